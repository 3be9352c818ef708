/* dropout.cl — inverted dropout with a mask from the counter-based hash: nothing is stored
 * or checkpointed, the backward pass recomputes the mask, and every device draws the same.
 *
 *   key = hash_u32(seed, layer, 0x5BD1E995)        (one stream per layer; computed on the host)
 *   keep[i] = hash_u32(key, step, base + i) >= threshold,  threshold = floor(p · 2^32)
 *   (base: the index of the first element in the global batch, 0 but on a data-parallel replica)
 *   y[i] = keep[i] ? x[i] · 1/(1 − p) : 0;   dx[i] = keep[i] ? dy[i] · 1/(1 − p) : 0
 *
 *   dropout   global (n): y from x (forward) or dx from dy (backward: the same kernel)
 * GPU note: element-wise, neighbouring items on neighbouring elements: GPU-suitable as it is.
 * Reference: engine.reference.dropout_mask / dropout_forward.
 */
#include "hash.cl"

__kernel void dropout(__global const float* x, __global float* y, const uint key, const uint step,
                      const uint threshold, const float scale, const uint base)
{
    const uint i = get_global_id(0);
    y[i] = hash_u32(key, step, base + i) >= threshold ? x[i] * scale : 0.0f;
}
