"""numpy references of the slot memory read (engine/layers/memory.py): the kernels of
kernels/memory.cl (same names and argument order as engine.ops, less the device and the sizes)
and the layer MemoryRead (same class name and constructor as the device layer; the protocol is
engine/reference/layers.py's: forward(p, st, x, c) -> (y, cache), backward(p, st, cache, dy) ->
(dx, grads), local_update(st, cache, step, p=, logits=)). float64-capable.

Letters: N = B·S rows, E embedding, M memory width, Ms slots, V vocabulary.

    q = GELU(e·W_q + b_q);  a = softmax_s(q·Kᵀ);  read = a·Vals
    backward:  dVals = aᵀ·dy;  da = dy·Valsᵀ;  ds = a ⊙ (da − Σ_s a·da);  dK = dsᵀ·q;
               dq = ds·K;  dpre = dq·GELU'(pre);  dW_q = eᵀ·dpre;  db_q = Σ_n dpre;  de = dpre·W_qᵀ
"""
from __future__ import annotations

import numpy as np

from . import gelu_backward, gelu_forward

MEM_EPS = 1e-6   # normalise(v) = v / sqrt(|v|² + MEM_EPS), as row_normalize_forward


def normalise(v):
    """v (..., M) / sqrt(|v|² + 1e-6) along the last axis."""
    return v / np.sqrt(np.sum(v * v, axis=-1, keepdims=True) + MEM_EPS)


# -- kernels --------------------------------------------------------------------------------------
def memory_softmax(scores):
    """scores (N,Ms) -> (a (N,Ms) = softmax over the slots, slot (N,) int32 = first argmax)."""
    z = np.exp(scores - scores.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True), np.argmax(scores, axis=1).astype(np.int32)


def memory_softmax_backward(a, da):
    """-> ds (N,Ms) = a ⊙ (da − Σ_s a·da)."""
    return a * (da - (a * da).sum(axis=1, keepdims=True))


def memory_write(mem, sums, counts, w):
    """mem (Ms,M) in place: for each slot s with counts[s] > 0, t = normalise(sums[s]/counts[s]),
    mem[s] ← normalise((1−w)·mem[s] + w·t). sums (Ms,M), counts (Ms,) (the shared "mean" write
    passes the one sum and N for every slot). -> delta2 (Ms,) = |Δmem[s]|² (0 for untouched slots)."""
    delta2 = np.zeros(mem.shape[0], mem.dtype)
    for s in np.flatnonzero(np.asarray(counts) > 0):
        t = normalise(sums[s] / counts[s])
        new = normalise((1 - w) * mem[s] + w * t)
        delta2[s] = np.sum((new - mem[s]) ** 2)
        mem[s] = new
    return delta2


def memory_usage_update(usage, slot):
    """usage (Ms,) += the counts of each slot in slot (N,) (the arg-max slots), in place."""
    usage += np.bincount(slot, minlength=usage.shape[0]).astype(usage.dtype)


def key_cosine(K):
    """The mean over slot pairs s ≠ t of k̂_s·k̂_t, k̂ = normalise(K): 1 when every key is one vector."""
    kh = normalise(K)
    G = kh @ kh.T
    Ms = K.shape[0]
    return float((G.sum() - np.trace(G)) / (Ms * (Ms - 1)))


def perplexity(counts):
    """exp of the entropy of the distribution counts/Σcounts (1 for one used slot, Ms for uniform)."""
    q = np.asarray(counts, np.float64)
    q = q[q > 0] / max(1.0, q.sum())
    return float(np.exp(-(q * np.log(q)).sum())) if q.size else 0.0


def value_projection(V, Vp, M, seed):
    """W_u (Vp,M): the fixed Linear V→M of the logits for the value write, He/Kaiming normal
    N(0, 2/V) over the V real rows (default_rng([seed, 14])), the Vp − V padding rows 0."""
    W = np.zeros((Vp, M))
    W[:V] = np.random.default_rng([seed, 14]).standard_normal((V, M)) * np.sqrt(2.0 / V)
    return W


# -- the layer ------------------------------------------------------------------------------------
class MemoryRead:
    """engine/layers/memory.py's maths; the write rule is outside backprop (local_update)."""
    kind = "memory_read"
    writes_params = True

    def __init__(self, name, prefix="", E=1, M=1, Ms=1, V=1, memory=True, write_mode="mean", write_strength=0.1,
                 init="kaiming", seed=0):
        self.name, self.E, self.M, self.Ms, self.V = name, E, M, Ms, V
        self.memory, self.mode, self.w = memory, write_mode, write_strength

    def forward(self, p, st, e, c):
        pre = e @ p["W_q"] + p["b_q"]
        q = gelu_forward(pre)
        cache = dict(e=e, pre=pre, q=q)
        if not self.memory:
            return q, cache
        a, slot = memory_softmax(q @ p["K"].T)
        cache.update(a=a, slot=slot)
        return a @ p["Vals"], cache

    def backward(self, p, st, cache, dy):
        grads = {}
        dq = dy
        if self.memory:
            a, q = cache["a"], cache["q"]
            grads["Vals"] = a.T @ dy
            ds = memory_softmax_backward(a, dy @ p["Vals"].T)
            grads["K"] = ds.T @ q
            dq = ds @ p["K"]
        dpre = gelu_backward(dq, cache["pre"])
        grads["W_q"] = cache["e"].T @ dpre
        grads["b_q"] = dpre.sum(axis=0)
        return dpre @ p["W_q"].T, grads

    def local_update(self, st, cache, step, p=None, logits=None):
        """After the optimiser step, on that step's forward (cache): the usage counts, then the
        write of K (from q) and Vals (from u = logits·W_u), in place on p. st["dK2"], st["dV2"]:
        the per-slot |Δ|² of this write (0 when nothing is written)."""
        if not self.memory:
            return
        memory_usage_update(st["usage"], cache["slot"])
        Ms = self.Ms
        st["dK2"], st["dV2"] = np.zeros(Ms), np.zeros(Ms)
        if self.mode == "none":
            return
        q = cache["q"]
        u = logits @ st["W_u"][:logits.shape[1]]   # the head's logits (N, V), or stored (N, Vp)
        N = q.shape[0]
        for name, x, d in (("K", q, "dK2"), ("Vals", u, "dV2")):
            if self.mode == "mean":
                sums, counts = np.repeat(x.sum(axis=0)[None], Ms, axis=0), np.full(Ms, N)
            else:
                sums = np.zeros((Ms, x.shape[1]))
                np.add.at(sums, cache["slot"], x)
                counts = np.bincount(cache["slot"], minlength=Ms)
            st[d] = memory_write(p[name], sums, counts, self.w)

    def telemetry(self, p, st, cache) -> dict:
        """The device layer's telemetry from the same inputs (tests/test_memory.py)."""
        if not self.memory:
            return {}
        counts = np.bincount(cache["slot"], minlength=self.Ms)
        out = {"mem_usage_counts": [int(v) for v in st["usage"]],
               "mem_usage_perplexity": perplexity(st["usage"]),
               "mem_never_used": int((st["usage"] == 0).sum()),
               "mem_batch_perplexity": perplexity(counts), "mem_batch_used": int((counts > 0).sum()),
               "mem_write_norm_K": float(np.sqrt(np.sum(st.get("dK2", 0.0)))),
               "mem_write_norm_Vals": float(np.sqrt(np.sum(st.get("dV2", 0.0))))}
        if self.Ms > 1:
            out["mem_key_cosine"] = key_cosine(p["K"])
        return out
