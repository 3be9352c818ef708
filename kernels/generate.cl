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
 * GPU variant (TREE = 1, built as generate_step_wg; engine.generate picks it for
 * dev.variant == "gpu", with a larger WG and VEC8 = 0 so that neighbouring items own
 * neighbouring columns, i.e. coalesced rows of W1, Aᵀ and W2): the reductions one item ran
 * alone (|h|², |h̃|², and each prototype's score, a per-item loop over P's row) are tree sums
 * over the group (reduce.cl), every item then holding the same values, and the argmax runs in
 * every item over T in order (the same choice as the serial loop). The column loops
 * stay one item per column. Sums in another fixed order: last bits differ from the CPU's.
 * Reference: engine.generate.Generator.feed (the unfused kernels), which
 * tests/test_generate.py compares it with.
 */
#include "fastmath.cl"

#ifndef WG
#define WG 64
#endif
#ifndef TREE
#define TREE 0
#endif
#include "reduce.cl"
#if TREE
#define GENERATE_STEP generate_step_wg
#else
#define GENERATE_STEP generate_step
#endif
/* VEC8 (host: E, H, Vp all % 8 == 0): the column loops (e·W1, A·k, the A update,
 * z·W2) give each work-item eight adjacent columns as one float8, the rows still
 * summed in index order, so the numbers are those of the scalar loops; one
 * work-group is one core, and without explicit vectors PoCL ran these loops
 * scalar (0.42 ms of kernel per character at the reference size). */
#ifndef VEC8
#define VEC8 0
#endif
#define V8(p, i) (*(__global float8*)((p) + (i)))
#define CV8(p, i) (*(__global const float8*)((p) + (i)))

__kernel __attribute__((reqd_work_group_size(WG, 1, 1)))
void GENERATE_STEP(const int token, const int E, const int H, const int T, const int Vp,
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
#if VEC8
    for (int j = lid * 8; j < H; j += WG * 8) {
        float8 a = 0.0f;
        for (int i = 0; i < E; i++) a += e[i] * CV8(W1, i * H + j);
        V8(ht, j) = a + CV8(b1, j);      /* ht: scratch until the Hebbian term below */
    }
    barrier(CLK_GLOBAL_MEM_FENCE);
    for (int j = lid; j < H; j += WG) {
        const float a = ht[j];
#else
    for (int j = lid; j < H; j += WG) {
        float a = 0.0f;
        for (int i = 0; i < E; i++) a += e[i] * W1[i * H + j];
        a += b1[j];
#endif
        float cdf, pdf;
        gelu_parts(a, &cdf, &pdf);
        const float hj = a * cdf;
        h[j] = hj;
        post[j] = post_is_h ? hj : (hj > theta ? 1.0f : 0.0f);
    }
    barrier(CLK_GLOBAL_MEM_FENCE);
#if HEBB == 2
#if TREE
    float ss = 0.0f;  /* |h|² as row_normalize_forward_wg */
    for (int j = lid; j < H; j += WG) ss += h[j] * h[j];
    const float inv = 1.0f / sqrt(wg_sum(ss, red) + 1e-6f);
#else
    if (lid == 0) {  /* |h|² in index order, as row_normalize_forward */
        float ss = 0.0f;
        for (int j = 0; j < H; j++) ss += h[j] * h[j];
        red[0] = 1.0f / sqrt(ss + 1e-6f);
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    const float inv = red[0];
#endif
    for (int j = lid; j < H; j += WG) kv[j] = h[j] * inv;
    barrier(CLK_GLOBAL_MEM_FENCE);
#if VEC8
    for (int j = lid * 8; j < H; j += WG * 8) {
        float8 m = 0.0f;
        for (int i = 0; i < H; i++) m += kv[i] * V8(At, i * H + j);
        V8(ht, j) = V8(h, j) + m;
    }
    barrier(CLK_GLOBAL_MEM_FENCE);
    for (int j = lid * 8; j < H; j += WG * 8) {   /* Aᵀ[i,j] = λ·Aᵀ[i,j] + η·k_i·post_j */
        const float8 pj = V8(post, j);
        for (int i = 0; i < H; i++) V8(At, i * H + j) = lambda * V8(At, i * H + j) + eta * kv[i] * pj;
    }
#else
    for (int j = lid; j < H; j += WG) {
        float m = 0.0f;
        for (int i = 0; i < H; i++) m += kv[i] * At[i * H + j];
        ht[j] = h[j] + m;
    }
    barrier(CLK_GLOBAL_MEM_FENCE);
    for (int j = lid; j < H; j += WG)          /* Aᵀ[i,j] = λ·Aᵀ[i,j] + η·k_i·post_j */
        for (int i = 0; i < H; i++) At[i * H + j] = lambda * At[i * H + j] + eta * kv[i] * post[j];
#endif
#elif HEBB == 1 && VEC8
    for (int j = lid * 8; j < H; j += WG * 8) {
        float8 m = 0.0f;
        for (int i = 0; i < H; i++) m += h[i] * CV8(W_hebb, i * H + j);
        V8(ht, j) = V8(h, j) + hebb_alpha * m;
    }
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
#if PROTO == 1 && TREE
#if COSINE
    float sq = 0.0f;  /* 1/|h̃| as row_inv_norm_wg */
    for (int j = lid; j < H; j += WG) sq += ht[j] * ht[j];
    const float inv_ht = 1.0f / sqrt(wg_sum(sq, red) + 1e-6f);
#endif
    int best = 0;  /* every item holds every score: the argmax in order, lowest index on ties */
    float bv = -INFINITY;
    for (int t = 0; t < T; t++) {
        float s = 0.0f;
        for (int j = lid; j < H; j += WG) s += ht[j] * P[t * H + j];
        s = wg_sum(s, red);
#if COSINE
        float pp = 0.0f;
        for (int j = lid; j < H; j += WG) pp += P[t * H + j] * P[t * H + j];
        s = s * inv_ht * (1.0f / sqrt(wg_sum(pp, red) + 1e-6f));
#endif
        if (s > bv) { bv = s; best = t; }
    }
    for (int j = lid; j < H; j += WG) z[j] = ht[j] + beta * P[best * H + j];
#elif PROTO == 1
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
#if VEC8
    for (int v = lid * 8; v < Vp; v += WG * 8) {
        float8 acc = 0.0f;
        for (int j = 0; j < H; j++) acc += z[j] * CV8(W2, j * Vp + v);
        V8(logits, v) = acc + CV8(b2, v);
    }
#else
    for (int v = lid; v < Vp; v += WG) {
        float acc = 0.0f;
        for (int j = 0; j < H; j++) acc += z[j] * W2[j * Vp + v];
        logits[v] = acc + b2[v];
    }
#endif
}
