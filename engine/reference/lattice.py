"""numpy reference of the lattice layer (engine/layers/lattice.py): the host tables (built once,
shared with the device layer), the kernels of kernels/lattice.cl (same names, inputs in the same
order, outputs returned) and the layer `Lattice` (same kind and constructor as the device layer;
the protocol of engine/reference/layers.py). float64-capable.

Letters: N rows (independent samples), n the face side, D the depth, Q = n·n·D cells, C channels,
Hc hidden, K steps, W = 1 + P the perception width in cells (the cell itself, then its P
neighbours or R links), E active experts. Cell i = (z·n + y)·n + x; z = 0 the front face.

    s_0[r, i<n², c] = x[r,i]·a_c + b_c (0 elsewhere);  s_{t+1} = s_t + Σ_e g_e ⊙ Δ_e(s_t)
    y[r, i] = Σ_c s_K[r, (D−1)·n² + i, c]·r_c   (K = 0: the front face, i.e. x·(a·r) + b·r)
    Δ_local = tanh(P·W1 + b1)·W2,  P = [s_i, s_{nbr_1}, …] (out-of-lattice neighbours read 0)
    Δ_distant: the same over R fixed links per cell (lattice_links);  g = softmax(s_i·Wg + bg)
    Δ_functional = softmax(q·kᵀ/√dk)·v over the n² cells of the same z-layer, q,k,v = s·Wq,Wk,Wv
"""
from __future__ import annotations

import math

import numpy as np

EXPERTS = ("local", "distant", "functional")   # the gate's column order (those active, in this order)


# -- host tables ----------------------------------------------------------------------------------
def neighbour_offsets(neighbours: int) -> list[tuple[int, int, int]]:
    """(dx, dy, dz) of the P neighbours in table order: 6: −x, +x, −y, +y, −z, +z; 26: every
    offset in {−1, 0, 1}³ but the origin, dz slowest then dy then dx (lexicographic)."""
    if neighbours == 6:
        return [(-1, 0, 0), (1, 0, 0), (0, -1, 0), (0, 1, 0), (0, 0, -1), (0, 0, 1)]
    return [(dx, dy, dz) for dz in (-1, 0, 1) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dx, dy, dz) != (0, 0, 0)]


def lattice_neighbours(n: int, D: int, neighbours: int) -> np.ndarray:
    """(Q, 1+P) int32: column 0 the cell itself, then its neighbours in neighbour_offsets order,
    −1 where the neighbour is outside the lattice (the fixed zero border)."""
    z, y, x = np.meshgrid(np.arange(D), np.arange(n), np.arange(n), indexing="ij")
    z, y, x = z.ravel(), y.ravel(), x.ravel()
    cols = [(z * n + y) * n + x]
    for dx, dy, dz in neighbour_offsets(neighbours):
        xx, yy, zz = x + dx, y + dy, z + dz
        inside = (xx >= 0) & (xx < n) & (yy >= 0) & (yy < n) & (zz >= 0) & (zz < D)
        cols.append(np.where(inside, (zz * n + yy) * n + xx, -1))
    return np.stack(cols, axis=1).astype(np.int32)


def lattice_links(Q: int, R: int, seed: int) -> np.ndarray:
    """(Q, 1+R) int32: column 0 the cell itself, then R distinct other cells drawn uniformly over
    the lattice (numpy's PCG64 from [seed, 77]; rows with a repeat are redrawn in row order)."""
    if R > Q - 1:
        raise ValueError(f"lattice: R = {R} links need at least R + 1 = {R + 1} cells, the lattice has {Q}")
    rng = np.random.default_rng([seed, 77])
    cells = np.arange(Q)[:, None]
    links = rng.integers(0, Q - 1, (Q, R))
    links += links >= cells                    # uniform over the Q − 1 other cells
    for i in range(Q):                         # distinct: redraw a row with a repeat (rare when R ≪ Q)
        while len(set(links[i].tolist())) < R:
            row = rng.integers(0, Q - 1, R)
            links[i] = row + (row >= i)
    return np.concatenate([cells, links], axis=1).astype(np.int32)


def reverse_table(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The adjoint of a gather table in CSR form: (ptr (Q+1,), idx (nnz,)) int32; the entries of
    source cell i are idx[ptr[i]:ptr[i+1]], each m = j·W + k with table[j, k] = i, ascending in
    m (a fixed order: the backward's sums are the same on every run and device)."""
    Q, W = table.shape
    flat = table.ravel()
    m = np.flatnonzero(flat >= 0)
    order = np.argsort(flat[m], kind="stable")           # stable: ascending m within each source
    counts = np.bincount(flat[m], minlength=Q)
    ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    return ptr, m[order].astype(np.int32)


# -- kernels --------------------------------------------------------------------------------------
def lattice_write(x, a, b, Q):
    """s_0 (N,Q,C) from x (N,n²): the front face x·a + b, every other cell 0."""
    N, n2 = x.shape
    s = np.zeros((N, Q, a.shape[0]), np.result_type(x, a))
    s[:, :n2] = x[:, :, None] * a + b
    return s


def lattice_read(s, rv, off, n2):
    """y (N,n²) = Σ_c s[:, off + i, c]·rv_c (off = (D−1)·n²: the back face; 0: the front)."""
    return s[:, off:off + n2] @ rv


def lattice_gather(s, table):
    """P (N,Q,W·C): P[r, i, k·C + c] = s[r, table[i,k], c], 0 where table[i,k] = −1."""
    N, Q, C = s.shape
    padded = np.concatenate([s, np.zeros((N, 1, C), s.dtype)], axis=1)   # index −1 reads the zero row
    return padded[:, table].reshape(N, Q, -1)


def lattice_gather_backward(dP, table, Q):
    """The adjoint of lattice_gather: ds (N,Q,C) = Σ over (j, k) with table[j,k] = i of dP[r, j, k]."""
    N, W = dP.shape[0], table.shape[1]
    dP = dP.reshape(N, Q, W, -1)
    ds = np.zeros((N, Q + 1, dP.shape[-1]), dP.dtype)
    for k in range(W):
        np.add.at(ds, (slice(None), table[:, k]), dP[:, :, k])
    return ds[:, :Q]


def softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


# -- the layer ------------------------------------------------------------------------------------
class Lattice:
    kind = "lattice"

    def __init__(self, name, prefix="", n=3, D=None, C=4, Hc=16, K=None, neighbours=6, experts=("local",), R=4,
                 dk=4, rates=None, seed=0, w2_scale=0.1):
        self.name, self.n, self.D = name, n, n if D is None else D
        self.C, self.Hc, self.K, self.R, self.dk = C, Hc, (n if K is None else K), R, dk
        self.experts = tuple(e for e in EXPERTS if e in experts)
        self.Q, self.n2 = n * n * self.D, n * n
        self.tables = {"local": lattice_neighbours(n, self.D, neighbours)}
        if "distant" in self.experts:
            self.tables["distant"] = lattice_links(self.Q, R, seed)
        self.gated = len(self.experts) > 1
        self.suffix = {"local": "", "distant": "d"}

    @property
    def read_offset(self):
        return (self.D - 1) * self.n2 if self.K else 0

    # Δ of one expert at state s (N,Q,C), and what its backward needs
    def _expert(self, p, e, s):
        if e == "functional":
            N, C, n2 = s.shape[0], self.C, self.n2
            g = s.reshape(N * self.D, n2, C)                     # one group per (row, z-layer)
            q, k, v = g @ p["Wq"], g @ p["Wk"], g @ p["Wv"]
            A = softmax(q @ k.transpose(0, 2, 1) / math.sqrt(self.dk))
            return (A @ v).reshape(s.shape), (g, q, k, v, A)
        x = self.suffix[e]
        P = lattice_gather(s, self.tables[e])
        h = np.tanh(P @ p["W1" + x] + p["b1" + x])
        return h @ p["W2" + x], (P, h)

    def _expert_backward(self, p, e, s, keep, dD, grads):
        """Adds expert e's parameter gradients for one step; returns its ∂L/∂s_t (N,Q,C)."""
        if e == "functional":
            g, q, k, v, A = keep
            dD = dD.reshape(g.shape)
            dA, dv = dD @ v.transpose(0, 2, 1), A.transpose(0, 2, 1) @ dD
            dsc = A * (dA - (A * dA).sum(axis=-1, keepdims=True)) / math.sqrt(self.dk)
            dq, dk_ = dsc @ k, dsc.transpose(0, 2, 1) @ q
            for w, d in (("Wq", dq), ("Wk", dk_), ("Wv", dv)):
                grads[w] += np.einsum("gic,gij->cj", g, d)
            ds = dq @ p["Wq"].T + dk_ @ p["Wk"].T + dv @ p["Wv"].T
            return ds.reshape(s.shape)
        x = self.suffix[e]
        P, h = keep
        grads["W2" + x] += np.einsum("rih,ric->hc", h, dD)
        da = (dD @ p["W2" + x].T) * (1.0 - h * h)
        grads["W1" + x] += np.einsum("rik,rih->kh", P, da)
        grads["b1" + x] += da.sum(axis=(0, 1))
        return lattice_gather_backward(da @ p["W1" + x].T, self.tables[e], self.Q)

    def forward(self, p, st, x, c):
        s = lattice_write(x, p["a"], p["b"], self.Q)
        states, gates = [s], []
        for _ in range(self.K):
            deltas = [self._expert(p, e, s)[0] for e in self.experts]
            if self.gated:
                g = softmax(s @ p["Wg"] + p["bg"])
                gates.append(g)
                s = s + sum(g[..., j:j + 1] * d for j, d in enumerate(deltas))
            else:
                s = s + deltas[0]
            states.append(s)
        y = lattice_read(s, p["r"], self.read_offset, self.n2)
        return y, dict(x=x, states=states, gates=gates)

    def backward(self, p, st, cache, dy):
        x, states, n2, off = cache["x"], cache["states"], self.n2, self.read_offset
        grads = {k: np.zeros_like(v) for k, v in p.items()}
        grads["r"] = np.einsum("ri,ric->c", dy, states[-1][:, off:off + n2])
        ds = np.zeros_like(states[-1])
        ds[:, off:off + n2] = dy[:, :, None] * p["r"]
        for t in reversed(range(self.K)):
            s, dnext = states[t], ds
            ds = dnext.copy()                                  # the residual path
            g = softmax(s @ p["Wg"] + p["bg"]) if self.gated else None
            dg = np.zeros(s.shape[:2] + (len(self.experts),))
            for j, e in enumerate(self.experts):
                delta, keep = self._expert(p, e, s)
                dD = dnext
                if self.gated:
                    dD = g[..., j:j + 1] * dnext
                    dg[..., j] = (dnext * delta).sum(axis=-1)
                ds = ds + self._expert_backward(p, e, s, keep, dD, grads)
            if self.gated:
                dz = g * (dg - (g * dg).sum(axis=-1, keepdims=True))
                grads["Wg"] += np.einsum("ric,rie->ce", s, dz)
                grads["bg"] += dz.sum(axis=(0, 1))
                ds = ds + dz @ p["Wg"].T
        front = ds[:, :n2]
        grads["a"] = np.einsum("ric,ri->c", front, x)
        grads["b"] = front.sum(axis=(0, 1))
        return front @ p["a"], grads
