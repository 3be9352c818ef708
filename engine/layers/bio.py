"""BioAssociative: spikes, the Hebbian memory and the prototypes of one bio-associative
layer (docs/model.md). h (N,H) -> z (N,H):

  s  = 1[h > θ]                                   spikes; post = s (or h: hebb.post=activity)
  h̃  = h                                          hebb.mode off, shadow (W_hebb learned, not read)
     = h + α·h·W_hebb                             modulate (W_hebb from the Hebbian rule)
     = h + m,  m_t = A_{t−1}·k_t, k = h/|h|       fast_weights; A by the sum rule (causal linear
                                                  attention) or the delta rule (hebb.rule)
  h̃ ← LayerNorm(h̃)                               hebb.norm = layernorm (γ, β learned)
  a  = argmax_t sim(h̃, P_t)                       prototypes (on h for proto.mode = key)
  z  = h̃ + β·P_a (feature) | h̃ + U_a (token: U learned) | h̃ (off, shadow, key)

prenorm (a transformer's in-block hybrid with transformer.branch = prenorm): the layer reads
the stream x through its own LayerNorm, h = LN(x) (γ, β only with bias, eps 1e-5), runs the
maths above on h and returns x + (z − h): what it adds lands on the un-normalised stream, as a
pre-LayerNorm block's branch, while the spikes, keys and prototypes see unit-scale rows.

proto.mode = key: the memory is addressed by the assigned prototype, k = P̂_a, instead of h
(assignments and the k-means rule then work on h). The local rules (local_update) run after
the optimiser step: W_hebb ← (1−decay)·W_hebb + lr/N·hᵀ·post (shadow, modulate), then one
online k-means step on P with usage tracking and re-seeding. Reference:
engine.reference.layers.BioAssociative.
"""
from __future__ import annotations

import numpy as np

from .. import ops
from ..params import ParamSpec
from . import Layer, StateSpec, f32, i32
from .norm import affine


class BioAssociative(Layer):
    kind = "bio"
    needs_warm_start = True

    def __init__(self, name, prefix="", H=1, T=1, hebb=None, proto=None, spike_threshold=0.5, seed=0,
                 tprefix="", prenorm=False, bias=False):
        super().__init__(name, prefix)
        self.prenorm, self.pre_bias = prenorm, bias
        self.H, self.T, self.hebb, self.proto = H, T, hebb, proto
        self.theta, self.seed, self.tprefix = spike_threshold, seed, tprefix
        self.fast = hebb.mode == "fast_weights"
        self.delta = self.fast and hebb.rule == "delta"
        self.norm = hebb.norm == "layernorm"
        self.pm = proto.mode
        self.key_mode = self.pm == "key"
        # which buffer holds h̃ before the norm: the input itself when nothing is added to it
        self.adds = hebb.mode in ("modulate", "fast_weights")

    # -- declarations ------------------------------------------------------------------
    def params(self):
        p, H, T = self.prefix, self.H, self.T
        out = []
        if self.norm:
            out += affine(p + "hebb_ln.", H)
        if self.pm == "token":   # the assigned prototype's learned embedding
            out += [ParamSpec(p + "proto_emb", (T, H), init="normal", scale=0.1, decay=True)]
        if self.prenorm:
            out += [ParamSpec(p + "pre_ln.gamma", (H,), init="ones", decay=False)]
            out += [ParamSpec(p + "pre_ln.beta", (H,), init="zeros", decay=False)] if self.pre_bias else []
        return out

    @property
    def zeroed(self):
        return ("pre_beta0",) if self.prenorm and not self.pre_bias else ()

    def state(self):
        p, H, T = self.prefix, self.H, self.T
        return [StateSpec(p + "W_hebb", (H, H)), StateSpec(p + "P", (T, H)), StateSpec(p + "usage", (T,), fill=1.0 / T),
                StateSpec(p + "inv_p", (T,), checkpoint=False), StateSpec(p + "psums", (T, H), checkpoint=False)]

    def buffers(self, B, S):
        N, H, T = B * S, self.H, self.T
        out = {"s": ((N, H), f32), "spike_cols": ((H,), f32)}
        if self.adds:
            out.update(ht=((N, H), f32), dh=((N, H), f32))
        if self.fast:
            out.update(k=((N, H), f32), inv=((N,), f32), dK=((N, H), f32), decay=((S,), f32),
                       G=((B, S, S), f32), Q=((B, S, S), f32), fw_norm=((B,), f32))
            if self.delta:
                out.update(m=((N, H), f32))
                out.update({f"delta_{k}": v for k, v in ops.delta_scratch(B, S, H).items()})   # gm, dgm, u
            else:
                out.update(Gm=((B, S, S), f32))
        if self.norm:
            out.update(hn=((N, H), f32), ln_mean=((N,), f32), ln_rstd=((N,), f32), du=((N, H), f32))
        if self.pm != "off":
            out.update(scores=((N, T), f32), inv_v=((N,), f32), assign=((N,), i32), perm=((N,), i32),
                       starts=((T + 1,), i32), qerr=((N,), f32))
        if self.key_mode:
            out.update(pk=((N, H), f32))
        if self.pm in ("feature", "token"):
            out.update(z=((N, H), f32))
        if self.prenorm:
            out.update(pre_ln=((N, H), f32), pre_mean=((N,), f32), pre_rstd=((N,), f32), pre_out=((N, H), f32),
                       pre_dln=((N, H), f32), pre_dx=((N, H), f32))
            out.update({} if self.pre_bias else {"pre_beta0": ((H,), f32), "pre_dbeta": ((H,), f32)})
        return out

    def products(self, B, S):
        N, H, T = B * S, self.H, self.T
        tn = [(N, T, H, 1)] if self.pm != "off" else []           # scores = v·Pᵀ
        tn += [(N, H, H, 1)] if self.hebb.mode == "modulate" else []   # dh += dh̃·W_hebbᵀ
        tn += [(S, S, H, B)] if self.fast else []                  # telemetry Gram matrices
        tk = [(H, H, N)] if self.hebb.mode in ("shadow", "modulate") else []   # the Hebbian update
        tk += [(S, H, S)] if self.fast and not self.delta and B == 1 else []   # dK += Gmᵀ·k
        return tn, tk

    # -- forward ------------------------------------------------------------------------
    def decay_table(self, c):
        """w[d] = η·λ^d for d < S, computed in float64 like the reference (once per workspace)."""
        if not c.decay_ready:
            lam = 1.0 - self.hebb.decay
            c.b.decay.set((self.hebb.lr * lam ** np.arange(c.S, dtype=np.float64)).astype(np.float32))
            c.decay_ready = True
        return c.b.decay

    def forward(self, c, x):
        if not self.prenorm:
            return self._forward(c, x)
        b, N, H = c.b, c.N, self.H
        beta = c.p["pre_ln.beta"] if self.pre_bias else b.pre_beta0
        ops.layernorm_forward(c.dev, x, c.p["pre_ln.gamma"], beta, b.pre_ln, b.pre_mean, b.pre_rstd, N, H, vec=True)
        c.pre_x = x
        z = self._forward(c, b.pre_ln)
        ops.add_branch(c.dev, x, z, b.pre_ln, b.pre_out, N * H)
        return b.pre_out

    def _forward(self, c, h):
        dev, b, st, N, H, hc = c.dev, c.b, c.st, c.N, self.H, self.hebb
        B, S = c.B, c.S
        ops.spikes_forward(dev, h, self.theta, b.s, N, H)
        post = b.s if hc.post == "spikes" else h
        c.h_in, c.post = h, post
        if self.key_mode:
            self._assign(c, h)
            ops.embedding_forward(dev, st["P"], b.assign, b.pk, N, H)   # the assigned prototype's row
        ht = h
        if hc.mode == "modulate":
            ht = b.ht
            dev.cl.enqueue_copy(dev.queue, ht.data, h.data)
            ops.gemm(dev, h, st["W_hebb"], ht, N, H, H, alpha=hc.strength, beta=1.0)
        elif self.fast:   # causal linear attention (docs/model.md)
            ht = b.ht
            ops.row_normalize_forward(dev, b.pk if self.key_mode else h, b.k, b.inv, N, H)
            dev.cl.enqueue_copy(dev.queue, ht.data, h.data)
            if c.fw_state is not None:   # generation: m = A·k, i.e. k·Aᵀ with Aᵀ carried
                ops.gemm(dev, b.k, c.fw_state, ht, N, H, H, beta=1.0)
            elif self.delta:
                ops.fast_weights_delta_forward(dev, b.k, post, hc.lr, 1.0 - hc.decay, b.m, B, S, H,
                                               self._delta_scratch(b))
                ops.add_inplace(dev, b.m, ht, N * H)
            else:
                ops.causal_dots_decay(dev, b.k, b.k, self.decay_table(c), b.Gm, B, S, H, tmp=b.G)
                ops.gemm(dev, b.Gm, post, ht, S, H, S, beta=1.0, batch=B)
        c.u = ht
        if self.norm:
            ops.layernorm_forward(dev, ht, c.p["hebb_ln.gamma"], c.p["hebb_ln.beta"], b.hn, b.ln_mean, b.ln_rstd, N, H)
            ht = b.hn
        c.ht = ht
        z = ht
        if self.pm not in ("off", "key"):
            self._assign(c, ht)
            if self.pm == "feature":
                z = b.z
                ops.proto_feature_forward(dev, ht, st["P"], b.assign, self.proto.strength, z, N, H)
            elif self.pm == "token":
                z = b.z
                ops.proto_feature_forward(dev, ht, c.p["proto_emb"], b.assign, 1.0, z, N, H)
        return z

    def _delta_scratch(self, b):
        return {k[len("delta_"):]: getattr(b, k) for k in vars(b) if k.startswith("delta_")}

    def assigned_to(self, c):
        """The vectors the prototypes cluster: h̃ (h for proto.mode = key)."""
        return c.h_in if self.key_mode else c.ht

    def _assign(self, c, v):
        dev, b, st, N, H, T = c.dev, c.b, c.st, c.N, self.H, self.T
        cosine = int(self.proto.similarity == "cosine")
        ops.gemm(dev, v, st["P"], b.scores, N, T, H, trans_b=True)
        if cosine:
            ops.row_inv_norm(dev, v, b.inv_v, N, H)
            ops.row_inv_norm(dev, st["P"], st["inv_p"], T, H)
        ops.proto_argmax(dev, b.scores, b.inv_v, st["inv_p"], b.assign, N, T, cosine)

    def warm_start(self, c):
        """P from the data: k-means++ (or random rows) on this forward's assigned vectors,
        once, on the host. The first layer draws with the run's seed (as always)."""
        if self.pm == "off":
            return
        from ..reference import kmeanspp_init
        v = self.assigned_to(c).get().reshape(c.N, self.H)
        if self.proto.init == "kmeans++":
            P = kmeanspp_init(v, self.T, self.seed)
        else:
            rng = np.random.default_rng([self.seed, 2])
            P = v[rng.choice(c.N, size=self.T, replace=c.N < self.T)]
        c.st["P"].set(np.ascontiguousarray(P, np.float32))

    # -- backward ------------------------------------------------------------------------
    def backward(self, c, dout):
        """prenorm: dx = dout + LN'ᵀ(dh − dout), dh the maths' gradient at h = LN(x) of dz = dout."""
        if not self.prenorm:
            return self._backward(c, dout)
        b, g, N, H = c.b, c.g, c.N, self.H
        dh = self._backward(c, dout)
        ops.sub_into(c.dev, dh, dout, b.pre_dln, N * H)
        dbeta = g["pre_ln.beta"] if self.pre_bias else b.pre_dbeta
        ops.layernorm_backward(c.dev, b.pre_dln, c.pre_x, c.p["pre_ln.gamma"], b.pre_mean, b.pre_rstd, b.pre_dx,
                               g["pre_ln.gamma"], dbeta, N, H, vec=True, dres=dout)
        return b.pre_dx

    def _backward(self, c, dz):
        """dh̃ = dz (the prototype term is constant in h̃); post and the assignments are
        constants for backprop; for token, dU_t = Σ_{a_n = t} dz_n."""
        dev, b, st, N, H, hc = c.dev, c.b, c.st, c.N, self.H, self.hebb
        B, S = c.B, c.S
        if self.pm == "token":
            ops.bucket_sort(dev, b.assign, N, self.T, b.starts, b.perm)
            ops.embedding_backward(dev, dz, b.perm, b.starts, c.g["proto_emb"], self.T, H)
        dht = dz
        if self.norm:
            ops.layernorm_backward(dev, dht, c.u, c.p["hebb_ln.gamma"], b.ln_mean, b.ln_rstd, b.du,
                                   c.g["hebb_ln.gamma"], c.g["hebb_ln.beta"], N, H)
            dht = b.du
        if hc.mode == "modulate":
            dh = b.dh
            dev.cl.enqueue_copy(dev.queue, dh.data, dht.data)
            ops.gemm(dev, dht, st["W_hebb"], dh, N, H, H, alpha=hc.strength, beta=1.0, trans_b=True)
            return dh
        if not self.fast:
            return dht
        dh = b.dh
        if self.delta:
            ops.fast_weights_delta_backward(dev, dht, b.k, hc.lr, 1.0 - hc.decay, b.dK, B, S, H,
                                            self._delta_scratch(b))
        else:
            w = self.decay_table(c)
            ops.causal_dots_decay(dev, dht, c.post, w, b.Gm, B, S, H, tmp=b.Q)   # dG = decay(dM·Postᵀ)
            ops.gemm(dev, b.Gm, b.k, b.dK, S, H, S, batch=B)
            ops.gemm(dev, b.Gm, b.k, b.dK, S, H, S, beta=1.0, trans_a=True, batch=B)
        dev.cl.enqueue_copy(dev.queue, dh.data, dht.data)
        if not self.key_mode:   # keys from P are constants
            ops.row_normalize_backward(dev, b.dK, b.k, b.inv, dh, N, H)
        return dh

    # -- local rules ----------------------------------------------------------------------
    def local_update(self, c):
        dev, b, st, N, H, T, hc = c.dev, c.b, c.st, c.N, self.H, self.T, self.hebb
        if hc.mode in ("shadow", "modulate"):
            ops.gemm(dev, c.h_in, c.post, st["W_hebb"], H, H, N, alpha=hc.lr / N, beta=1.0 - hc.decay, trans_a=True)
        if self.pm != "off":
            pc = self.proto
            v = self.assigned_to(c)
            ops.bucket_sort(dev, b.assign, N, T, b.starts, b.perm)
            ops.proto_sums(dev, v, b.perm, b.starts, st["psums"], T, H)
            ops.proto_update(dev, st["P"], st["psums"], b.starts, st["usage"], v, pc.lr, pc.usage_decay,
                             pc.reseed_threshold, self.seed, c.model.step, N, T, H)
            ops.proto_usage_update(dev, st["usage"], b.starts, pc.usage_decay, pc.reseed_threshold, N, T)

    def local_reads(self, c) -> list:
        out = [c.h_in, c.post] if self.hebb.mode in ("shadow", "modulate") else []
        return out + ([self.assigned_to(c), c.b.assign] if self.pm != "off" else [])

    # -- telemetry (logging points only: these read the device) -----------------------------
    def telemetry(self, c) -> dict:
        dev, b, st, N, H = c.dev, c.b, c.st, c.N, self.H
        out = {}
        ops.colsum(dev, b.s, b.spike_cols, N, H)
        out["spike_rate"] = float(b.spike_cols.get().astype(np.float64).sum() / (N * H))
        if self.fast:   # |A_{S−1}|_F per sequence from the Gram matrices; A = Σ w·u_τ k_τᵀ with
            S, B = c.S, c.B   # u = post (sum rule) or u = post − m (delta rule, kept by its forward)
            u = b.delta_u if self.delta else c.post
            ops.gemm(dev, b.k, b.k, b.G, S, S, H, trans_b=True, batch=B)        # the full Gram matrices
            ops.gemm(dev, u, u, b.Q, S, S, H, trans_b=True, batch=B)
            ops.fw_state_norm(dev, b.G, b.Q, self.decay_table(c), b.fw_norm, B, S)
            out["hebb_norm"] = float(b.fw_norm.get().astype(np.float64).mean())
        else:
            out["hebb_norm"] = float(np.linalg.norm(st["W_hebb"].get().astype(np.float64)))
        if self.pm != "off":
            out.update(self.proto_telemetry(c))
        return {self.tprefix + k: v for k, v in out.items()}

    def proto_telemetry(self, c) -> dict:
        """Counts of this forward pass's assignments (before any update re-sorted them)."""
        b, st, N, T = c.b, c.st, c.N, self.T
        ops.proto_qerr_rows(c.dev, self.assigned_to(c), st["P"], b.assign, b.qerr, N, self.H)
        counts = np.bincount(b.assign.get(), minlength=T)
        q = counts / max(1, counts.sum())
        nz = q[q > 0]
        return {"proto_counts": counts.tolist(),
                "proto_perplexity": float(np.exp(-(nz * np.log(nz)).sum())),
                "proto_used": int((counts > 0).sum()), "proto_dead": int((counts == 0).sum()),
                "proto_qerr": float(b.qerr.get().astype(np.float64).mean())}
