"""The transformer family's layers (nanoGPT's GPT, engine/models/transformer.py):

  TokPosEmbed  x = wte[token] + wpe[t], t the position inside its window (0..S−1)
  AttnBlock    x + W_proj·Attn(LN_1(x)): causal multi-head self-attention, pre-LayerNorm
  MlpBlock     x + W_proj·GELU(W_fc·LN_2(x)), 4·C hidden, GELU exact (erf: the engine's
               GELU kernels, as nanoGPT's nn.GELU())

Letters: B batch, S sequence, N = B·S, C width (transformer.n_embd), nh heads, d = C/nh,
BH = B·nh, V vocabulary (Vp: rounded up to 8). Weights are (in, out): y = x·W.

Attention per head (kernels/attention.cl; the products are ops.gemm's, batched over BH):
  qkv = LN_1(x)·W_qkv (+ b_qkv), columns [q | k | v], head h at columns h·d:(h+1)·d of each
  s = q·kᵀ;  p = causal_softmax(s/√d) (τ ≤ t);  y = p·v;  out = x + merge(y)·W_proj (+ b_proj)
  backward: dv = pᵀ·dy, dp = dy·vᵀ, ds = p ⊙ (dp − Σ p·dp)/√d, dq = ds·k, dk = dsᵀ·q
With transformer.dropout > 0 (training only) the probabilities, each residual branch and the
embedding are dropped (ops.dropout: counter-based masks, the same in the backward); at 0 no
dropout kernel runs. bias=False (the default): no biases, and the LayerNorms have no β (as
nanoGPT's LayerNorm(bias=False)); their kernels read a zero β. The last forward's K and V stay
in the layer's buffers (AttnBlock.kv): the hook for a generation cache.
References: engine.reference.attention.{TokPosEmbed, AttnBlock, MlpBlock}.
"""
from __future__ import annotations

import math

import numpy as np

from .. import ops
from ..params import ParamSpec, padded
from . import Layer, f32, i32


def _dropping(layer, c) -> bool:
    return layer.rate > 0 and c.training


class TokPosEmbed(Layer):
    """tied: the head (logits = x·wteᵀ) wrote its gradient of wte first; this layer's is added
    to it (the backward runs in reverse, so the order is fixed). wte is stored (Vp, C): the
    padding rows are zero and stay zero (the tied head's padding logits are 0, never read)."""
    kind = "tok_pos_embed"

    def __init__(self, name, prefix="", V=1, C=1, block_size=1, dropout=0.0, seed=0, index=0, tied=False):
        super().__init__(name, prefix)
        self.V, self.C, self.block_size, self.rate, self.tied = V, C, block_size, dropout, tied
        self.key = ops.dropout_key(seed, index)

    def params(self):
        p, V, C = self.prefix, self.V, self.C
        return [ParamSpec(p + "wte", (V, C), (padded(V), C), init="normal", scale=0.02),
                ParamSpec(p + "wpe", (self.block_size, C), init="normal", scale=0.02)]

    def buffers(self, B, S):
        N, V, C = B * S, self.V, self.C
        out = {"x": ((N, C), f32), "perm": ((N,), i32), "starts": ((V + 1,), i32)}
        out.update({"xd": ((N, C), f32), "dxd": ((N, C), f32)} if self.rate > 0 else {})
        out.update({"D": ((V, C), f32)} if self.tied else {})
        return out

    def forward(self, c, x):
        dev, p, b = c.dev, c.p, c.b
        ops.tok_pos_embed_forward(dev, p["wte"], x, p["wpe"], b.x, c.N, c.S, self.C)
        c.x_in = x
        if not _dropping(self, c):
            return b.x
        ops.dropout(dev, b.x, b.xd, c.N * self.C, self.rate, self.key, c.model.step, c.row0 * self.C)
        return b.xd

    def backward(self, c, dx):
        dev, g, b, N, V, C = c.dev, c.g, c.b, c.N, self.V, self.C
        if _dropping(self, c):
            ops.dropout(dev, dx, b.dxd, N * C, self.rate, self.key, c.model.step, c.row0 * C)
            dx = b.dxd
        ops.colsum(dev, dx, g["wpe"], c.B, c.S * C)   # rows ≥ S of dwpe: never written, zero
        ops.bucket_sort(dev, c.x_in, N, V, b.starts, b.perm)
        if self.tied:
            ops.bucket_sums(dev, dx, b.perm, b.starts, b.D, V, C)
            ops.add_inplace(dev, b.D, g["wte"], V * C)
        else:
            ops.embedding_backward(dev, dx, b.perm, b.starts, g["wte"], V, C)
        return None


def _ln_params(prefix, C, bias):
    """LayerNorm γ (ones) and, only with bias, β (zeros): no weight decay."""
    out = [ParamSpec(prefix + "gamma", (C,), init="ones", decay=False)]
    return out + ([ParamSpec(prefix + "beta", (C,), init="zeros", decay=False)] if bias else [])


def _linear(prefix, name, shape, bias, scale):
    out = [ParamSpec(f"{prefix}W_{name}", shape, init="normal", scale=scale)]
    return out + ([ParamSpec(f"{prefix}b_{name}", (shape[1],), init="zeros", decay=False)] if bias else [])


class _Block(Layer):
    """What both blocks share: a pre-LayerNorm (ln), the residual, the block's gradient-norm group."""

    def __init__(self, name, prefix, C, bias, dropout, proj_scale, seed, index):
        super().__init__(name, prefix)
        self.C, self.bias, self.rate, self.proj_scale = C, bias, dropout, proj_scale
        self.seed, self.index = seed, index
        self.group = prefix.rstrip(".") or None   # grad_norm/h{l}: the block's parameters together

    def _norm_buffers(self, N):
        C = self.C
        out = {"ln": ((N, C), f32), "mean": ((N,), f32), "rstd": ((N,), f32), "dln": ((N, C), f32),
               "dx": ((N, C), f32), "out": ((N, C), f32)}
        out.update({} if self.bias else {"beta0": ((C,), f32), "dbeta": ((C,), f32)})
        out.update({"br": ((N, C), f32), "dbr": ((N, C), f32)} if self.rate > 0 else {})
        return out

    @property
    def zeroed(self):
        return () if self.bias else ("beta0",)

    def _ln_forward(self, c, x, ln):
        b = c.b
        beta = c.p[f"{ln}.beta"] if self.bias else b.beta0
        ops.layernorm_forward(c.dev, x, c.p[f"{ln}.gamma"], beta, b.ln, b.mean, b.rstd, c.N, self.C, vec=True)

    def _ln_backward(self, c, ln, dout):
        """b.dx = dout (the residual) + the LayerNorm backward of b.dln."""
        b, g = c.b, c.g
        dbeta = g[f"{ln}.beta"] if self.bias else b.dbeta
        ops.layernorm_backward(c.dev, b.dln, c.x_in, c.p[f"{ln}.gamma"], b.mean, b.rstd, b.dx,
                               g[f"{ln}.gamma"], dbeta, c.N, self.C, vec=True, dres=dout)
        return b.dx

    def _residual(self, c, x, a, W, bias_name, K, key):
        """out = x + dropout(a·W (+ bias)): a (N,K), W (K,C)."""
        dev, p, b, N, C = c.dev, c.p, c.b, c.N, self.C
        if _dropping(self, c):
            ops.gemm(dev, a, p[W], b.br, N, C, K)
            if self.bias:
                ops.add_bias(dev, b.br, p[bias_name], N, C)
            ops.dropout(dev, b.br, b.br, N * C, self.rate, key, c.model.step, c.row0 * C)
            dev.cl.enqueue_copy(dev.queue, b.out.data, x.data)
            ops.add_inplace(dev, b.br, b.out, N * C)
            return b.out
        dev.cl.enqueue_copy(dev.queue, b.out.data, x.data)
        ops.gemm(dev, a, p[W], b.out, N, C, K, beta=1.0)
        if self.bias:
            ops.add_bias(dev, b.out, p[bias_name], N, C)
        return b.out

    def _branch_grad(self, c, dout, key):
        """The gradient of the branch before its dropout (dout itself without dropout)."""
        if not _dropping(self, c):
            return dout
        ops.dropout(c.dev, dout, c.b.dbr, c.N * self.C, self.rate, key, c.model.step, c.row0 * self.C)
        return c.b.dbr


class AttnBlock(_Block):
    kind = "attn_block"

    def __init__(self, name, prefix="", C=1, n_head=1, bias=False, dropout=0.0, proj_scale=0.02, seed=0,
                 index=0):
        super().__init__(name, prefix, C, bias, dropout, proj_scale, seed, index)
        self.nh, self.d = n_head, C // n_head
        self.scale = 1.0 / math.sqrt(self.d)
        self.keys = (ops.dropout_key(seed, index), ops.dropout_key(seed, index + 1))   # probabilities, branch

    def params(self):
        p, C, bias = self.prefix, self.C, self.bias
        return (_ln_params(p + "ln_1.", C, bias) + _linear(p + "attn.", "qkv", (C, 3 * C), bias, 0.02)
                + _linear(p + "attn.", "proj", (C, C), bias, self.proj_scale))

    @property
    def fused(self) -> bool:
        """The CPU variant's fused attention kernels (ops.attention_forward): d % 8 == 0, no dropout.
        Otherwise (the GPU variant, dropout) heads split, batched products, softmax, merge."""
        return self.variant != "gpu" and self.d % 8 == 0 and self.rate == 0

    def buffers(self, B, S):
        N, C, BH = B * S, self.C, B * self.nh
        out = self._norm_buffers(N)
        out.update(qkv=((N, 3 * C), f32), s=((BH, S, S), f32), p=((BH, S, S), f32), y=((N, C), f32),
                   dy=((N, C), f32), dqkv=((N, 3 * C), f32))
        if not self.fused:
            out.update(qkvh=((3 * N * C,), f32), yh=((N * C,), f32), dyh=((N * C,), f32), dqkvh=((3 * N * C,), f32))
        out.update({"pd": ((BH, S, S), f32)} if self.rate > 0 else {})
        return out

    def products(self, B, S):
        N, C, BH, d = B * S, self.C, B * self.nh, self.d
        heads = [] if self.fused else [(S, S, d, BH)]
        return (heads + [(N, C, C, 1), (N, C, 3 * C, 1)], [(C, C, N), (C, 3 * C, N)])

    @staticmethod
    def _parts(buf, N, C):
        """q, k, v (or dq, dk, dv) views (BH, S, d) of a (3, BH, S, d) buffer."""
        return buf[:N * C], buf[N * C:2 * N * C], buf[2 * N * C:]

    def kv(self, c):
        """The last forward's qkv (N, 3C): the key and value of row b·S + t, head h, are at columns
        C + h·d and 2C + h·d (nanoGPT's c_attn layout): the hook for a key-value cache."""
        return c.b.qkv

    def forward(self, c, x):
        dev, p, b, N, S, C, nh, d = c.dev, c.p, c.b, c.N, c.S, self.C, self.nh, self.d
        BH = c.B * nh
        c.x_in = x
        self._ln_forward(c, x, "ln_1")
        ops.gemm(dev, b.ln, p["attn.W_qkv"], b.qkv, N, 3 * C, C)
        if self.bias:
            ops.add_bias(dev, b.qkv, p["attn.b_qkv"], N, 3 * C)
        if self.fused:
            ops.attention_forward(dev, b.qkv, b.p, b.y, c.B, S, nh, d, self.scale)
            return self._residual(c, x, b.y, "attn.W_proj", "attn.b_proj", C, self.keys[1])
        ops.heads_split(dev, b.qkv, b.qkvh, N, S, nh, d, parts=3)
        q, k, v = self._parts(b.qkvh, N, C)
        ops.gemm(dev, q, k, b.s, S, S, d, trans_b=True, batch=BH)
        ops.causal_softmax(dev, b.s, b.p, BH * S, S, self.scale)
        pv = b.p
        if _dropping(self, c):
            ops.dropout(dev, b.p, b.pd, BH * S * S, self.rate, self.keys[0], c.model.step, c.row0 * nh * S)
            pv = b.pd
        ops.gemm(dev, pv, v, b.yh, S, d, S, batch=BH)
        ops.heads_merge(dev, b.yh, b.y, N, S, nh, d)
        return self._residual(c, x, b.y, "attn.W_proj", "attn.b_proj", C, self.keys[1])

    def backward(self, c, dout):
        dev, p, g, b, N, S, C, nh, d = c.dev, c.p, c.g, c.b, c.N, c.S, self.C, self.nh, self.d
        dbr = self._branch_grad(c, dout, self.keys[1])
        ops.gemm(dev, b.y, dbr, g["attn.W_proj"], C, C, N, trans_a=True)
        if self.bias:
            ops.colsum(dev, dbr, g["attn.b_proj"], N, C)
        ops.gemm(dev, dbr, p["attn.W_proj"], b.dy, N, C, C, trans_b=True)
        if self.fused:
            ops.attention_backward(dev, b.qkv, b.p, b.dy, b.s, b.dqkv, c.B, S, nh, d, self.scale)
        else:
            self._heads_backward(c)
        ops.gemm(dev, b.ln, b.dqkv, g["attn.W_qkv"], C, 3 * C, N, trans_a=True)
        if self.bias:
            ops.colsum(dev, b.dqkv, g["attn.b_qkv"], N, 3 * C)
        ops.gemm(dev, b.dqkv, p["attn.W_qkv"], b.dln, N, C, 3 * C, trans_b=True)
        return self._ln_backward(c, "ln_1", dout)

    def _heads_backward(self, c):
        """dqkv from b.dy through the split heads: batched products and the softmax's backward."""
        dev, b, N, S, C, nh, d = c.dev, c.b, c.N, c.S, self.C, self.nh, self.d
        BH = c.B * nh
        ops.heads_split(dev, b.dy, b.dyh, N, S, nh, d)
        q, k, v = self._parts(b.qkvh, N, C)
        dq, dk, dv = self._parts(b.dqkvh, N, C)
        dropping = _dropping(self, c)
        ops.gemm(dev, b.pd if dropping else b.p, b.dyh, dv, S, d, S, trans_a=True, batch=BH)   # dv = pᵀ·dy
        ops.gemm(dev, b.dyh, v, b.s, S, S, d, trans_b=True, batch=BH)                        # dp = dy·vᵀ
        if dropping:   # the forward's mask (same key and step)
            ops.dropout(dev, b.s, b.s, BH * S * S, self.rate, self.keys[0], c.model.step, c.row0 * nh * S)
        ops.causal_softmax_backward(dev, b.p, b.s, b.s, BH * S, S, self.scale)               # ds, in place
        ops.gemm(dev, b.s, k, dq, S, d, S, batch=BH)                                         # dq = ds·k
        ops.gemm(dev, b.s, q, dk, S, d, S, trans_a=True, batch=BH)                           # dk = dsᵀ·q
        ops.heads_merge(dev, b.dqkvh, b.dqkv, N, S, nh, d, parts=3)

    def telemetry(self, c) -> dict:
        """attn_entropy/h{l}: the mean over rows (heads, positions) of −Σ_τ p log p of the last
        forward's causal attention (before dropout), nats; log(t+1) at most for row t."""
        from ..reference.attention import attention_entropy
        return {f"attn_entropy/{self.group or self.name}": attention_entropy(c.b.p.get().astype(np.float64))}


class MlpBlock(_Block):
    kind = "mlp_block"

    def __init__(self, name, prefix="", C=1, bias=False, dropout=0.0, proj_scale=0.02, seed=0, index=0):
        super().__init__(name, prefix, C, bias, dropout, proj_scale, seed, index)
        self.key = ops.dropout_key(seed, index)

    def params(self):
        p, C, bias = self.prefix, self.C, self.bias
        return (_ln_params(p + "ln_2.", C, bias) + _linear(p + "mlp.", "fc", (C, 4 * C), bias, 0.02)
                + _linear(p + "mlp.", "proj", (4 * C, C), bias, self.proj_scale))

    def buffers(self, B, S):
        N, C = B * S, self.C
        out = self._norm_buffers(N)
        out.update(a=((N, 4 * C), f32), h=((N, 4 * C), f32), dh=((N, 4 * C), f32))
        out.update({} if self.bias else {"b0": ((4 * C,), f32)})
        return out

    @property
    def zeroed(self):
        return () if self.bias else ("beta0", "b0")

    def products(self, B, S):
        N, C = B * S, self.C
        return [(N, 4 * C, C, 1), (N, C, 4 * C, 1)], [(4 * C, C, N), (C, 4 * C, N)]

    def _vec(self, *arrays) -> bool:
        """The CPU variant's float8 GELU kernels apply (4·C % 8 == 0 rows, aligned buffers)."""
        return self.variant != "gpu" and ops._rows8(4 * self.C, *arrays)

    def forward(self, c, x):
        dev, p, b, N, C = c.dev, c.p, c.b, c.N, self.C
        c.x_in = x
        self._ln_forward(c, x, "ln_2")
        ops.gemm(dev, b.ln, p["mlp.W_fc"], b.a, N, 4 * C, C)
        if self.bias or not self._vec(b.a, b.h):
            ops.bias_gelu_forward(dev, b.a, p["mlp.b_fc"] if self.bias else b.b0, b.h, N, 4 * C)
        else:
            ops.gelu_forward8(dev, b.a, b.h, N * 4 * C)
        return self._residual(c, x, b.h, "mlp.W_proj", "mlp.b_proj", 4 * C, self.key)

    def backward(self, c, dout):
        dev, p, g, b, N, C = c.dev, c.p, c.g, c.b, c.N, self.C
        dbr = self._branch_grad(c, dout, self.key)
        ops.gemm(dev, b.h, dbr, g["mlp.W_proj"], 4 * C, C, N, trans_a=True)
        if self.bias:
            ops.colsum(dev, dbr, g["mlp.b_proj"], N, C)
        ops.gemm(dev, dbr, p["mlp.W_proj"], b.dh, N, 4 * C, C, trans_b=True)
        if self._vec(b.dh, b.a):                              # da, in place (element-wise)
            ops.gelu_backward8(dev, b.dh, b.a, b.dh, N * 4 * C)
        else:
            ops.gelu_backward(dev, b.dh, b.a, b.dh, N, 4 * C)
        ops.gemm(dev, b.ln, b.dh, g["mlp.W_fc"], C, 4 * C, N, trans_a=True)
        if self.bias:
            ops.colsum(dev, b.dh, g["mlp.b_fc"], N, 4 * C)
        ops.gemm(dev, b.dh, p["mlp.W_fc"], b.dln, N, C, 4 * C, trans_b=True)
        return self._ln_backward(c, "ln_2", dout)
