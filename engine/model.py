"""The hybrid character model on an OpenCL device: forward, backward, AdamW,
Hebbian and prototype rules, each step entirely in kernels (docs/model.md).

    python -m engine.train --set train.steps=50     # trains this model

Letters: B batch, S sequence, N = B·S, E embedding, H hidden, V vocab,
T prototypes. Parameters live in one flat buffer (and so do gradients and
Adam moments) in which every tensor starts at a multiple of CHUNK elements:
AdamW, the global norm and clipping are then one launch each over the
whole model, and per-tensor norms come from per-chunk partial sums.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import ops, optim
from .config import Config
from .params import char_lm_params, padded

CHUNK = 1024
PARAM_NAMES = tuple(p.name for p in char_lm_params(1, 1, 1))
DECAYED = {p.name for p in char_lm_params(1, 1, 1) if p.decay}  # weight decay: weights only, not biases


@dataclass(frozen=True)
class Layout:
    """Where each declared parameter (engine.params.ParamSpec) sits in the flat buffers
    (element offsets; every tensor starts at a multiple of CHUNK)."""
    specs: tuple
    shapes: dict      # as stored
    offsets: dict
    total: int

    @classmethod
    def build(cls, V: int, E: int, H: int) -> Layout:
        """W2 and b2 are stored with Vp = V rounded up to 8 columns (zero padding,
        which stays zero: its gradient is zero), so every product takes the
        vector GEMM path; get_params() and checkpoints show the (H,V), (V,) views."""
        return cls.of(char_lm_params(V, E, H))

    @classmethod
    def of(cls, specs) -> Layout:
        shapes, offsets, pos = {}, {}, 0
        for p in specs:
            shapes[p.name], offsets[p.name] = tuple(p.stored), pos
            pos += -(-int(np.prod(p.stored)) // CHUNK) * CHUNK
        return cls(tuple(specs), shapes, offsets, pos)

    @property
    def names(self) -> tuple:
        return tuple(p.name for p in self.specs)

    def size(self, name) -> int:
        return int(np.prod(self.shapes[name]))

    def chunk_owner(self) -> list[str]:
        """Parameter name of each CHUNK-sized piece of the flat buffer."""
        owner = []
        for name in self.names:
            owner += [name] * (-(-self.size(name) // CHUNK))
        return owner

    def decay_mask(self) -> np.ndarray:
        """1 for each chunk of a parameter that weight decay applies to, else 0."""
        decayed = {p.name for p in self.specs if p.decay}
        return np.array([name in decayed for name in self.chunk_owner()], np.float32)


def workspace_buffers(B, S, E, H, V, T) -> dict[str, tuple[tuple, type]]:
    """{attribute: (shape, dtype)} of every buffer a (B,S) Workspace allocates, in allocation
    order: what Workspace allocates and what the memory check (device_buffers) sizes."""
    N, Vp = B * S, padded(V)
    f, i = np.float32, np.int32
    fold = V < N  # see Workspace
    out = {"x": ((N,), i), "y": ((N,), i), "offsets": ((B,), i)}
    out.update({"EW": ((V, H), f), "D": ((V, H), f)} if fold else {"e": ((N, E), f), "de": ((N, E), f)})
    for name in ("a", "h", "s", "k"):
        out[name] = ((N, H), f)
    out["inv"] = ((N,), f)
    for name in ("G", "Gm", "Q"):
        out[name] = ((B, S, S), f)
    out.update(ht_buf=((N, H), f), z_buf=((N, H), f), scores=((N, T), f), inv_v=((N,), f),
               assign=((N,), i), logits=((N, Vp), f), dlogits=((N, Vp), f), loss_rows=((N,), f),
               hits=((N,), f), nv=((1,), i), loss_out=((4,), f))
    for name in ("dz", "dh", "da", "dK"):
        out[name] = ((N, H), f)
    out.update(perm=((N,), i), starts=((max(V, T) + 1,), i), qerr=((N,), f), fw_norm=((B,), f),
               spike_cols=((H,), f))
    return out


class Workspace:
    """Per-(B,S) activations and gradients, allocated once per shape (workspace_buffers)."""

    def __init__(self, dev, B, S, E, H, V, T):
        N = B * S
        self.B, self.S, self.N = B, S, N
        # The embedding folded into the first layer when that is less work (V < N, always for
        # characters at training sizes): a = (W_emb·W1)[x] and, from D[v] = Σ_{x_n=v} da[n],
        # dW1 = W_embᵀ·D and dW_emb = D·W1ᵀ: V·E·H multiply-adds each instead of N·E·H.
        self.fold = V < N
        self.e = self.de = self.EW = self.D = None
        for name, (shape, dtype) in workspace_buffers(B, S, E, H, V, T).items():
            # padding columns of dlogits are never written: keep them 0
            setattr(self, name, (dev.zeros if name == "dlogits" else dev.empty)(shape, dtype))
        self.ht = self.h  # set per forward: which buffer holds h̃ and z
        self.zz = self.h
        self.post = self.s


def model_buffers(V, E, H, T, optimizer: str = "adamw") -> dict[str, tuple[tuple, type]]:
    """{attribute: (shape, dtype)} of every buffer a Model allocates (flat parameters, gradients,
    the optimiser's state (engine.optim: Adam's moments or SGD's velocity) and the chunk tables;
    Hebbian and prototype state)."""
    n = Layout.build(V, E, H).total
    f = np.float32
    flat, chunks = ((n,), f), ((n // CHUNK,), f)
    return {"theta": flat, "grad": flat, **optim.optimizer_class(optimizer).buffers(n), "wd_mask": chunks,
            "partials": chunks, "gnorm": ((1,), f), "W_hebb": ((H, H), f), "P": ((T, H), f),
            "inv_p": ((T,), f), "psums": ((T, H), f), "usage": ((T,), f)}


def gemm_scratch(cfg: Config, V: int, B: int, S: int, variant: str = "cpu") -> dict[str, tuple[tuple, type]]:
    """The scratch buffers ops.gemm allocates (and keeps) for this model's products at (B,S):
    B transposed for trans_b products, K-split partials and packed A panels of trans_a ones.
    Lists the products of forward, backward, local_updates and telemetry that use scratch."""
    E, H, T = cfg.model.embedding_dim, cfg.model.hidden_dim, cfg.model.num_prototypes
    N, Vp, hm = B * S, padded(V), cfg.hebb.mode
    tn = [(N, H, Vp, 1)]                                   # (M, N, K, batch): dz = dlogits·W2ᵀ
    tn += [(N, T, H, 1)] if cfg.proto.mode != "off" else []   # scores = h̃·Pᵀ
    tn += [(N, H, H, 1)] if hm == "modulate" else []          # dh += dz·W_hebbᵀ
    tn += [(V, E, H, 1)] if V < N else [(N, E, H, 1)]         # dW_emb = D·W1ᵀ / de = da·W1ᵀ
    tn += [(S, S, H, B)] if hm == "fast_weights" else []      # telemetry Gram matrices
    tk = [(H, Vp, N), (E, H, V) if V < N else (E, H, N)]       # (M, N, K): dW2, dW1
    tk += [(H, H, N)] if hm in ("shadow", "modulate") else []   # Hebbian update
    tk += [(S, H, S)] if hm == "fast_weights" and B == 1 else []  # dK += Gmᵀ·k (split only if batch 1)
    bt = max(b * k * n for _, n, k, b in tn)
    partial = pack = 0
    for m, n, k in tk:
        kc = ops._k_chunk(k)
        if kc:
            partial = max(partial, k // kc * m * n)
            if variant != "gpu" and n >= m and m % 4 == 0 and n % 8 == 0 and k % 8 == 0:
                pack = max(pack, k * m)
    out = {"gemm_bt": ((bt,), np.float32)}
    out.update({"gemm_partial": ((partial,), np.float32)} if partial else {})
    out.update({"gemm_apack": ((pack,), np.float32)} if pack else {})
    return out


def device_buffers(cfg: Config, V: int, B: int, S: int, variant: str = "cpu") -> dict[str, tuple[tuple, type]]:
    """{name: (shape, dtype)} of everything a Model of cfg and its (B,S) Workspace put on the
    device (model.*, workspace.*, the decay table, ops.* scratch): for Device.check_memory."""
    E, H, T = cfg.model.embedding_dim, cfg.model.hidden_dim, cfg.model.num_prototypes
    out = {f"model.{k}": v for k, v in model_buffers(V, E, H, T, cfg.optim.name).items()}
    out.update({f"workspace.{k}": v for k, v in workspace_buffers(B, S, E, H, V, T).items()})
    if cfg.hebb.mode == "fast_weights":
        out["model.decay_table"] = ((S,), np.float32)
    out.update({f"ops.{k}": v for k, v in gemm_scratch(cfg, V, B, S, variant).items()})
    return out


def state_shapes(V, E, H, T, optimizer: str = "adamw") -> dict[str, tuple[tuple, type]]:
    """{name: (shape, dtype)} of what Model.state_arrays() returns (checkpoint sizes)."""
    f = np.float32
    prefixes = ("param", *optim.optimizer_class(optimizer).STATE)
    out = {f"{prefix}.{p.name}": (tuple(p.shape), f) for prefix in prefixes for p in char_lm_params(V, E, H)}
    out.update({"state.W_hebb": ((H, H), f), "state.P": ((T, H), f), "state.usage": ((T,), f)})
    return out


class Model:
    """Parameters, optimiser state and local state of one model on one device."""

    def __init__(self, dev, cfg: Config, vocab_size: int):
        self.dev, self.cfg = dev, cfg
        m = cfg.model
        self.V, self.E, self.H, self.T = vocab_size, m.embedding_dim, m.hidden_dim, m.num_prototypes
        self.Vp = padded(self.V)
        self.layout = Layout.build(self.V, self.E, self.H)
        self.n_chunks = self.layout.total // CHUNK
        buf = model_buffers(self.V, self.E, self.H, self.T, cfg.optim.name)   # what the memory check sized
        self.theta, self.grad = dev.zeros(*buf["theta"]), dev.zeros(*buf["grad"])
        self.opt = optim.optimizer_class(cfg.optim.name)(dev, cfg.optim, self.layout.total, CHUNK)
        self.wd_mask = dev.to_device(self.layout.decay_mask())
        self.partials, self.gnorm = dev.zeros(*buf["partials"]), dev.zeros(*buf["gnorm"])
        self.p = {name: self._view(self.theta, name) for name in self.layout.names}
        self.g = {name: self._view(self.grad, name) for name in self.layout.names}
        self.W_hebb = dev.zeros(*buf["W_hebb"])
        self.P = dev.zeros(*buf["P"])
        self.inv_p = dev.zeros(*buf["inv_p"])
        self.psums = dev.zeros(*buf["psums"])
        self.usage = dev.to_device(np.full(self.T, 1.0 / self.T, np.float32))
        self.proto_ready = cfg.proto.mode == "off"
        self.step = 0  # optimiser steps taken
        self._decay_w = {}
        self._ws = {}

    # -- buffers -----------------------------------------------------------------
    def _view(self, flat, name):
        import pyopencl.array as cla
        off, size = self.layout.offsets[name], self.layout.size(name)
        sub = flat.data.get_sub_region(off * 4, size * 4)
        return cla.Array(self.dev.queue, self.layout.shapes[name], np.float32, data=sub)

    def workspace(self, B, S) -> Workspace:
        ws = self._ws.get((B, S))
        if ws is None:
            ws = self._ws[(B, S)] = Workspace(self.dev, B, S, self.E, self.H, self.V, self.T)
        return ws

    def decay_table(self, S):
        """w[d] = η·λ^d for d < S, computed in float64 like the reference."""
        w = self._decay_w.get(S)
        if w is None:
            lam = 1.0 - self.cfg.hebb.decay
            host = (self.cfg.hebb.lr * lam ** np.arange(S, dtype=np.float64)).astype(np.float32)
            w = self._decay_w[S] = self.dev.to_device(host)
        return w

    # -- host <-> device -------------------------------------------------------------
    def set_params(self, params: dict):
        flat = np.zeros(self.layout.total, np.float32)
        self._pack(flat, params)
        self.theta.set(flat)

    def _pack(self, flat, arrays):
        for name in self.layout.names:
            o = self.layout.offsets[name]
            stored = np.zeros(self.layout.shapes[name], np.float32)
            a = np.asarray(arrays[name], np.float32)
            stored[tuple(slice(0, n) for n in a.shape)] = a  # W2, b2: zero padding columns
            flat[o:o + self.layout.size(name)] = stored.ravel()

    def _unpack(self, flat) -> dict:
        out = {}
        for p in self.layout.specs:   # the stored array, cut to the shape as seen (W2, b2: padding)
            o = self.layout.offsets[p.name]
            a = flat[o:o + self.layout.size(p.name)].reshape(p.stored)
            out[p.name] = a[tuple(slice(0, n) for n in p.shape)].copy()
        return out

    def get_params(self) -> dict:
        return self._unpack(self.theta.get())

    def get_grads(self) -> dict:
        return self._unpack(self.grad.get())

    def state_arrays(self) -> dict:
        """Everything a checkpoint needs from the device, as named host arrays."""
        out = {f"param.{k}": v for k, v in self.get_params().items()}
        for name, buf in self.opt.state.items():   # adam_m.*, adam_v.* (or sgd_velocity.*)
            out.update({f"{name}.{k}": v for k, v in self._unpack(buf.get()).items()})
        out["state.W_hebb"] = self.W_hebb.get()
        out["state.P"] = self.P.get()
        out["state.usage"] = self.usage.get()
        return out

    def load_state_arrays(self, arrays: dict):
        for prefix, flat_dev in (("param", self.theta), *self.opt.state.items()):
            flat = np.zeros(self.layout.total, np.float32)
            self._pack(flat, {k: arrays[f"{prefix}.{k}"] for k in self.layout.names})
            flat_dev.set(flat)
        self.W_hebb.set(np.ascontiguousarray(arrays["state.W_hebb"], np.float32))
        self.P.set(np.ascontiguousarray(arrays["state.P"], np.float32))
        self.usage.set(np.ascontiguousarray(arrays["state.usage"], np.float32))
        self.proto_ready = True

    # -- forward -------------------------------------------------------------------------
    def forward(self, ws: Workspace, fw_state=None, loss: bool = True):
        """Enqueue the forward pass on ws.x / ws.y; loss summary lands in ws.loss_out.
        fw_state: for generation (S = 1), the carried fast-weight matrix Aᵀ (H,H).
        loss=False stops at the logits (generation)."""
        dev, cfg, p = self.dev, self.cfg, self.p
        B, S, N, E, H, V, T = ws.B, ws.S, ws.N, self.E, self.H, self.V, self.T
        if ws.fold:  # see Workspace: the same sums per element as e·W1
            ops.gemm(dev, p["W_emb"], p["W1"], ws.EW, V, H, E)
            ops.embed_bias_gelu(dev, ws.EW, ws.x, p["b1"], ws.a, ws.h, N, H)
        else:
            ops.embedding_forward(dev, p["W_emb"], ws.x, ws.e, N, E)
            ops.gemm(dev, ws.e, p["W1"], ws.a, N, H, E)
            ops.bias_gelu_forward(dev, ws.a, p["b1"], ws.h, N, H)
        ops.spikes_forward(dev, ws.h, cfg.model.spike_threshold, ws.s, N, H)
        ws.post = ws.s if cfg.hebb.post == "spikes" else ws.h
        mode = cfg.hebb.mode
        if mode in ("off", "shadow"):
            ws.ht = ws.h
        elif mode == "modulate":
            ws.ht = ws.ht_buf
            dev.cl.enqueue_copy(dev.queue, ws.ht.data, ws.h.data)
            ops.gemm(dev, ws.h, self.W_hebb, ws.ht, N, H, H, alpha=cfg.hebb.strength, beta=1.0)
        else:  # fast_weights: causal linear attention (docs/model.md)
            ws.ht = ws.ht_buf
            ops.row_normalize_forward(dev, ws.h, ws.k, ws.inv, N, H)
            dev.cl.enqueue_copy(dev.queue, ws.ht.data, ws.h.data)
            if fw_state is not None:  # generation: m = A·k, i.e. k·Aᵀ with Aᵀ carried
                ops.gemm(dev, ws.k, fw_state, ws.ht, N, H, H, beta=1.0)
            else:
                ops.causal_dots_decay(dev, ws.k, ws.k, self.decay_table(S), ws.Gm, B, S, H, tmp=ws.G)
                ops.gemm(dev, ws.Gm, ws.post, ws.ht, S, H, S, beta=1.0, batch=B)
        pm = cfg.proto.mode
        ws.zz = ws.ht
        if pm != "off":
            self._assign(ws)
            if pm == "feature":
                ws.zz = ws.z_buf
                ops.proto_feature_forward(dev, ws.ht, self.P, ws.assign, cfg.proto.strength, ws.zz, N, H)
        Vp = self.Vp
        ops.gemm(dev, ws.zz, p["W2"], ws.logits, N, Vp, H)
        ops.add_bias(dev, ws.logits, p["b2"], N, Vp)
        if not loss:
            return
        ops.count_valid(dev, ws.y, N, ws.nv)
        ops.softmax_xent(dev, ws.logits, ws.y, ws.nv, ws.loss_rows, ws.hits, ws.dlogits, N, V, Vp)
        ops.loss_reduce(dev, ws.loss_rows, ws.hits, ws.nv, ws.loss_out, N)

    def _assign(self, ws):
        dev, N, H, T = self.dev, ws.N, self.H, self.T
        cosine = int(self.cfg.proto.similarity == "cosine")
        ops.gemm(dev, ws.ht, self.P, ws.scores, N, T, H, trans_b=True)
        if cosine:
            ops.row_inv_norm(dev, ws.ht, ws.inv_v, N, H)
            ops.row_inv_norm(dev, self.P, self.inv_p, T, H)
        ops.proto_argmax(dev, ws.scores, ws.inv_v, self.inv_p, ws.assign, N, T, cosine)

    def init_prototypes(self, ws: Workspace):
        """P from the data: k-means++ (or random rows) on h̃ of the batch in ws,
        after a forward pass with the current parameters. Once, on the host."""
        from .reference import kmeanspp_init
        self.forward(ws)
        v = ws.ht.get().reshape(ws.N, self.H)
        if self.cfg.proto.init == "kmeans++":
            P = kmeanspp_init(v, self.T, self.cfg.seed)
        else:
            rng = np.random.default_rng([self.cfg.seed, 2])
            P = v[rng.choice(ws.N, size=self.T, replace=ws.N < self.T)]
        self.P.set(np.ascontiguousarray(P, np.float32))
        self.proto_ready = True

    # -- backward ---------------------------------------------------------------------------
    def backward(self, ws: Workspace):
        """Enqueue gradients of the mean loss into the flat gradient buffer."""
        dev, cfg, p, g = self.dev, self.cfg, self.p, self.g
        B, S, N, E, H, V = ws.B, ws.S, ws.N, self.E, self.H, self.V
        Vp = self.Vp
        ops.gemm(dev, ws.zz, ws.dlogits, g["W2"], H, Vp, N, trans_a=True)
        ops.colsum(dev, ws.dlogits, g["b2"], N, Vp)
        ops.gemm(dev, ws.dlogits, p["W2"], ws.dz, N, H, Vp, trans_b=True)
        mode = cfg.hebb.mode
        dh = ws.dz  # dh̃ = dz: the prototype term is constant
        if mode == "modulate":
            dh = ws.dh
            dev.cl.enqueue_copy(dev.queue, dh.data, ws.dz.data)
            ops.gemm(dev, ws.dz, self.W_hebb, dh, N, H, H, alpha=cfg.hebb.strength, beta=1.0, trans_b=True)
        elif mode == "fast_weights":
            dh = ws.dh
            w = self.decay_table(S)
            ops.causal_dots_decay(dev, ws.dz, ws.post, w, ws.Gm, B, S, H, tmp=ws.Q)   # dG = decay(dM·Postᵀ)
            ops.gemm(dev, ws.Gm, ws.k, ws.dK, S, H, S, batch=B)
            ops.gemm(dev, ws.Gm, ws.k, ws.dK, S, H, S, beta=1.0, trans_a=True, batch=B)
            dev.cl.enqueue_copy(dev.queue, dh.data, ws.dz.data)
            ops.row_normalize_backward(dev, ws.dK, ws.k, ws.inv, dh, N, H)
        ops.gelu_backward(dev, dh, ws.a, ws.da, N, H)
        ops.bucket_sort(dev, ws.x, N, V, ws.starts, ws.perm)
        if ws.fold:  # D[v] = Σ_{x_n = v} da[n]; eᵀ·da = W_embᵀ·D, Σ_n de[n] over x_n = v is D·W1ᵀ
            ops.bucket_sums(dev, ws.da, ws.perm, ws.starts, ws.D, V, H)
            ops.colsum(dev, ws.D, g["b1"], V, H)
            ops.gemm(dev, p["W_emb"], ws.D, g["W1"], E, H, V, trans_a=True)
            ops.gemm(dev, ws.D, p["W1"], g["W_emb"], V, E, H, trans_b=True)
        else:
            ops.colsum(dev, ws.da, g["b1"], N, H)
            ops.gemm(dev, ws.e, ws.da, g["W1"], E, H, N, trans_a=True)
            ops.gemm(dev, ws.da, p["W1"], ws.de, N, E, H, trans_b=True)
            ops.embedding_backward(dev, ws.de, ws.perm, ws.starts, g["W_emb"], V, E)

    # -- updates ------------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        return optim.lr_at(self.cfg.optim, self.cfg.train.steps, step)

    def gradient_step(self, ws: Workspace) -> float:
        """Forward, backward and AdamW on the batch in ws (prototypes initialised
        from it first if needed); returns the learning rate used. The local
        rules follow with local_updates(ws), after any telemetry read."""
        if not self.proto_ready:
            self.init_prototypes(ws)
        lr = self.lr_at(self.step + 1)
        self.forward(ws)
        self.backward(ws)
        self.optimizer_step(lr)
        return lr

    def optimizer_step(self, lr: float):
        """Global norm (before clipping), then one step of the optimiser over every parameter."""
        self.step += 1
        ops.sumsq_chunks(self.dev, self.grad, self.partials, self.n_chunks, CHUNK)
        ops.global_norm(self.dev, self.partials, self.n_chunks, self.gnorm)
        self.opt.step(self.theta, self.grad, self.wd_mask, self.gnorm, self.step, lr)

    def local_updates(self, ws: Workspace):
        """Hebbian and prototype rules on this step's forward pass (after AdamW)."""
        dev, cfg, N, H, T = self.dev, self.cfg, ws.N, self.H, self.T
        if cfg.hebb.mode in ("shadow", "modulate"):
            ops.gemm(dev, ws.h, ws.post, self.W_hebb, H, H, N, alpha=cfg.hebb.lr / N,
                     beta=1.0 - cfg.hebb.decay, trans_a=True)
        if cfg.proto.mode != "off":
            pc = cfg.proto
            ops.bucket_sort(dev, ws.assign, N, T, ws.starts, ws.perm)
            ops.proto_sums(dev, ws.ht, ws.perm, ws.starts, self.psums, T, H)
            ops.proto_update(dev, self.P, self.psums, ws.starts, self.usage, ws.ht, pc.lr, pc.usage_decay,
                             pc.reseed_threshold, self.cfg.seed, self.step, N, T, H)
            ops.proto_usage_update(dev, self.usage, ws.starts, pc.usage_decay, pc.reseed_threshold, N, T)

    # -- telemetry (logging points only: these read the device) ------------------------------------
    def telemetry(self, ws: Workspace) -> dict:
        dev, cfg, N, H, T = self.dev, self.cfg, ws.N, self.H, self.T
        out = {}
        partials = self.partials.get().astype(np.float64)
        owner = self.layout.chunk_owner()
        for name in self.layout.names:
            out[f"grad_norm/{name}"] = float(np.sqrt(sum(p for p, o in zip(partials, owner) if o == name)))
        out["grad_norm"] = float(self.gnorm.get()[0])
        ops.colsum(dev, ws.s, ws.spike_cols, N, H)
        out["spike_rate"] = float(ws.spike_cols.get().astype(np.float64).sum() / (N * H))
        if cfg.hebb.mode == "fast_weights":
            S, B = ws.S, ws.B
            ops.gemm(dev, ws.k, ws.k, ws.G, S, S, H, trans_b=True, batch=B)        # the full Gram matrices
            ops.gemm(dev, ws.post, ws.post, ws.Q, S, S, H, trans_b=True, batch=B)
            ops.fw_state_norm(dev, ws.G, ws.Q, self.decay_table(S), ws.fw_norm, B, S)
            out["hebb_norm"] = float(ws.fw_norm.get().astype(np.float64).mean())
        else:
            out["hebb_norm"] = float(np.linalg.norm(self.W_hebb.get().astype(np.float64)))
        if cfg.proto.mode != "off":
            out.update(self.proto_telemetry(ws))
        return out

    def proto_telemetry(self, ws: Workspace) -> dict:
        """Counts of this forward pass's assignments (before any update re-sorted them)."""
        N, T = ws.N, self.T
        ops.proto_qerr_rows(self.dev, ws.ht, self.P, ws.assign, ws.qerr, N, self.H)
        counts = np.bincount(ws.assign.get(), minlength=T)
        q = counts / max(1, counts.sum())
        nz = q[q > 0]
        return {"proto_counts": counts.tolist(),
                "proto_perplexity": float(np.exp(-(nz * np.log(nz)).sum())),
                "proto_used": int((counts > 0).sum()), "proto_dead": int((counts == 0).sum()),
                "proto_qerr": float(ws.qerr.get().astype(np.float64).mean())}
