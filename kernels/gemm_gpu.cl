/* gemm_gpu.cl — the GPU variant of gemm.cl's products: local-memory tiles.
 *
 *   gemm_nn_local:  C[b] = alpha · A[b]·B[b]  + beta · C[b]     A (M,K), B (K,N)
 *   gemm_tn_local:  C[b] = alpha · A[b]ᵀ·B[b] + beta · C[b]     A stored (K,M)
 *   gemm_nn_block / gemm_tn_block: the same, WPT×WPT outputs per work-item (below)
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
#ifndef WPT
#define WPT 1   /* outputs per work-item along each side: 1 builds the _local kernels, else _block */
#endif
#define A_NN_L(i, k) A[(i) * K + (k)]
#define A_TN_L(i, k) A[(k) * M + (i)]

#if WPT == 1

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

GEMM_LOCAL(gemm_nn_local, A_NN_L)
GEMM_LOCAL(gemm_tn_local, A_TN_L)
#else


/* gemm_nn_block / gemm_tn_block: register blocking, the same products and arguments. Each
 * work-item computes WPT×WPT outputs of the group's TS×TS tile, so one value read from local
 * memory feeds WPT multiply-adds instead of one. Item (lc, lr) owns rows lr + i·RTS and columns
 * lc + j·RTS (RTS = TS/WPT; strided, so neighbouring items touch neighbouring columns). Every
 * output is still `acc += a·b` over k ascending from 0, as in gemm_*_local: the two are
 * bit-identical for any TS and WPT (tests/test_tune.py). engine.tune picks TS and WPT per
 * device. Launch: global = (ceil(N/TS)·RTS, ceil(M/TS)·RTS, batch), local = (RTS, RTS, 1). */
#define RTS (TS / WPT)

#define GEMM_BLOCK(NAME, A_AT)                                                            \
__kernel __attribute__((reqd_work_group_size(RTS, RTS, 1)))                              \
void NAME(const int M, const int N, const int K, const float alpha, const float beta,    \
          __global const float* A, const int offA, const int strideA,                    \
          __global const float* B, const int offB, const int strideB,                    \
          __global float* C, const int offC, const int strideC)                          \
{                                                                                        \
    __local float As[TS][TS + 1];                                                        \
    __local float Bs[TS][TS + 1];                                                        \
    const int lc = get_local_id(0), lr = get_local_id(1), b = get_global_id(2);          \
    const int row0 = get_group_id(1) * TS, col0 = get_group_id(0) * TS;                  \
    A += offA + b * strideA;                                                             \
    B += offB + b * strideB;                                                             \
    C += offC + b * strideC;                                                             \
    float acc[WPT][WPT];                                                                 \
    for (int i = 0; i < WPT; i++)                                                        \
        for (int j = 0; j < WPT; j++) acc[i][j] = 0.0f;                                  \
    for (int t = 0; t < K; t += TS) {                                                    \
        for (int i = 0; i < WPT; i++)                                                    \
            for (int j = 0; j < WPT; j++) {                                              \
                const int r = lr + i * RTS, c = lc + j * RTS;                            \
                As[r][c] = (row0 + r < M && t + c < K) ? A_AT(row0 + r, t + c) : 0.0f;   \
                Bs[r][c] = (t + r < K && col0 + c < N) ? B[(t + r) * N + col0 + c] : 0.0f; \
            }                                                                            \
        barrier(CLK_LOCAL_MEM_FENCE);                                                    \
        for (int k = 0; k < TS; k++) {                                                   \
            float bk[WPT];                                                               \
            for (int j = 0; j < WPT; j++) bk[j] = Bs[k][lc + j * RTS];                   \
            for (int i = 0; i < WPT; i++) {                                              \
                const float a = As[lr + i * RTS][k];                                     \
                for (int j = 0; j < WPT; j++) acc[i][j] += a * bk[j];                    \
            }                                                                            \
        }                                                                                \
        barrier(CLK_LOCAL_MEM_FENCE);                                                    \
    }                                                                                    \
    for (int i = 0; i < WPT; i++)                                                        \
        for (int j = 0; j < WPT; j++) {                                                  \
            const int row = row0 + lr + i * RTS, col = col0 + lc + j * RTS;              \
            if (row < M && col < N) {                                                    \
                __global float* c = C + row * N + col;                                   \
                *c = beta == 0.0f ? alpha * acc[i][j] : alpha * acc[i][j] + beta * *c;   \
            }                                                                            \
        }                                                                                \
}

GEMM_BLOCK(gemm_nn_block, A_NN_L)
GEMM_BLOCK(gemm_tn_block, A_TN_L)
#endif
