/* lattice.cl — the lattice layer's own kernels (engine/layers/lattice.py): the face write and read,
 * the perception gather and its adjoint, tanh, the gate; the products (P·W1, h·W2, s·Wg, the
 * functional expert's attention) are ops.gemm's, its row softmax memory.cl's.
 *
 * Letters: N rows, Q = n·n·D cells (cell i = (z·n + y)·n + x, z = 0 the front face), n2 = n·n,
 * C channels, Hc hidden, W = 1 + P cells per perception (the cell, then its neighbours or links),
 * E active experts. Row-major float32; a state s is (N·Q, C), row r·Q + i. Arguments named
 * `*_off` are element offsets into the buffer before them (the K+1 states share one buffer).
 *
 *   lattice_write            s0[r,i,c] = i < n2 ? x[r,i]·a_c + b_c : 0            global (C, Q, N)
 *   lattice_read             y[r,i] = Σ_c s[r, off+i, c]·rv_c (c ascending)         global (n2, N)
 *   lattice_read_backward    ds[r,i,c] = dy[r, i−off]·rv_c on the read face, else 0 global (C, Q, N)
 *   lattice_face_dot         out[c] = Σ_r Σ_i u[r,i]·v[r, off+i, c] (or Σ v with use_u = 0),
 *                            r then i ascending                                     global (C)
 *   lattice_gather           P[r·Q+i, k·C+c] = s[r·Q + table[i,k], c], 0 for table −1 global (C, W, N·Q)
 *   lattice_gather_backward  ds[r·Q+i, c] += Σ_{m = ptr[i]}^{ptr[i+1]−1} dP[r·Q + m/W, (m%W)·C + c]
 *                            (the CSR adjoint of the table, m ascending)            global (C, N·Q)
 *   lattice_bias_tanh        h[j, u] = tanh(h[j, u] + b[u]) in place                global (Hc, rows)
 *   lattice_tanh_backward    dh *= 1 − h² in place                                  global (n)
 *   lattice_colsum_part      part[p, u] = Σ_j of chunk p of X[j, u] (ascending)     global (U, P)
 *   lattice_colsum_reduce    out[u] = beta·out[u] + Σ_p part[p, u] (p ascending)    global (U)
 *                            (a few rows: X itself as part, one stage)
 *   lattice_gate_softmax     g[j] = softmax_e(g[j, e] + bg[e]) in place             global (rows)
 *   lattice_gate_mix         s[j, c] += g[j, e]·dl[j, c]                            global (C, rows)
 *   lattice_gate_split       dd[j, c] = g[j,e]·ds[j,c]; dg[j,e] = Σ_c ds[j,c]·dl[j,c] global (rows)
 *   lattice_gate_softmax_backward  dg[j] = g ⊙ (dg − Σ_e g·dg) in place            global (rows)
 *
 * One work-item per output element with fixed-order loops: the same kernels serve the CPU and
 * the GPU variant (neighbouring items on neighbouring addresses where the output is per
 * channel), no atomics, so every run gives the same bits. The gather's adjoint reads a reverse
 * table built on the host once (engine.reference.lattice.reverse_table) instead of scattering.
 * tanh through exp_fast (fastmath.cl: PoCL's tanh is a call, 4x slower here):
 * tanh(a) = 1 − 2/(1 + e^2a), absolute error ~1e-7.
 * References: engine.reference.lattice.{lattice_write, lattice_read, lattice_gather,
 * lattice_gather_backward, softmax} and the layer Lattice.
 */
#include "fastmath.cl"

static inline __attribute__((always_inline)) float tanh_fast(float a) { return 1.0f - 2.0f / (1.0f + exp_fast(2.0f * a)); }

__kernel void lattice_write(__global const float* x, __global const float* a, __global const float* b,
                            const int n2, const int Q, const int C, __global float* s)
{
    const int c = get_global_id(0), i = get_global_id(1), r = get_global_id(2);
    s[((long)r * Q + i) * C + c] = i < n2 ? x[r * n2 + i] * a[c] + b[c] : 0.0f;
}

__kernel void lattice_read(__global const float* s, const int s_off, __global const float* rv, const int off,
                           const int Q, const int C, __global float* y)
{
    const int i = get_global_id(0), r = get_global_id(1), n2 = get_global_size(0);
    __global const float* row = s + s_off + ((long)r * Q + off + i) * C;
    float acc = 0.0f;
    for (int c = 0; c < C; c++) acc += row[c] * rv[c];
    y[r * n2 + i] = acc;
}

__kernel void lattice_read_backward(__global const float* dy, __global const float* rv, const int off, const int n2,
                                    const int Q, const int C, __global float* ds)
{
    const int c = get_global_id(0), i = get_global_id(1), r = get_global_id(2);
    const int f = i - off;
    ds[((long)r * Q + i) * C + c] = (f >= 0 && f < n2) ? dy[r * n2 + f] * rv[c] : 0.0f;
}

__kernel void lattice_face_dot(__global const float* u, const int use_u, __global const float* v, const int v_off,
                               const int off, const int n2, const int Q, const int C, const int N,
                               __global float* out)
{
    const int c = get_global_id(0);
    float acc = 0.0f;
    for (int r = 0; r < N; r++) {
        __global const float* row = v + v_off + ((long)r * Q + off) * C + c;
        for (int i = 0; i < n2; i++) acc += (use_u ? u[r * n2 + i] : 1.0f) * row[i * C];
    }
    out[c] = acc;
}

__kernel void lattice_gather(__global const float* s, const int s_off, __global const int* table, const int W,
                             const int Q, const int C, __global float* P)
{
    const int c = get_global_id(0), k = get_global_id(1), j = get_global_id(2);   // j = r·Q + i
    const int r = j / Q, i = j - r * Q;
    const int src = table[i * W + k];
    P[((long)j * W + k) * C + c] = src < 0 ? 0.0f : s[s_off + ((long)r * Q + src) * C + c];
}

__kernel void lattice_gather_backward(__global const float* dP, __global const int* ptr, __global const int* idx,
                                      const int W, const int Q, const int C, __global float* ds)
{
    const int c = get_global_id(0), j = get_global_id(1), r = j / Q, i = j - r * Q;
    float acc = ds[(long)j * C + c];
    for (int e = ptr[i]; e < ptr[i + 1]; e++) {
        const int m = idx[e];   // m = dest cell · W + slot: the row r·Q + m/W of dP, column (m%W)·C + c
        acc += dP[((long)r * Q) * W * C + (long)m * C + c];
    }
    ds[(long)j * C + c] = acc;
}

__kernel void lattice_bias_tanh(__global float* h, __global const float* b, const int Hc)
{
    const int u = get_global_id(0), j = get_global_id(1);
    h[(long)j * Hc + u] = tanh_fast(h[(long)j * Hc + u] + b[u]);
}

__kernel void lattice_tanh_backward(__global float* dh, __global const float* h)
{
    const long j = get_global_id(0);
    dh[j] *= 1.0f - h[j] * h[j];
}

/* The column sum in two fixed-order stages for many rows (every bias gradient of a 37³ lattice:
 * rows = N·37³): part[p, u] = Σ of rows [p·CH, min((p+1)·CH, rows)) ascending, one work-item per
 * (u, p); then out[u] = beta·out[u] + Σ_p part[p, u], p ascending. Both stages have many items (a
 * GPU's occupancy, both CPU cores) and no atomics. */
__kernel void lattice_colsum_part(__global const float* X, const int rows, const int U, const int CH,
                                  __global float* part)
{
    const int u = get_global_id(0), p = get_global_id(1);
    const int j1 = min(rows, (p + 1) * CH);
    float acc = 0.0f;
    for (int j = p * CH; j < j1; j++) acc += X[(long)j * U + u];
    part[(long)p * U + u] = acc;
}

__kernel void lattice_colsum_reduce(__global const float* part, const int P, const int U, const float beta,
                                    __global float* out)
{
    const int u = get_global_id(0);
    float acc = 0.0f;
    for (int p = 0; p < P; p++) acc += part[(long)p * U + u];
    out[u] = beta == 0.0f ? acc : beta * out[u] + acc;
}

__kernel void lattice_gate_softmax(__global float* g, __global const float* bg, const int E)
{
    const int j = get_global_id(0);
    __global float* z = g + (long)j * E;
    float m = -INFINITY;
    for (int e = 0; e < E; e++) m = fmax(m, z[e] + bg[e]);
    float sum = 0.0f;
    for (int e = 0; e < E; e++) { z[e] = exp(z[e] + bg[e] - m); sum += z[e]; }
    for (int e = 0; e < E; e++) z[e] /= sum;
}

__kernel void lattice_gate_mix(__global float* s, const int s_off, __global const float* g, __global const float* dl,
                               const int e, const int E, const int C)
{
    const int c = get_global_id(0), j = get_global_id(1);
    s[s_off + (long)j * C + c] += g[(long)j * E + e] * dl[(long)j * C + c];
}

__kernel void lattice_gate_split(__global const float* ds, __global const float* g, __global const float* dl,
                                 const int e, const int E, const int C, __global float* dd, __global float* dg)
{
    const int j = get_global_id(0);
    const float w = g[(long)j * E + e];
    float acc = 0.0f;
    for (int c = 0; c < C; c++) {
        const float d = ds[(long)j * C + c];
        dd[(long)j * C + c] = w * d;
        acc += d * dl[(long)j * C + c];
    }
    dg[(long)j * E + e] = acc;
}

__kernel void lattice_gate_softmax_backward(__global const float* g, __global float* dg, const int E)
{
    const int j = get_global_id(0);
    float dot = 0.0f;
    for (int e = 0; e < E; e++) dot += g[(long)j * E + e] * dg[(long)j * E + e];
    for (int e = 0; e < E; e++) dg[(long)j * E + e] = g[(long)j * E + e] * (dg[(long)j * E + e] - dot);
}
