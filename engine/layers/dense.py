"""The memory network's plain layers (engine/models/memnet.py):

  Embedding  e = W[x]                      x (N,) int32 token ids -> e (N,E); W (V,E) ~ N(0, scale²)
  Dense      y = act(x·W + b)              x (N,I) -> y (N,O); act GELU (exact, the engine's erf
                                           kernels) or none; W (I,O) Kaiming by default

Backward: Embedding dW[v] = Σ_{x_n = v} de[n] (bucket sums, fixed order); Dense da = dy·act'(a),
dW = xᵀ·da, db = Σ_n da, dx = da·Wᵀ. References: engine.reference.layers.{Embedding, Dense}.
"""
from __future__ import annotations

from .. import ops
from ..params import ParamSpec
from . import Layer, f32, i32


class Embedding(Layer):
    kind = "embedding"

    def __init__(self, name, prefix="", V=1, E=1, scale=0.1):
        super().__init__(name, prefix)
        self.V, self.E, self.scale = V, E, scale
        self.n_out = E   # the output width (tests/test_layer_contract.py: widths)

    def params(self):
        return [ParamSpec(self.prefix + "W_emb", (self.V, self.E), init="normal", scale=self.scale)]

    def buffers(self, B, S):
        N = B * S
        return {"e": ((N, self.E), f32), "perm": ((N,), i32), "starts": ((self.V + 1,), i32)}

    def forward(self, c, x):
        ops.embedding_forward(c.dev, c.p["W_emb"], x, c.b.e, c.N, self.E)
        c.x_in = x
        return c.b.e

    def backward(self, c, de):
        b = c.b
        ops.bucket_sort(c.dev, c.x_in, c.N, self.V, b.starts, b.perm)
        ops.embedding_backward(c.dev, de, b.perm, b.starts, c.g["W_emb"], self.V, self.E)
        return None


class Dense(Layer):
    kind = "dense"

    def __init__(self, name, prefix="", I=1, O=1, act="gelu", init="kaiming"):
        super().__init__(name, prefix)
        if act not in ("gelu", "none"):
            raise ValueError(f"dense act must be gelu or none, got {act!r}")
        self.I, self.O, self.act, self.init = I, O, act, init
        self.n_in, self.n_out = I, O   # input and output widths (tests/test_layer_contract.py: widths)

    def params(self):
        p = self.prefix
        return [ParamSpec(p + "W", (self.I, self.O), init=self.init),
                ParamSpec(p + "b", (self.O,), init="zeros", decay=False)]

    def buffers(self, B, S):
        N = B * S
        out = {"a": ((N, self.O), f32), "dx": ((N, self.I), f32)}
        return out | ({"y": ((N, self.O), f32), "da": ((N, self.O), f32)} if self.act == "gelu" else {})

    def products(self, B, S):
        N = B * S
        return [(N, self.O, self.I, 1), (N, self.I, self.O, 1)], [(self.I, self.O, N)]

    def forward(self, c, x):
        dev, p, b, N = c.dev, c.p, c.b, c.N
        ops.gemm(dev, x, p["W"], b.a, N, self.O, self.I)
        c.x_in = x
        if self.act == "gelu":
            ops.bias_gelu_forward(dev, b.a, p["b"], b.y, N, self.O)   # a += b in place; y = GELU(a)
            return b.y
        ops.add_bias(dev, b.a, p["b"], N, self.O)
        return b.a

    def backward(self, c, dy):
        dev, p, g, b, N = c.dev, c.p, c.g, c.b, c.N
        da = dy
        if self.act == "gelu":
            ops.gelu_backward(dev, dy, b.a, b.da, N, self.O)
            da = b.da
        ops.gemm(dev, c.x_in, da, g["W"], self.I, self.O, N, trans_a=True)
        ops.colsum(dev, da, g["b"], N, self.O)
        ops.gemm(dev, da, p["W"], b.dx, N, self.I, self.O, trans_b=True)
        return b.dx
