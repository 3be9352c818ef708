"""The hybrid character model of docs/model.md in PyTorch (float32; CPU, or a GPU through
torch.cuda, which ROCm builds also use): the baseline the OpenCL engine is benchmarked
against (benchmarks/speed.py).

    python -c "from benchmarks.torch_model import TorchHybrid"      # needs torch (optional)

Same parameters (engine.reference.init_params), same wirings, same AdamW with
clipping, same Hebbian and prototype rules as engine/model.py, so the first
training step's loss matches the engine's (on the CPU; tests/test_bench.py). On a GPU
(`device="cuda"`) every tensor lives there and nothing is read back in a step. Gradients come from autograd; the
local rules run under torch.no_grad(). Letters: B batch, S sequence, N = B·S,
E embedding, H hidden, V vocabulary, T prototypes.

torch is an optional dependency of the project: only this module imports it.
"""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

from engine.config import Config
from engine.reference import DECAYED, NORM_EPS, PAD, hash_u32, init_params, kmeanspp_init

PARAM_NAMES = ("W_emb", "W1", "b1", "W2", "b2")


def _decay_matrix(S: int, eta: float, lam: float) -> np.ndarray:
    """C (S,S): η·λ^(t−1−τ) for τ < t else 0, in float64 rounded once (as the reference)."""
    t = np.arange(S)[:, None]
    tau = np.arange(S)[None, :]
    C = np.where(tau < t, eta * np.power(float(lam), np.maximum(t - 1 - tau, 0)), 0.0)
    return C.astype(np.float32)


class TorchHybrid:
    """One model: Adam parameters, optimiser, Hebbian matrix, prototypes and their usage."""

    def __init__(self, cfg: Config, vocab_size: int, params: dict | None = None, threads: int | None = None,
                 device: str = "cpu"):
        torch.set_num_threads(threads or os.cpu_count() or 1)
        self.cfg = cfg
        self.device = dev = torch.device(device)
        m, o = cfg.model, cfg.optim
        self.V, self.E, self.H, self.T = vocab_size, m.embedding_dim, m.hidden_dim, m.num_prototypes
        if params is None:
            params = init_params(self.V, self.E, self.H, cfg.seed)
        self.p = {name: torch.tensor(np.asarray(params[name], np.float32), device=dev).requires_grad_(True)
                  for name in PARAM_NAMES}
        decayed = [self.p[n] for n in PARAM_NAMES if n in DECAYED]
        plain = [self.p[n] for n in PARAM_NAMES if n not in DECAYED]
        self.opt = torch.optim.AdamW([{"params": decayed, "weight_decay": o.weight_decay},
                                      {"params": plain, "weight_decay": 0.0}],
                                     lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=True)
        self.W_hebb = torch.zeros(self.H, self.H, device=dev)          # buffers, not parameters
        self.P = torch.zeros(self.T, self.H, device=dev)
        self.usage = torch.full((self.T,), 1.0 / self.T, device=dev)
        self.proto_ready = cfg.proto.mode == "off"
        self.step = 0                                                  # optimiser steps taken
        self.gnorm = torch.zeros((), device=dev)                       # last global norm (before clipping)
        self._C = {}

    # -- helpers ------------------------------------------------------------------------
    def _ids(self, a) -> torch.Tensor:
        if not isinstance(a, torch.Tensor):
            a = torch.from_numpy(np.ascontiguousarray(a, np.int64))
        return a.long().to(self.device)

    def decay_matrix(self, S: int) -> torch.Tensor:
        C = self._C.get(S)
        if C is None:
            hc = self.cfg.hebb
            C = self._C[S] = torch.from_numpy(_decay_matrix(S, hc.lr, 1.0 - hc.decay)).to(self.device)
        return C

    def get_params(self) -> dict:
        return {k: v.detach().cpu().numpy().copy() for k, v in self.p.items()}

    def lr_at(self, step: int) -> float:
        """The engine's schedule (engine.optim.lr_at)."""
        from engine.optim import lr_at
        return lr_at(self.cfg.optim, self.cfg.train.steps, step)

    # -- forward ------------------------------------------------------------------------
    def forward(self, x, y=None) -> tuple[torch.Tensor | None, dict]:
        """x, y (B,S) ids -> (mean loss over non-PAD targets or None, cache of the local rules)."""
        cfg, p = self.cfg, self.p
        x = self._ids(x)
        B, S = x.shape
        N, H = B * S, self.H
        e = F.embedding(x.reshape(-1), p["W_emb"])                     # (N,E)
        a = e @ p["W1"] + p["b1"]                                      # (N,H)
        h = F.gelu(a, approximate="none")
        hd = h.detach()
        s = (hd > cfg.model.spike_threshold).float()                   # spikes: no gradient
        post = s if cfg.hebb.post == "spikes" else hd
        mode = cfg.hebb.mode
        if mode == "modulate":
            ht = h + cfg.hebb.strength * (h @ self.W_hebb)             # W_hebb constant for backprop
        elif mode == "fast_weights":                                   # causal linear attention per sequence
            k = h / torch.sqrt((h * h).sum(dim=1, keepdim=True) + NORM_EPS)
            K = k.reshape(B, S, H)
            G = torch.bmm(K, K.transpose(1, 2))                        # (B,S,S)
            Gm = G * self.decay_matrix(S)
            M = torch.bmm(Gm, post.reshape(B, S, H))                   # post constant for backprop
            ht = h + M.reshape(N, H)
        else:                                                          # off, shadow
            ht = h
        pm = cfg.proto.mode
        assign = None
        z = ht
        if pm != "off":
            with torch.no_grad():
                v = ht.detach()
                sim = v @ self.P.T                                     # (N,T)
                if cfg.proto.similarity == "cosine":
                    nv = torch.sqrt((v * v).sum(dim=1) + NORM_EPS)
                    nP = torch.sqrt((self.P * self.P).sum(dim=1) + NORM_EPS)
                    sim = sim / (nv[:, None] * nP[None, :])
                assign = torch.argmax(sim, dim=1)                      # first maximum on ties
            if pm == "feature":
                z = ht + cfg.proto.strength * self.P[assign]           # P, assign constant for backprop
        cache = {"N": N, "h": hd, "post": post, "ht": ht.detach(), "assign": assign}
        if y is None:
            return None, cache
        logits = z @ p["W2"] + p["b2"]                                 # (N,V)
        yv = self._ids(y).reshape(-1)
        nv = (yv != PAD).sum().clamp(min=1)                            # loss 0 when every target is PAD
        loss = F.cross_entropy(logits, yv, ignore_index=PAD, reduction="sum") / nv
        return loss, cache

    def init_prototypes(self, x):
        """P by k-means++ (or random rows, proto.init) on h̃ of this batch with the current parameters."""
        with torch.no_grad():
            _, cache = self.forward(x)
        v = cache["ht"].cpu().numpy()
        if self.cfg.proto.init == "kmeans++":
            P = kmeanspp_init(v, self.T, self.cfg.seed)
        else:
            rng = np.random.default_rng([self.cfg.seed, 2])
            P = v[rng.choice(v.shape[0], size=self.T, replace=v.shape[0] < self.T)]
        self.P = torch.from_numpy(np.ascontiguousarray(P, np.float32)).to(self.device)
        self.proto_ready = True

    # -- one training step ----------------------------------------------------------------
    def train_step(self, x, y, lr: float, return_loss: bool = False):
        """Forward, backward, clipping, AdamW, then the local rules. Returns the loss as a
        Python float only if return_loss (else the detached loss tensor: no sync)."""
        if not self.proto_ready:
            self.init_prototypes(x)
        o = self.cfg.optim
        self.opt.zero_grad(set_to_none=True)
        loss, cache = self.forward(x, y)
        loss.backward()
        params = list(self.p.values())
        if o.clip_value > 0:                      # the norm is taken before any clipping
            self.gnorm = torch.nn.utils.get_total_norm([q.grad for q in params])
            torch.nn.utils.clip_grad_value_(params, o.clip_value)
            if o.clip_norm > 0:
                torch.nn.utils.clip_grads_with_norm_(params, o.clip_norm, self.gnorm)
        elif o.clip_norm > 0:
            self.gnorm = torch.nn.utils.clip_grad_norm_(params, o.clip_norm)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        self.step += 1
        self.local_updates(cache)
        return float(loss.item()) if return_loss else loss.detach()

    @torch.no_grad()
    def local_updates(self, cache: dict):
        """Hebbian rule (shadow, modulate) and online k-means step (shadow, feature), docs/model.md."""
        cfg, N, T = self.cfg, cache["N"], self.T
        hc, pc = cfg.hebb, cfg.proto
        if hc.mode in ("shadow", "modulate"):
            self.W_hebb.mul_(1.0 - hc.decay).add_(cache["h"].T @ cache["post"], alpha=hc.lr / N)
        if pc.mode != "off":
            v, k = cache["ht"], cache["assign"]
            counts = torch.bincount(k, minlength=T).to(torch.float32)          # (T,)
            sums = torch.zeros(T, self.H, device=self.device).index_add_(0, k, v)
            mu = sums / counts.clamp(min=1.0)[:, None]
            P = torch.where((counts > 0)[:, None], self.P + pc.lr * (mu - self.P), self.P)
            usage = pc.usage_decay * self.usage + (1.0 - pc.usage_decay) * counts / N
            if pc.reseed_threshold > 0:
                dead = usage < pc.reseed_threshold / T
                j = torch.tensor([hash_u32(cfg.seed, self.step, t) % N for t in range(T)], device=self.device)
                P = torch.where(dead[:, None], v[j], P)
                usage = torch.where(dead, torch.full_like(usage, 1.0 / T), usage)
            self.P, self.usage = P, usage
