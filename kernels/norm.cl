/* norm.cl — LayerNorm over the last axis of an (N, C) row-major buffer (Ba et al. 2016).
 *
 *   y[n,c] = (x[n,c] − μ_n)·r_n·γ[c] + β[c],  μ_n = mean_c x[n,c],
 *   r_n = 1/sqrt(mean_c (x[n,c] − μ_n)² + eps)   (two passes: the mean, then the variance)
 *
 * Backward, with x̂ = (x − μ)·r and dŷ = dy·γ:
 *   dx[n,c] = r_n·(dŷ[n,c] − mean_c dŷ[n,·] − x̂[n,c]·mean_c(dŷ[n,·]·x̂[n,·]))
 *   dγ[c] = Σ_n dy[n,c]·x̂[n,c],   dβ[c] = Σ_n dy[n,c]
 *
 * Two families, each summing in one fixed order (bit-identical runs):
 *   *_rows   one work-item per row, a sequential loop over C        global (N)       CPU
 *   *_wg     one work-group of WG items per row, each a strided partial sum, then a
 *            tree reduction in local memory                         global (N·WG), local (WG)   GPU
 *   layernorm_param_grads  one work-item per column, a loop over the rows   global (C)       CPU
 *   layernorm_param_grads_wg  a 16×16 group per 16 columns: row lane r sums rows r, r+16, …
 *            (coalesced), then a fixed tree over the 16 lanes (as colsum_wg)
 *                                                    global (⌈C/16⌉·16, 16), local (16, 16)   GPU
 *   layernorm_forward_rows8 / layernorm_backward_rows8   *_rows with float8 row chunks (C % 8 == 0,
 *            aligned rows: host checks): eight lane sums, then the lanes in a fixed tree (hsum8),
 *            so the last bits differ from *_rows (the transformer family's blocks use them, the
 *            hybrid keeps *_rows); built with ADD=1 the backward adds a residual's gradient dres
 *            into dx                                                global (N)       CPU
 *   layernorm_param_grads8  layernorm_param_grads on eight columns per work-item: the same sums
 *            in the same order, so the same bits (taken with the rows8 kernels)   global (C/8), local (1)   CPU
 * GPU note: every row or column loop here has a _wg variant; batchnorm_apply and
 * batchnorm_eval_stats are element-wise (GPU-suitable as they are).
 * Reference: engine.reference.layernorm_forward / layernorm_backward.
 */
#ifndef WG
#define WG 64
#endif
#include "reduce.cl"

__kernel void layernorm_forward_rows(__global const float* x, __global const float* gamma,
                                     __global const float* beta, const int C, const float eps,
                                     __global float* y, __global float* mean, __global float* rstd)
{
    const int n = get_global_id(0);
    __global const float* xr = x + (size_t)n * C;
    float s = 0.0f;
    for (int c = 0; c < C; c++) s += xr[c];
    const float mu = s / C;
    float v = 0.0f;
    for (int c = 0; c < C; c++) { const float d = xr[c] - mu; v += d * d; }
    const float r = 1.0f / sqrt(v / C + eps);
    for (int c = 0; c < C; c++) y[(size_t)n * C + c] = (xr[c] - mu) * r * gamma[c] + beta[c];
    mean[n] = mu;
    rstd[n] = r;
}

__kernel void layernorm_forward_wg(__global const float* x, __global const float* gamma,
                                   __global const float* beta, const int C, const float eps,
                                   __global float* y, __global float* mean, __global float* rstd)
{
    __local float red[WG];
    const int n = get_group_id(0), l = get_local_id(0);
    __global const float* xr = x + (size_t)n * C;
    float s = 0.0f;
    for (int c = l; c < C; c += WG) s += xr[c];
    const float mu = wg_sum(s, red) / C;
    float v = 0.0f;
    for (int c = l; c < C; c += WG) { const float d = xr[c] - mu; v += d * d; }
    const float r = 1.0f / sqrt(wg_sum(v, red) / C + eps);
    for (int c = l; c < C; c += WG) y[(size_t)n * C + c] = (xr[c] - mu) * r * gamma[c] + beta[c];
    if (l == 0) { mean[n] = mu; rstd[n] = r; }
}

__kernel void layernorm_backward_rows(__global const float* dy, __global const float* x,
                                      __global const float* gamma, __global const float* mean,
                                      __global const float* rstd, const int C, __global float* dx)
{
    const int n = get_global_id(0);
    const size_t o = (size_t)n * C;
    const float mu = mean[n], r = rstd[n];
    float a = 0.0f, b = 0.0f;   // Σ dŷ, Σ dŷ·x̂
    for (int c = 0; c < C; c++) {
        const float dh = dy[o + c] * gamma[c];
        a += dh;
        b += dh * (x[o + c] - mu) * r;
    }
    a /= C;
    b /= C;
    for (int c = 0; c < C; c++) {
        const float xh = (x[o + c] - mu) * r;
        dx[o + c] = r * (dy[o + c] * gamma[c] - a - xh * b);
    }
}

__kernel void layernorm_backward_wg(__global const float* dy, __global const float* x,
                                    __global const float* gamma, __global const float* mean,
                                    __global const float* rstd, const int C, __global float* dx)
{
    __local float red[WG];
    const int n = get_group_id(0), l = get_local_id(0);
    const size_t o = (size_t)n * C;
    const float mu = mean[n], r = rstd[n];
    float a = 0.0f, b = 0.0f;
    for (int c = l; c < C; c += WG) {
        const float dh = dy[o + c] * gamma[c];
        a += dh;
        b += dh * (x[o + c] - mu) * r;
    }
    a = wg_sum(a, red) / C;
    b = wg_sum(b, red) / C;
    for (int c = l; c < C; c += WG) {
        const float xh = (x[o + c] - mu) * r;
        dx[o + c] = r * (dy[o + c] * gamma[c] - a - xh * b);
    }
}

__kernel void layernorm_param_grads(__global const float* dy, __global const float* x,
                                    __global const float* mean, __global const float* rstd,
                                    const int N, const int C, __global float* dgamma, __global float* dbeta)
{
    const int c = get_global_id(0);
    float g = 0.0f, b = 0.0f;
    for (int n = 0; n < N; n++) {
        const float d = dy[(size_t)n * C + c];
        g += d * (x[(size_t)n * C + c] - mean[n]) * rstd[n];
        b += d;
    }
    dgamma[c] = g;
    dbeta[c] = b;
}

static inline __attribute__((always_inline)) float hsum8(const float8 a)
{
    const float4 h = a.lo + a.hi;
    const float2 g = h.lo + h.hi;
    return g.x + g.y;
}

__kernel void layernorm_forward_rows8(__global const float* x, __global const float* gamma,
                                      __global const float* beta, const int C, const float eps,
                                      __global float* y, __global float* mean, __global float* rstd)
{
    const int n = get_global_id(0), C8 = C / 8;
    __global const float8* xr = (__global const float8*)(x + (size_t)n * C);
    __global const float8* g = (__global const float8*)gamma;
    __global const float8* b = (__global const float8*)beta;
    __global float8* yr = (__global float8*)(y + (size_t)n * C);
    float8 s = 0.0f;
    for (int c = 0; c < C8; c++) s += xr[c];
    const float mu = hsum8(s) / C;
    float8 v = 0.0f;
    for (int c = 0; c < C8; c++) { const float8 d = xr[c] - mu; v += d * d; }
    const float r = 1.0f / sqrt(hsum8(v) / C + eps);
    for (int c = 0; c < C8; c++) yr[c] = (xr[c] - mu) * r * g[c] + b[c];
    mean[n] = mu;
    rstd[n] = r;
}

__kernel void layernorm_backward_rows8(__global const float* dy, __global const float* x,
                                       __global const float* gamma, __global const float* mean,
                                       __global const float* rstd, const int C, __global const float* dres,
                                       __global float* dx)
{
    const int n = get_global_id(0), C8 = C / 8;
    __global const float8* dr = (__global const float8*)(dy + (size_t)n * C);
    __global const float8* xr = (__global const float8*)(x + (size_t)n * C);
    __global const float8* g = (__global const float8*)gamma;
    __global float8* o = (__global float8*)(dx + (size_t)n * C);
    const float mu = mean[n], r = rstd[n];
    float8 a = 0.0f, b = 0.0f;   /* Σ dŷ, Σ dŷ·x̂ */
    for (int c = 0; c < C8; c++) { const float8 dh = dr[c] * g[c]; a += dh; b += dh * (xr[c] - mu) * r; }
    const float ma = hsum8(a) / C, mb = hsum8(b) / C;
#if ADD
    __global const float8* rr = (__global const float8*)(dres + (size_t)n * C);
    for (int c = 0; c < C8; c++) o[c] = rr[c] + r * (dr[c] * g[c] - ma - (xr[c] - mu) * r * mb);
#else
    for (int c = 0; c < C8; c++) o[c] = r * (dr[c] * g[c] - ma - (xr[c] - mu) * r * mb);
#endif
}

__kernel void layernorm_param_grads8(__global const float* dy, __global const float* x,
                                     __global const float* mean, __global const float* rstd,
                                     const int N, const int C, __global float* dgamma, __global float* dbeta)
{
    const int c = get_global_id(0);
    float8 g = 0.0f, b = 0.0f;
    for (int n = 0; n < N; n++) {
        const float8 d = ((__global const float8*)(dy + (size_t)n * C))[c];
        g += d * (((__global const float8*)(x + (size_t)n * C))[c] - mean[n]) * rstd[n];
        b += d;
    }
    ((__global float8*)dgamma)[c] = g;
    ((__global float8*)dbeta)[c] = b;
}

__kernel __attribute__((reqd_work_group_size(16, 16, 1)))
void layernorm_param_grads_wg(__global const float* dy, __global const float* x,
                              __global const float* mean, __global const float* rstd,
                              const int N, const int C, __global float* dgamma, __global float* dbeta)
{
    __local float rg[16][17], rb[16][17];
    const int cx = get_local_id(0), r = get_local_id(1);
    const int c = get_group_id(0) * 16 + cx;
    float g = 0.0f, b = 0.0f;
    if (c < C)
        for (int n = r; n < N; n += 16) {
            const float d = dy[(size_t)n * C + c];
            g += d * (x[(size_t)n * C + c] - mean[n]) * rstd[n];
            b += d;
        }
    rg[r][cx] = g;
    rb[r][cx] = b;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int step = 8; step > 0; step >>= 1) {
        if (r < step) { rg[r][cx] += rg[r + step][cx]; rb[r][cx] += rb[r + step][cx]; }
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    if (r == 0 && c < C) { dgamma[c] = rg[0][cx]; dbeta[c] = rb[0][cx]; }
}

/* BatchNorm over the rows of an (N, C) buffer, per column c (Ioffe & Szegedy 2015):
 *   μ_c = mean_n x[n,c], r_c = 1/sqrt(mean_n (x[n,c] − μ_c)² + eps),  y = (x − μ)·r·γ + β
 *   running (training only): rμ ← (1−m)·rμ + m·μ,  rv ← (1−m)·rv + m·var·N/(N−1)  (unbiased, as torch)
 *   evaluation: μ = rμ, r = 1/sqrt(rv + eps)   (batchnorm_eval_stats)
 * Backward, with x̂ = (x − μ)·r:  dx = γ·r·(dy − mean_n dy − x̂·mean_n(dy·x̂)),
 *   dγ = Σ_n dy·x̂, dβ = Σ_n dy.
 *   batchnorm_stats_cols / _wg        μ, r and the running update     global (C) / (C·WG), local (WG)
 *   batchnorm_apply                   y from μ, r                      global (C, N)
 *   batchnorm_backward_cols / _wg     dx, dγ, dβ                       global (C) / (C·WG), local (WG)
 * Reference: engine.reference.batchnorm_forward / batchnorm_backward / batchnorm_running. */
inline void bn_running(const int c, const float mu, const float var, const int N, const float momentum,
                       __global float* run_mean, __global float* run_var)
{
    if (momentum > 0.0f) {
        run_mean[c] = (1.0f - momentum) * run_mean[c] + momentum * mu;
        run_var[c] = (1.0f - momentum) * run_var[c] + momentum * var * ((float)N / (float)max(N - 1, 1));
    }
}

__kernel void batchnorm_stats_cols(__global const float* x, const int N, const int C, const float eps,
                                   const float momentum, __global float* mean, __global float* rstd,
                                   __global float* run_mean, __global float* run_var)
{
    const int c = get_global_id(0);
    float s = 0.0f;
    for (int n = 0; n < N; n++) s += x[(size_t)n * C + c];
    const float mu = s / N;
    float v = 0.0f;
    for (int n = 0; n < N; n++) { const float d = x[(size_t)n * C + c] - mu; v += d * d; }
    v /= N;
    mean[c] = mu;
    rstd[c] = 1.0f / sqrt(v + eps);
    bn_running(c, mu, v, N, momentum, run_mean, run_var);
}

__kernel void batchnorm_stats_wg(__global const float* x, const int N, const int C, const float eps,
                                 const float momentum, __global float* mean, __global float* rstd,
                                 __global float* run_mean, __global float* run_var)
{
    __local float red[WG];
    const int c = get_group_id(0), l = get_local_id(0);
    float s = 0.0f;
    for (int n = l; n < N; n += WG) s += x[(size_t)n * C + c];
    const float mu = wg_sum(s, red) / N;
    float v = 0.0f;
    for (int n = l; n < N; n += WG) { const float d = x[(size_t)n * C + c] - mu; v += d * d; }
    v = wg_sum(v, red) / N;
    if (l == 0) {
        mean[c] = mu;
        rstd[c] = 1.0f / sqrt(v + eps);
        bn_running(c, mu, v, N, momentum, run_mean, run_var);
    }
}

__kernel void batchnorm_eval_stats(__global const float* run_mean, __global const float* run_var,
                                   const float eps, __global float* mean, __global float* rstd)
{
    const int c = get_global_id(0);
    mean[c] = run_mean[c];
    rstd[c] = 1.0f / sqrt(run_var[c] + eps);
}

__kernel void batchnorm_apply(__global const float* x, __global const float* mean, __global const float* rstd,
                              __global const float* gamma, __global const float* beta, __global float* y)
{
    const int c = get_global_id(0), n = get_global_id(1), C = get_global_size(0);
    const size_t i = (size_t)n * C + c;
    y[i] = (x[i] - mean[c]) * rstd[c] * gamma[c] + beta[c];
}

__kernel void batchnorm_backward_cols(__global const float* dy, __global const float* x,
                                      __global const float* gamma, __global const float* mean,
                                      __global const float* rstd, const int N, const int C,
                                      __global float* dx, __global float* dgamma, __global float* dbeta)
{
    const int c = get_global_id(0);
    const float mu = mean[c], r = rstd[c];
    float a = 0.0f, b = 0.0f;   // Σ dy, Σ dy·x̂
    for (int n = 0; n < N; n++) {
        const size_t i = (size_t)n * C + c;
        a += dy[i];
        b += dy[i] * (x[i] - mu) * r;
    }
    dgamma[c] = b;
    dbeta[c] = a;
    const float am = a / N, bm = b / N, k = gamma[c] * r;
    for (int n = 0; n < N; n++) {
        const size_t i = (size_t)n * C + c;
        dx[i] = k * (dy[i] - am - (x[i] - mu) * r * bm);
    }
}

__kernel void batchnorm_backward_wg(__global const float* dy, __global const float* x,
                                    __global const float* gamma, __global const float* mean,
                                    __global const float* rstd, const int N, const int C,
                                    __global float* dx, __global float* dgamma, __global float* dbeta)
{
    __local float red[WG];
    const int c = get_group_id(0), l = get_local_id(0);
    const float mu = mean[c], r = rstd[c];
    float a = 0.0f, b = 0.0f;
    for (int n = l; n < N; n += WG) {
        const size_t i = (size_t)n * C + c;
        a += dy[i];
        b += dy[i] * (x[i] - mu) * r;
    }
    a = wg_sum(a, red);
    b = wg_sum(b, red);
    if (l == 0) { dgamma[c] = b; dbeta[c] = a; }
    const float am = a / N, bm = b / N, k = gamma[c] * r;
    for (int n = l; n < N; n += WG) {
        const size_t i = (size_t)n * C + c;
        dx[i] = k * (dy[i] - am - (x[i] - mu) * r * bm);
    }
}
