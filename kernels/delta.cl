/* delta.cl — the delta rule of the fast-weight memory (Schlag et al. 2021), per sequence b
 * of S rows of (N, H) row-major float32 buffers, N = B·S:
 *
 *   m_t = A_{t−1}·k_t,   A_t = λ·A_{t−1} + η·u_t·k_tᵀ,   u_t = post_t − m_t,   A_{−1} = 0
 *
 * A is never formed. Unrolled, A_{t−1} = Σ_{τ<t} η·λ^{t−1−τ}·u_τ·k_τᵀ, so with the masked,
 * decayed Gram matrix Gm[t,τ] = w[t−1−τ]·(k_t·k_τ) for τ < t, else 0 (w[d] = η·λ^d;
 * layers.cl's causal_dots_decay) the forward is a unit lower-triangular solve, column by column:
 *
 *   u_t = post_t − Σ_{τ<t} Gm[t,τ]·u_τ,   m_t = post_t − u_t        (forward substitution)
 *
 * This is the same recurrence, not its inverse: a rounding error in u_τ moves A_τ by η·δ·k_τᵀ,
 * which then evolves as in the recurrence itself (the "WY"/UT form of Yang et al. 2024).
 * Backward (post constant, L = Σ dm·m): with V = (I + Gm)⁻ᵀ·dm, i.e.
 *
 *   v_t = dm_t − Σ_{τ>t} Gm[τ,t]·v_τ                                (back substitution)
 *
 * dL/dGm[t,τ] = v_t·u_τ, and dk = P·K + Pᵀ·K with P = decay(V·Uᵀ) (causal_dots_decay again,
 * then two batched gemms; engine/ops.py composes them). v_t equals the reference's
 * dm_t − η·G_t·k_t with G_t = dL/dA_t = Σ_{τ>t} λ^{τ−t−1}·v_τ·k_τᵀ.
 * Memory: Gm, P (B,S,S) and u (N,H); no H×H state (ops.delta_scratch).
 *
 * The kernels here are the two solves; every column j of every sequence is independent, each
 * sum runs τ ascending (fixed order, no atomics: bit-identical reruns).
 *   fast_weights_delta_forward(8)    gm, post -> m, u     one column (NB·8 columns as float8)
 *   fast_weights_delta_backward(8)   gm, dm -> v          per work-item, global (H, B) /
 *                                                         (H/(8·NB), B), local (1, 1)        CPU
 *   fast_weights_delta_forward_wg    the same, a work-group of WG columns of one sequence;
 *   fast_weights_delta_backward_wg   each step's row (column) of Gm staged in local memory in
 *                                    tiles of WG; global (⌈H/WG⌉·WG, B), local (WG, 1)    GPU
 * GPU note: both solves have _wg variants (above); the Gram products are causal_dots_decay's,
 * which takes the tiled gemm + causal_decay_mask on GPUs (engine.ops).
 * Reference: engine.reference.fast_weights_delta_forward / fast_weights_delta_backward.
 */
#ifndef WG
#define WG 64
#endif
#ifndef NB
#define NB 1
#endif

/* gm (B,S,S), post (N,H) -> m, u (N,H) */
__kernel void fast_weights_delta_forward(__global const float* gm, __global const float* post,
                                         const int S, const int H, __global float* m, __global float* u)
{
    const int j = get_global_id(0), b = get_global_id(1);
    __global const float* g = gm + (size_t)b * S * S;
    const size_t o = (size_t)b * S * H + j;
    for (int t = 0; t < S; t++) {
        float acc = 0.0f;
        for (int tau = 0; tau < t; tau++) acc += g[t * S + tau] * u[o + (size_t)tau * H];
        m[o + (size_t)t * H] = acc;
        u[o + (size_t)t * H] = post[o + (size_t)t * H] - acc;
    }
}

/* the same sums, NB·8 columns per work-item as NB float8 (each lane in the same order): NB
 * independent chains of additions, where one chain waits on each addition's latency (NB = 4:
 * 2.4 -> 1.2 ms at B=64, S=64, H=384 here; a private array acc[NB] instead of named
 * registers ran slower than NB = 1). H % (8·NB) == 0 and the buffers 32-byte aligned (host
 * checks). NB (1, 2 or 4) is a build-time define. */
#if NB == 4
#define COLS(X) X(0) X(1) X(2) X(3)
#elif NB == 2
#define COLS(X) X(0) X(1)
#else
#define COLS(X) X(0)
#endif
#define ACC_ZERO(c) float8 a##c = 0.0f;
#define ACC_ADD(c) a##c += gt * r[c];

__kernel void fast_weights_delta_forward8(__global const float* gm, __global const float* post,
                                          const int S, const int H, __global float* m, __global float* u)
{
    const int j8 = get_global_id(0) * NB, b = get_global_id(1), H8 = H / 8;
    __global const float* g = gm + (size_t)b * S * S;
    const size_t o = (size_t)b * S * H8 + j8;
    for (int t = 0; t < S; t++) {
        COLS(ACC_ZERO)
        for (int tau = 0; tau < t; tau++) {
            const float gt = g[t * S + tau];
            __global const float8* r = (__global const float8*)u + o + (size_t)tau * H8;
            COLS(ACC_ADD)
        }
        __global const float8* p8 = (__global const float8*)post + o + (size_t)t * H8;
        __global float8* m8 = (__global float8*)m + o + (size_t)t * H8;
        __global float8* u8 = (__global float8*)u + o + (size_t)t * H8;
#define FWD_STORE(c) m8[c] = a##c; u8[c] = p8[c] - a##c;
        COLS(FWD_STORE)
#undef FWD_STORE
    }
}

/* gm (B,S,S), dm (N,H) -> v (N,H) */
__kernel void fast_weights_delta_backward(__global const float* gm, __global const float* dm,
                                          const int S, const int H, __global float* v)
{
    const int j = get_global_id(0), b = get_global_id(1);
    __global const float* g = gm + (size_t)b * S * S;
    const size_t o = (size_t)b * S * H + j;
    for (int t = S - 1; t >= 0; t--) {
        float acc = 0.0f;
        for (int tau = t + 1; tau < S; tau++) acc += g[tau * S + t] * v[o + (size_t)tau * H];
        v[o + (size_t)t * H] = dm[o + (size_t)t * H] - acc;
    }
}

__kernel void fast_weights_delta_backward8(__global const float* gm, __global const float* dm,
                                           const int S, const int H, __global float* v)
{
    const int j8 = get_global_id(0) * NB, b = get_global_id(1), H8 = H / 8;
    __global const float* g = gm + (size_t)b * S * S;
    const size_t o = (size_t)b * S * H8 + j8;
    for (int t = S - 1; t >= 0; t--) {
        COLS(ACC_ZERO)
        for (int tau = t + 1; tau < S; tau++) {
            const float gt = g[tau * S + t];
            __global const float8* r = (__global const float8*)v + o + (size_t)tau * H8;
            COLS(ACC_ADD)
        }
        __global const float8* d8 = (__global const float8*)dm + o + (size_t)t * H8;
        __global float8* v8 = (__global float8*)v + o + (size_t)t * H8;
#define BWD_STORE(c) v8[c] = d8[c] - a##c;
        COLS(BWD_STORE)
#undef BWD_STORE
    }
}

/* GPU family: neighbouring work-items own neighbouring columns (coalesced rows of u, v), the
 * Gm entries of a step are read once per work-group into local memory. Items past H take part
 * in the barriers only. The loop bounds depend on t alone, the same for the whole group. */
__kernel __attribute__((reqd_work_group_size(WG, 1, 1)))
void fast_weights_delta_forward_wg(__global const float* gm, __global const float* post,
                                   const int S, const int H, __global float* m, __global float* u)
{
    __local float g[WG];
    const int j = get_global_id(0), l = get_local_id(0), b = get_global_id(1);
    const int on = j < H;
    __global const float* gb = gm + (size_t)b * S * S;
    const size_t o = (size_t)b * S * H + j;
    for (int t = 0; t < S; t++) {
        float acc = 0.0f;
        for (int t0 = 0; t0 < t; t0 += WG) {
            g[l] = t0 + l < t ? gb[t * S + t0 + l] : 0.0f;
            barrier(CLK_LOCAL_MEM_FENCE);
            const int n = min(WG, t - t0);
            if (on) for (int q = 0; q < n; q++) acc += g[q] * u[o + (size_t)(t0 + q) * H];
            barrier(CLK_LOCAL_MEM_FENCE);   /* the tile is read before the next one is staged */
        }
        if (on) {
            m[o + (size_t)t * H] = acc;
            u[o + (size_t)t * H] = post[o + (size_t)t * H] - acc;
        }
    }
}

__kernel __attribute__((reqd_work_group_size(WG, 1, 1)))
void fast_weights_delta_backward_wg(__global const float* gm, __global const float* dm,
                                    const int S, const int H, __global float* v)
{
    __local float g[WG];
    const int j = get_global_id(0), l = get_local_id(0), b = get_global_id(1);
    const int on = j < H;
    __global const float* gb = gm + (size_t)b * S * S;
    const size_t o = (size_t)b * S * H + j;
    for (int t = S - 1; t >= 0; t--) {
        float acc = 0.0f;
        for (int t0 = t + 1; t0 < S; t0 += WG) {
            g[l] = t0 + l < S ? gb[(t0 + l) * S + t] : 0.0f;
            barrier(CLK_LOCAL_MEM_FENCE);
            const int n = min(WG, S - t0);
            if (on) for (int q = 0; q < n; q++) acc += g[q] * v[o + (size_t)(t0 + q) * H];
            barrier(CLK_LOCAL_MEM_FENCE);
        }
        if (on) v[o + (size_t)t * H] = dm[o + (size_t)t * H] - acc;
    }
}
