"""EmbedGelu: h = GELU(W_emb[x]·W1 + b1), the first layer of the character model
(docs/model.md, Forward). x (N,) int32 token ids -> h (N,H).

The embedding is folded into the product when that is less work (V < N, always for
characters at training sizes): a = (W_emb·W1)[x] and, from D[v] = Σ_{x_n=v} da[n],
dW1 = W_embᵀ·D and dW_emb = D·W1ᵀ: V·E·H multiply-adds each instead of N·E·H.
Reference: engine.reference.layers.EmbedGelu.
"""
from __future__ import annotations

from .. import ops
from ..params import ParamSpec
from . import Layer, f32, i32


class EmbedGelu(Layer):
    kind = "embed_gelu"

    def __init__(self, name, prefix="", V=1, E=1, H=1, init="lecun"):
        super().__init__(name, prefix)
        self.V, self.E, self.H, self.init = V, E, H, init

    def params(self):
        p, V, E, H = self.prefix, self.V, self.E, self.H
        return [ParamSpec(p + "W_emb", (V, E), init="normal", scale=1.0),
                ParamSpec(p + "W1", (E, H), init=self.init),
                ParamSpec(p + "b1", (H,), init="zeros", decay=False)]

    def fold(self, N) -> bool:
        return self.V < N

    def buffers(self, B, S):
        N, V, E, H = B * S, self.V, self.E, self.H
        out = {"EW": ((V, H), f32), "D": ((V, H), f32)} if self.fold(N) else {"e": ((N, E), f32), "de": ((N, E), f32)}
        out.update(a=((N, H), f32), h=((N, H), f32), da=((N, H), f32), perm=((N,), i32), starts=((V + 1,), i32))
        return out

    def products(self, B, S):
        N, V, E, H = B * S, self.V, self.E, self.H
        return ([(V, E, H, 1)] if self.fold(N) else [(N, E, H, 1)]), [(E, H, V) if self.fold(N) else (E, H, N)]

    def forward(self, c, x):
        dev, p, b, N, V, E, H = c.dev, c.p, c.b, c.N, self.V, self.E, self.H
        if self.fold(N):   # the same sums per element as e·W1
            ops.gemm(dev, p["W_emb"], p["W1"], b.EW, V, H, E)
            ops.embed_bias_gelu(dev, b.EW, x, p["b1"], b.a, b.h, N, H)
        else:
            ops.embedding_forward(dev, p["W_emb"], x, b.e, N, E)
            ops.gemm(dev, b.e, p["W1"], b.a, N, H, E)
            ops.bias_gelu_forward(dev, b.a, p["b1"], b.h, N, H)
        c.x_in = x
        return b.h

    def backward(self, c, dh):
        dev, p, g, b, N, V, E, H = c.dev, c.p, c.g, c.b, c.N, self.V, self.E, self.H
        ops.gelu_backward(dev, dh, b.a, b.da, N, H)
        ops.bucket_sort(dev, c.x_in, N, V, b.starts, b.perm)
        if self.fold(N):  # D[v] = Σ_{x_n = v} da[n]; eᵀ·da = W_embᵀ·D, Σ_n de[n] over x_n = v is D·W1ᵀ
            ops.bucket_sums(dev, b.da, b.perm, b.starts, b.D, V, H)
            ops.colsum(dev, b.D, g["b1"], V, H)
            ops.gemm(dev, p["W_emb"], b.D, g["W1"], E, H, V, trans_a=True)
            ops.gemm(dev, b.D, p["W1"], g["W_emb"], V, E, H, trans_b=True)
        else:
            ops.colsum(dev, b.da, g["b1"], N, H)
            ops.gemm(dev, b.e, b.da, g["W1"], E, H, N, trans_a=True)
            ops.gemm(dev, b.da, p["W1"], b.de, N, E, H, trans_b=True)
            ops.embedding_backward(dev, b.de, b.perm, b.starts, g["W_emb"], V, E)
        return None
