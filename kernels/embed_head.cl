/* embed_head.cl — the embedding-regression head's loss and its gradient (engine/layers/embed_head.py).
 *
 * z (N,D) the student's output, y (N,D) the target vectors. Per row n, with
 * cos_n = z·y / max(|z||y|, 1e-8) (defined at a zero row, and differentiated as written: where
 * |z||y| ≤ 1e-8 the denominator is the constant 1e-8):
 *   loss_n = w_mse·mean_d (z−y)² + w_cos·(1 − cos_n)
 * batch loss = (1/N)·Σ_n loss_n + w_div·Div,  Div = 1/(N(N−1)) Σ_{n≠m} cos(z_n, z_m)².
 *
 *   embed_head_rows     rows_mse, rows_cos, loss_rows, zz = |z_n|² (N,) and
 *                       dz (N,D) = inv_n·(w_mse·(2/D)(z−y) − w_cos·∂cos_n/∂z_n),
 *                       ∂cos/∂z = y/den − [|z||y| > 1e-8]·(cos/|z|²)·z         global (N)
 *   embed_head_div      from the Gram matrix G = z·zᵀ (N,N, ops.gemm) and zz: per row
 *                       c_nm = G[n,m]/den_nm, Wd[n,m] = c_nm/den_nm (0 on the diagonal),
 *                       div_rows[n] = Σ_{m≠n} c_nm², q[n] = Σ_{m≠n, |z_n||z_m|>1e-8} c_nm² / |z_n|²
 *                                                                                   global (N)
 *   embed_head_div_grad dz += k·(dzd − q_n·z_n), dzd = Wd·z (ops.gemm), k = 4·w_div/(N(N−1)):
 *                       ∂Div/∂z_n = 4/(N(N−1)) Σ_{m≠n} c_nm ∂c_nm/∂z_n       global (D, N)
 *   embed_head_reduce   out (4,) = [Σ loss_rows/N + w_div·Σ div_rows·inv_pairs, Σ rows_cos, N,
 *                       N × out[0]] (fixed order; use_div = 0: no diversity term) global (1)
 *   embed_head_rows_wg / embed_head_div_wg / embed_head_reduce_wg  the same for GPUs: a
 *                       work-group of WG items per row (strided coalesced reads, a tree sum,
 *                       reduce.cl) / one work-group over N     global (N·WG) / (WG), local (WG)
 * The CPU kernels sum each row serially in index order; the _wg kernels in the fixed tree order:
 * both deterministic (no atomics), different in the last bits.
 * Reference: engine.reference.embed_head (embed_head_forward, embed_head_backward).
 */
#include "reduce.cl"

#define COS_EPS 1e-8f

/* the row's values from its four sums (shared by both variants) */
inline void row_values(const float se, const float zy, const float zz, const float yy, const int D,
                       const float w_mse, const float w_cos, float* mse, float* cs, float* loss,
                       float* inv_den, float* coef)
{
    const float a = sqrt(zz) * sqrt(yy);
    const float den = fmax(a, COS_EPS);
    *mse = se / (float)D;
    *cs = zy / den;
    *loss = w_mse * *mse + w_cos * (1.0f - *cs);
    *inv_den = 1.0f / den;
    *coef = a > COS_EPS ? *cs / zz : 0.0f;
}

__kernel void embed_head_rows(__global const float* z, __global const float* y, const int D,
                              const float w_mse, const float w_cos, const float inv_n,
                              __global float* rows_mse, __global float* rows_cos, __global float* loss_rows,
                              __global float* zz_out, __global float* dz)
{
    const int n = get_global_id(0);
    __global const float* zr = z + (size_t)n * D;
    __global const float* yr = y + (size_t)n * D;
    float se = 0.0f, zy = 0.0f, zz = 0.0f, yy = 0.0f;
    for (int d = 0; d < D; d++) {
        const float e = zr[d] - yr[d];
        se += e * e; zy += zr[d] * yr[d]; zz += zr[d] * zr[d]; yy += yr[d] * yr[d];
    }
    float mse, cs, loss, inv_den, coef;
    row_values(se, zy, zz, yy, D, w_mse, w_cos, &mse, &cs, &loss, &inv_den, &coef);
    rows_mse[n] = mse; rows_cos[n] = cs; loss_rows[n] = loss; zz_out[n] = zz;
    const float a2 = w_mse * 2.0f / (float)D;
    for (int d = 0; d < D; d++)
        dz[(size_t)n * D + d] = inv_n * (a2 * (zr[d] - yr[d]) - w_cos * (yr[d] * inv_den - coef * zr[d]));
}

__kernel void embed_head_rows_wg(__global const float* z, __global const float* y, const int D,
                                 const float w_mse, const float w_cos, const float inv_n,
                                 __global float* rows_mse, __global float* rows_cos, __global float* loss_rows,
                                 __global float* zz_out, __global float* dz)
{
    __local float red[WG];
    const int n = get_group_id(0), l = get_local_id(0);
    __global const float* zr = z + (size_t)n * D;
    __global const float* yr = y + (size_t)n * D;
    float se = 0.0f, zy = 0.0f, zz = 0.0f, yy = 0.0f;
    for (int d = l; d < D; d += WG) {
        const float e = zr[d] - yr[d];
        se += e * e; zy += zr[d] * yr[d]; zz += zr[d] * zr[d]; yy += yr[d] * yr[d];
    }
    se = wg_sum(se, red); zy = wg_sum(zy, red); zz = wg_sum(zz, red); yy = wg_sum(yy, red);
    float mse, cs, loss, inv_den, coef;
    row_values(se, zy, zz, yy, D, w_mse, w_cos, &mse, &cs, &loss, &inv_den, &coef);
    if (l == 0) { rows_mse[n] = mse; rows_cos[n] = cs; loss_rows[n] = loss; zz_out[n] = zz; }
    const float a2 = w_mse * 2.0f / (float)D;
    for (int d = l; d < D; d += WG)
        dz[(size_t)n * D + d] = inv_n * (a2 * (zr[d] - yr[d]) - w_cos * (yr[d] * inv_den - coef * zr[d]));
}

/* one pair's terms: c_nm, its weight c/den in Wd, and whether the denominator varies */
inline float pair_cos(const float g, const float nn, const float nm, float* w, int* live)
{
    const float a = nn * nm;
    const float den = fmax(a, COS_EPS);
    const float c = g / den;
    *w = c / den;
    *live = a > COS_EPS;
    return c;
}

__kernel void embed_head_div(__global const float* G, __global const float* zz, const int N,
                             __global float* Wd, __global float* div_rows, __global float* q)
{
    const int n = get_global_id(0);
    const float nn = sqrt(zz[n]);
    float c2 = 0.0f, ql = 0.0f;
    for (int m = 0; m < N; m++) {
        float w = 0.0f;
        if (m != n) {
            int live;
            const float c = pair_cos(G[(size_t)n * N + m], nn, sqrt(zz[m]), &w, &live);
            c2 += c * c;
            if (live) ql += c * c;
        }
        Wd[(size_t)n * N + m] = w;
    }
    div_rows[n] = c2;
    q[n] = ql > 0.0f ? ql / zz[n] : 0.0f;
}

__kernel void embed_head_div_wg(__global const float* G, __global const float* zz, const int N,
                                __global float* Wd, __global float* div_rows, __global float* q)
{
    __local float red[WG];
    const int n = get_group_id(0), l = get_local_id(0);
    const float nn = sqrt(zz[n]);
    float c2 = 0.0f, ql = 0.0f;
    for (int m = l; m < N; m += WG) {
        float w = 0.0f;
        if (m != n) {
            int live;
            const float c = pair_cos(G[(size_t)n * N + m], nn, sqrt(zz[m]), &w, &live);
            c2 += c * c;
            if (live) ql += c * c;
        }
        Wd[(size_t)n * N + m] = w;
    }
    c2 = wg_sum(c2, red);
    ql = wg_sum(ql, red);
    if (l == 0) { div_rows[n] = c2; q[n] = ql > 0.0f ? ql / zz[n] : 0.0f; }
}

__kernel void embed_head_div_grad(__global const float* dzd, __global const float* q, __global const float* z,
                                  const int D, const float k, __global float* dz)
{
    const int d = get_global_id(0), n = get_global_id(1);
    const size_t i = (size_t)n * D + d;
    dz[i] += k * (dzd[i] - q[n] * z[i]);
}

__kernel void embed_head_reduce(__global const float* loss_rows, __global const float* rows_cos,
                                __global const float* div_rows, const int N, const int use_div,
                                const float w_div, const float inv_pairs, __global float* out)
{
    float l = 0.0f, c = 0.0f, dv = 0.0f;
    for (int n = 0; n < N; n++) { l += loss_rows[n]; c += rows_cos[n]; }
    if (use_div) for (int n = 0; n < N; n++) dv += div_rows[n];
    const float div_term = w_div * dv * inv_pairs;
    out[0] = l / (float)N + div_term;
    out[1] = c;
    out[2] = (float)N;
    out[3] = l + (float)N * div_term;
}

__kernel void embed_head_reduce_wg(__global const float* loss_rows, __global const float* rows_cos,
                                   __global const float* div_rows, const int N, const int use_div,
                                   const float w_div, const float inv_pairs, __global float* out)
{
    __local float red[WG];
    const int l = get_local_id(0);
    float a = 0.0f, b = 0.0f, e = 0.0f;
    for (int n = l; n < N; n += WG) { a += loss_rows[n]; b += rows_cos[n]; if (use_div) e += div_rows[n]; }
    a = wg_sum(a, red); b = wg_sum(b, red); e = wg_sum(e, red);
    if (l == 0) {
        const float div_term = w_div * e * inv_pairs;
        out[0] = a / (float)N + div_term;
        out[1] = b;
        out[2] = (float)N;
        out[3] = a + (float)N * div_term;
    }
}
