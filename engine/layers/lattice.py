"""The lattice layer: a 3D lattice of n×n×D cells with C channels each, updated K times by residual
experts, written on its front face and read on its back face.

Letters: N = B·S rows (independent samples), n the face side, D the depth, Q = n·n·D cells
(cell i = (z·n + y)·n + x, z = 0 the front face, z = D−1 the back face), C channels, Hc hidden,
K steps, W = 1 + P cells per perception, E active experts.

  write   s_0[r, i, c] = x[r,i]·a_c + b_c on the front face (i < n²), 0 elsewhere; x (N, n²)
  step    s_{t+1} = s_t + Σ_e g_e ⊙ Δ_e(s_t)   (one expert: no gate, s_{t+1} = s_t + Δ_local)
  read    y[r, i] = Σ_c s_K[r, (D−1)·n² + i, c]·r_c; y (N, n²).
          K = 0 reads the FRONT face (the "face maps alone" ablation): y = x·(a·r) + b·r.
Experts (`experts`, a tuple that must hold "local"; the gate's columns in the order local,
distant, functional):
  local       P = [s_i, s_{nbr_1}, …, s_{nbr_P}] (P = 6: −x, +x, −y, +y, −z, +z; 26: {−1,0,1}³ but 0,
              dz slowest; out-of-lattice neighbours read 0), Δ = tanh(P·W1 + b1)·W2
  distant     the same over R fixed links per cell (R distinct other cells, uniform, drawn once from
              `seed`: engine.reference.lattice.lattice_links), W1d, b1d, W2d
  functional  attention over the n² cells of the cell's z-layer: q = s·Wq, k = s·Wk (C→dk),
              v = s·Wv, Δ = softmax(q·kᵀ/√dk)·v (batched ops.gemm, N·D groups; memory_softmax)
  gate        g = softmax(s_i·Wg + bg) over the active experts per cell (more than one expert)
Parameters: a (C,) N(0,1), b (C,) 0, r (C,) N(0, 1/C) (no decay, lr_scale 1); W1 (W·C, Hc) LeCun,
b1 0, W2 (Hc, C) N(0, (w2_scale/√Hc)²) so K residual steps start near the identity; Wq, Wk
(C, dk), Wv (C, C) LeCun; Wg (C, E) LeCun, bg 0. Each expert's and the gate's carry
ParamSpec.lr_scale = rates[expert] (`rates`, default 1.0).

Forward keeps s_0..s_K, ((K+1)·N·Q, C); the backward recomputes each step's perception, hidden
layer, gate and attention from s_t (t = K−1 … 0) and accumulates the parameter gradients over
the steps (gemm β = 1 after the first, lattice_colsum β = 1). The gather's adjoint is a
fixed-order gather-sum through a reverse table (CSR, host-built once, kept as scratch state):
no atomics, a rerun gives the same bits. Bytes per sample (buffers() at one row, float32; the
gemm scratch holds only weights, transposed, and small K-split partials): per cell
(K+1)·C (states) + W·C (perception, reused as its gradient) + 2·Hc (h, dh) + 2·C (ds), the gate
+ 2·E + 2·C, the functional expert + 2·n² (scores, their gradient) + 4·dk + 2·C + 1 (int), and
2·n² per row (y, dx). n = D = 37, C = 8, Hc = 32, K = 37, 6 neighbours, local only:
4·50653·(304 + 56 + 64 + 16) ≈ 89.2 MB per sample (bytes_per_sample()); n = 8, K = 8: 0.43 MB.
Telemetry: lattice/state_norm/t{t} (RMS of s_t) and, gated, lattice/gate/{expert} (mean weight
over rows, cells and steps). states(c): the last forward's states, (N, K+1, D, n, n, C).
Reference: engine.reference.lattice.Lattice.
"""
from __future__ import annotations

import math

import numpy as np

from .. import ops
from ..params import ParamSpec
from ..reference.lattice import EXPERTS, lattice_links, lattice_neighbours, reverse_table
from . import Layer, StateSpec, f32, i32



def wgrad_parts(rows: int) -> list[tuple[int, int]]:
    """(first row, rows) of the pieces a weight gradient Aᵀ·B over `rows` rows is computed in: one,
    unless rows is long (ops.K_SPLIT_MIN) and has no chunk divisor (ops._k_chunk: N·37³ rows), then a
    head of a multiple of 512 rows (ops.gemm splits it over 512-row chunks in parallel) and the tail
    added after it (β = 1): a fixed order, so deterministic; the 37³ lattice's products run ~4x faster."""
    if rows < ops.K_SPLIT_MIN or ops._k_chunk(rows):
        return [(0, rows)]
    head = rows - rows % 512
    return [(0, head), (head, rows - head)]


def wgrad(dev, a, b, c, M, N, rows, beta):
    """c (M, N) = beta·c + aᵀ·b over a (rows, M), b (rows, N), in the pieces of wgrad_parts. a and b
    are read as rows of M and N floats from their first element, whatever width the buffers were
    declared with (P holds the widest expert's perception; the distant expert's is narrower)."""
    parts = wgrad_parts(rows)
    if len(parts) == 1:
        ops.gemm(dev, a, b, c, M, N, rows, beta=beta, trans_a=True)
        return
    fa, fb = a.ravel(), b.ravel()
    for k, (r0, n) in enumerate(parts):
        ops.gemm(dev, fa[r0 * M:(r0 + n) * M], fb[r0 * N:(r0 + n) * N], c, M, N, n, beta=beta if k == 0 else 1.0,
                 trans_a=True)

class Lattice(Layer):
    kind = "lattice"

    def __init__(self, name, prefix="", n=3, D=None, C=4, Hc=16, K=None, neighbours=6, experts=("local",), R=4,
                 dk=4, rates=None, seed=0, w2_scale=0.1):
        super().__init__(name, prefix)
        D = n if D is None else D
        K = n if K is None else K
        experts = tuple(experts)
        for what, v in (("n", n), ("D", D), ("C", C), ("Hc", Hc)):
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name}: lattice {what} must be a positive integer, got {v!r}")
        if K < 0:
            raise ValueError(f"{name}: lattice K (steps) must be >= 0, got {K}")
        if neighbours not in (6, 26):
            raise ValueError(f"{name}: lattice neighbours must be 6 or 26, got {neighbours!r}")
        unknown = [e for e in experts if e not in EXPERTS]
        if unknown or len(set(experts)) != len(experts) or "local" not in experts:
            raise ValueError(f"{name}: lattice experts must be distinct names from {EXPERTS} and contain 'local', "
                             f"got {experts!r}")
        rates = dict(rates or {})
        bad = [k for k in rates if k not in (*EXPERTS, "gate")]
        if bad or any(not (float(v) >= 0.0) for v in rates.values()):
            raise ValueError(f"{name}: lattice rates are non-negative numbers for {(*EXPERTS, 'gate')}, got {rates!r}")
        Q = n * n * D
        if "distant" in experts and not 1 <= R <= Q - 1:
            raise ValueError(f"{name}: lattice R (distant links) must be in 1..Q-1 = {Q - 1}, got {R}")
        if "functional" in experts and dk < 1:
            raise ValueError(f"{name}: lattice dk must be positive, got {dk}")
        if not w2_scale > 0:
            raise ValueError(f"{name}: lattice w2_scale must be positive, got {w2_scale}")
        self.n, self.D, self.C, self.Hc, self.K, self.neighbours = n, D, C, Hc, K, neighbours
        self.R, self.dk, self.seed, self.w2_scale = R, dk, seed, w2_scale
        self.experts = tuple(e for e in EXPERTS if e in experts)
        self.rates = {e: float(rates.get(e, 1.0)) for e in (*EXPERTS, "gate")}
        self.Q, self.n2, self.E = Q, n * n, len(self.experts)
        self.gated = self.E > 1
        self.W = {"local": 1 + neighbours, "distant": 1 + R}
        self.n_in = self.n_out = self.n2   # tests/test_layer_contract.py: widths
        self._tables = {}

    @property
    def read_offset(self):
        """The first cell of the read face: the back face, or the front with K = 0."""
        return (self.D - 1) * self.n2 if self.K else 0

    def table(self, e):
        """The gather table (Q, W) of expert e (local, distant), built on the host once."""
        if e not in self._tables:
            self._tables[e] = lattice_neighbours(self.n, self.D, self.neighbours) if e == "local" else \
                lattice_links(self.Q, self.R, self.seed)
        return self._tables[e]

    # -- declarations ---------------------------------------------------------------------------------
    def params(self):
        p, C, Hc = self.prefix, self.C, self.Hc
        out = [ParamSpec(p + "a", (C,), init="normal", scale=1.0, decay=False),
               ParamSpec(p + "b", (C,), init="zeros", decay=False),
               ParamSpec(p + "r", (C,), init="normal", scale=1.0 / math.sqrt(C), decay=False)]
        for e, x in (("local", ""), ("distant", "d")):
            if e in self.experts:
                lr = self.rates[e]
                out += [ParamSpec(p + "W1" + x, (self.W[e] * C, Hc), init="lecun", lr_scale=lr),
                        ParamSpec(p + "b1" + x, (Hc,), init="zeros", decay=False, lr_scale=lr),
                        ParamSpec(p + "W2" + x, (Hc, C), init="normal", scale=self.w2_scale / math.sqrt(Hc),
                                  lr_scale=lr)]
        if "functional" in self.experts:
            lr = self.rates["functional"]
            out += [ParamSpec(p + "Wq", (C, self.dk), init="lecun", lr_scale=lr),
                    ParamSpec(p + "Wk", (C, self.dk), init="lecun", lr_scale=lr),
                    ParamSpec(p + "Wv", (C, C), init="lecun", lr_scale=lr)]
        if self.gated:
            lr = self.rates["gate"]
            out += [ParamSpec(p + "Wg", (C, self.E), init="lecun", lr_scale=lr),
                    ParamSpec(p + "bg", (self.E,), init="zeros", decay=False, lr_scale=lr)]
        return out

    def state(self):
        """The gather tables and their reverse (CSR) tables: scratch, rebuilt from the arguments."""
        out = []
        for e, x in (("local", ""), ("distant", "d")):
            if e in self.experts:
                tab = self.table(e)
                ptr, idx = reverse_table(tab)
                out += [StateSpec(self.prefix + "nbr" + x, tab.shape, i32, checkpoint=False, init=lambda t=tab: t),
                        StateSpec(self.prefix + "rev_ptr" + x, ptr.shape, i32, checkpoint=False, init=lambda t=ptr: t),
                        StateSpec(self.prefix + "rev_idx" + x, idx.shape, i32, checkpoint=False, init=lambda t=idx: t)]
        return out

    def buffers(self, B, S):
        N, Q, C, Hc, E, n2 = B * S, self.Q, self.C, self.Hc, self.E, self.n2
        rows = N * Q
        Wm = max(self.W[e] for e in self.experts if e in self.W)
        out = {"states": (((self.K + 1) * rows, C), f32), "P": ((rows, Wm * C), f32), "h": ((rows, Hc), f32),
               "dh": ((rows, Hc), f32), "ds_a": ((rows, C), f32), "ds_b": ((rows, C), f32),
               "y": ((N, n2), f32), "dx": ((N, n2), f32), "tmp": ((max(Hc, C, E, self.dk),), f32)}
        if ops.colsum_parts(rows):   # the bias gradients' partial column sums (ops.lattice_colsum)
            out["cpart"] = ((ops.colsum_parts(rows) * max(Hc, E),), f32)
        if self.gated:
            out |= {"g": ((rows, E), f32), "dg": ((rows, E), f32), "dl": ((rows, C), f32), "dd": ((rows, C), f32)}
        if "functional" in self.experts:
            dk = self.dk
            out |= {"fq": ((rows, dk), f32), "fk": ((rows, dk), f32), "fv": ((rows, C), f32),
                    "A": ((rows, n2), f32), "dA": ((rows, n2), f32), "slot": ((rows,), i32),
                    "dq": ((rows, dk), f32), "dkk": ((rows, dk), f32), "dv": ((rows, C), f32)}
        return out

    def bytes_per_sample(self) -> int:
        return sum(math.prod(s) * np.dtype(t).itemsize for s, t in self.buffers(1, 1).values())

    def products(self, B, S):
        rows, C, Hc, E, n2, G = B * S * self.Q, self.C, self.Hc, self.E, self.n2, B * S * self.D
        tn, ta = [], []
        for e in self.experts:
            if e in self.W:
                WC = self.W[e] * C
                tn += [(rows, Hc, WC, 1), (rows, C, Hc, 1), (rows, Hc, C, 1), (rows, WC, Hc, 1)]
                ta += [(M, Nn, k) for M, Nn in ((Hc, C), (WC, Hc)) for _, k in wgrad_parts(rows)]
            else:
                dk = self.dk
                tn += [(rows, dk, C, 1), (rows, C, C, 1), (n2, n2, dk, G), (n2, C, n2, G), (n2, n2, C, G),
                       (n2, dk, n2, G), (rows, C, dk, 1)]
                ta += [(M, Nn, k) for M, Nn in ((C, dk), (C, C)) for _, k in wgrad_parts(rows)]
        if self.gated:
            tn += [(rows, E, C, 1), (rows, C, E, 1)]
            ta += [(C, E, k) for _, k in wgrad_parts(rows)]
        return tn, ta

    # -- helpers --------------------------------------------------------------------------------------
    def _state(self, c, t):
        rows = c.N * self.Q
        return c.b.states[t * rows:(t + 1) * rows]

    def _copy(self, dev, src, dst):
        dev.cl.enqueue_copy(dev.queue, dst.base_data, src.base_data, byte_count=src.nbytes, src_offset=src.offset,
                            dst_offset=dst.offset)

    def _suffix(self, e):
        return {"local": "", "distant": "d"}[e]

    def _expert_hidden(self, c, e, s):
        """P = the perception of s, h = tanh(P·W1 + b1) (local, distant)."""
        dev, b, x, rows, C = c.dev, c.b, self._suffix(e), c.N * self.Q, self.C
        W = self.W[e]
        ops.lattice_gather(dev, s, c.st["nbr" + x], b.P, W, rows, self.Q, C)
        ops.gemm(dev, b.P, c.p["W1" + x], b.h, rows, self.Hc, W * C)
        ops.lattice_bias_tanh(dev, b.h, c.p["b1" + x], rows, self.Hc)

    def _attention(self, c, s):
        """fq, fk, fv = s·Wq, s·Wk, s·Wv; A = softmax(fq·fkᵀ/√dk) per (row, z-layer) group."""
        dev, b, p, rows, C, dk, n2 = c.dev, c.b, c.p, c.N * self.Q, self.C, self.dk, self.n2
        G = c.N * self.D
        ops.gemm(dev, s, p["Wq"], b.fq, rows, dk, C)
        ops.gemm(dev, s, p["Wk"], b.fk, rows, dk, C)
        ops.gemm(dev, s, p["Wv"], b.fv, rows, C, C)
        ops.gemm(dev, b.fq, b.fk, b.A, n2, n2, dk, alpha=1.0 / math.sqrt(dk), trans_b=True, batch=G)
        ops.memory_softmax(dev, b.A, b.slot, rows, n2)

    def _delta(self, c, e, s, out, beta):
        """out = beta·out + Δ_e(s)."""
        rows, n2 = c.N * self.Q, self.n2
        if e == "functional":
            self._attention(c, s)
            ops.gemm(c.dev, c.b.A, c.b.fv, out, n2, self.C, n2, beta=beta, batch=c.N * self.D)
            return
        self._expert_hidden(c, e, s)
        ops.gemm(c.dev, c.b.h, c.p["W2" + self._suffix(e)], out, rows, self.C, self.Hc, beta=beta)

    def _gate(self, c, s):
        rows = c.N * self.Q
        ops.gemm(c.dev, s, c.p["Wg"], c.b.g, rows, self.E, self.C)
        ops.lattice_gate_softmax(c.dev, c.b.g, c.p["bg"], rows, self.E)

    # -- forward and backward -------------------------------------------------------------------------
    def forward(self, c, x):
        dev, b, p, N, C, Q, n2 = c.dev, c.b, c.p, c.N, self.C, self.Q, self.n2
        rows = N * Q
        c.x_in = x
        ops.lattice_write(dev, x, p["a"], p["b"], self._state(c, 0), N, n2, Q, C)
        for t in range(self.K):
            s, nxt = self._state(c, t), self._state(c, t + 1)
            self._copy(dev, s, nxt)                               # the residual path
            if not self.gated:
                self._delta(c, self.experts[0], s, nxt, 1.0)
                continue
            self._gate(c, s)
            for j, e in enumerate(self.experts):
                self._delta(c, e, s, b.dl, 0.0)
                ops.lattice_gate_mix(dev, nxt, b.g, b.dl, j, rows, self.E, C)
        ops.lattice_read(dev, self._state(c, self.K), p["r"], b.y, self.read_offset, N, n2, Q, C)
        return b.y

    def _expert_backward(self, c, e, s, dD, ds, beta, recompute=True):
        """Expert e's parameter gradients at step t (beta = 0: the first step of the backward) and
        ds += ∂L/∂s_t through it, from dD = ∂L/∂Δ_e. recompute=False: _delta has just computed its
        hidden layer (or attention) from s."""
        dev, b, p, g, rows, C, Hc = c.dev, c.b, c.p, c.g, c.N * self.Q, self.C, self.Hc
        if e == "functional":
            n2, dk, G = self.n2, self.dk, c.N * self.D
            if recompute:
                self._attention(c, s)
            ops.gemm(dev, dD, b.fv, b.dA, n2, n2, C, trans_b=True, batch=G)          # ∂A = dΔ·vᵀ
            ops.gemm(dev, b.A, dD, b.dv, n2, C, n2, trans_a=True, batch=G)           # ∂v = Aᵀ·dΔ
            ops.memory_softmax_backward(dev, b.A, b.dA, rows, n2)                    # ∂ of the scores
            scale = 1.0 / math.sqrt(dk)
            ops.gemm(dev, b.dA, b.fk, b.dq, n2, dk, n2, alpha=scale, batch=G)
            ops.gemm(dev, b.dA, b.fq, b.dkk, n2, dk, n2, alpha=scale, trans_a=True, batch=G)
            for w, d, width in (("Wq", b.dq, dk), ("Wk", b.dkk, dk), ("Wv", b.dv, C)):
                wgrad(dev, s, d, g[w], C, width, rows, beta)
                ops.gemm(dev, d, p[w], ds, rows, C, width, beta=1.0, trans_b=True)
            return
        x, W = self._suffix(e), self.W[e]
        if recompute:
            self._expert_hidden(c, e, s)
        wgrad(dev, b.h, dD, g["W2" + x], Hc, C, rows, beta)
        ops.gemm(dev, dD, p["W2" + x], b.dh, rows, Hc, C, trans_b=True)
        ops.lattice_tanh_backward(dev, b.dh, b.h, rows * Hc)
        wgrad(dev, b.P, b.dh, g["W1" + x], W * C, Hc, rows, beta)
        ops.lattice_colsum(dev, b.dh, g["b1" + x], rows, Hc, beta, getattr(b, "cpart", None))
        ops.gemm(dev, b.dh, p["W1" + x], b.P, rows, W * C, Hc, trans_b=True)       # P becomes ∂P
        ops.lattice_gather_backward(dev, b.P, c.st["rev_ptr" + x], c.st["rev_idx" + x], ds, W, rows, self.Q, C)

    def backward(self, c, dy):
        dev, b, p, g, N, C, Q, n2 = c.dev, c.b, c.p, c.g, c.N, self.C, self.Q, self.n2
        rows, off = N * Q, self.read_offset
        ops.lattice_face_dot(dev, dy, self._state(c, self.K), g["r"], off, N, n2, Q, C)
        ops.lattice_read_backward(dev, dy, p["r"], b.ds_a, off, N, n2, Q, C)
        if not self.K:   # no step ran: the experts' and the gate's gradients are 0
            for spec in self.params()[3:]:
                view = g[spec.name[len(self.prefix):]]
                dev.cl.enqueue_fill_buffer(dev.queue, view.base_data, np.zeros(1, f32), view.offset, view.nbytes)
        dnext, dcur = b.ds_a, b.ds_b
        for t in reversed(range(self.K)):
            s, beta = self._state(c, t), (0.0 if t == self.K - 1 else 1.0)
            self._copy(dev, dnext, dcur)                          # the residual path
            if not self.gated:
                self._expert_backward(c, self.experts[0], s, dnext, dcur, beta)
            else:
                self._gate(c, s)
                for j, e in enumerate(self.experts):
                    self._delta(c, e, s, b.dl, 0.0)
                    ops.lattice_gate_split(dev, dnext, b.g, b.dl, j, b.dd, b.dg, rows, self.E, C)
                    self._expert_backward(c, e, s, b.dd, dcur, beta, recompute=False)
                ops.lattice_gate_softmax_backward(dev, b.g, b.dg, rows, self.E)
                wgrad(dev, s, b.dg, g["Wg"], C, self.E, rows, beta)
                ops.lattice_colsum(dev, b.dg, g["bg"], rows, self.E, beta, getattr(b, "cpart", None))
                ops.gemm(dev, b.dg, p["Wg"], dcur, rows, C, self.E, beta=1.0, trans_b=True)
            dnext, dcur = dcur, dnext
        ops.lattice_read(dev, dnext, p["a"], b.dx, 0, N, n2, Q, C)              # dx = Σ_c ∂s_0·a
        ops.lattice_face_dot(dev, c.x_in, dnext, g["a"], 0, N, n2, Q, C)
        ops.lattice_face_dot(dev, None, dnext, g["b"], 0, N, n2, Q, C)
        return b.dx

    # -- inspection -----------------------------------------------------------------------------------
    def states(self, c) -> np.ndarray:
        """A host copy of the last forward's states, (N, K+1, D, n, n, C)."""
        n, D, C = self.n, self.D, self.C
        s = c.b.states.get().reshape(self.K + 1, c.N, D, n, n, C)
        return np.ascontiguousarray(s.transpose(1, 0, 2, 3, 4, 5))

    def telemetry(self, c) -> dict:
        s = self.states(c)
        out = {f"lattice/state_norm/t{t}": float(np.sqrt(np.mean(s[:, t].astype(np.float64) ** 2)))
               for t in range(self.K + 1)}
        if self.gated and self.K:
            Wg, bg = c.p["Wg"].get().astype(np.float64), c.p["bg"].get().astype(np.float64)
            z = s[:, :self.K].astype(np.float64) @ Wg + bg
            e = np.exp(z - z.max(axis=-1, keepdims=True))
            mean = (e / e.sum(axis=-1, keepdims=True)).reshape(-1, self.E).mean(axis=0)
            out |= {f"lattice/gate/{name}": float(mean[j]) for j, name in enumerate(self.experts)}
        return out
