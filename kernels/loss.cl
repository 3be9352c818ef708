/* loss.cl — softmax cross-entropy over the vocabulary, ignoring PAD (-1) targets.
 *
 *   count_valid   nv[0] = #{n : y_n ≠ PAD}                                   global (1)
 *   softmax_xent  loss_rows (N,), hits (N,), dlogits (N,V) = (p − onehot)/Nv
 *                 (0 rows for PAD targets); logits and dlogits rows are ld >= V
 *                 apart (the model pads V to a multiple of 8 for the vector
 *                 GEMM path); columns V..ld-1 are neither read nor written  global (N)
 *   loss_reduce   out = [Σ loss_rows / Nv, Σ hits, Nv, Σ loss_rows]  (fixed order)        global (1)
 * Reference: engine.reference.softmax_xent_forward. exp_fast: see fastmath.cl.
 */
#include "fastmath.cl"

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
