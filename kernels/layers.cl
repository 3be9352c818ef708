/* layers.cl — element-wise and row-wise layers of the hybrid model.
 *
 * Shapes (row-major float32): N positions, E embedding, H hidden, V vocab,
 * T prototypes, S sequence length. The maths is docs/model.md; each kernel
 * has a numpy reference of the same name in engine/reference.py.
 *
 *   gather_windows      x,y (B,S) int from token ids and window offsets     global (S, B)
 *   bucket_sort         stable counting sort of keys (N,) into nb buckets   global (1)
 *   bucket_sort_wg      the same for GPUs: one work-group, a work-item per bucket (strided)
 *                       counts, one prefix sum, then writes its bucket   global (WG), local (WG)
 *   embedding_forward   e (N,E) = W_emb[x]                                  global (E, N)
 *   bucket_sums(8)      out (nb,C) = Σ_{key_n = t} X[n] (sorted positions)  global (C, nb) / (C/8, nb)
 *                       (dW_emb from de, prototype sums, per-token sums of da)
 *   bias_gelu_forward   a += b (in place), h = GELU(a)                      global (H, N)
 *   embed_bias_gelu     a = EW[x] + b, h = GELU(a)  (EW = W_emb·W1)          global (H, N)
 *   gelu_backward       da = dh · GELU'(a)                                  global (N·H)
 *   gelu_forward8 / gelu_backward8   h = GELU(a), da = dh·GELU'(a), a float8 per item   global (n/8)
 *   add_bias            X (N,C) += b                                        global (C, N)
 *   add_inplace         y (n,) += x (n,)                                    global (n)
 *   colsum(8)           out (C,) = Σ_n X[n]                                 global (C) / (C/8)
 *   colsum_wg           the same for GPUs: a 16×16 group per 16 columns, rows strided by 16
 *                       (coalesced), then a fixed tree over the 16 row lanes   global (⌈C/16⌉·16, 16)
 *   spikes_forward      s = 1[h > θ]                                        global (H, N)
 *   row_normalize_forward / _backward(8)   k = h/sqrt(|h|²+1e-6) and dh += … global (N)
 *   causal_decay_mask   Gm[b,t,τ] = w[t−1−τ]·G[b,t,τ] for τ < t, else 0      global (S, S, B)
 *   causal_dots_decay   the same from G = X·Yᵀ in one pass (rows dotted)    global (S/2, S/4, B)
 *   fw_state_norm       ‖A_{S−1}‖_F per sequence from the Gram matrices     global (B)
 *
 * GPU family (engine.ops picks it for dev.variant == "gpu"; the sums are in another fixed order,
 * so the last bits differ from the CPU kernels'):
 *   row_normalize_forward_wg / _backward_wg   a work-group of WG items per row, coalesced
 *                       strided reads, a tree sum (reduce.cl)         global (N·WG), local (WG)
 *   fw_state_norm_wg    a work-group per sequence over its S² entries   global (B·WG), local (WG)
 *   bucket_sums_wg      a 16×16 group per (16 columns, bucket): member lane r sums members
 *                       r, r+16, … of the bucket, then a fixed tree over the 16 lanes, so a
 *                       large bucket (a frequent character, a crowded prototype) is not one
 *                       serial loop      global (⌈C/16⌉·16, 16·nb), local (16, 16)
 *   colsum_wg, bucket_sort_wg   (listed above)
 * Already GPU-suitable, one kernel for both: gather_windows, embedding_forward, embed_bias_gelu,
 * bias_gelu_forward, gelu_backward, add_bias, add_inplace, spikes_forward, causal_decay_mask
 * (element-wise, neighbouring items on neighbouring addresses). causal_dots_decay (a product:
 * per-item float8 dots over H, rows H apart across items) is not used on GPUs: engine.ops
 * takes its gemm + causal_decay_mask path there (the tiled products of gemm_gpu.cl).
 *
 * Reductions loop in a fixed order inside one work-item (or a fixed tree inside one
 * work-group): no atomics, so a result never depends on scheduling (training is
 * bit-reproducible).
 * GELU uses gelu_parts (fastmath.cl): the built-in erf/exp are calls in PoCL.
 */
#include "fastmath.cl"
#include "reduce.cl"

__kernel void gather_windows(__global const int* ids, __global const int* offsets, const int S,
                             __global int* x, __global int* y)
{
    const int s = get_global_id(0), b = get_global_id(1);
    const int o = offsets[b];
    x[b * S + s] = ids[o + s];
    y[b * S + s] = ids[o + s + 1];
}

/* starts (nb+1): bucket boundaries; perm (N): positions grouped by key, in
 * increasing position order inside each bucket. One work-item: N is small
 * (a batch), and the order is then fixed by construction. */
__kernel void bucket_sort(__global const int* keys, const int N, const int nb,
                          __global int* starts, __global int* perm)
{
    for (int i = 0; i <= nb; i++) starts[i] = 0;
    for (int n = 0; n < N; n++) starts[keys[n] + 1] += 1;
    for (int i = 0; i < nb; i++) starts[i + 1] += starts[i];
    /* perm used as a cursor pass: write positions, advancing a running start */
    for (int n = 0; n < N; n++) {
        const int key = keys[n];
        perm[starts[key]] = n;
        starts[key] += 1;
    }
    for (int i = nb; i > 0; i--) starts[i] = starts[i - 1];
    starts[0] = 0;
}

/* bucket_sort_wg: the same result as bucket_sort (integers: exactly the same). One work-group of
 * BS_WG items; item l owns buckets l, l + BS_WG, …: it counts their keys, item 0 takes the prefix
 * sum, then each item writes its buckets' positions in increasing n. Every key is read twice per
 * bucket an item owns; no atomics. */
#ifndef BS_WG
#define BS_WG 64
#endif
__kernel void bucket_sort_wg(__global const int* keys, const int N, const int nb,
                             __global int* starts, __global int* perm)
{
    const int l = get_local_id(0);
    for (int t = l; t < nb; t += BS_WG) {
        int c = 0;
        for (int n = 0; n < N; n++) c += keys[n] == t;
        starts[t + 1] = c;
    }
    barrier(CLK_GLOBAL_MEM_FENCE);
    if (l == 0) {
        starts[0] = 0;
        for (int t = 0; t < nb; t++) starts[t + 1] += starts[t];
    }
    barrier(CLK_GLOBAL_MEM_FENCE);
    for (int t = l; t < nb; t += BS_WG) {
        int pos = starts[t];
        for (int n = 0; n < N; n++)
            if (keys[n] == t) perm[pos++] = n;
    }
}

__kernel void embedding_forward(__global const float* W_emb, __global const int* x, const int E,
                                __global float* e)
{
    const int j = get_global_id(0), n = get_global_id(1);
    e[n * E + j] = W_emb[x[n] * E + j];
}

/* bucket_sums: out[t] = Σ_{keys_n = t} X[n] over the rows of X (N,C), members in
 * position order (perm/starts from bucket_sort): the embedding gradient, the
 * prototype sums, and the per-token sums of da. Launch: global (C, nb). */
__kernel void bucket_sums(__global const float* X, __global const int* perm,
                          __global const int* starts, const int C, __global float* out)
{
    const int j = get_global_id(0), t = get_global_id(1);
    float acc = 0.0f;
    for (int i = starts[t]; i < starts[t + 1]; i++) acc += X[perm[i] * C + j];
    out[t * C + j] = acc;
}

/* bucket_sums8: the same sums (same member order, so the same bits), eight columns
 * per work-item as one float8; C % 8 == 0 and X, out 32-byte aligned (host checks).
 * Launch: global (C/8, nb). */
__kernel void bucket_sums8(__global const float* X, __global const int* perm,
                           __global const int* starts, const int C, __global float* out)
{
    const int j = get_global_id(0) * 8, t = get_global_id(1);
    float8 acc = 0.0f;
    for (int i = starts[t]; i < starts[t + 1]; i++) acc += *(__global const float8*)(X + perm[i] * C + j);
    *(__global float8*)(out + t * C + j) = acc;
}

/* embed_bias_gelu: the first layer with the embedding folded in (engine.model):
 * a[n] = EW[x_n] + b1 with EW = W_emb·W1 (V,H) computed once per step, h = GELU(a);
 * the same numbers as embedding_forward, e·W1 and bias_gelu_forward. Launch: global (H, N). */
__kernel void embed_bias_gelu(__global const float* EW, __global const int* x, __global const float* bias,
                              const int H, __global float* a, __global float* h)
{
    const int j = get_global_id(0), n = get_global_id(1);
    const float v = EW[x[n] * H + j] + bias[j];
    a[n * H + j] = v;
    float cdf, pdf;
    gelu_parts(v, &cdf, &pdf);
    h[n * H + j] = v * cdf;
}

__kernel void bias_gelu_forward(__global float* a, __global const float* bias, const int H,
                                __global float* h)
{
    const int j = get_global_id(0);                   /* 2-D launch: no i % H per element, */
    const int i = get_global_id(1) * H + j;           /* whose integer division PoCL cannot vectorise */
    const float x = a[i] + bias[j];
    a[i] = x;
    float cdf, pdf;
    gelu_parts(x, &cdf, &pdf);
    h[i] = x * cdf;
}

__kernel void gelu_backward(__global const float* dh, __global const float* a, const int H,
                            __global float* da)
{
    const int i = get_global_id(0);
    const float x = a[i];
    float cdf, pdf;
    gelu_parts(x, &cdf, &pdf);
    da[i] = dh[i] * (cdf + x * pdf);
}

/* gelu_forward8 / gelu_backward8: h = GELU(a) (no bias: a is only read) and da = dh·GELU'(a),
 * eight elements per work-item (n % 8 == 0) with gelu_parts8: the same values lane by lane as
 * gelu_parts (the transformer's MLP; bias_gelu_forward's h at bias 0).   global (n/8) */
__kernel void gelu_forward8(__global const float* a, __global float* h)
{
    const int i = get_global_id(0);
    const float8 x = ((__global const float8*)a)[i];
    float8 cdf, pdf;
    gelu_parts8(x, &cdf, &pdf);
    ((__global float8*)h)[i] = x * cdf;
}

__kernel void gelu_backward8(__global const float* dh, __global const float* a, __global float* da)
{
    const int i = get_global_id(0);
    const float8 x = ((__global const float8*)a)[i];
    float8 cdf, pdf;
    gelu_parts8(x, &cdf, &pdf);
    ((__global float8*)da)[i] = ((__global const float8*)dh)[i] * (cdf + x * pdf);
}

__kernel void add_bias(__global float* X, __global const float* bias, const int C)
{
    const int j = get_global_id(0), n = get_global_id(1);
    X[n * C + j] += bias[j];
}

__kernel void colsum(__global const float* X, const int N, const int C, __global float* out)
{
    const int j = get_global_id(0);
    float acc = 0.0f;
    for (int n = 0; n < N; n++) acc += X[n * C + j];
    out[j] = acc;
}

/* colsum8: the same sums (same order per column, so the same bits), eight columns
 * per work-item as one float8: C % 8 == 0 and X 32-byte aligned (host checks).
 * Launch: global = (C/8), local = (1): one work-group per strip, so both cores work. */
__kernel void colsum8(__global const float* X, const int N, const int C, __global float* out)
{
    const int j = get_global_id(0) * 8;
    __global const float* xp = X + j;
    float8 acc = 0.0f;
    for (int n = 0; n < N; n++, xp += C) acc += *(__global const float8*)xp;
    *(__global float8*)(out + j) = acc;
}

__kernel void spikes_forward(__global const float* h, const float theta, const int H,
                             __global float* s)
{
    const int j = get_global_id(0), n = get_global_id(1);
    s[n * H + j] = h[n * H + j] > theta ? 1.0f : 0.0f;
}

__kernel void row_normalize_forward(__global const float* h, const int H,
                                    __global float* k, __global float* inv_norm)
{
    const int n = get_global_id(0);
    float ss = 0.0f;
    for (int j = 0; j < H; j++) ss += h[n * H + j] * h[n * H + j];
    const float inv = 1.0f / sqrt(ss + 1e-6f);
    inv_norm[n] = inv;
    for (int j = 0; j < H; j++) k[n * H + j] = h[n * H + j] * inv;
}

/* dh += (dk − k·(k·dk)) · inv_norm : derivative of k = h / sqrt(|h|² + ε). */
__kernel void row_normalize_backward(__global const float* dk, __global const float* k,
                                     __global const float* inv_norm, const int H,
                                     __global float* dh)
{
    const int n = get_global_id(0);
    float kd = 0.0f;
    for (int j = 0; j < H; j++) kd += k[n * H + j] * dk[n * H + j];
    const float inv = inv_norm[n];
    for (int j = 0; j < H; j++) dh[n * H + j] += (dk[n * H + j] - k[n * H + j] * kd) * inv;
}

/* w[d] = η·λ^d, precomputed on the host in float64 (same numbers as the reference). */
/* row_normalize_forward8 / _backward8: the same with float8 chunks of the row
 * (H % 8 == 0, rows 32-byte aligned: host checks); the row sums add eight lane
 * partials at the end, so they differ from the scalar kernels' in the last bits. */
#define HSUM8(v) ((((v).s0 + (v).s1) + ((v).s2 + (v).s3)) + (((v).s4 + (v).s5) + ((v).s6 + (v).s7)))
__kernel void row_normalize_forward8(__global const float* h, const int H,
                                     __global float* k, __global float* inv_norm)
{
    const int n = get_global_id(0);
    __global const float8* hp = (__global const float8*)(h + n * H);
    __global float8* kp = (__global float8*)(k + n * H);
    float8 ss = 0.0f;
    for (int j = 0; j < H / 8; j++) ss += hp[j] * hp[j];
    const float inv = 1.0f / sqrt(HSUM8(ss) + 1e-6f);
    inv_norm[n] = inv;
    for (int j = 0; j < H / 8; j++) kp[j] = hp[j] * inv;
}

__kernel void row_normalize_backward8(__global const float* dk, __global const float* k,
                                      __global const float* inv_norm, const int H,
                                      __global float* dh)
{
    const int n = get_global_id(0);
    __global const float8* dkp = (__global const float8*)(dk + n * H);
    __global const float8* kp = (__global const float8*)(k + n * H);
    __global float8* dhp = (__global float8*)(dh + n * H);
    float8 kd8 = 0.0f;
    for (int j = 0; j < H / 8; j++) kd8 += kp[j] * dkp[j];
    const float kd = HSUM8(kd8);
    const float inv = inv_norm[n];
    for (int j = 0; j < H / 8; j++) dhp[j] += (dkp[j] - kp[j] * kd) * inv;
}

/* causal_dots_decay: out[b,t,τ] = w[t−1−τ]·(X[b,t]·Y[b,τ]) for τ < t, else 0 — the
 * A·Bᵀ product and causal_decay_mask in one pass, without transposing Y and without
 * computing the masked half: Gm = decay(K·Kᵀ) forward, dG = decay(dM·Postᵀ) backward.
 * Each work-item: 4 rows t × 2 rows τ, dots in float8 lanes over H (summed across the
 * lanes at the end, so the last bits differ from gemm + mask); tiles wholly above the
 * diagonal only write zeros. Host checks S % 4 == 0, H % 8 == 0, aligned rows.
 * Launch: global (S/2, S/4, B). */
__kernel void causal_dots_decay(__global const float* X, __global const float* Y, __global const float* w,
                                const int S, const int H, __global float* out)
{
    const int tau0 = get_global_id(0) * 2, t0 = get_global_id(1) * 4, b = get_global_id(2);
    __global float* o = out + ((size_t)b * S + t0) * S + tau0;
    if (tau0 >= t0 + 3) {                         /* τ ≥ t for the whole tile */
        for (int i = 0; i < 4; i++) { o[i * S] = 0.0f; o[i * S + 1] = 0.0f; }
        return;
    }
    const int H8 = H / 8;
    __global const float8* x0 = (__global const float8*)(X + ((size_t)b * S + t0) * H);
    __global const float8* x1 = x0 + H8;
    __global const float8* x2 = x1 + H8;
    __global const float8* x3 = x2 + H8;
    __global const float8* y0 = (__global const float8*)(Y + ((size_t)b * S + tau0) * H);
    __global const float8* y1 = y0 + H8;
    float8 a00 = 0, a01 = 0, a10 = 0, a11 = 0, a20 = 0, a21 = 0, a30 = 0, a31 = 0;
    for (int j = 0; j < H8; j++) {
        const float8 u = y0[j], v = y1[j];
        const float8 p0 = x0[j], p1 = x1[j], p2 = x2[j], p3 = x3[j];
        a00 += p0 * u; a01 += p0 * v; a10 += p1 * u; a11 += p1 * v;
        a20 += p2 * u; a21 += p2 * v; a30 += p3 * u; a31 += p3 * v;
    }
#define CAUSAL_OUT(i, c, acc) { const int t = t0 + i, tau = tau0 + c; \
        o[i * S + c] = tau < t ? w[t - 1 - tau] * HSUM8(acc) : 0.0f; }
    CAUSAL_OUT(0, 0, a00) CAUSAL_OUT(0, 1, a01) CAUSAL_OUT(1, 0, a10) CAUSAL_OUT(1, 1, a11)
    CAUSAL_OUT(2, 0, a20) CAUSAL_OUT(2, 1, a21) CAUSAL_OUT(3, 0, a30) CAUSAL_OUT(3, 1, a31)
#undef CAUSAL_OUT
}

__kernel void causal_decay_mask(__global const float* G, __global const float* w, const int S,
                                __global float* Gm)
{
    const int tau = get_global_id(0), t = get_global_id(1), b = get_global_id(2);
    const int i = (b * S + t) * S + tau;
    Gm[i] = tau < t ? w[t - 1 - tau] * G[i] : 0.0f;
}

/* ‖A_{S−1}‖²_F = Σ_{τ,τ'} c_τ c_τ' (post_τ·post_τ')(k_τ·k_τ'), c_τ = w[S−1−τ]
 * (w[d] = η·λ^d); G = K·Kᵀ and Q = Post·Postᵀ per sequence. */
__kernel void fw_state_norm(__global const float* G, __global const float* Q,
                            __global const float* w, const int S, __global float* out)
{
    const int b = get_global_id(0);
    float acc = 0.0f;
    for (int t = 0; t < S; t++)
        for (int u = 0; u < S; u++) {
            const int i = (b * S + t) * S + u;
            acc += w[S - 1 - t] * w[S - 1 - u] * G[i] * Q[i];
        }
    out[b] = sqrt(max(acc, 0.0f));
}

/* add_inplace: y (n,) += x (n,)   global (n)   reference: add_inplace */
__kernel void add_inplace(__global const float* x, __global float* y)
{
    const int i = get_global_id(0);
    y[i] += x[i];
}

/* add_branch: out = x + (z − h) (n,): a pre-normalised branch's output, the stream x plus what
 * a layer added to its normalised input h (bio prenorm)   global (n)   reference: BioAssociative */
__kernel void add_branch(__global const float* x, __global const float* z, __global const float* h,
                         __global float* out)
{
    const int i = get_global_id(0);
    out[i] = x[i] + (z[i] - h[i]);
}

/* sub_into: out = a − b (n,)   global (n) */
__kernel void sub_into(__global const float* a, __global const float* b, __global float* out)
{
    const int i = get_global_id(0);
    out[i] = a[i] - b[i];
}

/* colsum_wg: out (C,) = Σ_n X[n]; group (16 columns × 16 row lanes): lane r sums rows r, r+16, …
 * of its column, then the 16 lane sums are added in a fixed tree.   global (⌈C/16⌉·16, 16), local (16, 16) */
__kernel void colsum_wg(__global const float* X, const int N, const int C, __global float* out)
{
    __local float red[16][17];
    const int cx = get_local_id(0), r = get_local_id(1);
    const int c = get_group_id(0) * 16 + cx;
    float acc = 0.0f;
    if (c < C)
        for (int n = r; n < N; n += 16) acc += X[(size_t)n * C + c];
    red[r][cx] = acc;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int step = 8; step > 0; step >>= 1) {
        if (r < step) red[r][cx] += red[r + step][cx];
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    if (r == 0 && c < C) out[c] = red[0][cx];
}

/* row_normalize_forward_wg / _backward_wg: row_normalize_forward / _backward with a work-group of
 * WG items per row (item l takes columns l, l + WG, …) and the row sum as a tree (wg_sum).
 * Launch: global (N·WG), local (WG). */
__kernel __attribute__((reqd_work_group_size(WG, 1, 1)))
void row_normalize_forward_wg(__global const float* h, const int H,
                              __global float* k, __global float* inv_norm)
{
    __local float red[WG];
    const int n = get_group_id(0), l = get_local_id(0);
    __global const float* hr = h + (size_t)n * H;
    float ss = 0.0f;
    for (int j = l; j < H; j += WG) ss += hr[j] * hr[j];
    const float inv = 1.0f / sqrt(wg_sum(ss, red) + 1e-6f);
    if (l == 0) inv_norm[n] = inv;
    for (int j = l; j < H; j += WG) k[(size_t)n * H + j] = hr[j] * inv;
}

__kernel __attribute__((reqd_work_group_size(WG, 1, 1)))
void row_normalize_backward_wg(__global const float* dk, __global const float* k,
                               __global const float* inv_norm, const int H,
                               __global float* dh)
{
    __local float red[WG];
    const int n = get_group_id(0), l = get_local_id(0);
    const size_t o = (size_t)n * H;
    float kd = 0.0f;
    for (int j = l; j < H; j += WG) kd += k[o + j] * dk[o + j];
    kd = wg_sum(kd, red);
    const float inv = inv_norm[n];
    for (int j = l; j < H; j += WG) dh[o + j] += (dk[o + j] - k[o + j] * kd) * inv;
}

/* fw_state_norm_wg: fw_state_norm with a work-group per sequence; item l sums the entries
 * i = l, l + WG, … of the S×S products (the same terms, in a tree order).
 * Launch: global (B·WG), local (WG). */
__kernel __attribute__((reqd_work_group_size(WG, 1, 1)))
void fw_state_norm_wg(__global const float* G, __global const float* Q,
                      __global const float* w, const int S, __global float* out)
{
    __local float red[WG];
    const int b = get_group_id(0), l = get_local_id(0);
    __global const float* g = G + (size_t)b * S * S;
    __global const float* q = Q + (size_t)b * S * S;
    float acc = 0.0f;
    for (int i = l; i < S * S; i += WG) {
        const int t = i / S, u = i - t * S;
        acc += w[S - 1 - t] * w[S - 1 - u] * g[i] * q[i];
    }
    acc = wg_sum(acc, red);
    if (l == 0) out[b] = sqrt(max(acc, 0.0f));
}

/* bucket_sums_wg: out[t] = Σ_{keys_n = t} X[n] (bucket_sums) for GPUs; group (16 columns × 16
 * member lanes) per 16 columns of one bucket t: lane r sums the members starts[t] + r, + 16, …
 * (perm order), then the 16 lane sums are added in a fixed tree (as colsum_wg). An empty bucket
 * writes zeros.   global (⌈C/16⌉·16, 16·nb), local (16, 16) */
__kernel __attribute__((reqd_work_group_size(16, 16, 1)))
void bucket_sums_wg(__global const float* X, __global const int* perm,
                    __global const int* starts, const int C, __global float* out)
{
    __local float red[16][17];
    const int cx = get_local_id(0), r = get_local_id(1);
    const int c = get_group_id(0) * 16 + cx, t = get_group_id(1);
    float acc = 0.0f;
    if (c < C)
        for (int i = starts[t] + r; i < starts[t + 1]; i += 16) acc += X[(size_t)perm[i] * C + c];
    red[r][cx] = acc;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int step = 8; step > 0; step >>= 1) {
        if (r < step) red[r][cx] += red[r + step][cx];
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    if (r == 0 && c < C) out[(size_t)t * C + c] = red[0][cx];
}
