"""ResidualGelu: h = x + GELU(x·W + b), the input block of a stacked bio layer
(model.num_layers > 1): each layer after the first reads the previous layer's output
through its own learned map, with the identity beside it. x (N,H) -> h (N,H).
Reference: engine.reference.layers.ResidualGelu.
"""
from __future__ import annotations

from .. import ops
from ..params import ParamSpec
from . import Layer, f32


class ResidualGelu(Layer):
    kind = "residual_gelu"

    def __init__(self, name, prefix="", H=1, init="lecun"):
        super().__init__(name, prefix)
        self.H, self.init = H, init

    def params(self):
        p, H = self.prefix, self.H
        return [ParamSpec(p + "W", (H, H), init=self.init), ParamSpec(p + "b", (H,), init="zeros", decay=False)]

    def buffers(self, B, S):
        N, H = B * S, self.H
        return {name: ((N, H), f32) for name in ("a", "u", "h", "da", "dx")}

    def products(self, B, S):
        N, H = B * S, self.H
        return [(N, H, H, 1)], [(H, H, N)]

    def forward(self, c, x):
        dev, p, b, N, H = c.dev, c.p, c.b, c.N, self.H
        ops.gemm(dev, x, p["W"], b.a, N, H, H)
        ops.bias_gelu_forward(dev, b.a, p["b"], b.u, N, H)
        dev.cl.enqueue_copy(dev.queue, b.h.data, x.data)
        ops.add_inplace(dev, b.u, b.h, N * H)
        c.x_in = x
        return b.h

    def backward(self, c, dh):
        dev, p, g, b, N, H = c.dev, c.p, c.g, c.b, c.N, self.H
        ops.gelu_backward(dev, dh, b.a, b.da, N, H)
        ops.gemm(dev, c.x_in, b.da, g["W"], H, H, N, trans_a=True)
        ops.colsum(dev, b.da, g["b"], N, H)
        dev.cl.enqueue_copy(dev.queue, b.dx.data, dh.data)
        ops.gemm(dev, b.da, p["W"], b.dx, N, H, H, beta=1.0, trans_b=True)
        return b.dx
