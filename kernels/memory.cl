/* memory.cl — the slot memory read of DRLMemNet (engine/layers/memory.py) and its local write.
 *
 * Letters: N = B·S rows, M memory width, Ms slots. Row-major float32. The products around these
 * kernels (q·Kᵀ, a·Vals and their gradients) are ops.gemm's; the query's GELU, the sums over rows
 * (colsum) and per slot (bucket_sort, bucket_sums) are layers.cl's.
 *
 *   memory_softmax   in place: a (N,Ms) = softmax over the slots of the scores in a, max
 *                    subtracted; slot (N,) = argmax_s of the scores (the first maximum)  global (N)
 *   memory_softmax_backward   in place: ds = a ⊙ (da − Σ_s a·da) per row, into da     global (N)
 *   memory_softmax8 / memory_softmax_backward8   the same, float8 chunks of a row (Ms % 8 == 0,
 *                    32-byte aligned rows: the host checks): eight lane partials added in a fixed
 *                    tree at the end (other last bits than the serial kernels'), the same slot
 *                    (each lane's first maximum, then the lowest index among equal lanes)  global (N)
 *   memory_write     one slot per work-item: with c = the slot's count (N for every slot
 *                    when shared) and t = normalise(sums[row]/c),
 *                    mem[s] ← normalise((1−w)·mem[s] + w·t), delta2[s] = |Δmem[s]|²;
 *                    a slot with c = 0 is not touched (delta2[s] = 0)              global (Ms)
 *   memory_usage_update   usage (Ms,) int += starts[s+1] − starts[s]                global (Ms)
 *   memory_softmax_wg / memory_softmax_backward_wg / memory_write_wg   the same for GPUs:
 *                    a work-group of WG items per row (slot), item l taking columns l, l + WG, …
 *                    (coalesced), a tree argmax (wg_argmax: the first maximum, so slot is
 *                    exactly the CPU kernel's) and tree sums (wg_sum) in a fixed order
 *                                                               global (R·WG), local (WG)
 * normalise(v) = v / sqrt(|v|² + 1e-6) (row_normalize_forward's). The CPU kernels loop over a row
 * in one work-item in column order, the GPU ones sum in a tree: both fixed, so reruns are
 * bit-identical on one device (no atomics); the two variants differ in the last bits.
 * exp_fast: fastmath.cl.
 * References: engine.reference.memory.{memory_softmax, memory_softmax_backward, memory_write,
 * memory_usage_update}.
 */
#include "fastmath.cl"
#include "reduce.cl"

#define MEM_EPS 1e-6f

__kernel void memory_softmax(__global float* a, const int Ms, __global int* slot)
{
    const int n = get_global_id(0);
    __global float* r = a + (size_t)n * Ms;
    float mx = r[0];
    int arg = 0;
    for (int s = 1; s < Ms; s++) if (r[s] > mx) { mx = r[s]; arg = s; }
    float sum = 0.0f;
    for (int s = 0; s < Ms; s++) { const float e = exp_fast(r[s] - mx); r[s] = e; sum += e; }
    const float inv = 1.0f / sum;
    for (int s = 0; s < Ms; s++) r[s] *= inv;
    slot[n] = arg;
}

__kernel void memory_softmax_backward(__global const float* a, __global float* da, const int Ms)
{
    const int n = get_global_id(0);
    __global const float* p = a + (size_t)n * Ms;
    __global float* d = da + (size_t)n * Ms;
    float dot = 0.0f;
    for (int s = 0; s < Ms; s++) dot += p[s] * d[s];
    for (int s = 0; s < Ms; s++) d[s] = p[s] * (d[s] - dot);
}

#define HSUM8(v) ((((v).s0 + (v).s1) + ((v).s2 + (v).s3)) + (((v).s4 + (v).s5) + ((v).s6 + (v).s7)))

__kernel void memory_softmax8(__global float* a, const int Ms, __global int* slot)
{
    const int n = get_global_id(0);
    __global float8* r = (__global float8*)(a + (size_t)n * Ms);
    const int n8 = Ms / 8;
    const int8 lane = (int8)(0, 1, 2, 3, 4, 5, 6, 7);
    float8 mx8 = r[0];
    int8 id8 = lane;
    for (int i = 1; i < n8; i++) {
        const float8 v = r[i];
        const int8 upd = v > mx8;
        mx8 = upd ? v : mx8;
        id8 = upd ? 8 * i + lane : id8;
    }
    float mx = mx8.s0;
    int arg = id8.s0;
#define LANE_MAX(k) if (mx8.s##k > mx || (mx8.s##k == mx && id8.s##k < arg)) { mx = mx8.s##k; arg = id8.s##k; }
    LANE_MAX(1) LANE_MAX(2) LANE_MAX(3) LANE_MAX(4) LANE_MAX(5) LANE_MAX(6) LANE_MAX(7)
#undef LANE_MAX
    float8 sum8 = 0.0f;
    for (int i = 0; i < n8; i++) { const float8 e = exp_fast8(r[i] - mx); r[i] = e; sum8 += e; }
    const float inv = 1.0f / HSUM8(sum8);
    for (int i = 0; i < n8; i++) r[i] *= inv;
    slot[n] = arg;
}

__kernel void memory_softmax_backward8(__global const float* a, __global float* da, const int Ms)
{
    const int n = get_global_id(0);
    __global const float8* p = (__global const float8*)(a + (size_t)n * Ms);
    __global float8* d = (__global float8*)(da + (size_t)n * Ms);
    const int n8 = Ms / 8;
    float8 dot8 = 0.0f;
    for (int i = 0; i < n8; i++) dot8 += p[i] * d[i];
    const float dot = HSUM8(dot8);
    for (int i = 0; i < n8; i++) d[i] = p[i] * (d[i] - dot);
}

__kernel void memory_write(__global float* mem, __global const float* sums, __global const int* starts,
                           const int shared, const int N, const float w, const int M,
                           __global float* delta2)
{
    const int s = get_global_id(0);
    const int row = shared ? 0 : s;
    const int c = shared ? N : starts[s + 1] - starts[s];
    if (c == 0) { delta2[s] = 0.0f; return; }
    __global const float* v = sums + (size_t)row * M;
    __global float* k = mem + (size_t)s * M;
    const float inv_c = 1.0f / (float)c;
    float tt = 0.0f;
    for (int j = 0; j < M; j++) { const float t = v[j] * inv_c; tt += t * t; }
    const float tn = 1.0f / sqrt(tt + MEM_EPS);
    float mm = 0.0f;
    for (int j = 0; j < M; j++) { const float m = (1.0f - w) * k[j] + w * (v[j] * inv_c * tn); mm += m * m; }
    const float mn = 1.0f / sqrt(mm + MEM_EPS);
    float dd = 0.0f;
    for (int j = 0; j < M; j++) {
        const float m = (1.0f - w) * k[j] + w * (v[j] * inv_c * tn);
        const float x = m * mn, d = x - k[j];
        dd += d * d;
        k[j] = x;
    }
    delta2[s] = dd;
}

__kernel void memory_usage_update(__global int* usage, __global const int* starts)
{
    const int s = get_global_id(0);
    usage[s] += starts[s + 1] - starts[s];
}

__kernel __attribute__((reqd_work_group_size(WG, 1, 1)))
void memory_softmax_wg(__global float* a, const int Ms, __global int* slot)
{
    __local float red[WG];
    __local int idx[WG];
    const int n = get_group_id(0), l = get_local_id(0);
    __global float* r = a + (size_t)n * Ms;
    float bv = -INFINITY;
    int bi = l;
    for (int s = l; s < Ms; s += WG) if (r[s] > bv) { bv = r[s]; bi = s; }
    int arg;
    const float mx = wg_argmax(bv, bi, red, idx, &arg);
    float sum = 0.0f;
    for (int s = l; s < Ms; s += WG) { const float e = exp_fast(r[s] - mx); r[s] = e; sum += e; }
    const float inv = 1.0f / wg_sum(sum, red);
    for (int s = l; s < Ms; s += WG) r[s] *= inv;   /* each item rescales only what it wrote */
    if (l == 0) slot[n] = arg;
}

__kernel __attribute__((reqd_work_group_size(WG, 1, 1)))
void memory_softmax_backward_wg(__global const float* a, __global float* da, const int Ms)
{
    __local float red[WG];
    const int n = get_group_id(0), l = get_local_id(0);
    __global const float* p = a + (size_t)n * Ms;
    __global float* d = da + (size_t)n * Ms;
    float dot = 0.0f;
    for (int s = l; s < Ms; s += WG) dot += p[s] * d[s];
    dot = wg_sum(dot, red);
    for (int s = l; s < Ms; s += WG) d[s] = p[s] * (d[s] - dot);
}

__kernel __attribute__((reqd_work_group_size(WG, 1, 1)))
void memory_write_wg(__global float* mem, __global const float* sums, __global const int* starts,
                     const int shared, const int N, const float w, const int M,
                     __global float* delta2)
{
    __local float red[WG];
    const int s = get_group_id(0), l = get_local_id(0);
    const int row = shared ? 0 : s;
    const int c = shared ? N : starts[s + 1] - starts[s];
    if (c == 0) {                                  /* the whole group leaves: no barrier skipped */
        if (l == 0) delta2[s] = 0.0f;
        return;
    }
    __global const float* v = sums + (size_t)row * M;
    __global float* k = mem + (size_t)s * M;
    const float inv_c = 1.0f / (float)c;
    float tt = 0.0f;
    for (int j = l; j < M; j += WG) { const float t = v[j] * inv_c; tt += t * t; }
    const float tn = 1.0f / sqrt(wg_sum(tt, red) + MEM_EPS);
    float mm = 0.0f;
    for (int j = l; j < M; j += WG) { const float m = (1.0f - w) * k[j] + w * (v[j] * inv_c * tn); mm += m * m; }
    const float mn = 1.0f / sqrt(wg_sum(mm, red) + MEM_EPS);
    float dd = 0.0f;
    for (int j = l; j < M; j += WG) {
        const float m = (1.0f - w) * k[j] + w * (v[j] * inv_c * tn);
        const float x = m * mn, d = x - k[j];
        dd += d * d;
        k[j] = x;
    }
    dd = wg_sum(dd, red);
    if (l == 0) delta2[s] = dd;
}
