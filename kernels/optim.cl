/* optim.cl — gradient norms, clipping and AdamW over the flat parameter buffer.
 *
 * Parameters, gradients and both moments live in flat buffers in which every
 * tensor starts at a multiple of CHUNK elements (gaps are zero and stay zero),
 * so each CHUNK-sized piece belongs to one tensor.
 *
 *   sumsq_chunks  partial[c] = Σ_{i in chunk c} g[i]²                       global (n_chunks)
 *   global_norm   out[0] = sqrt(Σ_c partial[c])  (fixed order)              global (1)
 *   sumsq_chunks_wg / global_norm_wg   the same for GPUs: a work-group of WG items per chunk
 *                 (coalesced strided loads, then a tree sum, reduce.cl) / one work-group over
 *                 the chunk sums                           global (n_chunks·WG) / (WG), local (WG)
 *   adamw         one AdamW step (Loshchilov & Hutter 2019) with value and
 *                 global-norm clipping; wd_mask[c] ∈ {0,1} per chunk, lr_mask[c] the
 *                 chunk's tensor's lr_scale (engine.params.ParamSpec): lr_eff = lr·lr_mask[c]
 *                 is used exactly where lr was, so a mask of 1.0 gives the same bits   global (n)
 *                 (built with VEC8=1, the CPU variant's: eight elements per item, the same
 *                 bits                                                   global (n/8))
 *   sgd_momentum  one SGD step with momentum (heavy ball, no dampening), L2 weight
 *                 decay added to the clipped gradient; same clipping and lr_mask   global (n)
 *   accumulate_step_stats  loss / clipping / step counters between logging points  global (1)
 * GPU note: adamw and sgd_momentum are element-wise over the flat buffers (coalesced;
 * wd_mask[i / CHUNK], lr_mask[i / CHUNK] are one address per CHUNK items) and accumulate_step_stats is O(1) in one
 * item: GPU-suitable as they are; the two reductions have the _wg variants above.
 * Reference: engine.reference.adamw_step, engine.reference.sgd_step.
 */
#ifndef CHUNK
#define CHUNK 1024
#endif

__kernel void sumsq_chunks(__global const float* g, __global float* partial)
{
    const int c = get_global_id(0);
    float acc = 0.0f;
    for (int i = c * CHUNK; i < (c + 1) * CHUNK; i++) acc += g[i] * g[i];
    partial[c] = acc;
}

__kernel void global_norm(__global const float* partial, const int n_chunks, __global float* out)
{
    float acc = 0.0f;
    for (int c = 0; c < n_chunks; c++) acc += partial[c];
    out[0] = sqrt(acc);
}

#include "reduce.cl"

__kernel void sumsq_chunks_wg(__global const float* g, __global float* partial)
{
    __local float red[WG];
    const int c = get_group_id(0), l = get_local_id(0);
    __global const float* gc = g + (size_t)c * CHUNK;
    float acc = 0.0f;
    for (int i = l; i < CHUNK; i += WG) acc += gc[i] * gc[i];
    acc = wg_sum(acc, red);
    if (l == 0) partial[c] = acc;
}

__kernel void global_norm_wg(__global const float* partial, const int n_chunks, __global float* out)
{
    __local float red[WG];
    const int l = get_local_id(0);
    float acc = 0.0f;
    for (int c = l; c < n_chunks; c += WG) acc += partial[c];
    acc = wg_sum(acc, red);
    if (l == 0) out[0] = sqrt(acc);
}

/* clamp by value (clip_value > 0), then scale by the global norm taken before clipping */
inline float clipped(float g, const float gnorm, const float clip_norm, const float clip_value)
{
    if (clip_value > 0.0f) g = clamp(g, -clip_value, clip_value);
    if (clip_norm > 0.0f) g *= min(1.0f, clip_norm / (gnorm + 1e-6f));
    return g;
}

#if VEC8
/* adamw on eight elements per work-item (CPU variant; n % 8 == 0, CHUNK % 8 == 0): the same
 * operations lane by lane (IEEE division and square root in both), so the same bits as the
 * scalar kernel below (tested byte for byte); the scalar sqrt is a call in PoCL that kept the
 * kernel from vectorising (6x slower here).                            global (n/8) */
inline float8 clipped8(float8 g, const float gnorm, const float clip_norm, const float clip_value)
{
    if (clip_value > 0.0f) g = clamp(g, -clip_value, clip_value);
    if (clip_norm > 0.0f) g *= min(1.0f, clip_norm / (gnorm + 1e-6f));
    return g;
}

__kernel void adamw(__global float* theta, __global const float* grad,
                    __global float* m, __global float* v,
                    __global const float* wd_mask, __global const float* lr_mask,
                    __global const float* gnorm,
                    const float lr, const float beta1, const float beta2, const float eps,
                    const float weight_decay, const float bc1, const float bc2,
                    const float clip_norm, const float clip_value)
{
    const int i = get_global_id(0);
    __global float8* th = (__global float8*)theta + i;
    __global float8* m8 = (__global float8*)m + i;
    __global float8* v8 = (__global float8*)v + i;
    const float8 g = clipped8(((__global const float8*)grad)[i], gnorm[0], clip_norm, clip_value);
    const float8 mi = beta1 * *m8 + (1.0f - beta1) * g;
    const float8 vi = beta2 * *v8 + (1.0f - beta2) * g * g;
    *m8 = mi;
    *v8 = vi;
    const float8 mhat = mi / bc1;
    const float8 vhat = vi / bc2;
    const float wd = weight_decay * wd_mask[i * 8 / CHUNK];
    const float lr_eff = lr * lr_mask[i * 8 / CHUNK];
    *th -= lr_eff * (mhat / (sqrt(vhat) + eps) + wd * *th);
}
#else
__kernel void adamw(__global float* theta, __global const float* grad,
                    __global float* m, __global float* v,
                    __global const float* wd_mask, __global const float* lr_mask,
                    __global const float* gnorm,
                    const float lr, const float beta1, const float beta2, const float eps,
                    const float weight_decay, const float bc1, const float bc2,
                    const float clip_norm, const float clip_value)
{
    const int i = get_global_id(0);
    float g = clipped(grad[i], gnorm[0], clip_norm, clip_value);
    const float mi = beta1 * m[i] + (1.0f - beta1) * g;
    const float vi = beta2 * v[i] + (1.0f - beta2) * g * g;
    m[i] = mi;
    v[i] = vi;
    const float mhat = mi / bc1;
    const float vhat = vi / bc2;
    const float wd = weight_decay * wd_mask[i / CHUNK];
    const float lr_eff = lr * lr_mask[i / CHUNK];
    theta[i] -= lr_eff * (mhat / (sqrt(vhat) + eps) + wd * theta[i]);
}
#endif

__kernel void sgd_momentum(__global float* theta, __global const float* grad, __global float* vel,
                           __global const float* wd_mask, __global const float* lr_mask,
                           __global const float* gnorm, const float lr, const float momentum, const float weight_decay,
                           const float clip_norm, const float clip_value)
{
    const int i = get_global_id(0);
    float g = clipped(grad[i], gnorm[0], clip_norm, clip_value);
    g += weight_decay * wd_mask[i / CHUNK] * theta[i];
    const float vi = momentum * vel[i] + g;
    vel[i] = vi;
    const float lr_eff = lr * lr_mask[i / CHUNK];
    theta[i] -= lr_eff * vi;
}

/* Running per-step statistics between logging points (so the host need not
 * read every step): acc[0] += this step's mean loss, acc[1] += 1 if norm
 * clipping acted (same test as adamw), acc[2] += 1 (steps).   global (1) */
__kernel void accumulate_step_stats(__global const float* loss_out, __global const float* gnorm,
                                    const float clip_norm, __global float* acc)
{
    acc[0] += loss_out[0];
    acc[1] += (clip_norm > 0.0f && clip_norm / (gnorm[0] + 1e-6f) < 1.0f) ? 1.0f : 0.0f;
    acc[2] += 1.0f;
}
