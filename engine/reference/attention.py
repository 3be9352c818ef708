"""numpy references of the transformer family: the kernels of kernels/attention.cl (same names
and argument order as engine.ops) and the layers of engine/layers/transformer.py (same class
names and constructors as the device layers; see engine/reference/layers.py for the protocol:
forward(p, st, x, c) -> (y, cache), backward(p, st, cache, dy) -> (dx, grads)). float64-capable.

Letters: B batch, S sequence, C width, nh heads, d = C/nh, BH = B·nh, N = B·S, V vocabulary.

    causal self-attention (Vaswani et al. 2017; nanoGPT's CausalSelfAttention), per head:
      s = q·kᵀ (S,S);  p = softmax_τ(s/√d) over τ ≤ t (0 above the diagonal);  y = p·v
    backward:  dv = pᵀ·dy;  dp = dy·vᵀ;  ds = p ⊙ (dp − Σ_τ p·dp)/√d;  dq = ds·k;  dk = dsᵀ·q
"""
from __future__ import annotations

import math

import numpy as np

from . import dropout_forward, dropout_key, embedding_backward, gelu_backward, gelu_forward, layernorm_backward, \
    layernorm_forward


# -- kernels --------------------------------------------------------------------------------------
def tok_pos_embed_forward(wte, tok, wpe, S):
    """x (N,C) = wte[tok] + wpe[n mod S]."""
    tok = np.asarray(tok).reshape(-1)
    return wte[tok] + wpe[np.arange(tok.size) % S]


def heads_split(x, S, n_head, parts=1):
    """(N, parts·C) -> (parts, B·nh, S, d)."""
    N = x.shape[0]
    d = x.shape[1] // parts // n_head
    return x.reshape(N // S, S, parts, n_head, d).transpose(2, 0, 3, 1, 4).reshape(parts, N // S * n_head, S, d)


def heads_merge(x, S, n_head):
    """(parts, B·nh, S, d) -> (N, parts·C)."""
    parts, BH, _, d = x.shape
    return x.reshape(parts, BH // n_head, n_head, S, d).transpose(1, 3, 0, 2, 4).reshape(BH // n_head * S,
                                                                                          parts * n_head * d)


def causal_mask(S):
    """(S,S) bool: τ ≤ t."""
    return np.tril(np.ones((S, S), bool))


def causal_softmax(s, S, scale):
    """s (..., S, S) -> p: softmax over τ ≤ t of scale·s, 0 for τ > t (max subtracted)."""
    z = np.where(causal_mask(S), s * scale, -np.inf)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def causal_softmax_backward(p, dp, scale):
    """ds = scale·p ⊙ (dp − Σ_τ p·dp)."""
    return scale * p * (dp - (p * dp).sum(axis=-1, keepdims=True))


def attention_forward(qkv, S, n_head, scale):
    """qkv (N, 3C) -> (p (B·nh, S, S), y (N, C)): every head's causal attention, merged."""
    q, k, v = heads_split(qkv, S, n_head, parts=3)
    p = causal_softmax(q @ k.transpose(0, 2, 1), S, scale)
    return p, heads_merge((p @ v)[None], S, n_head)


def attention_backward(qkv, p, dy, S, n_head, scale):
    """-> dqkv (N, 3C) = [dq | dk | dv] of attention_forward from dy (N, C)."""
    q, k, v = heads_split(qkv, S, n_head, parts=3)
    dyh = heads_split(dy, S, n_head)[0]
    ds = causal_softmax_backward(p, dyh @ v.transpose(0, 2, 1), scale)
    return heads_merge(np.stack([ds @ k, ds.transpose(0, 2, 1) @ q, p.transpose(0, 2, 1) @ dyh]), S, n_head)


def attention_entropy(p):
    """Mean over rows (every head and position) of −Σ_τ p log p (nats)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0).sum(axis=-1)
    return float(h.mean())


def _drop(x, rate, key, c):
    return x if rate == 0 or not c.get("training", True) else dropout_forward(x, rate, key, c["step"])


# -- layers ---------------------------------------------------------------------------------------
class TokPosEmbed:
    kind = "tok_pos_embed"

    def __init__(self, name, prefix="", V=1, C=1, block_size=1, dropout=0.0, seed=0, index=0, tied=False):
        self.name, self.V, self.rate, self.key = name, V, dropout, dropout_key(seed, index)

    def forward(self, p, st, x, c):
        S = c["S"]
        return _drop(tok_pos_embed_forward(p["wte"], x, p["wpe"], S), self.rate, self.key, c), \
            dict(x=np.asarray(x).reshape(-1), S=S, c=c)

    def backward(self, p, st, cache, dx):
        S, N = cache["S"], cache["x"].size
        dx = _drop(dx, self.rate, self.key, cache["c"])
        dwpe = np.zeros_like(p["wpe"])
        dwpe[:S] = dx.reshape(N // S, S, -1).sum(axis=0)
        return None, {"wte": embedding_backward(dx, cache["x"], self.V), "wpe": dwpe}


class AttnBlock:
    """x + W_proj·Attn(LN_1(x)) (+ biases), dropout on the probabilities and the branch."""
    kind = "attn_block"

    def __init__(self, name, prefix="", C=1, n_head=1, bias=False, dropout=0.0, proj_scale=0.02, seed=0,
                 index=0):
        self.name, self.C, self.nh, self.bias, self.rate = name, C, n_head, bias, dropout
        self.keys = (dropout_key(seed, index), dropout_key(seed, index + 1))

    def forward(self, p, st, x, c):
        S, C, nh, bias = c["S"], self.C, self.nh, self.bias
        d = C // nh
        scale = 1.0 / math.sqrt(d)
        ln, ln_cache = layernorm_forward(x, p["ln_1.gamma"], p["ln_1.beta"] if bias else 0.0)
        qkv = ln @ p["attn.W_qkv"] + (p["attn.b_qkv"] if bias else 0.0)
        q, k, v = heads_split(qkv, S, nh, parts=3)
        prob = causal_softmax(q @ k.transpose(0, 2, 1), S, scale)
        pd = _drop(prob, self.rate, self.keys[0], c)
        y = heads_merge((pd @ v)[None], S, nh)
        br = y @ p["attn.W_proj"] + (p["attn.b_proj"] if bias else 0.0)
        out = x + _drop(br, self.rate, self.keys[1], c)
        return out, dict(ln=ln, ln_cache=ln_cache, q=q, k=k, v=v, p=prob, pd=pd, y=y, S=S, scale=scale, c=c)

    def backward(self, p, st, cache, dout):
        S, nh, bias, c = cache["S"], self.nh, self.bias, cache["c"]
        dbr = _drop(dout, self.rate, self.keys[1], c)
        g = {"attn.W_proj": cache["y"].T @ dbr}
        dyh = heads_split(dbr @ p["attn.W_proj"].T, S, nh)[0]
        q, k, v, prob, pd = cache["q"], cache["k"], cache["v"], cache["p"], cache["pd"]
        dv = pd.transpose(0, 2, 1) @ dyh
        dp = _drop(dyh @ v.transpose(0, 2, 1), self.rate, self.keys[0], c)
        ds = causal_softmax_backward(prob, dp, cache["scale"])
        dq, dk = ds @ k, ds.transpose(0, 2, 1) @ q
        dqkv = heads_merge(np.stack([dq, dk, dv]), S, nh)
        g["attn.W_qkv"] = cache["ln"].T @ dqkv
        dln = dqkv @ p["attn.W_qkv"].T
        dx, g["ln_1.gamma"], dbeta = layernorm_backward(dln, cache["ln_cache"])
        if bias:
            g.update({"attn.b_proj": dbr.sum(axis=0), "attn.b_qkv": dqkv.sum(axis=0), "ln_1.beta": dbeta})
        return dout + dx, g


class MlpBlock:
    """x + W_proj·GELU(W_fc·LN_2(x)) (+ biases), dropout on the branch; GELU exact (erf)."""
    kind = "mlp_block"

    def __init__(self, name, prefix="", C=1, bias=False, dropout=0.0, proj_scale=0.02, seed=0, index=0):
        self.name, self.bias, self.rate, self.key = name, bias, dropout, dropout_key(seed, index)

    def forward(self, p, st, x, c):
        bias = self.bias
        ln, ln_cache = layernorm_forward(x, p["ln_2.gamma"], p["ln_2.beta"] if bias else 0.0)
        a = ln @ p["mlp.W_fc"] + (p["mlp.b_fc"] if bias else 0.0)
        h = gelu_forward(a)
        br = h @ p["mlp.W_proj"] + (p["mlp.b_proj"] if bias else 0.0)
        return x + _drop(br, self.rate, self.key, c), dict(ln=ln, ln_cache=ln_cache, a=a, h=h, c=c)

    def backward(self, p, st, cache, dout):
        dbr = _drop(dout, self.rate, self.key, cache["c"])
        g = {"mlp.W_proj": cache["h"].T @ dbr}
        da = gelu_backward(dbr @ p["mlp.W_proj"].T, cache["a"])
        g["mlp.W_fc"] = cache["ln"].T @ da
        dx, g["ln_2.gamma"], dbeta = layernorm_backward(da @ p["mlp.W_fc"].T, cache["ln_cache"])
        if self.bias:
            g.update({"mlp.b_proj": dbr.sum(axis=0), "mlp.b_fc": da.sum(axis=0), "ln_2.beta": dbeta})
        return dout + dx, g
