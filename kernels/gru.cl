/* gru.cl — the gates of one step of a GRU layer (engine/layers/gru.py), PyTorch nn.GRU's
 * equations and gate order [r | z | n]; the products x·W_i (all positions at once) and
 * h_{t−1}·W_h (per step) are ops.gemm's.
 *
 * Letters: B batch, S sequence, N = B·S rows in (b, t) order, Hd hidden, H3 = 3·Hd. Row-major
 * float32. Time-major buffers: hs ((S+1)·B, Hd), row t·B + b = h_{t−1} of sequence b (row b of
 * block 0 is the carried state h_{−1}); gates (S·B, 4·Hd), row t·B + b = [r | z | n | hn];
 * dgh (S·B, 3·Hd), row t·B + b.
 *
 *   gru_gates_forward   step t: from gx (N,3Hd) row b·S+t (x·W_i) and gh (B,3Hd) (h_{t−1}·W_h):
 *                         r = σ(gx_r + b_ir + gh_r + b_hr),  z = σ(gx_z + b_iz + gh_z + b_hz),
 *                         hn = gh_n + b_hn,  n = tanh(gx_n + b_in + r·hn),
 *                         h_t = (1 − z)·n + z·h_{t−1}
 *                       writes h_t to hs row (t+1)·B + b and to y (N,Hd) row b·S + t, and
 *                       [r | z | n | hn] to gates row t·B + b              global (Hd, B)
 *   gru_gates_backward  step t, from dh = dy[b·S+t] + carry (carry = ∂L/∂h_t through step t+1;
 *                       read as 0 at t = S−1):
 *                         da_n = dh·(1 − z)·(1 − n²),  da_z = dh·(h_{t−1} − n)·z(1 − z),
 *                         da_r = da_n·hn·r(1 − r)
 *                       dgx row b·S+t = [da_r | da_z | da_n] (∂ of gx and b_i), dgh row t·B+b =
 *                       [da_r | da_z | da_n·r] (∂ of gh and b_h), carry = dh·z (the direct part of
 *                       ∂L/∂h_{t−1}; ops.gemm then adds dgh_t·W_hᵀ)          global (Hd, B)
 *   gru_gates_forward8 / gru_gates_backward8   the same, a float8 of units per work-item (the CPU
 *                       variant, Hd % 8 == 0: the scalar form does not vectorise in PoCL, 4-5x)
 *                                                                          global (Hd/8, B)
 *
 * All are element-wise, with no sums, so every run gives the same bits. The scalar kernels (one
 * work-item per (j, b), neighbouring items on neighbouring addresses: coalesced) are the GPU
 * variant's; the CPU variant takes the float8 ones where Hd % 8 == 0 (engine.ops).
 * σ and tanh through exp_fast (fastmath.cl: PoCL's exp is a call): σ(a) = 1/(1 + e^−a),
 * tanh(a) = 1 − 2/(1 + e^2a), absolute error ~1e-7.
 * References: engine.reference.gru.{gru_gates_forward, gru_gates_backward}.
 */
#include "fastmath.cl"

#define INLINE static inline __attribute__((always_inline))

INLINE float sigmoid_fast(float a) { return 1.0f / (1.0f + exp_fast(-a)); }
INLINE float tanh_fast(float a) { return 1.0f - 2.0f / (1.0f + exp_fast(2.0f * a)); }
INLINE float8 sigmoid_fast8(float8 a) { return 1.0f / (1.0f + exp_fast8(-a)); }
INLINE float8 tanh_fast8(float8 a) { return 1.0f - 2.0f / (1.0f + exp_fast8(2.0f * a)); }

__kernel void gru_gates_forward(__global const float* gx, __global const float* gh, __global const float* b_i,
                                __global const float* b_h, const int t, const int S, const int Hd,
                                __global float* hs, __global float* gates, __global float* y)
{
    const int j = get_global_id(0), b = get_global_id(1), B = get_global_size(1);
    __global const float* x = gx + (b * S + t) * 3 * Hd;
    __global const float* h = gh + b * 3 * Hd;
    const float r = sigmoid_fast((x[j] + b_i[j]) + (h[j] + b_h[j]));
    const float z = sigmoid_fast((x[Hd + j] + b_i[Hd + j]) + (h[Hd + j] + b_h[Hd + j]));
    const float hn = h[2 * Hd + j] + b_h[2 * Hd + j];
    const float n = tanh_fast((x[2 * Hd + j] + b_i[2 * Hd + j]) + r * hn);
    const float hp = hs[(t * B + b) * Hd + j];
    const float ht = (1.0f - z) * n + z * hp;
    hs[((t + 1) * B + b) * Hd + j] = ht;
    y[(b * S + t) * Hd + j] = ht;
    __global float* g = gates + (t * B + b) * 4 * Hd;
    g[j] = r;
    g[Hd + j] = z;
    g[2 * Hd + j] = n;
    g[3 * Hd + j] = hn;
}

__kernel void gru_gates_backward(__global const float* dy, __global const float* gates, __global const float* hs,
                                 const int t, const int S, const int Hd,
                                 __global float* carry, __global float* dgx, __global float* dgh)
{
    const int j = get_global_id(0), b = get_global_id(1), B = get_global_size(1);
    const float dh = dy[(b * S + t) * Hd + j] + (t < S - 1 ? carry[b * Hd + j] : 0.0f);
    __global const float* g = gates + (t * B + b) * 4 * Hd;
    const float r = g[j], z = g[Hd + j], n = g[2 * Hd + j], hn = g[3 * Hd + j];
    const float hp = hs[(t * B + b) * Hd + j];
    const float dan = dh * (1.0f - z) * (1.0f - n * n);
    const float daz = dh * (hp - n) * (z * (1.0f - z));
    const float dar = dan * hn * (r * (1.0f - r));
    __global float* dx = dgx + (b * S + t) * 3 * Hd;
    __global float* dh3 = dgh + (t * B + b) * 3 * Hd;
    dx[j] = dar;
    dx[Hd + j] = daz;
    dx[2 * Hd + j] = dan;
    dh3[j] = dar;
    dh3[Hd + j] = daz;
    dh3[2 * Hd + j] = dan * r;
    carry[b * Hd + j] = dh * z;
}

#define LD8(p, i) (*(__global const float8*)((p) + (i)))
#define ST8(p, i, v) (*(__global float8*)((p) + (i)) = (v))

/* gru_gates_forward8 / gru_gates_backward8: the same, eight hidden units per work-item as float8
 * (Hd % 8 == 0, rows 32-byte aligned; the CPU variant: the scalar form does not vectorise in
 * PoCL). exp_fast8 is exp_fast lane by lane: the same values.        global (Hd/8, B) */
__kernel void gru_gates_forward8(__global const float* gx, __global const float* gh, __global const float* b_i,
                                 __global const float* b_h, const int t, const int S, const int Hd,
                                 __global float* hs, __global float* gates, __global float* y)
{
    const int j = get_global_id(0) * 8, b = get_global_id(1), B = get_global_size(1);
    __global const float* x = gx + (b * S + t) * 3 * Hd;
    __global const float* h = gh + b * 3 * Hd;
    const float8 r = sigmoid_fast8((LD8(x, j) + LD8(b_i, j)) + (LD8(h, j) + LD8(b_h, j)));
    const float8 z = sigmoid_fast8((LD8(x, Hd + j) + LD8(b_i, Hd + j)) + (LD8(h, Hd + j) + LD8(b_h, Hd + j)));
    const float8 hn = LD8(h, 2 * Hd + j) + LD8(b_h, 2 * Hd + j);
    const float8 n = tanh_fast8((LD8(x, 2 * Hd + j) + LD8(b_i, 2 * Hd + j)) + r * hn);
    const float8 hp = LD8(hs, (t * B + b) * Hd + j);
    const float8 ht = (1.0f - z) * n + z * hp;
    ST8(hs, ((t + 1) * B + b) * Hd + j, ht);
    ST8(y, (b * S + t) * Hd + j, ht);
    __global float* g = gates + (t * B + b) * 4 * Hd;
    ST8(g, j, r);
    ST8(g, Hd + j, z);
    ST8(g, 2 * Hd + j, n);
    ST8(g, 3 * Hd + j, hn);
}

__kernel void gru_gates_backward8(__global const float* dy, __global const float* gates, __global const float* hs,
                                  const int t, const int S, const int Hd,
                                  __global float* carry, __global float* dgx, __global float* dgh)
{
    const int j = get_global_id(0) * 8, b = get_global_id(1), B = get_global_size(1);
    const float8 dh = LD8(dy, (b * S + t) * Hd + j) + (t < S - 1 ? LD8(carry, b * Hd + j) : (float8)(0.0f));
    __global const float* g = gates + (t * B + b) * 4 * Hd;
    const float8 r = LD8(g, j), z = LD8(g, Hd + j), n = LD8(g, 2 * Hd + j), hn = LD8(g, 3 * Hd + j);
    const float8 hp = LD8(hs, (t * B + b) * Hd + j);
    const float8 dan = dh * (1.0f - z) * (1.0f - n * n);
    const float8 daz = dh * (hp - n) * (z * (1.0f - z));
    const float8 dar = dan * hn * (r * (1.0f - r));
    __global float* dx = dgx + (b * S + t) * 3 * Hd;
    __global float* dh3 = dgh + (t * B + b) * 3 * Hd;
    ST8(dx, j, dar);
    ST8(dx, Hd + j, daz);
    ST8(dx, 2 * Hd + j, dan);
    ST8(dh3, j, dar);
    ST8(dh3, Hd + j, daz);
    ST8(dh3, 2 * Hd + j, dan * r);
    ST8(carry, b * Hd + j, dh * z);
}
