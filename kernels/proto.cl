/* proto.cl — prototype assignment, feature and the online k-means update.
 *
 *   row_inv_norm          inv[n] = 1/sqrt(|X_n|² + 1e-6)                          global (R)
 *   proto_argmax          k[n] = argmax_t sim(v_n, P_t) from scores = v·Pᵀ (N,T),
 *                         cosine: scores·inv_v·inv_p; lowest t on ties           global (N)
 *   proto_feature_forward z = ht + β·P[k]                                         global (H, N)
 *   (sums[t] = Σ_{k_n = t} v_n: bucket_sums in layers.cl)
 *   proto_update          P_t ← P_t + lr·(sums_t/c_t − P_t) if c_t > 0, then the
 *                         usage EMA and re-seeding of dead prototypes            global (H, T)
 *   proto_usage_update    usage EMA (after proto_update read the old one)        global (T)
 *   proto_qerr_rows       q[n] = |v_n − P_{k_n}|²                                 global (N)
 *   row_inv_norm_wg / proto_argmax_wg / proto_qerr_rows_wg   the same for GPUs: one work-group
 *                         of WG items per row, coalesced strided reads, a tree sum (wg_sum) or a
 *                         tree argmax (wg_argmax: the lowest index on ties, so k is exactly
 *                         proto_argmax's from the same scores)         global (R·WG), local (WG)
 * GPU note: proto_feature_forward, proto_update (element-wise over (H, N) / (H, T), a row
 * read contiguously by neighbouring items) and proto_usage_update (one item per prototype,
 * O(1) work) are already GPU-suitable; the row loops above have _wg variants.
 * Reference: engine.reference.proto_assign / proto_feature_forward / proto_update.
 */
#ifndef WG
#define WG 64
#endif
#include "reduce.cl"

__kernel void row_inv_norm(__global const float* X, const int C, __global float* inv)
{
    const int r = get_global_id(0);
    float ss = 0.0f;
    for (int j = 0; j < C; j++) ss += X[r * C + j] * X[r * C + j];
    inv[r] = 1.0f / sqrt(ss + 1e-6f);
}

/* row_inv_norm8: the same with float8 chunks (C % 8 == 0, host checks); the sum of
 * squares adds eight lane partials at the end (last bits differ from row_inv_norm). */
__kernel void row_inv_norm8(__global const float* X, const int C, __global float* inv)
{
    const int r = get_global_id(0);
    __global const float8* xp = (__global const float8*)(X + r * C);
    float8 ss = 0.0f;
    for (int j = 0; j < C / 8; j++) ss += xp[j] * xp[j];
    inv[r] = 1.0f / sqrt((((ss.s0 + ss.s1) + (ss.s2 + ss.s3)) + ((ss.s4 + ss.s5) + (ss.s6 + ss.s7))) + 1e-6f);
}

__kernel void proto_argmax(__global const float* scores, __global const float* inv_v,
                           __global const float* inv_p, const int T, const int cosine,
                           __global int* k)
{
    const int n = get_global_id(0);
    int best = 0;
    float bv = -INFINITY;
    for (int t = 0; t < T; t++) {
        float s = scores[n * T + t];
        if (cosine) s = s * inv_v[n] * inv_p[t];
        if (s > bv) { bv = s; best = t; }
    }
    k[n] = best;
}

__kernel void proto_feature_forward(__global const float* ht, __global const float* P,
                                    __global const int* k, const float beta, const int H,
                                    __global float* z)
{
    const int j = get_global_id(0), n = get_global_id(1);
    z[n * H + j] = ht[n * H + j] + beta * P[k[n] * H + j];
}

#include "hash.cl"

float usage_next(float u, int c, int N, float rho)
{
    return rho * u + (1.0f - rho) * ((float)c / (float)N);
}

__kernel void proto_update(__global float* P, __global const float* sums,
                           __global const int* starts, __global const float* usage,
                           __global const float* v, const float lr, const float rho,
                           const float threshold, const uint seed, const uint step,
                           const int N, const int T, const int H)
{
    const int j = get_global_id(0), t = get_global_id(1);
    const int c = starts[t + 1] - starts[t];
    float p = P[t * H + j];
    if (c > 0) p = p + lr * (sums[t * H + j] / (float)c - p);
    if (usage_next(usage[t], c, N, rho) < threshold / (float)T) {
        const uint row = hash_u32(seed, step, (uint)t) % (uint)N;
        p = v[row * H + j];
    }
    P[t * H + j] = p;
}

__kernel void proto_usage_update(__global float* usage, __global const int* starts,
                                 const float rho, const float threshold, const int N, const int T)
{
    const int t = get_global_id(0);
    const float u = usage_next(usage[t], starts[t + 1] - starts[t], N, rho);
    usage[t] = u < threshold / (float)T ? 1.0f / (float)T : u;
}

__kernel void proto_qerr_rows(__global const float* v, __global const float* P,
                              __global const int* k, const int H, __global float* q)
{
    const int n = get_global_id(0);
    float acc = 0.0f;
    for (int j = 0; j < H; j++) {
        const float d = v[n * H + j] - P[k[n] * H + j];
        acc += d * d;
    }
    q[n] = acc;
}

__kernel __attribute__((reqd_work_group_size(WG, 1, 1)))
void row_inv_norm_wg(__global const float* X, const int C, __global float* inv)
{
    __local float red[WG];
    const int r = get_group_id(0), l = get_local_id(0);
    __global const float* x = X + (size_t)r * C;
    float ss = 0.0f;
    for (int j = l; j < C; j += WG) ss += x[j] * x[j];
    ss = wg_sum(ss, red);
    if (l == 0) inv[r] = 1.0f / sqrt(ss + 1e-6f);
}

__kernel __attribute__((reqd_work_group_size(WG, 1, 1)))
void proto_argmax_wg(__global const float* scores, __global const float* inv_v,
                     __global const float* inv_p, const int T, const int cosine,
                     __global int* k)
{
    __local float red[WG];
    __local int idx[WG];
    const int n = get_group_id(0), l = get_local_id(0);
    float bv = -INFINITY;
    int best = l;
    for (int t = l; t < T; t += WG) {
        float s = scores[(size_t)n * T + t];
        if (cosine) s = s * inv_v[n] * inv_p[t];   /* proto_argmax's expression: the same scores */
        if (s > bv) { bv = s; best = t; }
    }
    int arg;
    wg_argmax(bv, best, red, idx, &arg);
    if (l == 0) k[n] = arg;
}

__kernel __attribute__((reqd_work_group_size(WG, 1, 1)))
void proto_qerr_rows_wg(__global const float* v, __global const float* P,
                        __global const int* k, const int H, __global float* q)
{
    __local float red[WG];
    const int n = get_group_id(0), l = get_local_id(0);
    __global const float* vr = v + (size_t)n * H;
    __global const float* pr = P + (size_t)k[n] * H;
    float acc = 0.0f;
    for (int j = l; j < H; j += WG) {
        const float d = vr[j] - pr[j];
        acc += d * d;
    }
    acc = wg_sum(acc, red);
    if (l == 0) q[n] = acc;
}
