/* generate.cl — one character of generation (B = S = 1) in one launch.
 *
 *   generate_step: token → logits (Vp,), carrying the fast-weight matrix Aᵀ (H,H)
 *
 * The same maths as the training forward (docs/model.md) for one position,
 * fused so that a character costs one launch and one read instead of ~15
 * launches: e = W_emb[token]; h = GELU(e·W1 + b1); s = 1[h > θ]; post = s or h;
 * Hebbian term (HEBB: 0 off/shadow, 1 modulate, 2 fast_weights: m = A·k with
 * k = h/sqrt(|h|²+1e-6), then Aᵀ ← λ·Aᵀ + η·k ⊗ post); prototype term (PROTO:
 * 0 off/shadow, 1 feature; COSINE: similarity); logits = z·W2 + b2.
 * Launch: global = local = (WG,), one work-group; each output element is
 * computed by one work-item in a fixed order (deterministic).
 * Reference: engine.generate.Generator.feed (the unfused kernels), which
 * tests/test_generate.py compares it with.
 */
#include "fastmath.cl"

#ifndef WG
#define WG 64
#endif

__kernel __attribute__((reqd_work_group_size(WG, 1, 1)))
void generate_step(const int token, const int E, const int H, const int T, const int Vp,
                   __global const float* W_emb, __global const float* W1, __global const float* b1,
                   __global const float* W2, __global const float* b2,
                   __global const float* W_hebb, __global float* At, __global const float* P,
                   const float theta, const int post_is_h, const float hebb_alpha,
                   const float eta, const float lambda, const float beta,
                   __global float* scratch, __global float* logits)
{
    /* scratch: h (H) | post (H) | k (H) | ht (H) | z (H) | e (E) | red (WG) | sel (1) */
    __global float* h = scratch;
    __global float* post = h + H;
    __global float* kv = post + H;
    __global float* ht = kv + H;
    __global float* z = ht + H;
    __global float* e = z + H;
    __local float red[WG];
    __local int chosen;
    const int lid = get_local_id(0);

    for (int i = lid; i < E; i += WG) e[i] = W_emb[token * E + i];
    barrier(CLK_GLOBAL_MEM_FENCE);
    for (int j = lid; j < H; j += WG) {
        float a = 0.0f;
        for (int i = 0; i < E; i++) a += e[i] * W1[i * H + j];
        a += b1[j];
        float cdf, pdf;
        gelu_parts(a, &cdf, &pdf);
        const float hj = a * cdf;
        h[j] = hj;
        post[j] = post_is_h ? hj : (hj > theta ? 1.0f : 0.0f);
    }
    barrier(CLK_GLOBAL_MEM_FENCE);
#if HEBB == 2
    if (lid == 0) {  /* |h|² in index order, as row_normalize_forward */
        float ss = 0.0f;
        for (int j = 0; j < H; j++) ss += h[j] * h[j];
        red[0] = 1.0f / sqrt(ss + 1e-6f);
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    const float inv = red[0];
    for (int j = lid; j < H; j += WG) kv[j] = h[j] * inv;
    barrier(CLK_GLOBAL_MEM_FENCE);
    for (int j = lid; j < H; j += WG) {
        float m = 0.0f;
        for (int i = 0; i < H; i++) m += kv[i] * At[i * H + j];
        ht[j] = h[j] + m;
    }
    barrier(CLK_GLOBAL_MEM_FENCE);
    for (int j = lid; j < H; j += WG)          /* Aᵀ[i,j] = λ·Aᵀ[i,j] + η·k_i·post_j */
        for (int i = 0; i < H; i++) At[i * H + j] = lambda * At[i * H + j] + eta * kv[i] * post[j];
#elif HEBB == 1
    for (int j = lid; j < H; j += WG) {
        float m = 0.0f;
        for (int i = 0; i < H; i++) m += h[i] * W_hebb[i * H + j];
        ht[j] = h[j] + hebb_alpha * m;
    }
#else
    for (int j = lid; j < H; j += WG) ht[j] = h[j];
#endif
    barrier(CLK_GLOBAL_MEM_FENCE);
#if PROTO == 1
#if COSINE
    if (lid == 0) {  /* 1/|h̃| in index order, as row_inv_norm */
        float ss = 0.0f;
        for (int j = 0; j < H; j++) ss += ht[j] * ht[j];
        red[1] = 1.0f / sqrt(ss + 1e-6f);
    }
    barrier(CLK_LOCAL_MEM_FENCE);
#endif
    for (int t = lid; t < T; t += WG) {  /* score of each prototype, as proto_argmax */
        float s = 0.0f, pp = 0.0f;
        for (int j = 0; j < H; j++) { s += ht[j] * P[t * H + j]; pp += P[t * H + j] * P[t * H + j]; }
#if COSINE
        s = s * red[1] * (1.0f / sqrt(pp + 1e-6f));
#endif
        scratch[5 * H + E + WG + t] = s;
    }
    barrier(CLK_GLOBAL_MEM_FENCE);
    if (lid == 0) {  /* argmax, lowest index on ties */
        int best = 0;
        float bv = -INFINITY;
        for (int t = 0; t < T; t++) {
            const float s = scratch[5 * H + E + WG + t];
            if (s > bv) { bv = s; best = t; }
        }
        chosen = best;
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int j = lid; j < H; j += WG) z[j] = ht[j] + beta * P[chosen * H + j];
#else
    for (int j = lid; j < H; j += WG) z[j] = ht[j];
#endif
    barrier(CLK_GLOBAL_MEM_FENCE);
    for (int v = lid; v < Vp; v += WG) {
        float acc = 0.0f;
        for (int j = 0; j < H; j++) acc += z[j] * W2[j * Vp + v];
        logits[v] = acc + b2[v];
    }
}
