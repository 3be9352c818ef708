"""Optimisers over a model's flat parameter buffer, and the learning-rate schedule.

The model owns the parameters and their gradients (flat buffers in which every tensor starts
at a multiple of CHUNK elements, engine.model.Layout). An optimiser is made from the model's
layout and called by the trainer (`opt.step(model, lr)`; the model never calls it). It owns
the weight-decay and learning-rate chunk masks, the per-chunk sums of squares and the global norm (one launch
each, the per-parameter gradient norms from the chunk sums), its own state (declared in
`STATE`, checkpointed under those names) and one kernel launch over every parameter:

    AdamW  m ← β1·m + (1−β1)·ĝ;  v ← β2·v + (1−β2)·ĝ²;  θ ← θ − lr·(m̂/(√v̂ + ε) + wd·θ)   (decoupled decay)
    SGD    u ← μ·u + ĝ + wd·θ;   θ ← θ − lr·u                                          (L2 decay, torch's SGD)

ĝ is the gradient clipped by value (optim.clip_value) and then by global norm
(optim.clip_norm, with the norm taken before any clipping); weight decay applies where the
model's chunk mask says so (weights, not biases); each tensor's rate is lr × its
ParamSpec.lr_scale (the lr chunk mask; 1.0 multiplies exactly, so the same bits).
References: engine.reference.adamw_step, engine.reference.sgd_step; kernels/optim.cl.
"""
from __future__ import annotations

import math

import numpy as np

from . import ops


def lr_at(o, total_steps: int, step: int) -> float:
    """The learning rate of optimiser step `step` (1-based): linear warm-up to optim.lr over
    optim.warmup_steps, then cosine decay to optim.min_lr_ratio·lr at total_steps (or constant)."""
    lr = o.lr * (min(1.0, step / o.warmup_steps) if o.warmup_steps else 1.0)
    if o.schedule == "cosine" and step > o.warmup_steps:
        frac = min(1.0, (step - o.warmup_steps) / max(1, total_steps - o.warmup_steps))
        lr *= o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac))
    return lr


class Optimizer:
    """State buffers named in STATE, each the size of the flat parameter buffer, and the
    gradient-norm tables of the layout it was made for."""
    STATE: tuple[str, ...] = ()

    def __init__(self, dev, o, layout, chunk: int, total_steps: int = 1, groups: dict | None = None):
        """groups: {name: [parameter names]} reported together as grad_norm/<name> as well."""
        self.dev, self.o, self.layout, self.chunk, self.total_steps = dev, o, layout, chunk, total_steps
        self.groups = dict(groups or {})
        self.n = layout.total
        self.n_chunks = self.n // chunk
        buf = self.buffers(self.n, chunk)
        self.state = {name: dev.zeros(*buf[name]) for name in self.STATE}
        self.wd_mask = dev.to_device(layout.decay_mask())
        self.lr_mask = dev.to_device(layout.lr_mask())
        self.partials, self.gnorm = dev.zeros(*buf["partials"]), dev.zeros(*buf["gnorm"])

    @classmethod
    def buffers(cls, n: int, chunk: int = 1024) -> dict:
        """{name: (shape, dtype)} of what an instance allocates (for the memory check)."""
        f = np.float32
        return {**{name: ((n,), f) for name in cls.STATE}, "wd_mask": ((n // chunk,), f),
                "lr_mask": ((n // chunk,), f), "partials": ((n // chunk,), f), "gnorm": ((1,), f)}

    def lr_at(self, step: int) -> float:
        """The schedule's rate for optimiser step `step` (1-based) of a run of total_steps."""
        return lr_at(self.o, self.total_steps, step)

    def step(self, model, lr: float) -> None:
        """Optimiser step model.step + 1 on model.grad: the global norm (before clipping), then
        one update of every parameter."""
        model.step += 1
        ops.sumsq_chunks(self.dev, model.grad, self.partials, self.n_chunks, self.chunk)
        ops.global_norm(self.dev, self.partials, self.n_chunks, self.gnorm)
        self.update(model.theta, model.grad, model.step, lr)

    def update(self, theta, grad, t: int, lr: float) -> None:
        raise NotImplementedError

    def telemetry(self) -> dict:
        """grad_norm/<param> from the chunk sums of the last step, and the global grad_norm."""
        out = {}
        partials = self.partials.get().astype(np.float64)
        owner = self.layout.chunk_owner()
        for name in self.layout.names:
            out[f"grad_norm/{name}"] = float(np.sqrt(sum(p for p, o in zip(partials, owner) if o == name)))
        for group, members in self.groups.items():
            members = set(members)
            out[f"grad_norm/{group}"] = float(np.sqrt(sum(p for p, o in zip(partials, owner) if o in members)))
        out["grad_norm"] = float(self.gnorm.get()[0])
        return out


class AdamW(Optimizer):
    STATE = ("adam_m", "adam_v")

    def update(self, theta, grad, t, lr):
        o = self.o
        ops.adamw(self.dev, theta, grad, self.state["adam_m"], self.state["adam_v"], self.wd_mask, self.lr_mask,
                  self.gnorm, self.n, lr, o.beta1, o.beta2, o.eps, o.weight_decay, 1.0 - o.beta1 ** t,
                  1.0 - o.beta2 ** t, o.clip_norm, o.clip_value, self.chunk)


class SGD(Optimizer):
    STATE = ("sgd_velocity",)

    def update(self, theta, grad, t, lr):
        o = self.o
        ops.sgd_momentum(self.dev, theta, grad, self.state["sgd_velocity"], self.wd_mask, self.lr_mask, self.gnorm,
                         self.n, lr, o.momentum, o.weight_decay, o.clip_norm, o.clip_value, self.chunk)


OPTIMIZERS = {"adamw": AdamW, "sgd": SGD}


def optimizer_class(name: str) -> type[Optimizer]:
    return OPTIMIZERS[name]


def make_optimizer(dev, cfg, model) -> Optimizer:
    """cfg.optim's optimiser for model's flat buffers."""
    from .model import CHUNK
    return optimizer_class(cfg.optim.name)(dev, cfg.optim, model.layout, CHUNK, cfg.train.steps,
                                           groups=model.param_groups())
