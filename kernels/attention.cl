/* attention.cl — causal multi-head self-attention and the transformer's embedding
 * (engine/layers/attention.py, engine/layers/embed_pos.py; the products are ops.gemm's).
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
 *
 * The CPU kernels loop over a row in one work-item in τ order; the GPU ones sum in a tree:
 * both fixed, so every run is bit-identical on one device (no atomics), and the two differ
 * in the last bits. exp_fast: see fastmath.cl (masked columns are never exponentiated).
 * References: engine.reference.attention.{tok_pos_embed_forward, heads_split, heads_merge,
 * causal_softmax, causal_softmax_backward}.
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
