/* attention.cl — causal multi-head self-attention and the transformer's embedding
 * (engine/layers/transformer.py; the products of the split-heads path are ops.gemm's).
 *
 * Letters: B batch, S sequence, C width, nh heads, d = C/nh head width, BH = B·nh,
 * P parts (3 for q|k|v, 1 for the attention output), N = B·S rows. Row-major float32.
 *
 *   tok_pos_embed_forward  x (N,C) = wte[tok[n]] + wpe[n mod S]              global (C, N)
 *   heads_split     in (N, P·C) -> out (P, BH, S, d): out[p][b·nh+h][t][j] =
 *                   in[b·S+t][p·C + h·d + j] (q, k, v of nanoGPT's c_attn split)  global (P·C, N)
 *   heads_merge     the inverse: out (N, P·C) from in (P, BH, S, d)          global (P·C, N)
 *   heads_split8 / heads_merge8   the same, a float8 per work-item (d % 8 == 0)  global (P·C/8, N)
 *   causal_softmax  p (R,S) = softmax over τ ≤ t of scale·s[r,τ], 0 for τ > t, with
 *                   t = r mod S (R = BH·S rows of S scores), max subtracted   global (R)
 *   causal_softmax_backward  ds = scale·p ⊙ (dp − Σ_τ p·dp) per row          global (R)
 *   causal_softmax_wg / causal_softmax_backward_wg   the same for GPUs: a work-group of WG
 *                   items per row (item l takes τ = l, l + WG, …: coalesced), a tree max and
 *                   tree sums in a fixed order (reduce.cl)      global (R·WG), local (WG)
 *   attention_forward8, attention_backward_rows8, attention_backward_cols8   the CPU variant's
 *                   fused attention straight from qkv (N, 3C) (described below)  global (S, BH)
 *
 * The CPU kernels loop over a row in one work-item in τ order; the GPU ones sum in a tree:
 * both fixed, so every run is bit-identical on one device (no atomics), and the two differ
 * in the last bits. exp_fast: see fastmath.cl (masked columns are never exponentiated).
 * References: engine.reference.attention.{tok_pos_embed_forward, heads_split, heads_merge,
 * causal_softmax, causal_softmax_backward, attention_forward, attention_backward}.
 */
#include "fastmath.cl"
#include "reduce.cl"

__kernel void tok_pos_embed_forward(__global const float* wte, __global const int* tok,
                                    __global const float* wpe, const int S, const int C,
                                    __global float* x)
{
    const int c = get_global_id(0), n = get_global_id(1);
    x[(size_t)n * C + c] = wte[(size_t)tok[n] * C + c] + wpe[(size_t)(n % S) * C + c];
}

/* i over P·C columns of row n = b·S + t: part p = i / C, head h = (i mod C) / d, lane j. */
__kernel void heads_split(__global const float* in, const int S, const int nh, const int d,
                          __global float* out)
{
    const int i = get_global_id(0), n = get_global_id(1);
    const int PC = get_global_size(0), C = nh * d, N = get_global_size(1);
    const int p = i / C, h = (i - p * C) / d, j = i - p * C - h * d;
    const int b = n / S, t = n - b * S;
    out[(size_t)p * N * C + ((size_t)(b * nh + h) * S + t) * d + j] = in[(size_t)n * PC + i];
}

__kernel void heads_merge(__global const float* in, const int S, const int nh, const int d,
                          __global float* out)
{
    const int i = get_global_id(0), n = get_global_id(1);
    const int PC = get_global_size(0), C = nh * d, N = get_global_size(1);
    const int p = i / C, h = (i - p * C) / d, j = i - p * C - h * d;
    const int b = n / S, t = n - b * S;
    out[(size_t)n * PC + i] = in[(size_t)p * N * C + ((size_t)(b * nh + h) * S + t) * d + j];
}

/* heads_split8 / heads_merge8: the same, eight floats of one head per work-item (d % 8 == 0,
 * host checks): float8 loads and stores, one index computation per eight.  global (P·C/8, N) */
__kernel void heads_split8(__global const float* in, const int S, const int nh, const int d,
                           __global float* out)
{
    const int i = get_global_id(0) * 8, n = get_global_id(1);
    const int PC = get_global_size(0) * 8, C = nh * d, N = get_global_size(1);
    const int p = i / C, h = (i - p * C) / d, j = i - p * C - h * d;
    const int b = n / S, t = n - b * S;
    *(__global float8*)(out + (size_t)p * N * C + ((size_t)(b * nh + h) * S + t) * d + j) =
        *(__global const float8*)(in + (size_t)n * PC + i);
}

__kernel void heads_merge8(__global const float* in, const int S, const int nh, const int d,
                           __global float* out)
{
    const int i = get_global_id(0) * 8, n = get_global_id(1);
    const int PC = get_global_size(0) * 8, C = nh * d, N = get_global_size(1);
    const int p = i / C, h = (i - p * C) / d, j = i - p * C - h * d;
    const int b = n / S, t = n - b * S;
    *(__global float8*)(out + (size_t)n * PC + i) =
        *(__global const float8*)(in + (size_t)p * N * C + ((size_t)(b * nh + h) * S + t) * d + j);
}

__kernel void causal_softmax(__global const float* s, const int S, const float scale, __global float* p)
{
    const int r = get_global_id(0), t = r % S;
    __global const float* sr = s + (size_t)r * S;
    __global float* pr = p + (size_t)r * S;
    float mx = sr[0] * scale;
    for (int u = 1; u <= t; u++) { const float v = sr[u] * scale; mx = v > mx ? v : mx; }
    float sum = 0.0f;
    for (int u = 0; u <= t; u++) { const float e = exp_fast(sr[u] * scale - mx); pr[u] = e; sum += e; }
    const float inv = 1.0f / sum;
    for (int u = 0; u <= t; u++) pr[u] *= inv;
    for (int u = t + 1; u < S; u++) pr[u] = 0.0f;
}

__kernel void causal_softmax_backward(__global const float* p, __global const float* dp, const int S,
                                      const float scale, __global float* ds)
{
    const int r = get_global_id(0), t = r % S;
    __global const float* pr = p + (size_t)r * S;
    __global const float* dr = dp + (size_t)r * S;
    __global float* out = ds + (size_t)r * S;
    float dot = 0.0f;
    for (int u = 0; u <= t; u++) dot += pr[u] * dr[u];
    for (int u = 0; u <= t; u++) out[u] = scale * pr[u] * (dr[u] - dot);
    for (int u = t + 1; u < S; u++) out[u] = 0.0f;
}

inline float wg_max(float value, __local float* red)
{
    const int l = get_local_id(0);
    red[l] = value;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int step = WG / 2; step > 0; step >>= 1) {
        if (l < step) red[l] = red[l + step] > red[l] ? red[l + step] : red[l];
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    const float m = red[0];
    barrier(CLK_LOCAL_MEM_FENCE);
    return m;
}

__kernel __attribute__((reqd_work_group_size(WG, 1, 1)))
void causal_softmax_wg(__global const float* s, const int S, const float scale, __global float* p)
{
    __local float red[WG];
    const int r = get_group_id(0), l = get_local_id(0), t = r % S;
    __global const float* sr = s + (size_t)r * S;
    __global float* pr = p + (size_t)r * S;
    float mx = -INFINITY;
    for (int u = l; u <= t; u += WG) { const float v = sr[u] * scale; mx = v > mx ? v : mx; }
    mx = wg_max(mx, red);
    float sum = 0.0f;
    for (int u = l; u <= t; u += WG) sum += exp_fast(sr[u] * scale - mx);
    const float inv = 1.0f / wg_sum(sum, red);
    for (int u = l; u < S; u += WG) pr[u] = u <= t ? exp_fast(sr[u] * scale - mx) * inv : 0.0f;
}

__kernel __attribute__((reqd_work_group_size(WG, 1, 1)))
void causal_softmax_backward_wg(__global const float* p, __global const float* dp, const int S,
                                const float scale, __global float* ds)
{
    __local float red[WG];
    const int r = get_group_id(0), l = get_local_id(0), t = r % S;
    __global const float* pr = p + (size_t)r * S;
    __global const float* dr = dp + (size_t)r * S;
    __global float* out = ds + (size_t)r * S;
    float dot = 0.0f;
    for (int u = l; u <= t; u += WG) dot += pr[u] * dr[u];
    dot = wg_sum(dot, red);
    for (int u = l; u < S; u += WG) out[u] = u <= t ? scale * pr[u] * (dr[u] - dot) : 0.0f;
}

/* ---- fused causal attention, CPU variant (d % 8 == 0, no dropout): reads q, k, v straight from
 * the c_attn output qkv (N, 3C) and writes y (N, C) merged, so no head split, transpose or merge.
 * Built with D8 = d/8 (the head row as D8 float8 registers). Per head (b, h), rows t, τ:
 *   attention_forward8        (t, bh): s_τ = q_t·k_τ (τ ≤ t), p = softmax(scale·s), y_t = Σ p_τ v_τ;
 *                             p (BH,S,S) kept for the backward, 0 above t      global (S, BH)
 *   attention_backward_rows8  (t, bh): dp_τ = dy_t·v_τ, ds = scale·p ⊙ (dp − Σ p·dp) into ds
 *                             (BH,S,S), dq_t = Σ_τ ds_τ k_τ into dqkv[:, 0:C]   global (S, BH)
 *   attention_backward_cols8  (τ, bh): dk_τ = Σ_{t≥τ} ds[t,τ] q_t, dv_τ = Σ_{t≥τ} p[t,τ] dy_t
 *                             into dqkv[:, C:2C] and dqkv[:, 2C:3C]             global (S, BH)
 * Dots are summed in eight lanes, then the lanes in a fixed tree (hsum8), and so are the softmax
 * sums over blocks of eight keys (exp_fast8) when S % 8 == 0 (else one key at a time); every loop
 * runs in τ (or t) order: bit-identical runs. */
#ifdef D8
#define LANES ((float8)(0.0f, 1.0f, 2.0f, 3.0f, 4.0f, 5.0f, 6.0f, 7.0f))

static inline __attribute__((always_inline)) float hsum8(const float8 a)
{
    const float4 h = a.lo + a.hi;
    const float2 g = h.lo + h.hi;
    return g.x + g.y;
}

__kernel void attention_forward8(__global const float* qkv, const int S, const int nh, const float scale,
                                 __global float* p, __global float* y)
{
    const int t = get_global_id(0), bh = get_global_id(1);
    const int b = bh / nh, h = bh - b * nh, C = nh * D8 * 8;
    __global const float* qr = qkv + (size_t)(b * S + t) * 3 * C + h * D8 * 8;
    __global const float* kr = qkv + (size_t)b * S * 3 * C + C + h * D8 * 8;
    __global float* pr = p + ((size_t)bh * S + t) * S;
    float8 q[D8], acc[D8];
    #pragma unroll
    for (int j = 0; j < D8; j++) { q[j] = ((__global const float8*)qr)[j] * scale; acc[j] = 0.0f; }
    float mx = -INFINITY;
    for (int u = 0; u <= t; u++) {
        __global const float8* kv = (__global const float8*)(kr + (size_t)u * 3 * C);
        float8 d = q[0] * kv[0];
        #pragma unroll
        for (int j = 1; j < D8; j++) d += q[j] * kv[j];
        const float sc = hsum8(d);
        pr[u] = sc;
        mx = sc > mx ? sc : mx;
    }
    /* the exponentials eight keys at a time (lanes past t are 0); one by one when S % 8 ≠ 0 */
    const int nb = S % 8 ? 0 : t / 8 + 1;   /* float8 rows need S % 8 == 0 (32-byte aligned rows) */
    float8 sum8 = 0.0f;
    for (int ib = 0; ib < nb; ib++) {
        __global float8* p8 = (__global float8*)(pr + ib * 8);
        const float8 e = (float)(ib * 8) + LANES <= (float)t ? exp_fast8(*p8 - mx) : (float8)(0.0f);
        *p8 = e;
        sum8 += e;
    }
    float sum = hsum8(sum8);
    for (int u = nb * 8; u <= t; u++) { const float e = exp_fast(pr[u] - mx); pr[u] = e; sum += e; }
    const float inv = 1.0f / sum;
    for (int u = 0; u <= t; u++) {
        const float w = pr[u] * inv;
        pr[u] = w;
        __global const float8* vv = (__global const float8*)(kr + (size_t)u * 3 * C + C);
        #pragma unroll
        for (int j = 0; j < D8; j++) acc[j] += w * vv[j];
    }
    for (int u = max(t + 1, nb * 8); u < S; u++) pr[u] = 0.0f;
    __global float8* yr = (__global float8*)(y + (size_t)(b * S + t) * C + h * D8 * 8);
    #pragma unroll
    for (int j = 0; j < D8; j++) yr[j] = acc[j];
}

__kernel void attention_backward_rows8(__global const float* qkv, __global const float* p,
                                       __global const float* dy, const int S, const int nh, const float scale,
                                       __global float* ds, __global float* dqkv)
{
    const int t = get_global_id(0), bh = get_global_id(1);
    const int b = bh / nh, h = bh - b * nh, C = nh * D8 * 8;
    __global const float* kr = qkv + (size_t)b * S * 3 * C + C + h * D8 * 8;
    __global const float* pr = p + ((size_t)bh * S + t) * S;
    __global float* dr = ds + ((size_t)bh * S + t) * S;
    __global const float8* dyr = (__global const float8*)(dy + (size_t)(b * S + t) * C + h * D8 * 8);
    float8 g[D8], acc[D8];
    #pragma unroll
    for (int j = 0; j < D8; j++) { g[j] = dyr[j]; acc[j] = 0.0f; }
    for (int u = 0; u <= t; u++) {
        __global const float8* vv = (__global const float8*)(kr + (size_t)u * 3 * C + C);
        float8 d = g[0] * vv[0];
        #pragma unroll
        for (int j = 1; j < D8; j++) d += g[j] * vv[j];
        dr[u] = hsum8(d);
    }
    /* Σ p·dp and ds eight keys at a time (lanes past t masked: dr holds old values there) */
    const int nb = S % 8 ? 0 : t / 8 + 1;   /* float8 rows need S % 8 == 0 (32-byte aligned rows) */
    float8 dot8 = 0.0f;
    for (int ib = 0; ib < nb; ib++) {
        const float8 pd = *(__global const float8*)(pr + ib * 8) * *(__global const float8*)(dr + ib * 8);
        dot8 += (float)(ib * 8) + LANES <= (float)t ? pd : (float8)(0.0f);
    }
    float dot = hsum8(dot8);
    for (int u = nb * 8; u <= t; u++) dot += pr[u] * dr[u];
    for (int ib = 0; ib < nb; ib++) {
        __global float8* d8 = (__global float8*)(dr + ib * 8);
        const float8 w = scale * *(__global const float8*)(pr + ib * 8) * (*d8 - dot);
        *d8 = (float)(ib * 8) + LANES <= (float)t ? w : (float8)(0.0f);
    }
    for (int u = nb * 8; u <= t; u++) dr[u] = scale * pr[u] * (dr[u] - dot);
    for (int u = 0; u <= t; u++) {
        const float w = dr[u];
        __global const float8* kv = (__global const float8*)(kr + (size_t)u * 3 * C);
        #pragma unroll
        for (int j = 0; j < D8; j++) acc[j] += w * kv[j];
    }
    for (int u = max(t + 1, nb * 8); u < S; u++) dr[u] = 0.0f;
    __global float8* o = (__global float8*)(dqkv + (size_t)(b * S + t) * 3 * C + h * D8 * 8);
    #pragma unroll
    for (int j = 0; j < D8; j++) o[j] = acc[j];
}

__kernel void attention_backward_cols8(__global const float* qkv, __global const float* p,
                                       __global const float* ds, __global const float* dy, const int S,
                                       const int nh, __global float* dqkv)
{
    const int u = get_global_id(0), bh = get_global_id(1);
    const int b = bh / nh, h = bh - b * nh, C = nh * D8 * 8;
    __global const float* qr = qkv + (size_t)b * S * 3 * C + h * D8 * 8;
    __global const float* dyr = dy + (size_t)b * S * C + h * D8 * 8;
    __global const float* pc = p + (size_t)bh * S * S + u;
    __global const float* dc = ds + (size_t)bh * S * S + u;
    float8 dk[D8], dv[D8];
    #pragma unroll
    for (int j = 0; j < D8; j++) { dk[j] = 0.0f; dv[j] = 0.0f; }
    for (int t = u; t < S; t++) {
        const float w = dc[(size_t)t * S], pw = pc[(size_t)t * S];
        __global const float8* qv = (__global const float8*)(qr + (size_t)t * 3 * C);
        __global const float8* gv = (__global const float8*)(dyr + (size_t)t * C);
        #pragma unroll
        for (int j = 0; j < D8; j++) { dk[j] += w * qv[j]; dv[j] += pw * gv[j]; }
    }
    __global float8* o = (__global float8*)(dqkv + (size_t)(b * S + u) * 3 * C + C + h * D8 * 8);
    #pragma unroll
    for (int j = 0; j < D8; j++) { o[j] = dk[j]; o[j + C / 8] = dv[j]; }
}
#endif
