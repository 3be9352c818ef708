/* loss.cl — softmax cross-entropy over the vocabulary, ignoring PAD (-1) targets.
 *
 *   count_valid   nv[0] = #{n : y_n ≠ PAD}                                   global (1)
 *   softmax_xent  loss_rows (N,), hits (N,), dlogits (N,V) = (p − onehot)/Nv
 *                 (0 rows for PAD targets); logits and dlogits rows are ld >= V
 *                 apart (the model pads V to a multiple of 8 for the vector
 *                 GEMM path); columns V..ld-1 are neither read nor written  global (N)
 *   softmax_xent8 the same, eight columns at a time (ld % 8 == 0)           global (N)
 *   loss_reduce   out = [Σ loss_rows / Nv, Σ hits, Nv, Σ loss_rows]  (fixed order)        global (1)
 *   argmax_rows   pred (N,) int = the first j in [0, V) with the largest logits[n, j] (rows ld
 *                 apart): the prediction whose hits softmax_xent counts; evaluation only
 *                 (macro F1, engine.tasks.metrics)                                      global (N)
 *   count_valid_wg / loss_reduce_wg   the same for GPUs: one work-group of WG items, strided
 *                 partial sums, then a tree sum (reduce.cl)           global (WG), local (WG)
 *   softmax_xent_wg  softmax_xent for GPUs: one work-group of WG items per row, reading the row
 *                 coalesced (item l takes columns l, l + WG, …), a tree max (wg_argmax: the first
 *                 maximum, so hits are exactly the CPU kernels') and a tree sum (wg_sum) of the
 *                 exponentials; loss and p differ from the CPU's in the last bits (sum order)
 *                                                               global (N·WG), local (WG)
 *   argmax_rows_wg  argmax_rows for GPUs: one work-group per row, the tree argmax above (exact:
 *                 the same index as the CPU kernel)                 global (N·WG), local (WG)
 * GPU note: every kernel here has a work-group variant (the CPU ones loop serially per row or
 * over N in one work-item).
 * Reference: engine.reference.softmax_xent_forward, engine.reference.argmax_rows. exp_fast: see fastmath.cl.
 */
#include "fastmath.cl"
#include "reduce.cl"

__kernel void count_valid(__global const int* y, const int N, __global int* nv)
{
    int c = 0;
    for (int n = 0; n < N; n++) c += y[n] >= 0;
    nv[0] = c;
}

__kernel void softmax_xent(__global const float* logits, __global const int* y,
                           __global const int* nv, const int V, const int ld,
                           __global float* loss_rows, __global float* hits,
                           __global float* dlogits)
{
    const int n = get_global_id(0);
    __global const float* z = logits + n * ld;
    __global float* d = dlogits + n * ld;
    const int target = y[n];
    if (target < 0) {
        loss_rows[n] = 0.0f;
        hits[n] = 0.0f;
        for (int j = 0; j < V; j++) d[j] = 0.0f;
        return;
    }
    float mx = z[0];
    int arg = 0;
    for (int j = 1; j < V; j++) if (z[j] > mx) { mx = z[j]; arg = j; }
    float sum = 0.0f;
    for (int j = 0; j < V; j++) sum += exp_fast(z[j] - mx);
    const float inv_sum = 1.0f / sum;
    const float scale = 1.0f / (float)nv[0];
    for (int j = 0; j < V; j++) d[j] = exp_fast(z[j] - mx) * inv_sum * scale;
    d[target] -= scale;
    loss_rows[n] = log(sum) + mx - z[target];
    hits[n] = arg == target ? 1.0f : 0.0f;
}

/* softmax_xent8: the same per row with float8 chunks of the row (ld % 8 == 0 and
 * 32-byte aligned rows: host checks); lanes past V are masked on read and not
 * written. The row sums add eight lane partials at the end, so the loss differs
 * from softmax_xent's in the last bits; the argmax keeps the first maximum.
 * Elementwise (p, dlogits) the same operations as softmax_xent. */
__kernel void softmax_xent8(__global const float* logits, __global const int* y,
                            __global const int* nv, const int V, const int ld,
                            __global float* loss_rows, __global float* hits,
                            __global float* dlogits)
{
    const int n = get_global_id(0);
    __global const float* z = logits + n * ld;
    __global float* d = dlogits + n * ld;
    const int target = y[n];
    const int full = V & ~7;                      /* columns in whole chunks */
    const int8 lane = (int8)(0, 1, 2, 3, 4, 5, 6, 7);
    if (target < 0) {
        loss_rows[n] = 0.0f;
        hits[n] = 0.0f;
        for (int j = 0; j < full; j += 8) *(__global float8*)(d + j) = 0.0f;
        for (int j = full; j < V; j++) d[j] = 0.0f;
        return;
    }
    float8 mx8 = -INFINITY;
    int8 id8 = 0;
    for (int j = 0; j < V; j += 8) {
        const float8 v = *(__global const float8*)(z + j);
        const int8 upd = (v > mx8) & (j + lane < V);
        mx8 = upd ? v : mx8;
        id8 = upd ? j + lane : id8;
    }
    float mx = mx8.s0;
    int arg = id8.s0;
#define LANE_MAX(k) if (mx8.s##k > mx || (mx8.s##k == mx && id8.s##k < arg)) { mx = mx8.s##k; arg = id8.s##k; }
    LANE_MAX(1) LANE_MAX(2) LANE_MAX(3) LANE_MAX(4) LANE_MAX(5) LANE_MAX(6) LANE_MAX(7)
#undef LANE_MAX
    float8 sum8 = 0.0f;
    for (int j = 0; j < V; j += 8) {
        const float8 e = exp_fast8(*(__global const float8*)(z + j) - mx);
        sum8 += (j + lane < V) ? e : (float8)(0.0f);
    }
    const float sum = ((sum8.s0 + sum8.s1) + (sum8.s2 + sum8.s3)) + ((sum8.s4 + sum8.s5) + (sum8.s6 + sum8.s7));
    const float inv_sum = 1.0f / sum;
    const float scale = 1.0f / (float)nv[0];
    for (int j = 0; j < full; j += 8)
        *(__global float8*)(d + j) = exp_fast8(*(__global const float8*)(z + j) - mx) * inv_sum * scale;
    if (full < V) {
        const float8 e = exp_fast8(*(__global const float8*)(z + full) - mx) * inv_sum * scale;
        const float tail[8] = {e.s0, e.s1, e.s2, e.s3, e.s4, e.s5, e.s6, e.s7};
        for (int j = full; j < V; j++) d[j] = tail[j - full];
    }
    d[target] -= scale;
    loss_rows[n] = log(sum) + mx - z[target];
    hits[n] = arg == target ? 1.0f : 0.0f;
}

__kernel void loss_reduce(__global const float* loss_rows, __global const float* hits,
                          __global const int* nv, const int N, __global float* out)
{
    float l = 0.0f, h = 0.0f;
    for (int n = 0; n < N; n++) { l += loss_rows[n]; h += hits[n]; }
    const int c = nv[0];
    out[0] = c > 0 ? l / (float)c : 0.0f;
    out[1] = h;
    out[2] = (float)c;
    out[3] = l;
}

__kernel void count_valid_wg(__global const int* y, const int N, __global int* nv)
{
    __local int red[WG];
    const int l = get_local_id(0);
    int c = 0;
    for (int n = l; n < N; n += WG) c += y[n] >= 0;
    c = wg_sum_int(c, red);
    if (l == 0) nv[0] = c;
}

__kernel void loss_reduce_wg(__global const float* loss_rows, __global const float* hits,
                             __global const int* nv, const int N, __global float* out)
{
    __local float red[WG];
    const int l = get_local_id(0);
    float a = 0.0f, b = 0.0f;
    for (int n = l; n < N; n += WG) { a += loss_rows[n]; b += hits[n]; }
    const float total = wg_sum(a, red);
    const float h = wg_sum(b, red);
    if (l == 0) {
        const int c = nv[0];
        out[0] = c > 0 ? total / (float)c : 0.0f;
        out[1] = h;
        out[2] = (float)c;
        out[3] = total;
    }
}

__kernel __attribute__((reqd_work_group_size(WG, 1, 1)))
void softmax_xent_wg(__global const float* logits, __global const int* y,
                     __global const int* nv, const int V, const int ld,
                     __global float* loss_rows, __global float* hits,
                     __global float* dlogits)
{
    __local float red[WG];
    __local int idx[WG];
    const int n = get_group_id(0), l = get_local_id(0);
    __global const float* z = logits + (size_t)n * ld;
    __global float* d = dlogits + (size_t)n * ld;
    const int target = y[n];
    if (target < 0) {                             /* the whole group leaves: no barrier skipped */
        for (int j = l; j < V; j += WG) d[j] = 0.0f;
        if (l == 0) { loss_rows[n] = 0.0f; hits[n] = 0.0f; }
        return;
    }
    float bv = -INFINITY;
    int bi = l;
    for (int j = l; j < V; j += WG) if (z[j] > bv) { bv = z[j]; bi = j; }
    int arg;
    const float mx = wg_argmax(bv, bi, red, idx, &arg);
    float s = 0.0f;
    for (int j = l; j < V; j += WG) s += exp_fast(z[j] - mx);
    const float sum = wg_sum(s, red);
    const float inv_sum = 1.0f / sum;
    const float scale = 1.0f / (float)nv[0];
    for (int j = l; j < V; j += WG) {
        const float p = exp_fast(z[j] - mx) * inv_sum * scale;
        d[j] = j == target ? p - scale : p;       /* softmax_xent's d[target] -= scale */
    }
    if (l == 0) {
        loss_rows[n] = log(sum) + mx - z[target];
        hits[n] = arg == target ? 1.0f : 0.0f;
    }
}

__kernel void argmax_rows(__global const float* logits, const int V, const int ld, __global int* pred)
{
    const int n = get_global_id(0);
    __global const float* z = logits + (size_t)n * ld;
    float mx = z[0];
    int arg = 0;
    for (int j = 1; j < V; j++) if (z[j] > mx) { mx = z[j]; arg = j; }
    pred[n] = arg;
}

__kernel __attribute__((reqd_work_group_size(WG, 1, 1)))
void argmax_rows_wg(__global const float* logits, const int V, const int ld, __global int* pred)
{
    __local float red[WG];
    __local int idx[WG];
    const int n = get_group_id(0), l = get_local_id(0);
    __global const float* z = logits + (size_t)n * ld;
    float bv = -INFINITY;
    int bi = l;
    for (int j = l; j < V; j += WG) if (z[j] > bv) { bv = z[j]; bi = j; }
    int arg;
    wg_argmax(bv, bi, red, idx, &arg);
    if (l == 0) pred[n] = arg;
}
