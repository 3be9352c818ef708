"""The engine's memory network (engine/models/memnet.py) in PyTorch: the twin it is held against
for equality (tests/test_torch_memnet.py) and speed (benchmarks/speed.py, `--wirings memnet`).

    Embedding → q = GELU(e·W_q + b_q) → a = softmax(q·Kᵀ), read = a·Vals (memnet.memory=false:
    read = q) → torch.nn.GRU (memnet.gru_layers, batch_first) → GELU(Linear) → dropout →
    Linear → GELU (memnet.logit_gelu) → cross-entropy (mean over non-PAD targets)

with the engine's parameters loaded by name (`from_engine`): the GRU's W_i (I, 3Hd) [r | z | n] and
W_h (Hd, 3Hd) are nn.GRU's weight_ih_l{l}ᵀ and weight_hh_l{l}ᵀ (the same gate order), the biases as
they are; the head's W (Hd, Vp) and b (Vp) are cut to V. After each optimiser step the memory's
local write runs as engine/layers/memory.py's (torch.no_grad): mean — every slot pulled towards
the batch's normalised mean query (keys) and mean u = logits·W_u (values); slot — each arg-max
slot towards its rows' mean; none. normalise(v) = v/√(|v|² + 1e-6). AdamW as engine/optim.py
(decoupled decay on 2-D tensors, clipping by the global norm before any clipping, the engine's
schedule). Dropout is torch's: runs equal the engine's only at memnet.dropout = 0. torch is
optional: imported on first use.
"""
from __future__ import annotations

import os

import numpy as np

torch = F = None
PAD = -1
MEM_EPS = 1e-6


def _import_torch():
    global torch, F
    if torch is None:
        import torch as _torch
        import torch.nn.functional as _F
        torch, F = _torch, _F
    return torch


def engine_init(cfg, V: int) -> dict:
    """The engine's declared initial parameters (engine.params.init_params of the family)."""
    from engine.model import model_layers, param_specs
    from engine.params import init_params
    return init_params(param_specs(model_layers(cfg, V)), cfg.seed)


def engine_decay(cfg, V: int) -> dict:
    """{engine name: whether weight decay applies} (engine.params.ParamSpec.decay)."""
    from engine.model import model_layers, param_specs
    return {sp.name: sp.decay for sp in param_specs(model_layers(cfg, V))}


class TorchMemnet:
    """One model: parameters (engine names, engine layouts except the GRU's), AdamW, the step."""

    def __init__(self, cfg, vocab_size: int, params: dict | None = None, threads: int | None = None,
                 device: str = "cpu", W_u: np.ndarray | None = None):
        _import_torch()
        torch.set_num_threads(threads or os.cpu_count() or 1)
        self.cfg, self.mc, self.V = cfg, cfg.memnet, vocab_size
        self.device = torch.device(device)
        params = engine_init(cfg, vocab_size) if params is None else params
        self.p = {k: torch.tensor(np.ascontiguousarray(np.asarray(v, np.float32)), device=self.device)
                  .requires_grad_(True) for k, v in params.items()}
        mc = self.mc
        self.gru = torch.nn.GRU(mc.memory_dim, mc.hidden_dim, mc.gru_layers,
                                batch_first=True).to(self.device)
        self._load_gru()
        if W_u is None:
            from engine.params import padded
            from engine.reference.memory import value_projection
            W_u = value_projection(vocab_size, padded(vocab_size), mc.memory_dim, cfg.seed)
        self.W_u = torch.tensor(np.asarray(W_u, np.float32)[:vocab_size], device=self.device)
        o = cfg.optim
        decay = engine_decay(cfg, vocab_size)
        tensors = list(self.p.items()) + [(e + n, getattr(self.gru, f"{t}_l{l}")) for l, e in self._gru_names()
                                          for n, t in (("W_i", "weight_ih"), ("W_h", "weight_hh"),
                                                       ("b_i", "bias_ih"), ("b_h", "bias_hh"))]
        decayed = [v for k, v in tensors if decay[k]]
        plain = [v for k, v in tensors if not decay[k]]
        self.opt = torch.optim.AdamW([{"params": decayed, "weight_decay": o.weight_decay},
                                      {"params": plain, "weight_decay": 0.0}],
                                     lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
        self.step = 0
        self.gnorm = torch.zeros((), device=self.device)

    def _gru_names(self):
        for l in range(self.mc.gru_layers):
            yield l, f"gru{l}."

    def _load_gru(self):
        with torch.no_grad():
            for l, e in self._gru_names():
                getattr(self.gru, f"weight_ih_l{l}").copy_(self.p.pop(e + "W_i").detach().T)
                getattr(self.gru, f"weight_hh_l{l}").copy_(self.p.pop(e + "W_h").detach().T)
                getattr(self.gru, f"bias_ih_l{l}").copy_(self.p.pop(e + "b_i").detach())
                getattr(self.gru, f"bias_hh_l{l}").copy_(self.p.pop(e + "b_h").detach())

    def _as_engine(self, get) -> dict:
        out = {k: get(v).detach().cpu().numpy().copy() for k, v in self.p.items()}
        for l, e in self._gru_names():
            out[e + "W_i"] = get(getattr(self.gru, f"weight_ih_l{l}")).detach().cpu().numpy().T.copy()
            out[e + "W_h"] = get(getattr(self.gru, f"weight_hh_l{l}")).detach().cpu().numpy().T.copy()
            out[e + "b_i"] = get(getattr(self.gru, f"bias_ih_l{l}")).detach().cpu().numpy().copy()
            out[e + "b_h"] = get(getattr(self.gru, f"bias_hh_l{l}")).detach().cpu().numpy().copy()
        return out

    def params_as_engine(self) -> dict:
        return self._as_engine(lambda q: q)

    def grads_as_engine(self) -> dict:
        return self._as_engine(lambda q: q.grad if q.grad is not None else torch.zeros_like(q))

    def lr_at(self, step: int) -> float:
        from engine.optim import lr_at
        return lr_at(self.cfg.optim, self.cfg.train.steps, step)

    def _ids(self, a):
        if not isinstance(a, torch.Tensor):
            a = torch.from_numpy(np.ascontiguousarray(a, np.int64))
        return a.long().to(self.device)

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, x, training: bool = True):
        """x (B,S) -> (logits (B,S,V), q (B,S,M), a (B,S,Ms) or None)."""
        p, mc, V = self.p, self.mc, self.V
        e = F.embedding(self._ids(x), p["emb.W_emb"])
        q = F.gelu(e @ p["mem.W_q"] + p["mem.b_q"], approximate="none")
        a = None
        if mc.memory:
            a = torch.softmax(q @ p["mem.K"].T, dim=-1)
            read = a @ p["mem.Vals"]
        else:
            read = q
        h, _ = self.gru(read)
        z = F.gelu(h @ p["fc.W"] + p["fc.b"], approximate="none")
        if training and mc.dropout > 0:
            z = F.dropout(z, mc.dropout, True)
        logits = z @ p["head.W"][:, :V] + p["head.b"][:V]
        if mc.logit_gelu:
            logits = F.gelu(logits, approximate="none")
        return logits, q, a

    def loss(self, x, y, training: bool = True):
        logits, q, a = self.forward(x, training)
        yv = self._ids(y).reshape(-1)
        total = F.cross_entropy(logits.reshape(-1, self.V), yv, ignore_index=PAD, reduction="sum")
        return total / (yv != PAD).sum().clamp(min=1), (logits, q, a)

    # -- one training step ------------------------------------------------------------------------
    def backward(self, x, y):
        self.opt.zero_grad(set_to_none=True)
        loss, self._cache = self.loss(x, y)
        loss.backward()
        return loss

    def optimizer_step(self, lr: float):
        """Clipping and AdamW as engine/optim.py (the transformer twin's clipped_step)."""
        from .torch_transformer import clipped_step
        self.gnorm = clipped_step(self.opt, list(self.p.values()) + list(self.gru.parameters()), self.cfg.optim, lr)
        self.step += 1

    def write(self):
        """The memory's local write on the last forward (engine/layers/memory.py), no gradient."""
        mc = self.mc
        if not mc.memory or mc.write_mode == "none":
            return
        logits, q, a = self._cache
        with torch.no_grad():
            q = q.reshape(-1, q.shape[-1])
            u = logits.reshape(-1, logits.shape[-1]) @ self.W_u
            slot = a.reshape(-1, a.shape[-1]).argmax(dim=1)
            for name, v in (("mem.K", q), ("mem.Vals", u)):
                mem = self.p[name]
                Ms = mem.shape[0]
                if mc.write_mode == "mean":
                    sums, counts = v.sum(dim=0).expand(Ms, -1), torch.full((Ms,), v.shape[0], device=v.device)
                else:
                    sums = torch.zeros((Ms, v.shape[1]), device=v.device).index_add_(0, slot, v)
                    counts = torch.bincount(slot, minlength=Ms)
                hit = counts > 0
                t = sums[hit] / counts[hit, None]
                t = t / torch.sqrt((t * t).sum(dim=1, keepdim=True) + MEM_EPS)
                new = (1 - mc.write_strength) * mem[hit] + mc.write_strength * t
                mem[hit] = new / torch.sqrt((new * new).sum(dim=1, keepdim=True) + MEM_EPS)

    def train_step(self, x, y, lr: float, return_loss: bool = False):
        loss = self.backward(x, y)
        self.optimizer_step(lr)
        self.write()
        return float(loss.item()) if return_loss else loss.detach()
