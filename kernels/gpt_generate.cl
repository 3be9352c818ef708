/* gpt_generate.cl — generation for the transformer family with a key-value cache (B = 1).
 *
 *   gpt_step     (CPU variant): n tokens at positions pos0 … pos0+n−1 through every block,
 *                their keys and values appended to the cache, the logits (Vp,) of the last
 *   gpt_step_wg  (GPU variant, TREE = 1): the same maths, the reductions as tree sums
 *
 * One launch, one work-group (global = local = (WG,)), loops over the tokens and the layers
 * inside: a character costs one launch and one read of its logits. Per token at position t
 * (nanoGPT's GPT, engine/models/transformer.py; y = x·W, W stored (in, out)):
 *   x = wte[tok] + wpe[t]
 *   per block l:  a = LN_1(x);  [q | k | v] = a·W_qkv (+ b_qkv);  K[l,t] = k, V[l,t] = v
 *                 per head h: s_τ = q_h·K[l,τ]_h/√d (τ ≤ t), p = softmax(s), y_h = Σ_τ p_τ·V[l,τ]_h
 *                 x = x + y·W_proj (+ b_proj)
 *                 x = x + GELU(LN_2(x)·W_fc (+ b_fc))·W_mp (+ b_mp)
 *   last token:   logits = LN_f(x)·wteᵀ (TIED) or LN_f(x)·W_head (+ b_head)
 * LayerNorm: mean and biased variance over C, eps 1e-5, β only with BIAS. GELU: the erf form
 * (fastmath.cl's gelu_parts), the exponentials exp_fast: the training kernels' functions.
 * The cache K, V: (L, T, C) each, row t of layer l at (l·T + t)·C; positions ≥ pos0 + n are
 * never read. Every sum runs in a fixed order (products: rows in index order; CPU: the
 * LayerNorm and softmax sums serial in index order; GPU: tree sums, reduce.cl): a rerun gives
 * the same bits; the last bits differ from the training kernels', whose sums are blocked.
 * CPU variant: one work-item (WG = 1, see the #error below) runs everything in order; with VEC8
 * (C % 32 == 0, d % 8 == 0) a product's 32 adjacent output columns are four float8
 * accumulators, each split into the even and the odd rows (eight independent chains), the
 * head's d-long dots are float8, and every access to the local vectors is a float8 one.
 * On one core (a work-group is one core) a baseline-size token (4 × 128 wide) took ~0.08 ms.
 * GPU variant: one column per item (neighbouring items on neighbouring columns: coalesced
 * rows of the weights and the cache), the scores one (head, τ) per item, the softmax's max
 * and sum tree reductions.
 * Parameters are read from the flat θ at element offsets offs[]: 0 wte, 1 wpe, 2 ln_f.gamma,
 * 3 ln_f.beta, 4 lm_head.W, 5 lm_head.b, then per layer l at 6 + 12·l: ln_1.gamma, ln_1.beta,
 * W_qkv, b_qkv, W_proj, b_proj, ln_2.gamma, ln_2.beta, W_fc, b_fc, mlp.W_proj, mlp.b_proj
 * (−1 where a model has none; multiples of the layout's CHUNK, so float8-aligned).
 * Build-time sizes: C, NH, D = C/NH, L, T (block_size), VP (padded vocabulary).
 * Reference: the model's training forward over the cached window (engine.model.Model.forward,
 * engine.reference.model.RefModel), which tests/test_generate.py compares it with.
 */
#include "fastmath.cl"

#ifndef WG
#define WG 64
#endif
#ifndef TREE
#define TREE 0
#endif
#ifndef VEC8
#define VEC8 0
#endif
#ifndef BIAS
#define BIAS 0
#endif
#ifndef TIED
#define TIED 1
#endif
#if !TREE && WG != 1
/* PoCL 3 miscompiled this kernel's CPU form with more than one work-item: regions that only some
 * items run (`if (lid == 0)`, `for (h = lid; h < NH; h += WG)`) were dropped or ran on stale data
 * at some sizes (d = 8 or 16: wrong logits, the attention's output left at zero). One work-item
 * has no such regions, and a work-group runs on one core either way (16 items: the same speed). */
#error "the CPU variant of gpt_step runs one work-item (WG = 1)"
#endif
#include "reduce.cl"
#if TREE
#define GPT_STEP gpt_step_wg
#else
#define GPT_STEP gpt_step
#endif

#define PAR(i) (theta + offs[i])
/* eight floats at p + 8·r as one float8: 32-byte aligned (every row start, column block and
 * parameter offset here is a multiple of 8 floats). A cast, not vload8/vstore8: PoCL 3 calls
 * those as functions (~6× the kernel's time at the baseline size). */
#define G8(p, r) (*(__global const float8*)((p) + 8 * (r)))
#define L8(p, r) (*(__local float8*)((p) + 8 * (r)))
#define LC8(p, r) (*(__local const float8*)((p) + 8 * (r)))
#define GW8(p, r) (*(__global float8*)((p) + 8 * (r)))
#define HSUM8(a) (((a).s0 + (a).s1) + ((a).s2 + (a).s3) + (((a).s4 + (a).s5) + ((a).s6 + (a).s7)))

/* the largest of each item's value over the group, in the tree order of wg_sum */
inline float wg_max(float value, __local float* red)
{
    const int l = get_local_id(0);
    red[l] = value;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int step = WG / 2; step > 0; step >>= 1) {
        if (l < step) red[l] = fmax(red[l], red[l + step]);
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    const float m = red[0];
    barrier(CLK_LOCAL_MEM_FENCE);
    return m;
}

/* out = LN(x)·γ + β over C (β null without BIAS); every item returns after the barrier.
 * VEC8: x and out are read and written as float8 only (see L8). */
inline void layer_norm(__local const float* x, __global const float* gamma, __global const float* beta,
                       __local float* out, __local float* red)
{
    const int lid = get_local_id(0);
#if TREE
    float s = 0.0f;
    for (int i = lid; i < C; i += WG) s += x[i];
    const float mean = wg_sum(s, red) * (1.0f / C);
    float q = 0.0f;
    for (int i = lid; i < C; i += WG) q += (x[i] - mean) * (x[i] - mean);
    const float rstd = 1.0f / sqrt(wg_sum(q, red) * (1.0f / C) + 1e-5f);
#elif VEC8
    if (lid == 0) {   /* eight lanes, each over its columns in order, then the lanes added */
        float8 s8 = 0.0f;
        for (int r = 0; r < C / 8; r++) s8 += LC8(x, r);
        const float m = HSUM8(s8) * (1.0f / C);
        float8 q8 = 0.0f;
        for (int r = 0; r < C / 8; r++) {
            const float8 dv = LC8(x, r) - m;
            q8 += dv * dv;
        }
        red[0] = m;
        red[1] = 1.0f / sqrt(HSUM8(q8) * (1.0f / C) + 1e-5f);
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    const float mean = red[0], rstd = red[1];
#else
    if (lid == 0) {
        float s = 0.0f;
        for (int i = 0; i < C; i++) s += x[i];
        const float m = s * (1.0f / C);
        float q = 0.0f;
        for (int i = 0; i < C; i++) q += (x[i] - m) * (x[i] - m);
        red[0] = m;
        red[1] = 1.0f / sqrt(q * (1.0f / C) + 1e-5f);
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    const float mean = red[0], rstd = red[1];
#endif
#if VEC8
    for (int r = lid; r < C / 8; r += WG) {
#if BIAS
        L8(out, r) = (LC8(x, r) - mean) * rstd * G8(gamma, r) + G8(beta, r);
#else
        L8(out, r) = (LC8(x, r) - mean) * rstd * G8(gamma, r);
#endif
    }
#else
    for (int i = lid; i < C; i += WG) {
#if BIAS
        out[i] = (x[i] - mean) * rstd * gamma[i] + beta[i];
#else
        out[i] = (x[i] - mean) * rstd * gamma[i];
#endif
    }
#endif
    barrier(CLK_LOCAL_MEM_FENCE);
}

/* out[j] = (acc: out[j] +) Σ_i in[i]·W[i·N + j] (+ b[j]) for j < N, then GELU (gelu != 0);
 * the rows in index order (VEC8: even and odd rows, each in order, then added). The bias after the residual, as the training kernels (gemm β = 1,
 * then add_bias). */
inline void matvec(__local const float* in, const int K, __global const float* W, __global const float* b,
                   const int N, __local float* out, const int acc, const int gelu)
{
    const int lid = get_local_id(0);
#if VEC8   /* N % 32 == 0, K even: 32 columns per item as four float8, each the sum of the even
            * rows in order plus that of the odd rows in order (eight independent chains) */
    for (int j = lid * 32; j < N; j += WG * 32) {
        float8 a[4] = {0.0f, 0.0f, 0.0f, 0.0f}, a1[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        for (int ib = 0; ib < K / 8; ib++) {   /* rows 8·ib … 8·ib + 7 */
            const float8 u = LC8(in, ib);
            __global const float* w = W + ib * 8 * N + j;
#define ROW(uk, k, acc) for (int r = 0; r < 4; r++) acc[r] += (uk) * G8(w + (k) * N, r);
            ROW(u.s0, 0, a) ROW(u.s1, 1, a1) ROW(u.s2, 2, a) ROW(u.s3, 3, a1)
            ROW(u.s4, 4, a) ROW(u.s5, 5, a1) ROW(u.s6, 6, a) ROW(u.s7, 7, a1)
#undef ROW
        }
        for (int r = 0; r < 4; r++) {
            a[r] += a1[r];
            float8 v = a[r];
            if (acc) v = L8(out + j, r) + v;
#if BIAS
            v += G8(b + j, r);
#endif
            if (gelu) {
                float8 cdf, pdf;
                gelu_parts8(v, &cdf, &pdf);
                v = v * cdf;
            }
            L8(out + j, r) = v;
        }
    }
#else
    for (int j = lid; j < N; j += WG) {
        float a = 0.0f;
        for (int i = 0; i < K; i++) a += in[i] * W[i * N + j];
        if (acc) a = out[j] + a;
#if BIAS
        a += b[j];
#endif
        if (gelu) {
            float cdf, pdf;
            gelu_parts(a, &cdf, &pdf);
            a = a * cdf;
        }
        out[j] = a;
    }
#endif
    barrier(CLK_LOCAL_MEM_FENCE);
}

__kernel __attribute__((reqd_work_group_size(WG, 1, 1)))
void GPT_STEP(const int tok0, __global const int* tokens, const int n, const int pos0,
              __global const float* theta, __global const int* offs,
              __global float* Kc, __global float* Vc, __global float* logits)
{
    __local float x[C] __attribute__((aligned(32)));
    __local float ln[C] __attribute__((aligned(32)));
    __local float qkv[3 * C] __attribute__((aligned(32)));
    __local float y[C] __attribute__((aligned(32)));
    __local float hb[4 * C] __attribute__((aligned(32)));
    __local float sc[NH * T];
    __local float red[WG];
    const int lid = get_local_id(0);
    const float scale = 1.0f / sqrt((float)D);

    for (int it = 0; it < n; it++) {
        const int pos = pos0 + it, tok = n == 1 ? tok0 : tokens[it], npos = pos + 1;
#if VEC8
        for (int r = lid; r < C / 8; r += WG) L8(x, r) = G8(PAR(0) + tok * C, r) + G8(PAR(1) + pos * C, r);
#else
        for (int i = lid; i < C; i += WG) x[i] = PAR(0)[tok * C + i] + PAR(1)[pos * C + i];
#endif
        barrier(CLK_LOCAL_MEM_FENCE);
        for (int l = 0; l < L; l++) {
            const int o = 6 + 12 * l;
            __global float* Kl = Kc + (size_t)l * T * C;
            __global float* Vl = Vc + (size_t)l * T * C;
            layer_norm(x, PAR(o), PAR(o + 1), ln, red);
            matvec(ln, C, PAR(o + 2), PAR(o + 3), 3 * C, qkv, 0, 0);
#if VEC8   /* float8 as the attention reads the rows (one type for each access of a buffer) */
            for (int r = lid; r < C / 8; r += WG) {
                GW8(Kl + pos * C, r) = L8(qkv + C, r);
                GW8(Vl + pos * C, r) = L8(qkv + 2 * C, r);
            }
#else
            for (int i = lid; i < C; i += WG) {
                Kl[pos * C + i] = qkv[C + i];
                Vl[pos * C + i] = qkv[2 * C + i];
            }
#endif
            barrier(CLK_GLOBAL_MEM_FENCE | CLK_LOCAL_MEM_FENCE);
#if TREE
            /* scores of every (head, τ ≤ pos): a d-long dot each */
            for (int e = lid; e < NH * npos; e += WG) {
                const int h = e / npos, tau = e - h * npos;
                __global const float* kr = Kl + tau * C + h * D;
                float s = 0.0f;
                for (int i = 0; i < D; i++) s += qkv[h * D + i] * kr[i];
                sc[h * T + tau] = s * scale;
            }
            barrier(CLK_LOCAL_MEM_FENCE);
            /* softmax per head over τ ≤ pos */
            for (int h = 0; h < NH; h++) {
                float m = -INFINITY;
                for (int tau = lid; tau < npos; tau += WG) m = fmax(m, sc[h * T + tau]);
                m = wg_max(m, red);
                float s = 0.0f;
                for (int tau = lid; tau < npos; tau += WG) {
                    const float e = exp_fast(sc[h * T + tau] - m);
                    sc[h * T + tau] = e;
                    s += e;
                }
                const float inv = 1.0f / wg_sum(s, red);
                for (int tau = lid; tau < npos; tau += WG) sc[h * T + tau] *= inv;
                barrier(CLK_LOCAL_MEM_FENCE);
            }
            /* y = p·V, one column per item, τ in order */
            for (int j = lid; j < C; j += WG) {
                const int h = j / D;
                float a = 0.0f;
                for (int tau = 0; tau < npos; tau++) a += sc[h * T + tau] * Vl[tau * C + j];
                y[j] = a;
            }
            barrier(CLK_LOCAL_MEM_FENCE);
#else
            /* head after head (the one work-item): the scores s_τ (float8 over d), the softmax
             * and y_h = Σ_τ p_τ·V[τ]_h in τ order */
            for (int h = 0; h < NH; h++) {
                __global const float* kh = Kl + h * D;
                __global const float* vh = Vl + h * D;
                __local float* sh = sc + h * T;
                float m = -INFINITY;
                for (int tau = 0; tau < npos; tau++) {
#if VEC8
                    float8 a = 0.0f;
                    for (int r = 0; r < D / 8; r++) a += L8(qkv + h * D, r) * G8(kh + tau * C, r);
                    const float sv = HSUM8(a) * scale;
#else
                    float a = 0.0f;
                    for (int i = 0; i < D; i++) a += qkv[h * D + i] * kh[tau * C + i];
                    const float sv = a * scale;
#endif
                    sh[tau] = sv;
                    m = sv > m ? sv : m;   /* not fmax: a call in PoCL 3 */
                }
                float ssum = 0.0f;
                for (int tau = 0; tau < npos; tau++) {
                    const float e = exp_fast(sh[tau] - m);
                    sh[tau] = e;
                    ssum += e;
                }
                const float inv = 1.0f / ssum;
#if VEC8
                for (int r = 0; r < D / 8; r++) {   /* eight columns at a time, τ in order */
                    float8 acc = 0.0f;
                    for (int tau = 0; tau < npos; tau++) acc += (sh[tau] * inv) * G8(vh + tau * C, r);
                    L8(y + h * D, r) = acc;
                }
#else
                for (int i = 0; i < D; i++) {
                    float a = 0.0f;
                    for (int tau = 0; tau < npos; tau++) a += (sh[tau] * inv) * vh[tau * C + i];
                    y[h * D + i] = a;
                }
#endif
            }
            barrier(CLK_LOCAL_MEM_FENCE);
#endif
            matvec(y, C, PAR(o + 4), PAR(o + 5), C, x, 1, 0);
            layer_norm(x, PAR(o + 6), PAR(o + 7), ln, red);
            matvec(ln, C, PAR(o + 8), PAR(o + 9), 4 * C, hb, 0, 1);
            matvec(hb, 4 * C, PAR(o + 10), PAR(o + 11), C, x, 1, 0);
        }
        if (it == n - 1) {
            layer_norm(x, PAR(2), PAR(3), ln, red);
#if TIED
            __global const float* wte = PAR(0);
            for (int v = lid; v < VP; v += WG) {   /* wte stored (VP, C): its padding rows are zero */
#if VEC8
                float8 a = 0.0f;
                for (int r = 0; r < C / 8; r++) a += L8(ln, r) * G8(wte + v * C, r);
                logits[v] = HSUM8(a);
#else
                float a = 0.0f;
                for (int i = 0; i < C; i++) a += ln[i] * wte[v * C + i];
                logits[v] = a;
#endif
            }
#else
            __global const float* W = PAR(4);
            for (int v = lid; v < VP; v += WG) {
                float a = 0.0f;
#if VEC8
                for (int ib = 0; ib < C / 8; ib++) {
                    const float8 u = L8(ln, ib);
                    __global const float* w = W + ib * 8 * VP + v;
                    a += u.s0 * w[0]; a += u.s1 * w[VP]; a += u.s2 * w[2 * VP]; a += u.s3 * w[3 * VP];
                    a += u.s4 * w[4 * VP]; a += u.s5 * w[5 * VP]; a += u.s6 * w[6 * VP]; a += u.s7 * w[7 * VP];
                }
#else
                for (int i = 0; i < C; i++) a += ln[i] * W[i * VP + v];
#endif
#if BIAS
                a += PAR(5)[v];
#endif
                logits[v] = a;
            }
#endif
        }
        barrier(CLK_GLOBAL_MEM_FENCE | CLK_LOCAL_MEM_FENCE);
    }
}
