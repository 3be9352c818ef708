"""CharHead: logits = z·W2 + b2 and the softmax cross-entropy against the next
character (docs/model.md). z (N,H) -> the loss summary in b.loss_out:
[mean loss over valid targets, correct predictions, valid targets, summed loss].
W2, b2 are stored with Vp = V rounded up to 8 columns (zero padding that stays zero:
its gradient is zero), so every product takes the vector GEMM path; a tied weight is stored
with Vp rows, zero and staying zero in the same way.
Reference: engine.reference.layers.CharHead.
"""
from __future__ import annotations

from .. import ops
from ..params import ParamSpec, padded
from . import Layer, f32, i32


class CharHead(Layer):
    """names: the local names of the weight and bias (the hybrid's W2, b2; the transformer's
    lm_head.W, lm_head.b with its prefix). bias=False: no bias. tie: the full name of a (V, C)
    parameter stored (Vp, C) that IS the weight (logits = z·tieᵀ, the transformer's wte): this
    head then declares no weight, and its gradient is written into the tied parameter's first
    (the owner, earlier in the forward pass, adds its own after: engine.layers.Layer.shared).
    init, scale: the weight's initialisation (engine.params). gelu: logits = GELU(z·W2 + b2) (the
    memory network's design applies GELU to the logits before the softmax; padding columns stay
    GELU(0) = 0)."""
    kind = "char_head"

    def __init__(self, name, prefix="", V=1, H=1, init="lecun", scale=1.0, names=("W2", "b2"), bias=True, tie="",
                 gelu=False):
        super().__init__(name, prefix)
        self.V, self.H, self.Vp, self.init, self.scale = V, H, padded(V), init, scale
        self.w, self.b, self.bias, self.tie, self.gelu = names[0], names[1], bias, tie, gelu

    def params(self):
        p, V, H, Vp = self.prefix, self.V, self.H, self.Vp
        out = [] if self.tie else [ParamSpec(p + self.w, (H, V), (H, Vp), init=self.init, scale=self.scale)]
        return out + ([ParamSpec(p + self.b, (V,), (Vp,), init="zeros", decay=False)] if self.bias else [])

    def shared(self):
        return {"tied": self.tie} if self.tie else {}

    def buffers(self, B, S):
        N, H, Vp = B * S, self.H, self.Vp
        out = {"logits": ((N, Vp), f32), "dlogits": ((N, Vp), f32), "loss_rows": ((N,), f32),
               "hits": ((N,), f32), "nv": ((1,), i32), "loss_out": ((4,), f32), "dz": ((N, H), f32),
               "pred": ((N,), i32)}
        if self.gelu:   # the pre-activation and its gradient; a zero bias without bias
            out.update(pre=((N, Vp), f32), dpre=((N, Vp), f32), **({} if self.bias else {"b0": ((Vp,), f32)}))
        return out

    @property
    def zeroed(self):   # dlogits: its padding columns are never written, kept 0
        return ("dlogits",) + (("b0",) if self.gelu and not self.bias else ())

    def products(self, B, S):
        N = B * S
        if self.tie:   # logits = z·Wᵀ (W stored (Vp, H)); dW = dlogitsᵀ·z
            return [(N, self.Vp, self.H, 1)], [(self.Vp, self.H, N)]
        return [(N, self.H, self.Vp, 1)], [(self.H, self.Vp, N)]

    def forward(self, c, z, loss=True):
        dev, p, b, N, V, Vp, H = c.dev, c.p, c.b, c.N, self.V, self.Vp, self.H
        out = b.pre if self.gelu else b.logits
        if self.tie:
            ops.gemm(dev, z, p["tied"], out, N, Vp, H, trans_b=True)
        else:
            ops.gemm(dev, z, p[self.w], out, N, Vp, H)
        if self.gelu:   # pre += bias (or 0) in place, logits = GELU(pre)
            ops.bias_gelu_forward(dev, b.pre, p[self.b] if self.bias else b.b0, b.logits, N, Vp)
        elif self.bias:
            ops.add_bias(dev, b.logits, p[self.b], N, Vp)
        c.x_in = z
        if loss:
            y = c.ws.y
            ops.count_valid(dev, y, N, b.nv)
            ops.softmax_xent(dev, b.logits, y, b.nv, b.loss_rows, b.hits, b.dlogits, N, V, Vp)
            ops.loss_reduce(dev, b.loss_rows, b.hits, b.nv, b.loss_out, N)
        return b.logits

    def predict(self, c):
        """b.pred (N,) int32: each position's predicted character (the first maximum of the last
        forward's logits), what the loss summary counts as correct; for evaluation."""
        ops.argmax_rows(c.dev, c.b.logits, c.b.pred, c.N, self.V, self.Vp)
        return c.b.pred

    def backward(self, c, dy=None):
        dev, p, g, b, N, Vp, H = c.dev, c.p, c.g, c.b, c.N, self.Vp, self.H
        d = b.dlogits
        if self.gelu:
            ops.gelu_backward(dev, b.dlogits, b.pre, b.dpre, N, Vp)
            d = b.dpre
        if self.tie:
            ops.gemm(dev, d, c.x_in, g["tied"], Vp, H, N, trans_a=True)
        else:
            ops.gemm(dev, c.x_in, d, g[self.w], H, Vp, N, trans_a=True)
        if self.bias:
            ops.colsum(dev, d, g[self.b], N, Vp)
        if self.tie:
            ops.gemm(dev, d, p["tied"], b.dz, N, H, Vp)
        else:
            ops.gemm(dev, d, p[self.w], b.dz, N, H, Vp, trans_b=True)
        return b.dz
