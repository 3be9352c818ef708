"""CharHead: logits = z·W2 + b2 and the softmax cross-entropy against the next
character (docs/model.md). z (N,H) -> the loss summary in b.loss_out:
[mean loss over valid targets, correct predictions, valid targets, summed loss].
W2, b2 are stored with Vp = V rounded up to 8 columns (zero padding that stays zero:
its gradient is zero), so every product takes the vector GEMM path.
Reference: engine.reference.layers.CharHead.
"""
from __future__ import annotations

from .. import ops
from ..params import ParamSpec, padded
from . import Layer, f32, i32


class CharHead(Layer):
    kind = "char_head"

    def __init__(self, name, prefix="", V=1, H=1, init="lecun"):
        super().__init__(name, prefix)
        self.V, self.H, self.Vp, self.init = V, H, padded(V), init

    def params(self):
        p, V, H, Vp = self.prefix, self.V, self.H, self.Vp
        return [ParamSpec(p + "W2", (H, V), (H, Vp), init=self.init),
                ParamSpec(p + "b2", (V,), (Vp,), init="zeros", decay=False)]

    def buffers(self, B, S):
        N, H, Vp = B * S, self.H, self.Vp
        return {"logits": ((N, Vp), f32), "dlogits": ((N, Vp), f32), "loss_rows": ((N,), f32),
                "hits": ((N,), f32), "nv": ((1,), i32), "loss_out": ((4,), f32), "dz": ((N, H), f32)}

    zeroed = ("dlogits",)   # its padding columns are never written: kept 0

    def products(self, B, S):
        N = B * S
        return [(N, self.H, self.Vp, 1)], [(self.H, self.Vp, N)]

    def forward(self, c, z, loss=True):
        dev, p, b, N, V, Vp, H = c.dev, c.p, c.b, c.N, self.V, self.Vp, self.H
        ops.gemm(dev, z, p["W2"], b.logits, N, Vp, H)
        ops.add_bias(dev, b.logits, p["b2"], N, Vp)
        c.x_in = z
        if loss:
            y = c.ws.y
            ops.count_valid(dev, y, N, b.nv)
            ops.softmax_xent(dev, b.logits, y, b.nv, b.loss_rows, b.hits, b.dlogits, N, V, Vp)
            ops.loss_reduce(dev, b.loss_rows, b.hits, b.nv, b.loss_out, N)
        return b.logits

    def backward(self, c, dy=None):
        dev, p, g, b, N, Vp, H = c.dev, c.p, c.g, c.b, c.N, self.Vp, self.H
        ops.gemm(dev, c.x_in, b.dlogits, g["W2"], H, Vp, N, trans_a=True)
        ops.colsum(dev, b.dlogits, g["b2"], N, Vp)
        ops.gemm(dev, b.dlogits, p["W2"], b.dz, N, H, Vp, trans_b=True)
        return b.dz
