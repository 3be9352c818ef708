"""Optimisers over a model's flat parameter buffer, and the learning-rate schedule.

The model owns the parameters and their gradients (flat buffers in which every tensor starts
at a multiple of CHUNK elements) and the global norm of the gradient; an optimiser owns its
own state (declared in `STATE`, checkpointed by the model under those names) and one kernel
launch over every parameter:

    AdamW  m ← β1·m + (1−β1)·ĝ;  v ← β2·v + (1−β2)·ĝ²;  θ ← θ − lr·(m̂/(√v̂ + ε) + wd·θ)   (decoupled decay)
    SGD    u ← μ·u + ĝ + wd·θ;   θ ← θ − lr·u                                          (L2 decay, torch's SGD)

ĝ is the gradient clipped by value (optim.clip_value) and then by global norm
(optim.clip_norm, with the norm taken before any clipping); weight decay applies where the
model's chunk mask says so (weights, not biases). References: engine.reference.adamw_step,
engine.reference.sgd_step; kernels/optim.cl.
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
    """State buffers named in STATE, each the size of the flat parameter buffer."""
    STATE: tuple[str, ...] = ()

    def __init__(self, dev, o, n: int, chunk: int):
        self.dev, self.o, self.n, self.chunk = dev, o, n, chunk
        self.state = {name: dev.zeros(n) for name in self.STATE}

    @classmethod
    def buffers(cls, n: int) -> dict:
        """{name: (shape, dtype)} of what an instance allocates (for the memory check)."""
        return {name: ((n,), np.float32) for name in cls.STATE}

    def step(self, theta, grad, wd_mask, gnorm, t: int, lr: float) -> None:
        raise NotImplementedError


class AdamW(Optimizer):
    STATE = ("adam_m", "adam_v")

    def step(self, theta, grad, wd_mask, gnorm, t, lr):
        o = self.o
        ops.adamw(self.dev, theta, grad, self.state["adam_m"], self.state["adam_v"], wd_mask, gnorm, self.n,
                  lr, o.beta1, o.beta2, o.eps, o.weight_decay, 1.0 - o.beta1 ** t, 1.0 - o.beta2 ** t,
                  o.clip_norm, o.clip_value, self.chunk)


class SGD(Optimizer):
    STATE = ("sgd_velocity",)

    def step(self, theta, grad, wd_mask, gnorm, t, lr):
        o = self.o
        ops.sgd_momentum(self.dev, theta, grad, self.state["sgd_velocity"], wd_mask, gnorm, self.n, lr,
                         o.momentum, o.weight_decay, o.clip_norm, o.clip_value, self.chunk)


OPTIMIZERS = {"adamw": AdamW, "sgd": SGD}


def optimizer_class(name: str) -> type[Optimizer]:
    return OPTIMIZERS[name]
