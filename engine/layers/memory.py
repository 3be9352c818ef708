"""MemoryRead: the slot memory read of DRLMemNet (issue 14) and its local write rule.
e (N,E) -> read (N,M):

  q    = GELU(e·W_q + b_q)            (N,M)    the query; GELU exact (erf), the engine's kernels
  s    = q·Kᵀ                         (N,Ms)   a score per slot
  a    = softmax_s(s)                 (N,Ms)   row-wise over the Ms slots, max subtracted
  read = a·Vals                       (N,M)    the output
  memory=False (the "no memory" ablation): read = q; K and Vals are not declared.

Backward through everything: dVals = aᵀ·dy, da = dy·Valsᵀ, ds = a ⊙ (da − Σ_s a·da),
dK = dsᵀ·q, dq = ds·K, dpre = dq·GELU'(pre), dW_q = eᵀ·dpre, db_q = Σ_n dpre, de = dpre·W_qᵀ.
Parameters are (in, out) as everywhere (y = x·W): W_q (E,M), b_q (M,), K (Ms,M), Vals (Ms,M),
`init` (default kaiming: N(0, 2/fan_in), fan_in = shape[0], so Ms for K and Vals) for the three
matrices, b_q zeros; weight decay on the matrices (dim ≥ 2), not on b_q.

The write (local_update: after the optimiser step, on that step's forward, outside backprop),
w = write_strength, normalise(v) = v/sqrt(|v|² + 1e-6), slot_n = argmax_s s[n,s] (= argmax of a:
the softmax is monotone; the first maximum on ties), u = logits·W_u (N,M):
  "mean" (the design, faithful): k̄ = normalise(mean_n q_n), K_s ← normalise((1−w)·K_s + w·k̄)
         for EVERY slot; Vals likewise with v̄ = normalise(mean_n u_n). Every slot is pulled to
         the same vector: the keys collapse (mem_key_cosine → 1), which the telemetry measures.
  "slot": only addressed slots: K_s ← normalise((1−w)·K_s + w·normalise(mean_{slot_n = s} q_n)),
         Vals likewise with u; a slot no row addressed is not touched (bit for bit).
  "none": no write.
Sums in a fixed order: ops.colsum ("mean"), ops.bucket_sort then ops.bucket_sums in row order
per slot ("slot", as the prototype update), then kernels/memory.cl's memory_write.
u: the logits are the model's output of this forward, read from the workspace in local_update
(c.ws.logits, the head's (N, Vp) buffer, Vp = V rounded up to 8; its padding columns are 0).
W_u (Vp,M) is the design's "Linear V→M" of the value write. The write is outside backprop, so
no gradient ever reaches W_u: it is a fixed random projection, state not parameter, drawn He
normal N(0, 2/V) from `seed` (engine.reference.memory.value_projection), padding rows 0,
checkpointed. K and Vals are parameters the optimiser also updates: the write changes them in
place in the flat parameter buffer (writes_params; data parallelism then sends the parameters
to the replicas after the rules, engine/parallel.py).
usage (Ms,) int32: the cumulative count of rows whose arg-max slot was s, over every step's
local_update in every write mode (never reset; checkpointed): mem_never_used counts its zeros.

Telemetry (logging points): mem_usage_counts (usage), mem_usage_perplexity (exp entropy of
usage/Σusage), mem_never_used, mem_batch_perplexity / mem_batch_used (this forward's arg-max
counts), mem_key_cosine (mean over pairs s ≠ t of k̂_s·k̂_t, from Σ_s k̂_s: (|Σk̂|² − Σ|k̂|²)/
(Ms(Ms−1)), no Ms×Ms matrix), mem_write_norm_K / _Vals (|ΔK|_F, |ΔVals|_F of the last write).
Reference: engine.reference.memory.MemoryRead.
"""
from __future__ import annotations

import numpy as np

from .. import ops
from ..params import ParamSpec, padded
from . import Layer, StateSpec, f32, i32

WRITE_MODES = ("mean", "slot", "none")


class MemoryRead(Layer):
    kind = "memory_read"
    writes_params = True

    def __init__(self, name, prefix="", E=1, M=1, Ms=1, V=1, memory=True, write_mode="mean", write_strength=0.1,
                 init="kaiming", seed=0):
        super().__init__(name, prefix)
        if write_mode not in WRITE_MODES:
            raise ValueError(f"{name}: write_mode must be one of {WRITE_MODES}, got {write_mode!r}")
        if not 0.0 <= write_strength <= 1.0:
            raise ValueError(f"{name}: write_strength must be in [0, 1], got {write_strength}")
        self.E, self.M, self.Ms, self.V, self.Vp = E, M, Ms, V, padded(V)
        self.memory, self.mode, self.w, self.init, self.seed = memory, write_mode, write_strength, init, seed
        self.n_in, self.n_out = E, M   # the input and output widths (tests/test_layer_contract.py)

    # -- declarations ------------------------------------------------------------------
    def params(self):
        p, E, M, Ms = self.prefix, self.E, self.M, self.Ms
        out = [ParamSpec(p + "W_q", (E, M), init=self.init), ParamSpec(p + "b_q", (M,), init="zeros", decay=False)]
        if self.memory:
            out += [ParamSpec(p + "K", (Ms, M), init=self.init), ParamSpec(p + "Vals", (Ms, M), init=self.init)]
        return out

    def state(self):
        if not self.memory:
            return []
        from ..reference.memory import value_projection
        p, M, Ms, V, Vp, seed = self.prefix, self.M, self.Ms, self.V, self.Vp, self.seed
        return [StateSpec(p + "usage", (Ms,), i32),
                StateSpec(p + "W_u", (Vp, M), init=lambda: value_projection(V, Vp, M, seed)),
                StateSpec(p + "sums", (Ms, M), checkpoint=False),    # per-slot sums; telemetry's k̂
                StateSpec(p + "dK2", (Ms,), checkpoint=False),       # |ΔK_s|² of the last write
                StateSpec(p + "dV2", (Ms,), checkpoint=False),
                StateSpec(p + "kinv", (Ms,), checkpoint=False),      # telemetry: 1/|K_s|, Σ_s k̂_s
                StateSpec(p + "kcol", (M,), checkpoint=False)]

    @property
    def writes(self) -> bool:
        return self.memory and self.mode != "none"

    def buffers(self, B, S):
        N, E, M, Ms = B * S, self.E, self.M, self.Ms
        out = {"pre": ((N, M), f32), "q": ((N, M), f32), "dq": ((N, M), f32), "de": ((N, E), f32)}
        if self.memory:
            out.update(a=((N, Ms), f32), slot=((N,), i32), y=((N, M), f32), da=((N, Ms), f32),
                       perm=((N,), i32), starts=((Ms + 1,), i32))
        if self.writes:
            out.update(u=((N, M), f32))
        return out

    def products(self, B, S):
        N, E, M, Ms = B * S, self.E, self.M, self.Ms
        tn, tk = [(N, E, M, 1)], [(E, M, N)]                      # de = dpre·W_qᵀ; dW_q = eᵀ·dpre
        if self.memory:
            tn += [(N, Ms, M, 1), (N, Ms, M, 1)]                   # s = q·Kᵀ; da = dy·Valsᵀ
            tk += [(Ms, M, N), (Ms, M, N)]                         # dVals = aᵀ·dy; dK = dsᵀ·q
        return tn, tk

    # -- forward and backward ---------------------------------------------------------------
    def forward(self, c, e):
        dev, p, b, N, E, M, Ms = c.dev, c.p, c.b, c.N, self.E, self.M, self.Ms
        c.x_in = e
        ops.gemm(dev, e, p["W_q"], b.pre, N, M, E)
        ops.bias_gelu_forward(dev, b.pre, p["b_q"], b.q, N, M)    # pre += b_q, q = GELU(pre)
        if not self.memory:
            return b.q
        ops.gemm(dev, b.q, p["K"], b.a, N, Ms, M, trans_b=True)
        ops.memory_softmax(dev, b.a, b.slot, N, Ms)
        ops.gemm(dev, b.a, p["Vals"], b.y, N, M, Ms)
        return b.y

    def backward(self, c, dy):
        dev, p, g, b, N, E, M, Ms = c.dev, c.p, c.g, c.b, c.N, self.E, self.M, self.Ms
        dq = dy
        if self.memory:
            ops.gemm(dev, b.a, dy, g["Vals"], Ms, M, N, trans_a=True)
            ops.gemm(dev, dy, p["Vals"], b.da, N, Ms, M, trans_b=True)
            ops.memory_softmax_backward(dev, b.a, b.da, N, Ms)      # b.da is now ds
            ops.gemm(dev, b.da, b.q, g["K"], Ms, M, N, trans_a=True)
            ops.gemm(dev, b.da, p["K"], b.dq, N, M, Ms)
            dq = b.dq
        ops.gelu_backward(dev, dq, b.pre, b.dq, N, M)               # dpre (element-wise: in place is safe)
        ops.gemm(dev, c.x_in, b.dq, g["W_q"], E, M, N, trans_a=True)
        ops.colsum(dev, b.dq, g["b_q"], N, M)
        ops.gemm(dev, b.dq, p["W_q"], b.de, N, E, M, trans_b=True)
        return b.de

    # -- the write rule -------------------------------------------------------------------------
    def local_update(self, c):
        if not self.memory:
            return
        dev, p, b, st, N, M, Ms = c.dev, c.p, c.b, c.st, c.N, self.M, self.Ms
        ops.bucket_sort(dev, b.slot, N, Ms, b.starts, b.perm)
        ops.memory_usage_update(dev, st["usage"], b.starts, Ms)
        if not self.writes:
            return
        ops.gemm(dev, c.ws.logits, st["W_u"], b.u, N, M, self.Vp)
        for name, x, d2 in (("K", b.q, st["dK2"]), ("Vals", b.u, st["dV2"])):
            if self.mode == "mean":
                ops.colsum(dev, x, st["sums"], N, M)                # row 0 of sums: Σ_n x_n
            else:
                ops.bucket_sums(dev, x, b.perm, b.starts, st["sums"], Ms, M)
            ops.memory_write(dev, p[name], st["sums"], b.starts, self.mode == "mean", N, self.w, d2, Ms, M)

    def local_reads(self, c) -> list:
        if not self.memory:
            return []
        return [c.b.slot] + ([c.b.q, c.ws.logits] if self.writes else [])

    # -- telemetry (logging points only: these read the device) -----------------------------------
    def telemetry(self, c) -> dict:
        """Before this step's local_update (the trainer's order): usage is the previous steps',
        the write norms the previous write's."""
        if not self.memory:
            return {}
        from ..reference.memory import perplexity
        dev, p, b, st, M, Ms = c.dev, c.p, c.b, c.st, self.M, self.Ms
        usage = st["usage"].get()
        counts = np.bincount(b.slot.get(), minlength=Ms)
        out = {"mem_usage_counts": usage.tolist(), "mem_usage_perplexity": perplexity(usage),
               "mem_never_used": int((usage == 0).sum()),
               "mem_batch_perplexity": perplexity(counts), "mem_batch_used": int((counts > 0).sum()),
               "mem_write_norm_K": float(np.sqrt(st["dK2"].get().astype(np.float64).sum())),
               "mem_write_norm_Vals": float(np.sqrt(st["dV2"].get().astype(np.float64).sum()))}
        if Ms > 1:   # k̂ = normalise(K) into the sums scratch, then Σ_s k̂_s
            ops.row_normalize_forward(dev, p["K"], st["sums"], st["kinv"], Ms, M)
            ops.colsum(dev, st["sums"], st["kcol"], Ms, M)
            kcol = st["kcol"].get().astype(np.float64)
            kinv = st["kinv"].get().astype(np.float64)
            sq = np.sum(1.0 - 1e-6 * kinv * kinv)   # Σ_s |k̂_s|² = Σ_s |K_s|²/(|K_s|² + 1e-6)
            out["mem_key_cosine"] = float((kcol @ kcol - sq) / (Ms * (Ms - 1)))
        tag = self.prefix.rstrip(".")
        return {f"{tag}/{k}" if tag else k: v for k, v in out.items()}
