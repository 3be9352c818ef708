/* reduce.cl — work-group sums in a fixed tree order (included by the GPU kernel families).
 *
 * wg_sum / wg_sum_int: the sum of each work-item's value over a 1-D work-group of WG items
 * (WG a power of two, a build-time define), every item gets the result. The tree pairs item l
 * with l + step for step = WG/2, WG/4, …: the order depends only on WG, never on scheduling,
 * so a result is bit-identical from run to run on one device (no atomics).
 * wg_argmax: the largest of each item's value and the lowest index holding it (ties go to the
 * lower index): with each item's partial the first maximum of its strided elements (index l
 * when it has none above -INFINITY), the result is the serial loop's first maximum, `s > best`
 * from best = (-INFINITY, 0), bit for bit (an argmax: no rounding).
 */
#ifndef REDUCE_CL
#define REDUCE_CL
#ifndef WG
#define WG 64
#endif

/* One tree sum per element type: every work-item of the group calls it with its value and gets
 * the group's total; the halving order is fixed, so a rerun gives the same bits. */
#define WG_SUM(NAME, T)                                               \
inline T NAME(T value, __local T* red)                                \
{                                                                     \
    const int l = get_local_id(0);                                    \
    red[l] = value;                                                   \
    barrier(CLK_LOCAL_MEM_FENCE);                                     \
    for (int step = WG / 2; step > 0; step >>= 1) {                   \
        if (l < step) red[l] += red[l + step];                        \
        barrier(CLK_LOCAL_MEM_FENCE);                                 \
    }                                                                 \
    const T total = red[0];                                           \
    barrier(CLK_LOCAL_MEM_FENCE);                                     \
    return total;                                                     \
}
WG_SUM(wg_sum, float)
WG_SUM(wg_sum_int, int)

inline float wg_argmax(float value, int index, __local float* red, __local int* idx, int* arg)
{
    const int l = get_local_id(0);
    red[l] = value;
    idx[l] = index;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int step = WG / 2; step > 0; step >>= 1) {
        if (l < step) {
            const float v = red[l + step];
            const int i = idx[l + step];
            if (v > red[l] || (v == red[l] && i < idx[l])) { red[l] = v; idx[l] = i; }
        }
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    const float best = red[0];
    *arg = idx[0];
    barrier(CLK_LOCAL_MEM_FENCE);
    return best;
}
#endif
