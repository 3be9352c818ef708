/* gemm.cl — strided, batched matrix products and transposes.
 *
 *   gemm_nn:  C[b] = alpha · A[b]·B[b]  + beta · C[b]     A (M,K), B (K,N), C (M,N)
 *   gemm_tn:  C[b] = alpha · A[b]ᵀ·B[b] + beta · C[b]     A stored (K,M)
 *   transpose: out[b] (C,R) = in[b] (R,C)ᵀ
 * A·Bᵀ products transpose B first (engine.ops.gemm does it), so every product
 * reads B row-contiguously. beta == 0 never reads C (C may hold garbage).
 * All matrices row-major float32; offsets and batch strides in elements.
 *
 * Launch (gemm_*): global = (ceil(N/16), ceil(M/4), batch), local = NULL.
 * Each work-item owns a 4×16 tile of C and accumulates over the whole K in
 * registers, in k order, so results do not depend on the launch.
 * gemm_nn/gemm_tn (host checks N % 8 == 0 and every offset/stride % 8 == 0)
 * load B as float8 by pointer cast (vload8 compiles to a call in PoCL 3, which
 * blocks vectorisation), plain a*b+c rather than fma()/mad() for the same
 * reason, and cover the rows of full 4-row tiles; gemm_*_edge (scalar, clamped
 * reads, masked stores) covers the last M % 4 rows, or everything when the
 * alignment does not hold. Launch (edge): global = (ceil(N/16), ceil((M−m_begin)/4), batch).
 * This is the CPU variant (register tiles); GPUs build kernels/gemm_gpu.cl
 * (local-memory tiles), chosen in engine.ops by the device's type.
 * Small grids (< 2048 work-items) are launched with one work-group per row of
 * tiles: left to PoCL they became a single work-group, i.e. one core.
 * K-split (long K, e.g. weight gradients with K = B·S): the batch index b of a
 * gemm_* launch walks K chunks instead of matrices (strideA/strideB = the chunk's
 * element step, C = a partial buffer, alpha = 1, beta = 0), then gemm_reduce
 * sums the partials in chunk order: deterministic, and each chunk's A and B
 * stay in cache while every tile of C reads them.
 * Launch (gemm_reduce): global = (M·N), partials (chunks, M, N).
 * Launch (transpose): global = (C, R, batch); transpose8: (C/8, R/8, batch).
 * GPU note (the products are gemm_gpu.cl's): transpose_wg, a 16×16 tile staged in local memory
 * so that both its reads and its writes are coalesced (transpose writes R apart across items),
 * global = (⌈C/16⌉·16, ⌈R/16⌉·16, batch), local = (16, 16, 1); gemm_reduce is element-wise over
 * M·N (coalesced) and serves both variants; pack_a4 and gemm_tn_split are CPU only.
 * Reference: numpy  alpha * (A.T if tn else A) @ B + beta * C  (engine.ops.gemm_reference).
 */
#define TM 4
#define TN 16

/* One TM×TN tile: the 8 float8 accumulators are named variables, not an
 * array: with arrays PoCL kept them in memory (55 GFLOP/s); named, the loop
 * reaches 130-160 GFLOP/s on 4096×384×128, like OpenBLAS on these 2 cores. */
#define FMA_ROW(c0, c1, a) c0 += (a) * b0; c1 += (a) * b1;
#define STORE8(ptr, acc) { __global float8* q_ = (__global float8*)(ptr); \
    *q_ = beta == 0.0f ? alpha * (acc) : alpha * (acc) + beta * *q_; }
#define STORE1(ptr, acc) { __global float* q_ = (ptr); \
    *q_ = beta == 0.0f ? alpha * (acc) : alpha * (acc) + beta * *q_; }

#define GEMM_KERNEL(NAME, A_AT, A_ROWS)                                                  \
__kernel void NAME(const int M, const int N, const int K,                               \
                   const float alpha, const float beta,                                 \
                   __global const float* A, const int offA, const int strideA,          \
                   __global const float* B, const int offB, const int strideB,          \
                   __global float* C, const int offC, const int strideC)                \
{                                                                                       \
    const int n0 = get_global_id(0) * TN;                                               \
    const int m0 = get_global_id(1) * TM;                                               \
    const int b = get_global_id(2);                                                     \
    if (n0 >= N || m0 + TM > M) return;   /* rows past the last full tile: NAME##_edge */ \
    A += offA + b * strideA;                                                            \
    B += offB + b * strideB;                                                            \
    C += offC + b * strideC;                                                            \
    float8 c00 = 0, c01 = 0, c10 = 0, c11 = 0, c20 = 0, c21 = 0, c30 = 0, c31 = 0;      \
    __global const float* bp = B + n0;                                                  \
    A_ROWS                                                                              \
    if (n0 + TN <= N) {                                                                 \
        for (int k = 0; k < K; k++, bp += N) {                                          \
            const float8 b0 = *(__global const float8*)bp;                              \
            const float8 b1 = *(__global const float8*)(bp + 8);                        \
            FMA_ROW(c00, c01, A_AT(0, k)) FMA_ROW(c10, c11, A_AT(1, k))                 \
            FMA_ROW(c20, c21, A_AT(2, k)) FMA_ROW(c30, c31, A_AT(3, k))                 \
        }                                                                               \
    } else { /* 8 columns left (N % 8 == 0 on this path) */                             \
        const float8 b1 = 0;                                                            \
        for (int k = 0; k < K; k++, bp += N) {                                          \
            const float8 b0 = *(__global const float8*)bp;                              \
            FMA_ROW(c00, c01, A_AT(0, k)) FMA_ROW(c10, c11, A_AT(1, k))                 \
            FMA_ROW(c20, c21, A_AT(2, k)) FMA_ROW(c30, c31, A_AT(3, k))                 \
        }                                                                               \
    }                                                                                   \
    __global float* cp = C + m0 * N + n0;                                               \
    const int two = n0 + TN <= N;                                                       \
    STORE8(cp, c00) if (two) STORE8(cp + 8, c01) cp += N;                               \
    STORE8(cp, c10) if (two) STORE8(cp + 8, c11) cp += N;                               \
    STORE8(cp, c20) if (two) STORE8(cp + 8, c21) cp += N;                               \
    STORE8(cp, c30) if (two) STORE8(cp + 8, c31)                                        \
}

/* Edge tiles (rows from m_begin on, or any N when VEC=0): clamped reads, masked
 * stores, in a kernel of their own: the scalar code inside the vector kernel
 * cost that kernel ~25 % (register allocation), even when never taken. */
#define GEMM_EDGE(NAME, A_ATC)                                                           \
__kernel void NAME(const int M, const int N, const int K,                               \
                   const float alpha, const float beta,                                 \
                   __global const float* A, const int offA, const int strideA,          \
                   __global const float* B, const int offB, const int strideB,          \
                   __global float* C, const int offC, const int strideC,                \
                   const int m_begin)                                                   \
{                                                                                       \
    const int n0 = get_global_id(0) * TN;                                               \
    const int m0 = m_begin + get_global_id(1) * TM;                                     \
    const int b = get_global_id(2);                                                     \
    if (n0 >= N || m0 >= M) return;                                                     \
    A += offA + b * strideA;                                                            \
    B += offB + b * strideB;                                                            \
    C += offC + b * strideC;                                                            \
    float acc[TM][TN];                                                                  \
    int nj[TN];                                                                         \
    for (int j = 0; j < TN; j++) nj[j] = min(n0 + j, N - 1);                            \
    for (int i = 0; i < TM; i++)                                                        \
        for (int j = 0; j < TN; j++) acc[i][j] = 0.0f;                                  \
    for (int k = 0; k < K; k++) {                                                       \
        float av[TM];                                                                   \
        for (int i = 0; i < TM; i++) av[i] = A_ATC(min(m0 + i, M - 1), k);              \
        for (int j = 0; j < TN; j++) {                                                  \
            const float bv = B[k * N + nj[j]];                                          \
            for (int i = 0; i < TM; i++) acc[i][j] += av[i] * bv;                       \
        }                                                                               \
    }                                                                                   \
    for (int i = 0; i < TM && m0 + i < M; i++)                                          \
        for (int j = 0; j < TN && n0 + j < N; j++)                                      \
            STORE1(C + (m0 + i) * N + n0 + j, acc[i][j])                                \
}

/* gemm_nn: four rows of A walked in k order */
#define NN_ROWS __global const float* a0p = A + m0 * K; __global const float* a1p = a0p + K; \
                __global const float* a2p = a1p + K;   __global const float* a3p = a2p + K;
#define NN_AT(i, k) a##i##p[k]
/* gemm_tn: A stored (K,M): the tile's four values of row k are contiguous */
#define TN_ROWS __global const float* ap = A + m0;
#define TN_AT(i, k) ap[(k) * M + (i)]
#define NN_ATC(i, k) A[(i) * K + (k)]
#define TN_ATC(i, k) A[(k) * M + (i)]

GEMM_KERNEL(gemm_nn, NN_AT, NN_ROWS)
GEMM_KERNEL(gemm_tn, TN_AT, TN_ROWS)
GEMM_EDGE(gemm_nn_edge, NN_ATC)
GEMM_EDGE(gemm_tn_edge, TN_ATC)

/* K-split Aᵀ·B (weight gradients, A stored (K,M), K long): pack_a4 first copies A
 * into 4-column panels Ap[m/4][k][0..3], so a work-item reads its four A values
 * as one float4 from one sequential stream (unpacked, they are four floats on a
 * new cache line every k). gemm_tn_split then writes chunk b's partial product
 * P[b] = A[b·kc:(b+1)·kc]ᵀ·B[b·kc:(b+1)·kc] with dimension 0 walking m-tiles, so
 * consecutive work-items share one 16-column strip of the chunk of B (it stays in
 * L1) and the chunk of Ap stays in L2: 1.2-1.5x the plain gemm_tn on the
 * model's weight gradients here. gemm_reduce sums the partials in chunk order.
 * Host checks M % 4 == 0, N % 8 == 0, offA % 4 == 0, offB % 8 == 0.
 * Launch (pack_a4): global = (M/4, K/8), K % 8 == 0. (gemm_tn_split): global = (M/4, ceil(N/16), K/kc).
 * gemm_tn_packed: the same tiles over the whole K into C with alpha, beta (an unsplit medium K). */
__kernel void pack_a4(const int K, const int M, __global const float* A, const int offA, __global float* Ap)
{   /* eight k per work-item: 128 contiguous bytes written (one float4 per item was 5x slower) */
    const int mt = get_global_id(0), k0 = get_global_id(1) * 8;
    __global const float* a = A + offA + (size_t)k0 * M + mt * 4;
    __global float4* o = (__global float4*)(Ap + ((size_t)mt * K + k0) * 4);
    o[0] = *(__global const float4*)(a);         o[1] = *(__global const float4*)(a + M);
    o[2] = *(__global const float4*)(a + 2 * M); o[3] = *(__global const float4*)(a + 3 * M);
    o[4] = *(__global const float4*)(a + 4 * M); o[5] = *(__global const float4*)(a + 5 * M);
    o[6] = *(__global const float4*)(a + 6 * M); o[7] = *(__global const float4*)(a + 7 * M);
}

/* The 4×16 tile of a packed-A product over kc values of k (ap: the tile's panel, bp: B's strip). */
#define PACKED_TILE(kc)                                                                  \
    float8 c00 = 0, c01 = 0, c10 = 0, c11 = 0, c20 = 0, c21 = 0, c30 = 0, c31 = 0;      \
    if (n0 + TN <= N) {                                                                 \
        for (int k = 0; k < (kc); k++, bp += N) {                                       \
            const float8 b0 = *(__global const float8*)bp;                              \
            const float8 b1 = *(__global const float8*)(bp + 8);                        \
            const float4 a = ap[k];                                                     \
            FMA_ROW(c00, c01, a.s0) FMA_ROW(c10, c11, a.s1) FMA_ROW(c20, c21, a.s2) FMA_ROW(c30, c31, a.s3) \
        }                                                                               \
    } else { /* 8 columns left */                                                       \
        const float8 b1 = 0;                                                            \
        for (int k = 0; k < (kc); k++, bp += N) {                                       \
            const float8 b0 = *(__global const float8*)bp;                              \
            const float4 a = ap[k];                                                     \
            FMA_ROW(c00, c01, a.s0) FMA_ROW(c10, c11, a.s1) FMA_ROW(c20, c21, a.s2) FMA_ROW(c30, c31, a.s3) \
        }                                                                               \
    }

__kernel void gemm_tn_split(const int M, const int N, const int kc, const int K,
                            __global const float* Ap, __global const float* B, const int offB,
                            __global float* P)
{
    const int mt = get_global_id(0);
    const int n0 = get_global_id(1) * TN;
    const int b = get_global_id(2);
    if (n0 >= N) return;
    __global const float4* ap = (__global const float4*)(Ap + ((size_t)mt * K + (size_t)b * kc) * 4);
    __global const float* bp = B + offB + (size_t)b * kc * N + n0;
    PACKED_TILE(kc)
    __global float* cp = P + (size_t)b * M * N + mt * TM * N + n0;
    const int two = n0 + TN <= N;
    *(__global float8*)cp = c00; if (two) *(__global float8*)(cp + 8) = c01; cp += N;
    *(__global float8*)cp = c10; if (two) *(__global float8*)(cp + 8) = c11; cp += N;
    *(__global float8*)cp = c20; if (two) *(__global float8*)(cp + 8) = c21; cp += N;
    *(__global float8*)cp = c30; if (two) *(__global float8*)(cp + 8) = c31;
}

/* gemm_tn_packed: C = alpha·Aᵀ·B + beta·C over the whole K from pack_a4's panels, stored as gemm_tn
 * stores (an unsplit medium K: the same sums in the same order as gemm_tn, so the same bits).
 * Host checks as gemm_tn_split and offC % 8 == 0. Launch: global = (M/4, ceil(N/16)). */
__kernel void gemm_tn_packed(const int M, const int N, const int K, const float alpha, const float beta,
                             __global const float* Ap, __global const float* B, const int offB,
                             __global float* C, const int offC)
{
    const int mt = get_global_id(0);
    const int n0 = get_global_id(1) * TN;
    if (n0 >= N) return;
    __global const float4* ap = (__global const float4*)(Ap + (size_t)mt * K * 4);
    __global const float* bp = B + offB + n0;
    PACKED_TILE(K)
    __global float* cp = C + offC + mt * TM * N + n0;
    const int two = n0 + TN <= N;
    STORE8(cp, c00) if (two) STORE8(cp + 8, c01) cp += N;
    STORE8(cp, c10) if (two) STORE8(cp + 8, c11) cp += N;
    STORE8(cp, c20) if (two) STORE8(cp + 8, c21) cp += N;
    STORE8(cp, c30) if (two) STORE8(cp + 8, c31)
}

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

/* transpose8: the same in 8×8 blocks held in registers (float8 loads and stores;
 * 2.3x faster than element-wise on PoCL); host checks R, Cn, offsets, strides % 8 == 0.
 * Launch: global = (Cn/8, R/8, batch). */
__kernel void transpose8(const int R, const int Cn, __global const float* in, const int offIn, const int strideIn,
                        __global float* out, const int offOut, const int strideOut)
{
    const int c0 = get_global_id(0) * 8; const int r0 = get_global_id(1) * 8; const int b = get_global_id(2);
    __global const float* ip = in + offIn + b * strideIn + r0 * Cn + c0;
    __global float* op = out + offOut + b * strideOut + c0 * R + r0;
    const float8 x0 = *(__global const float8*)(ip);
    const float8 x1 = *(__global const float8*)(ip + Cn);
    const float8 x2 = *(__global const float8*)(ip + 2 * Cn);
    const float8 x3 = *(__global const float8*)(ip + 3 * Cn);
    const float8 x4 = *(__global const float8*)(ip + 4 * Cn);
    const float8 x5 = *(__global const float8*)(ip + 5 * Cn);
    const float8 x6 = *(__global const float8*)(ip + 6 * Cn);
    const float8 x7 = *(__global const float8*)(ip + 7 * Cn);
    *(__global float8*)(op)         = (float8)(x0.s0, x1.s0, x2.s0, x3.s0, x4.s0, x5.s0, x6.s0, x7.s0);
    *(__global float8*)(op + R)     = (float8)(x0.s1, x1.s1, x2.s1, x3.s1, x4.s1, x5.s1, x6.s1, x7.s1);
    *(__global float8*)(op + 2 * R) = (float8)(x0.s2, x1.s2, x2.s2, x3.s2, x4.s2, x5.s2, x6.s2, x7.s2);
    *(__global float8*)(op + 3 * R) = (float8)(x0.s3, x1.s3, x2.s3, x3.s3, x4.s3, x5.s3, x6.s3, x7.s3);
    *(__global float8*)(op + 4 * R) = (float8)(x0.s4, x1.s4, x2.s4, x3.s4, x4.s4, x5.s4, x6.s4, x7.s4);
    *(__global float8*)(op + 5 * R) = (float8)(x0.s5, x1.s5, x2.s5, x3.s5, x4.s5, x5.s5, x6.s5, x7.s5);
    *(__global float8*)(op + 6 * R) = (float8)(x0.s6, x1.s6, x2.s6, x3.s6, x4.s6, x5.s6, x6.s6, x7.s6);
    *(__global float8*)(op + 7 * R) = (float8)(x0.s7, x1.s7, x2.s7, x3.s7, x4.s7, x5.s7, x6.s7, x7.s7);
}

/* transpose_wg: transpose for GPUs; the group reads a 16×16 tile of `in` row by row and writes
 * it to `out` row by row through local memory (padded to 17 columns: no bank conflicts). */
__kernel __attribute__((reqd_work_group_size(16, 16, 1)))
void transpose_wg(const int R, const int Cn, __global const float* in, const int offIn, const int strideIn,
                  __global float* out, const int offOut, const int strideOut)
{
    __local float tile[16][17];
    const int lx = get_local_id(0), ly = get_local_id(1), b = get_global_id(2);
    const int c0 = get_group_id(0) * 16, r0 = get_group_id(1) * 16;
    if (r0 + ly < R && c0 + lx < Cn) tile[ly][lx] = in[offIn + b * strideIn + (r0 + ly) * Cn + c0 + lx];
    barrier(CLK_LOCAL_MEM_FENCE);
    if (c0 + ly < Cn && r0 + lx < R) out[offOut + b * strideOut + (c0 + ly) * R + r0 + lx] = tile[lx][ly];
}
