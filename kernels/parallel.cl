/* parallel.cl — combining the replicas of a data-parallel step (engine/parallel.py).
 *
 *   combine_grads   out[i] = Σ_k (nv_k / nv)·G[k, i], k = 0..D−1 in order, nv = Σ_k nv_k:
 *                   the gradient of the mean loss over the global batch from the replicas'
 *                   gradients of their own means; nv_k = L[k, 2]            global (n)
 *   combine_loss    out (4,) = [Σ sum_k / nv, Σ hits_k, nv, Σ sum_k] from the replicas'
 *                   loss summaries L (D,4) = [mean, hits, valid, sum]          global (1)
 * Element-wise over the parameters (coalesced on a GPU); the sums over the D replicas run
 * in device order, so a rerun gives the same bits. nv = 0 (no valid target anywhere): the
 * weights are 0, as one device's gradient is.
 * Reference: engine.reference.combine_replicas.
 */

__kernel void combine_grads(__global const float* G, __global const float* L, const int D, const int n,
                            __global float* out)
{
    const int i = get_global_id(0);
    float nv = 0.0f;
    for (int k = 0; k < D; k++) nv += L[k * 4 + 2];
    float acc = 0.0f;
    if (nv > 0.0f)
        for (int k = 0; k < D; k++) acc += (L[k * 4 + 2] / nv) * G[k * n + i];
    out[i] = acc;
}

__kernel void combine_loss(__global const float* L, const int D, __global float* out)
{
    float nv = 0.0f, hits = 0.0f, sum = 0.0f;
    for (int k = 0; k < D; k++) { hits += L[k * 4 + 1]; nv += L[k * 4 + 2]; sum += L[k * 4 + 3]; }
    out[0] = nv > 0.0f ? sum / nv : 0.0f;
    out[1] = hits;
    out[2] = nv;
    out[3] = sum;
}
