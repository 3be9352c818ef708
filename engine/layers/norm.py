"""LayerNorm, BatchNorm and Dropout as layers (kernels/norm.cl, kernels/dropout.cl).
x (N,C) -> y (N,C). References: engine.reference.layers.{LayerNorm, BatchNorm, Dropout}.

  LayerNorm  y = (x − μ_row)·r·γ + β, r = 1/sqrt(var_row + eps)
  BatchNorm  the same per column over the batch in training (the running mean and unbiased
             variance updated with `momentum`, checkpointed state); the running statistics
             at evaluation
  Dropout    y = x·keep/(1 − p), keep = hash(key(seed, index), step, i) ≥ ⌊p·2³²⌋: nothing
             stored, the same mask on every device, the identity at evaluation
"""
from __future__ import annotations

from .. import ops
from ..params import ParamSpec
from . import Layer, StateSpec, f32


def affine(prefix, C):
    """γ (ones) and β (zeros) of a normalisation, without weight decay."""
    return [ParamSpec(prefix + "gamma", (C,), init="ones", decay=False),
            ParamSpec(prefix + "beta", (C,), init="zeros", decay=False)]


class LayerNorm(Layer):
    """bias=False: γ only, no β (nanoGPT's LayerNorm(bias=False)); the kernels read a zero β.
    vec: the float8 row kernels on the CPU variant (ops.layernorm_forward; other last bits)."""
    kind = "layernorm"

    def __init__(self, name, prefix="", C=1, eps=1e-5, bias=True, vec=False):
        super().__init__(name, prefix)
        self.C, self.eps, self.bias, self.vec = C, eps, bias, vec

    def params(self):
        return affine(self.prefix, self.C) if self.bias else affine(self.prefix, self.C)[:1]

    def buffers(self, B, S):
        N, C = B * S, self.C
        out = {"y": ((N, C), f32), "mean": ((N,), f32), "rstd": ((N,), f32), "dx": ((N, C), f32)}
        return out if self.bias else {**out, "beta0": ((C,), f32), "dbeta": ((C,), f32)}

    @property
    def zeroed(self):
        return () if self.bias else ("beta0",)

    def forward(self, c, x):
        b = c.b
        beta = c.p["beta"] if self.bias else b.beta0
        ops.layernorm_forward(c.dev, x, c.p["gamma"], beta, b.y, b.mean, b.rstd, c.N, self.C, self.eps, vec=self.vec)
        c.x_in = x
        return b.y

    def backward(self, c, dy):
        b = c.b
        dbeta = c.g["beta"] if self.bias else b.dbeta
        ops.layernorm_backward(c.dev, dy, c.x_in, c.p["gamma"], b.mean, b.rstd, b.dx, c.g["gamma"], dbeta,
                               c.N, self.C, vec=self.vec)
        return b.dx


class BatchNorm(Layer):
    kind = "batchnorm"

    def __init__(self, name, prefix="", C=1, eps=1e-5, momentum=0.1):
        super().__init__(name, prefix)
        self.C, self.eps, self.momentum = C, eps, momentum

    def params(self):
        return affine(self.prefix, self.C)

    def state(self):
        return [StateSpec(self.prefix + "run_mean", (self.C,)), StateSpec(self.prefix + "run_var", (self.C,), fill=1.0)]

    def buffers(self, B, S):
        N, C = B * S, self.C
        return {"y": ((N, C), f32), "mean": ((C,), f32), "rstd": ((C,), f32), "dx": ((N, C), f32)}

    def forward(self, c, x):
        b, st = c.b, c.st
        ops.batchnorm_forward(c.dev, x, c.p["gamma"], c.p["beta"], b.y, b.mean, b.rstd, st["run_mean"], st["run_var"],
                              c.N, self.C, self.eps, self.momentum, training=c.training)
        c.x_in = x
        return b.y

    def backward(self, c, dy):
        b = c.b
        ops.batchnorm_backward(c.dev, dy, c.x_in, c.p["gamma"], b.mean, b.rstd, b.dx, c.g["gamma"], c.g["beta"],
                               c.N, self.C)
        return b.dx


class Dropout(Layer):
    kind = "dropout"

    def __init__(self, name, prefix="", C=1, p=0.1, seed=0, index=0):
        super().__init__(name, prefix)
        self.C, self.p, self.key = C, p, ops.dropout_key(seed, index)

    def buffers(self, B, S):
        N, C = B * S, self.C
        return {"y": ((N, C), f32), "dx": ((N, C), f32)}

    def forward(self, c, x):
        if not c.training or self.p == 0:
            return x
        ops.dropout(c.dev, x, c.b.y, c.N * self.C, self.p, self.key, c.model.step, c.row0 * self.C)
        return c.b.y

    def backward(self, c, dy):   # the same mask: the same key and step
        if not c.training or self.p == 0:
            return dy
        ops.dropout(c.dev, dy, c.b.dx, c.N * self.C, self.p, self.key, c.model.step, c.row0 * self.C)
        return c.b.dx
