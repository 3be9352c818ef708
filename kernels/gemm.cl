/* gemm.cl — strided, batched matrix products and transposes.
 *
 *   gemm_nn:  C[b] = alpha · A[b]·B[b]  + beta · C[b]     A (M,K), B (K,N), C (M,N)
 *   gemm_tn:  C[b] = alpha · A[b]ᵀ·B[b] + beta · C[b]     A stored (K,M)
 *   transpose: out[b] (C,R) = in[b] (R,C)ᵀ
 * A·Bᵀ products transpose B first (engine.ops.gemm does it), so every product
 * reads B row-contiguously. beta == 0 never reads C (C may hold garbage).
 * All matrices row-major float32; offsets and batch strides in elements.
 *
 * Launch (gemm_*): global = (ceil(N/TN), ceil(M/TM), batch), local = NULL.
 * Each work-item owns a TM×TN tile of C and accumulates over the whole K in
 * registers, in k order, so results do not depend on the launch.
 * VEC=1 (host checks N % 8 == 0 and every offset/stride % 8 == 0): full tiles
 * use float8 loads by pointer cast (vload8 compiles to a call in PoCL 3,
 * which blocks vectorisation); plain a*b+c rather than fma()/mad() for the
 * same reason. Edge tiles clamp their reads and mask their stores.
 * K-split (long K, e.g. weight gradients with K = B·S): the batch index b of a
 * gemm_* launch walks K chunks instead of matrices (strideA/strideB = the chunk's
 * element step, C = a partial buffer, alpha = 1, beta = 0), then gemm_reduce
 * sums the partials in chunk order: deterministic, and each chunk's A and B
 * stay in cache while every tile of C reads them.
 * Launch (gemm_reduce): global = (M·N), partials (chunks, M, N).
 * Launch (transpose): global = (C, R, batch).
 * Reference: numpy  alpha * (A.T if tn else A) @ B + beta * C  (engine.ops.gemm_reference).
 */
#ifndef TM
#define TM 8
#endif
#define TN 8
#ifndef VEC
#define VEC 0
#endif

#define GEMM_KERNEL(NAME, A_AT)                                                        \
__kernel void NAME(const int M, const int N, const int K,                             \
                   const float alpha, const float beta,                               \
                   __global const float* A, const int offA, const int strideA,        \
                   __global const float* B, const int offB, const int strideB,        \
                   __global float* C, const int offC, const int strideC)              \
{                                                                                     \
    const int n0 = get_global_id(0) * TN;                                             \
    const int m0 = get_global_id(1) * TM;                                             \
    const int b = get_global_id(2);                                                   \
    if (n0 >= N || m0 >= M) return;                                                   \
    A += offA + b * strideA;                                                          \
    B += offB + b * strideB;                                                          \
    C += offC + b * strideC;                                                          \
    if (VEC && n0 + TN <= N && m0 + TM <= M) {                                        \
        float8 acc[TM];                                                               \
        for (int i = 0; i < TM; i++) acc[i] = (float8)(0.0f);                         \
        for (int k = 0; k < K; k++) {                                                 \
            const float8 bv = *(__global const float8*)(B + k * N + n0);              \
            for (int i = 0; i < TM; i++) acc[i] += A_AT(m0 + i, k) * bv;              \
        }                                                                             \
        for (int i = 0; i < TM; i++) {                                                \
            __global float8* c = (__global float8*)(C + (m0 + i) * N + n0);           \
            if (beta == 0.0f) *c = alpha * acc[i];                                    \
            else *c = alpha * acc[i] + beta * *c;                                     \
        }                                                                             \
        return;                                                                       \
    }                                                                                 \
    float acc[TM][TN];                                                                \
    int mi[TM], nj[TN];                                                               \
    for (int i = 0; i < TM; i++) mi[i] = min(m0 + i, M - 1);                          \
    for (int j = 0; j < TN; j++) nj[j] = min(n0 + j, N - 1);                          \
    for (int i = 0; i < TM; i++)                                                      \
        for (int j = 0; j < TN; j++) acc[i][j] = 0.0f;                                \
    for (int k = 0; k < K; k++) {                                                     \
        float bv[TN];                                                                 \
        for (int j = 0; j < TN; j++) bv[j] = B[k * N + nj[j]];                        \
        for (int i = 0; i < TM; i++) {                                                \
            const float av = A_AT(mi[i], k);                                          \
            for (int j = 0; j < TN; j++) acc[i][j] += av * bv[j];                     \
        }                                                                             \
    }                                                                                 \
    for (int i = 0; i < TM; i++) {                                                    \
        if (m0 + i >= M) break;                                                       \
        for (int j = 0; j < TN; j++) {                                                \
            if (n0 + j >= N) break;                                                   \
            __global float* c = C + (m0 + i) * N + n0 + j;                            \
            if (beta == 0.0f) *c = alpha * acc[i][j];                                 \
            else *c = alpha * acc[i][j] + beta * *c;                                  \
        }                                                                             \
    }                                                                                 \
}

#define A_NN(i, k) A[(i) * K + (k)]
#define A_TN(i, k) A[(k) * M + (i)]
GEMM_KERNEL(gemm_nn, A_NN)
GEMM_KERNEL(gemm_tn, A_TN)

__kernel void gemm_reduce(const int MN, const int chunks, const float alpha, const float beta,
                          __global const float* partial, __global float* C, const int offC)
{
    const int i = get_global_id(0);
    float acc = 0.0f;
    for (int c = 0; c < chunks; c++) acc += partial[c * MN + i];
    if (beta == 0.0f) C[offC + i] = alpha * acc;
    else C[offC + i] = alpha * acc + beta * C[offC + i];
}

__kernel void transpose(const int R, const int Cn,
                        __global const float* in, const int offIn, const int strideIn,
                        __global float* out, const int offOut, const int strideOut)
{
    const int c = get_global_id(0);
    const int r = get_global_id(1);
    const int b = get_global_id(2);
    out[offOut + b * strideOut + c * R + r] = in[offIn + b * strideIn + r * Cn + c];
}
