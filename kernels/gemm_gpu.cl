/* gemm_gpu.cl — the GPU variant of gemm.cl's products: local-memory tiles.
 *
 *   gemm_nn_local:  C[b] = alpha · A[b]·B[b]  + beta · C[b]     A (M,K), B (K,N)
 *   gemm_tn_local:  C[b] = alpha · A[b]ᵀ·B[b] + beta · C[b]     A stored (K,M)
 * Same arguments, maths and summation order (k ascending) as gemm_nn/gemm_tn;
 * engine.ops picks this file when the device is not a CPU (Device.variant), as
 * GPU-style local-memory tiling ran ~40x slower than register tiles on PoCL.
 * It runs on PoCL too, so tests/test_kernels.py checks it there (small sizes).
 * Work-group TS×TS; each work-item owns one element of C; A and B tiles of
 * TS×TS are staged in local memory. Launch: global = (ceil(N/TS)·TS,
 * ceil(M/TS)·TS, batch), local = (TS, TS, 1). TS is a build-time define. */
#ifndef TS
#define TS 16
#endif

#define GEMM_LOCAL(NAME, A_AT)                                                            \
__kernel __attribute__((reqd_work_group_size(TS, TS, 1)))                                \
void NAME(const int M, const int N, const int K, const float alpha, const float beta,    \
          __global const float* A, const int offA, const int strideA,                    \
          __global const float* B, const int offB, const int strideB,                    \
          __global float* C, const int offC, const int strideC)                          \
{                                                                                        \
    __local float As[TS][TS];                                                            \
    __local float Bs[TS][TS + 1];                                                        \
    const int col = get_global_id(0), row = get_global_id(1), b = get_global_id(2);      \
    const int lc = get_local_id(0), lr = get_local_id(1);                                \
    A += offA + b * strideA;                                                             \
    B += offB + b * strideB;                                                             \
    C += offC + b * strideC;                                                             \
    const int arow = get_group_id(1) * TS + lr;                                          \
    float acc = 0.0f;                                                                    \
    for (int t = 0; t < K; t += TS) {                                                    \
        As[lr][lc] = (arow < M && t + lc < K) ? A_AT(arow, t + lc) : 0.0f;               \
        Bs[lr][lc] = (t + lr < K && col < N) ? B[(t + lr) * N + col] : 0.0f;             \
        barrier(CLK_LOCAL_MEM_FENCE);                                                    \
        for (int k = 0; k < TS; k++) acc += As[lr][k] * Bs[k][lc];                       \
        barrier(CLK_LOCAL_MEM_FENCE);                                                    \
    }                                                                                    \
    if (row < M && col < N) {                                                            \
        __global float* c = C + row * N + col;                                           \
        *c = beta == 0.0f ? alpha * acc : alpha * acc + beta * *c;                       \
    }                                                                                    \
}

#define A_NN_L(i, k) A[(i) * K + (k)]
#define A_TN_L(i, k) A[(k) * M + (i)]
GEMM_LOCAL(gemm_nn_local, A_NN_L)
GEMM_LOCAL(gemm_tn_local, A_TN_L)
