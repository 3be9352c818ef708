"""One Python wrapper per OpenCL kernel, same name and argument order.

Letters: N positions, E embedding, H hidden, V vocab, T prototypes, S sequence.
Arguments are pyopencl arrays on `dev` (an engine.device.Device); shapes are
in each docstring. Wrappers only enqueue: nothing here reads device memory.
The numpy reference of each is in engine/reference.py (same name).
"""
from __future__ import annotations

import math

import numpy as np

i32, f32, u32 = np.int32, np.float32, np.uint32


def _buf(a):
    """(buffer, element offset) of a pyopencl array or view."""
    return a.base_data, a.offset // a.dtype.itemsize


def _rows8(C: int, *arrays) -> bool:
    """Rows of C floats can be read as float8: C % 8 == 0 and every array 32-byte aligned."""
    return C % 8 == 0 and all(_buf(a)[1] % 8 == 0 for a in arrays)


def _workspace(dev, name: str, size: int):
    ws = dev.__dict__.setdefault("_workspace", {})
    a = ws.get(name)
    if a is None or a.size < size:
        a = dev.empty((size,), np.float32)
        ws[name] = a
    return a


# -- matrix products ------------------------------------------------------------
TM, TN = 4, 16  # the tile one work-item computes (kernels/gemm.cl)


RED_WG = 64  # work-group of the GPU reductions and the GPU bucket sort (kernels/reduce.cl, layers.cl)
GPU_TS = 16  # local-memory tile side of the GPU variant (kernels/gemm_gpu.cl)


def tuned(dev, key: str, default):
    """A launch parameter of this device: its tuned value (dev.tuning, set by engine.tune) or the
    default. Keys: "gemm_tile" (GPU_TS), "gemm_block" (1), "red_wg" (RED_WG)."""
    return getattr(dev, "tuning", {}).get(key, default)


def gpu_gemm_tile(dev) -> tuple[int, int]:
    """(TS, WPT) of the GPU variant's products: the C tile side of a work-group and the outputs per
    work-item along each side (1: gemm_*_local, else the register-blocked gemm_*_block). An explicit
    dev.gemm_tile (the tests' small tiles) wins over the tuning, with dev.gemm_block or 1."""
    if "gemm_tile" in dev.__dict__:
        return dev.gemm_tile, dev.__dict__.get("gemm_block", 1)
    return tuned(dev, "gemm_tile", GPU_TS), tuned(dev, "gemm_block", 1)


def _red_wg(dev) -> int:
    return tuned(dev, "red_wg", RED_WG)


def _gemm_raw(dev, tn, M, N, K, alpha, A, offA, strideA, B, offB, strideB, beta, C, offC, strideC, batch):
    if dev.variant == "gpu":
        ts, wpt = gpu_gemm_tile(dev)
        r = ts // wpt   # work-items along each side of a group
        name, defines = ("local", (("TS", ts),)) if wpt == 1 else ("block", (("TS", ts), ("WPT", wpt)))
        kern = dev.kernel("gemm_gpu.cl", f"gemm_{'tn' if tn else 'nn'}_{name}", defines)
        gsize = (-(-N // ts) * r, -(-M // ts) * r, batch)
        dev.launch(kern, gsize, (r, r, 1), i32(M), i32(N), i32(K), f32(alpha), f32(beta),
                   A, i32(offA), i32(strideA), B, i32(offB), i32(strideB), C, i32(offC), i32(strideC))
        return
    vec = N % 8 == 0 and all(x % 8 == 0 for x in (offB, strideB, offC, strideC))
    name = "gemm_tn" if tn else "gemm_nn"
    args = (i32(M), i32(N), i32(K), f32(alpha), f32(beta),
            A, i32(offA), i32(strideA), B, i32(offB), i32(strideB), C, i32(offC), i32(strideC))
    m_full = M - M % TM if vec else 0   # rows the vector kernel covers
    if m_full:
        g = ((N + TN - 1) // TN, m_full // TM, batch)
        dev.launch(dev.kernel("gemm.cl", name), g, _small_grid_local(g), *args)
    if m_full < M:
        dev.launch(dev.kernel("gemm.cl", name + "_edge"), ((N + TN - 1) // TN, -(-(M - m_full) // TM), batch),
                   None, *args, i32(m_full))


def _small_grid_local(g):
    """Work-group size for a grid of g work-items: PoCL (local = NULL) makes a small grid one
    work-group, i.e. one core: 101 -> 62 us for D·W1ᵀ (104x128, K 384) with one work-group
    per row of tiles. Large grids keep NULL (PoCL's choice was the fastest there)."""
    return (g[0], 1, 1) if g[0] * g[1] * g[2] < 2048 else None


def transpose(dev, x, out, R, C, batch=1):
    """out[b] (C,R) = x[b] (R,C)ᵀ for b < batch."""
    bx, ox = _buf(x)
    bo, oo = _buf(out)
    if dev.variant == "gpu":   # a 16×16 tile in local memory: coalesced reads and writes
        dev.launch(dev.kernel("gemm.cl", "transpose_wg"), (-(-C // 16) * 16, -(-R // 16) * 16, batch), (16, 16, 1),
                   i32(R), i32(C), bx, i32(ox), i32(R * C), bo, i32(oo), i32(R * C))
        return
    if R % 8 == 0 and C % 8 == 0 and ox % 8 == 0 and oo % 8 == 0:  # 8×8 register blocks
        name, gsize = "transpose8", (C // 8, R // 8, batch)
    else:
        name, gsize = "transpose", (C, R, batch)
    dev.launch(dev.kernel("gemm.cl", name), gsize, None,
               i32(R), i32(C), bx, i32(ox), i32(R * C), bo, i32(oo), i32(R * C))


def gemm(dev, a, b, c, M, N, K, alpha=1.0, beta=0.0, trans_a=False, trans_b=False, batch=1):
    """c[b] (M,N) = alpha·op(a[b])·op(b[b]) + beta·c[b].
    a: (M,K), or (K,M) if trans_a; b: (K,N), or (N,K) if trans_b (then it is
    transposed into a workspace first). Batches are contiguous."""
    bA, oA = _buf(a)
    bB, oB = _buf(b)
    bC, oC = _buf(c)
    if trans_b:
        ws = _workspace(dev, "gemm_bt", batch * K * N)
        transpose(dev, b, ws, N, K, batch)
        bB, oB = _buf(ws)
    kc = _k_chunk(K) if trans_a and batch == 1 else 0
    if trans_a and batch == 1 and not kc and _packs(dev.variant, M, N, K) and oA % 4 == 0 and oB % 8 == 0 \
            and oC % 8 == 0:
        # a medium K (weight gradients at batch·seq < K_SPLIT_MIN): A packed into 4-column panels, then
        # gemm_tn_packed over the whole K, stored as gemm_tn stores; k ascending as gemm_tn: the same
        # bits, 1.2-1.4x faster here
        pack = _workspace(dev, "gemm_apack", K * M)
        dev.launch(dev.kernel("gemm.cl", "pack_a4"), (M // 4, K // 8), None, i32(K), i32(M), bA, i32(oA), pack.data)
        dev.launch(dev.kernel("gemm.cl", "gemm_tn_packed"), (M // 4, -(-N // TN)), None,
                   i32(M), i32(N), i32(K), f32(alpha), f32(beta), pack.data, bB, i32(oB), bC, i32(oC))
        return
    if kc:  # long K (weight gradients): per-chunk partial products, then an ordered sum
        chunks = K // kc
        part = _workspace(dev, "gemm_partial", chunks * M * N)
        bP, oP = _buf(part)
        # A packed into 4-column panels, work-items m-major (kernels/gemm.cl): 1.35x on dW1 and the
        # Hebbian update here; when B's chunk is the smaller operand (N < M, e.g. dW2) the plain
        # n-major kernel keeps it in L2 and is ~10 % faster than the packed one
        if dev.variant != "gpu" and N >= M and M % 4 == 0 and N % 8 == 0 and oA % 4 == 0 and oB % 8 == 0 \
                and K % 8 == 0:
            pack = _workspace(dev, "gemm_apack", K * M)
            dev.launch(dev.kernel("gemm.cl", "pack_a4"), (M // 4, K // 8), None, i32(K), i32(M), bA, i32(oA), pack.data)
            dev.launch(dev.kernel("gemm.cl", "gemm_tn_split"), (M // 4, -(-N // TN), chunks), None,
                       i32(M), i32(N), i32(kc), i32(K), pack.data, bB, i32(oB), part.data)
        else:
            _gemm_raw(dev, True, M, N, kc, 1.0, bA, oA, kc * M, bB, oB, kc * N, 0.0, bP, oP, M * N, chunks)
        dev.launch(dev.kernel("gemm.cl", "gemm_reduce"), (M * N,), None, i32(M * N), i32(chunks),
                   f32(alpha), f32(beta), bP, bC, i32(oC))
        return
    _gemm_raw(dev, trans_a, M, N, K, alpha, bA, oA, M * K, bB, oB, K * N, beta, bC, oC, M * N, batch)


K_SPLIT_MIN = 2048  # below this K the whole product stays in cache anyway
K_PACK_MIN = 256    # from this K (and below K_SPLIT_MIN) an unsplit Aᵀ·B packs A first (gemm, _packs)


def _packs(variant: str, M: int, N: int, K: int) -> bool:
    """An unsplit Aᵀ·B takes pack_a4 + gemm_tn_packed: the CPU variant, K in
    [K_PACK_MIN, K_SPLIT_MIN), M % 4 == 0, N % 8 == 0, K % 8 == 0 (and aligned offsets)."""
    return variant != "gpu" and K_PACK_MIN <= K < K_SPLIT_MIN and M % 4 == 0 and N % 8 == 0 and K % 8 == 0


def _k_chunk(K: int) -> int:
    """Chunk length for K-split products (0 = no split): a divisor of K."""
    if K < K_SPLIT_MIN:
        return 0
    return next((kc for kc in (512, 256, 128) if K % kc == 0), 0)


# -- data -----------------------------------------------------------------------
def gather_windows(dev, ids, offsets, S, x, y):
    """x, y (B,S) int32 = ids[o:o+S], ids[o+1:o+S+1] for each window start o in offsets (B,)."""
    B = offsets.shape[0]
    dev.launch(dev.kernel("layers.cl", "gather_windows"), (S, B), None, ids.data, offsets.data, i32(S), x.data, y.data)


def bucket_sort(dev, keys, N, nb, starts, perm):
    """starts (nb+1,), perm (N,): positions grouped by key in position order."""
    if dev.variant == "gpu":
        wg = _red_wg(dev)
        dev.launch(dev.kernel("layers.cl", "bucket_sort_wg", (("BS_WG", wg),)), (wg,), (wg,),
                   keys.data, i32(N), i32(nb), starts.data, perm.data)
    else:
        dev.launch(dev.kernel("layers.cl", "bucket_sort"), (1,), None, keys.data, i32(N), i32(nb), starts.data,
                   perm.data)


# -- layers -----------------------------------------------------------------------
def embedding_forward(dev, W_emb, x, e, N, E):
    """e (N,E) = W_emb (V,E)[x (N,)]."""
    dev.launch(dev.kernel("layers.cl", "embedding_forward"), (E, N), None, W_emb.data, x.data, i32(E), e.data)


def bucket_sums(dev, X, perm, starts, out, nb, C):
    """out (nb,C) = Σ_{key_n = t} X (N,C)[n]; perm/starts from bucket_sort(keys)."""
    if dev.variant == "gpu":   # 16 member lanes per bucket: a large bucket is not one serial loop
        dev.launch(dev.kernel("layers.cl", "bucket_sums_wg"), (-(-C // 16) * 16, 16 * nb), (16, 16),
                   X.data, perm.data, starts.data, i32(C), out.data)
    elif _rows8(C, X, out):
        dev.launch(dev.kernel("layers.cl", "bucket_sums8"), (C // 8, nb), None,
                   X.data, perm.data, starts.data, i32(C), out.data)
    else:
        dev.launch(dev.kernel("layers.cl", "bucket_sums"), (C, nb), None, X.data, perm.data, starts.data, i32(C), out.data)


def embedding_backward(dev, de, perm, starts, dW, V, E):
    """dW (V,E) = Σ_{x_n = v} de[n]; perm/starts from bucket_sort(x)."""
    bucket_sums(dev, de, perm, starts, dW, V, E)


def embed_bias_gelu(dev, EW, x, bias, a, h, N, H):
    """a (N,H) = EW (V,H)[x] + bias, h = GELU(a): the first layer with EW = W_emb·W1."""
    dev.launch(dev.kernel("layers.cl", "embed_bias_gelu"), (H, N), None, EW.data, x.data, bias.data, i32(H), a.data, h.data)


def bias_gelu_forward(dev, a, bias, h, N, H):
    """a (N,H) += bias (H,) in place; h = GELU(a)."""
    dev.launch(dev.kernel("layers.cl", "bias_gelu_forward"), (H, N), None, a.data, bias.data, i32(H), h.data)


def gelu_forward8(dev, a, h, n):
    """h (n,) = GELU(a) (n % 8 == 0, float8-aligned; the CPU variant's: bias_gelu_forward at bias
    0 without writing a back)."""
    dev.launch(dev.kernel("layers.cl", "gelu_forward8"), (n // 8,), None, a.data, h.data)


def gelu_backward8(dev, dh, a, da, n):
    """da (n,) = dh · GELU'(a), eight per work-item: gelu_backward's values."""
    dev.launch(dev.kernel("layers.cl", "gelu_backward8"), (n // 8,), None, dh.data, a.data, da.data)


def gelu_backward(dev, dh, a, da, N, H):
    """da (N,H) = dh · GELU'(a)."""
    dev.launch(dev.kernel("layers.cl", "gelu_backward"), (N * H,), None, dh.data, a.data, i32(H), da.data)


def add_bias(dev, X, bias, N, C):
    """X (N,C) += bias (C,)."""
    dev.launch(dev.kernel("layers.cl", "add_bias"), (C, N), None, X.data, bias.data, i32(C))


def add_inplace(dev, x, y, n):
    """y (n,) += x (n,)."""
    dev.launch(dev.kernel("layers.cl", "add_inplace"), (n,), None, x.data, y.data)


def add_branch(dev, x, z, h, out, n):
    """out (n,) = x + (z − h)."""
    dev.launch(dev.kernel("layers.cl", "add_branch"), (n,), None, x.data, z.data, h.data, out.data)


def sub_into(dev, a, b, out, n):
    """out (n,) = a − b."""
    dev.launch(dev.kernel("layers.cl", "sub_into"), (n,), None, a.data, b.data, out.data)


def colsum(dev, X, out, N, C):
    """out (C,) = Σ_n X (N,C)[n]."""
    if dev.variant == "gpu":
        dev.launch(dev.kernel("layers.cl", "colsum_wg"), (-(-C // 16) * 16, 16), (16, 16),
                   X.data, i32(N), i32(C), out.data)
    elif _rows8(C, X, out):
        dev.launch(dev.kernel("layers.cl", "colsum8"), (C // 8,), (1,), X.data, i32(N), i32(C), out.data)
    else:
        dev.launch(dev.kernel("layers.cl", "colsum"), (C,), None, X.data, i32(N), i32(C), out.data)


def spikes_forward(dev, h, theta, s, N, H):
    """s (N,H) = 1[h > theta]."""
    dev.launch(dev.kernel("layers.cl", "spikes_forward"), (H, N), None, h.data, f32(theta), i32(H), s.data)


def row_normalize_forward(dev, h, k, inv_norm, N, H):
    """k (N,H) = h / sqrt(|h|² + 1e-6), inv_norm (N,)."""
    if dev.variant == "gpu":
        wg = _red_wg(dev)
        dev.launch(dev.kernel("layers.cl", "row_normalize_forward_wg", (("WG", wg),)), (N * wg,), (wg,),
                   h.data, i32(H), k.data, inv_norm.data)
        return
    name = "row_normalize_forward8" if _rows8(H, h, k) else "row_normalize_forward"
    dev.launch(dev.kernel("layers.cl", name), (N,), None, h.data, i32(H), k.data, inv_norm.data)


def row_normalize_backward(dev, dk, k, inv_norm, dh, N, H):
    """dh (N,H) += (dk − k·(k·dk))·inv_norm."""
    if dev.variant == "gpu":
        wg = _red_wg(dev)
        dev.launch(dev.kernel("layers.cl", "row_normalize_backward_wg", (("WG", wg),)), (N * wg,), (wg,),
                   dk.data, k.data, inv_norm.data, i32(H), dh.data)
        return
    name = "row_normalize_backward8" if _rows8(H, dk, k, dh) else "row_normalize_backward"
    dev.launch(dev.kernel("layers.cl", name), (N,), None, dk.data, k.data, inv_norm.data, i32(H), dh.data)


def causal_decay_mask(dev, G, w, Gm, B, S):
    """Gm (B,S,S) = w[t−1−τ]·G for τ < t else 0; w (S,) = η·λ^d."""
    dev.launch(dev.kernel("layers.cl", "causal_decay_mask"), (S, S, B), None, G.data, w.data, i32(S), Gm.data)


def causal_dots_decay(dev, X, Y, w, out, B, S, H, tmp):
    """out (B,S,S) = w[t−1−τ]·(X[b,t]·Y[b,τ]) for τ < t else 0; X, Y (B·S, H).
    One kernel when S % 4 == 0 and the rows are float8-aligned; otherwise X·Yᵀ into
    `tmp` (B,S,S) and causal_decay_mask, which is also the GPU variant's path (the fused kernel
    is a product with per-item serial dots: the tiled products of gemm_gpu.cl suit a GPU)."""
    if dev.variant != "gpu" and S % 4 == 0 and _rows8(H, X, Y, out):
        dev.launch(dev.kernel("layers.cl", "causal_dots_decay"), (S // 2, S // 4, B), None,
                   X.data, Y.data, w.data, i32(S), i32(H), out.data)
    else:
        gemm(dev, X, Y, tmp, S, S, H, trans_b=True, batch=B)
        causal_decay_mask(dev, tmp, w, out, B, S)


def fw_state_norm(dev, G, Q, w, out, B, S):
    """out (B,) = ‖A_{S−1}‖_F per sequence, from G = K·Kᵀ and Q = Post·Postᵀ (B,S,S)."""
    if dev.variant == "gpu":
        wg = _red_wg(dev)
        dev.launch(dev.kernel("layers.cl", "fw_state_norm_wg", (("WG", wg),)), (B * wg,), (wg,),
                   G.data, Q.data, w.data, i32(S), out.data)
        return
    dev.launch(dev.kernel("layers.cl", "fw_state_norm"), (B,), None, G.data, Q.data, w.data, i32(S), out.data)


# -- loss ---------------------------------------------------------------------------
def count_valid(dev, y, N, nv):
    if dev.variant == "gpu":
        wg = _red_wg(dev)
        dev.launch(dev.kernel("loss.cl", "count_valid_wg", (("WG", wg),)), (wg,), (wg,),
                   y.data, i32(N), nv.data)
    else:
        dev.launch(dev.kernel("loss.cl", "count_valid"), (1,), None, y.data, i32(N), nv.data)


def softmax_xent(dev, logits, y, nv, loss_rows, hits, dlogits, N, V, ld=None):
    """loss_rows, hits (N,); dlogits (N,V) = (softmax − onehot)/Nv, 0 for PAD rows.
    Rows of logits/dlogits are ld (default V) apart; columns V..ld-1 untouched."""
    ld = ld or V
    if dev.variant == "gpu":   # a work-group per row: tree max and tree sum
        wg = _red_wg(dev)
        dev.launch(dev.kernel("loss.cl", "softmax_xent_wg", (("WG", wg),)), (N * wg,), (wg,),
                   logits.data, y.data, nv.data, i32(V), i32(ld), loss_rows.data, hits.data, dlogits.data)
        return
    dev.launch(dev.kernel("loss.cl", "softmax_xent8" if _rows8(ld, logits, dlogits) else "softmax_xent"), (N,), None,
               logits.data, y.data, nv.data, i32(V), i32(ld), loss_rows.data, hits.data, dlogits.data)


def loss_reduce(dev, loss_rows, hits, nv, out, N):
    """out (4,) = [mean loss over valid targets, correct predictions, valid targets, summed loss]."""
    if dev.variant == "gpu":
        wg = _red_wg(dev)
        dev.launch(dev.kernel("loss.cl", "loss_reduce_wg", (("WG", wg),)), (wg,), (wg,),
                   loss_rows.data, hits.data, nv.data, i32(N), out.data)
    else:
        dev.launch(dev.kernel("loss.cl", "loss_reduce"), (1,), None, loss_rows.data, hits.data, nv.data,
                   i32(N), out.data)


def argmax_rows(dev, logits, pred, N, V, ld=None):
    """pred (N,) int32 = the first index of each row's maximum over columns 0..V-1 (rows ld apart):
    the prediction softmax_xent's hits count (evaluation: macro F1)."""
    ld = ld or V
    if dev.variant == "gpu":
        wg = _red_wg(dev)
        dev.launch(dev.kernel("loss.cl", "argmax_rows_wg", (("WG", wg),)), (N * wg,), (wg,),
                   logits.data, i32(V), i32(ld), pred.data)
        return
    dev.launch(dev.kernel("loss.cl", "argmax_rows"), (N,), None, logits.data, i32(V), i32(ld), pred.data)


# -- optimiser ------------------------------------------------------------------------
def sumsq_chunks(dev, g, partial, n_chunks, chunk):
    """partial (n_chunks,) = Σ g² over each chunk of `chunk` elements."""
    if dev.variant == "gpu":
        wg = _red_wg(dev)
        dev.launch(dev.kernel("optim.cl", "sumsq_chunks_wg", (("CHUNK", chunk), ("WG", wg))),
                   (n_chunks * wg,), (wg,), g.data, partial.data)
    else:
        dev.launch(dev.kernel("optim.cl", "sumsq_chunks", (("CHUNK", chunk),)), (n_chunks,), None, g.data, partial.data)


def global_norm(dev, partial, n_chunks, out):
    """out (1,) = sqrt(Σ partial)."""
    if dev.variant == "gpu":
        wg = _red_wg(dev)
        dev.launch(dev.kernel("optim.cl", "global_norm_wg", (("WG", wg),)), (wg,), (wg,),
                   partial.data, i32(n_chunks), out.data)
    else:
        dev.launch(dev.kernel("optim.cl", "global_norm"), (1,), None, partial.data, i32(n_chunks), out.data)


def adamw(dev, theta, grad, m, v, wd_mask, lr_mask, gnorm, n, lr, beta1, beta2, eps, weight_decay, bc1, bc2,
          clip_norm, clip_value, chunk):
    """One AdamW step over the flat buffers (n,), clipping with gnorm (1,); per chunk, weight decay
    where wd_mask (n/chunk,) is 1 and the rate lr·lr_mask (n/chunk,). The CPU variant takes eight
    elements per work-item (VEC8: the same bits, ~6x faster on PoCL)."""
    vec = dev.variant != "gpu" and n % 8 == 0 and chunk % 8 == 0
    dev.launch(dev.kernel("optim.cl", "adamw", (("CHUNK", chunk),) + ((("VEC8", 1),) if vec else ())),
               (n // 8 if vec else n,), None,
               theta.data, grad.data, m.data, v.data, wd_mask.data, lr_mask.data, gnorm.data,
               f32(lr), f32(beta1), f32(beta2), f32(eps), f32(weight_decay), f32(bc1), f32(bc2),
               f32(clip_norm), f32(clip_value))


def sgd_momentum(dev, theta, grad, vel, wd_mask, lr_mask, gnorm, n, lr, momentum, weight_decay, clip_norm, clip_value,
                 chunk):
    """One SGD-with-momentum step over the flat buffers (n,), clipping with gnorm (1,); the masks as
    adamw's."""
    dev.launch(dev.kernel("optim.cl", "sgd_momentum", (("CHUNK", chunk),)), (n,), None,
               theta.data, grad.data, vel.data, wd_mask.data, lr_mask.data, gnorm.data,
               f32(lr), f32(momentum), f32(weight_decay), f32(clip_norm), f32(clip_value))


def accumulate_step_stats(dev, loss_out, gnorm, clip_norm, acc):
    """acc (3,) += [mean loss of this step, 1 if norm clipping acted, 1]."""
    dev.launch(dev.kernel("optim.cl", "accumulate_step_stats"), (1,), None,
               loss_out.data, gnorm.data, f32(clip_norm), acc.data)


# -- prototypes ---------------------------------------------------------------------------
def row_inv_norm(dev, X, inv, R, C):
    """inv (R,) = 1/sqrt(|X_r|² + 1e-6) of the rows of X (R,C)."""
    if dev.variant == "gpu":
        wg = _red_wg(dev)
        dev.launch(dev.kernel("proto.cl", "row_inv_norm_wg", (("WG", wg),)), (R * wg,), (wg,),
                   X.data, i32(C), inv.data)
        return
    name = "row_inv_norm8" if _rows8(C, X) else "row_inv_norm"
    dev.launch(dev.kernel("proto.cl", name), (R,), None, X.data, i32(C), inv.data)


def proto_argmax(dev, scores, inv_v, inv_p, k, N, T, cosine):
    """k (N,) int = argmax_t of scores (N,T) (times inv_v[n]·inv_p[t] if cosine), lowest t on ties."""
    if dev.variant == "gpu":   # a tree argmax per row: exactly the CPU kernel's k from the same scores
        wg = _red_wg(dev)
        dev.launch(dev.kernel("proto.cl", "proto_argmax_wg", (("WG", wg),)), (N * wg,), (wg,),
                   scores.data, inv_v.data, inv_p.data, i32(T), i32(cosine), k.data)
        return
    dev.launch(dev.kernel("proto.cl", "proto_argmax"), (N,), None,
               scores.data, inv_v.data, inv_p.data, i32(T), i32(cosine), k.data)


def proto_feature_forward(dev, ht, P, k, beta, z, N, H):
    """z (N,H) = ht + beta·P[k]."""
    dev.launch(dev.kernel("proto.cl", "proto_feature_forward"), (H, N), None,
               ht.data, P.data, k.data, f32(beta), i32(H), z.data)


def proto_sums(dev, v, perm, starts, sums, T, H):
    """sums (T,H) = Σ_{k_n = t} v[n]; perm/starts from bucket_sort(k)."""
    bucket_sums(dev, v, perm, starts, sums, T, H)


def proto_update(dev, P, sums, starts, usage, v, lr, rho, threshold, seed, step, N, T, H):
    dev.launch(dev.kernel("proto.cl", "proto_update"), (H, T), None,
               P.data, sums.data, starts.data, usage.data, v.data, f32(lr), f32(rho), f32(threshold),
               u32(seed & 0xFFFFFFFF), u32(step & 0xFFFFFFFF), i32(N), i32(T), i32(H))


def proto_usage_update(dev, usage, starts, rho, threshold, N, T):
    dev.launch(dev.kernel("proto.cl", "proto_usage_update"), (T,), None,
               usage.data, starts.data, f32(rho), f32(threshold), i32(N), i32(T))


def proto_qerr_rows(dev, v, P, k, q, N, H):
    """q (N,) = |v_n − P_{k_n}|²."""
    if dev.variant == "gpu":
        wg = _red_wg(dev)
        dev.launch(dev.kernel("proto.cl", "proto_qerr_rows_wg", (("WG", wg),)), (N * wg,), (wg,),
                   v.data, P.data, k.data, i32(H), q.data)
        return
    dev.launch(dev.kernel("proto.cl", "proto_qerr_rows"), (N,), None, v.data, P.data, k.data, i32(H), q.data)


# -- LayerNorm (kernels/norm.cl) -----------------------------------------------------------------
LN_WG = 64   # work-group of the GPU variant: one group per row


def layernorm_forward(dev, x, gamma, beta, y, mean, rstd, N, C, eps=1e-5, vec=False):
    """y (N,C) = LayerNorm(x) with γ, β (C,); mean and rstd (N,) kept for the backward pass.
    vec: on the CPU variant with C % 8 == 0, the float8 row kernel (other last bits than the serial
    one: the transformer's blocks ask for it, the hybrid keeps its recorded bits)."""
    if dev.variant == "gpu":
        dev.launch(dev.kernel("norm.cl", "layernorm_forward_wg", (("WG", LN_WG),)), (N * LN_WG,), (LN_WG,),
                   x.data, gamma.data, beta.data, i32(C), f32(eps), y.data, mean.data, rstd.data)
    elif vec and _rows8(C, x, y, gamma, beta):
        dev.launch(dev.kernel("norm.cl", "layernorm_forward_rows8"), (N,), None,
                   x.data, gamma.data, beta.data, i32(C), f32(eps), y.data, mean.data, rstd.data)
    else:
        dev.launch(dev.kernel("norm.cl", "layernorm_forward_rows"), (N,), None,
                   x.data, gamma.data, beta.data, i32(C), f32(eps), y.data, mean.data, rstd.data)


def layernorm_backward(dev, dy, x, gamma, mean, rstd, dx, dgamma, dbeta, N, C, vec=False, dres=None):
    """dx (N,C), dγ and dβ (C,) of LayerNorm from dy (N,C) and the forward's mean and rstd.
    dres (N,C): a residual's gradient added into dx (a pre-LayerNorm block's dx = dres + ∂LN).
    vec: as layernorm_forward (the float8 row kernel, dres added in it)."""
    if dev.variant != "gpu" and vec and _rows8(C, dy, x, dx, gamma, *([dres] if dres is not None else [])):
        dev.launch(dev.kernel("norm.cl", "layernorm_backward_rows8", (("ADD", int(dres is not None)),)), (N,), None,
                   dy.data, x.data, gamma.data, mean.data, rstd.data, i32(C),
                   (dres if dres is not None else dy).data, dx.data)
        dres = None
    elif dev.variant == "gpu":
        dev.launch(dev.kernel("norm.cl", "layernorm_backward_wg", (("WG", LN_WG),)), (N * LN_WG,), (LN_WG,),
                   dy.data, x.data, gamma.data, mean.data, rstd.data, i32(C), dx.data)
    else:
        dev.launch(dev.kernel("norm.cl", "layernorm_backward_rows"), (N,), None,
                   dy.data, x.data, gamma.data, mean.data, rstd.data, i32(C), dx.data)
    if dres is not None:
        add_inplace(dev, dres, dx, N * C)
    if dev.variant == "gpu":   # column sums over N: 16 row lanes per column, a fixed tree
        dev.launch(dev.kernel("norm.cl", "layernorm_param_grads_wg", (("WG", LN_WG),)), (-(-C // 16) * 16, 16),
                   (16, 16), dy.data, x.data, mean.data, rstd.data, i32(N), i32(C), dgamma.data, dbeta.data)
        return
    if vec and _rows8(C, dy, x, dgamma, dbeta):   # eight columns per item, the same sums and order: same bits
        dev.launch(dev.kernel("norm.cl", "layernorm_param_grads8"), (C // 8,), (1,),
                   dy.data, x.data, mean.data, rstd.data, i32(N), i32(C), dgamma.data, dbeta.data)
        return
    dev.launch(dev.kernel("norm.cl", "layernorm_param_grads"), (C,), None,
               dy.data, x.data, mean.data, rstd.data, i32(N), i32(C), dgamma.data, dbeta.data)


def batchnorm_forward(dev, x, gamma, beta, y, mean, rstd, run_mean, run_var, N, C, eps=1e-5, momentum=0.1,
                      training=True):
    """y (N,C) = BatchNorm(x) per column. Training: batch statistics (kept in mean, rstd for the
    backward) and the running ones updated with `momentum` (0: not updated); evaluation: the
    running statistics."""
    if training:
        if dev.variant == "gpu":
            dev.launch(dev.kernel("norm.cl", "batchnorm_stats_wg", (("WG", LN_WG),)), (C * LN_WG,), (LN_WG,),
                       x.data, i32(N), i32(C), f32(eps), f32(momentum), mean.data, rstd.data,
                       run_mean.data, run_var.data)
        else:
            dev.launch(dev.kernel("norm.cl", "batchnorm_stats_cols"), (C,), None, x.data, i32(N), i32(C),
                       f32(eps), f32(momentum), mean.data, rstd.data, run_mean.data, run_var.data)
    else:
        dev.launch(dev.kernel("norm.cl", "batchnorm_eval_stats"), (C,), None, run_mean.data, run_var.data,
                   f32(eps), mean.data, rstd.data)
    dev.launch(dev.kernel("norm.cl", "batchnorm_apply"), (C, N), None, x.data, mean.data, rstd.data,
               gamma.data, beta.data, y.data)


def batchnorm_backward(dev, dy, x, gamma, mean, rstd, dx, dgamma, dbeta, N, C):
    """dx (N,C), dγ and dβ (C,) of training-mode BatchNorm (batch statistics in mean, rstd)."""
    name, g, loc, defs = (("batchnorm_backward_wg", (C * LN_WG,), (LN_WG,), (("WG", LN_WG),))
                          if dev.variant == "gpu" else ("batchnorm_backward_cols", (C,), None, ()))
    dev.launch(dev.kernel("norm.cl", name, defs), g, loc, dy.data, x.data, gamma.data, mean.data, rstd.data,
               i32(N), i32(C), dx.data, dgamma.data, dbeta.data)


# -- dropout (kernels/dropout.cl) ---------------------------------------------------------------------
def dropout_key(seed: int, layer: int) -> int:
    """The per-layer stream of dropout masks (engine.reference.dropout_key)."""
    from .reference import dropout_key as key
    return key(seed, layer)


def dropout(dev, x, y, n, p, key, step, base=0):
    """y (n,) = x masked by keep = hash(key, step, i) ≥ ⌊p·2³²⌋, kept values scaled by 1/(1−p).
    The backward pass is the same call on the gradients (same key and step: the same mask).
    base: the global index of x[0] (a data-parallel replica's slice draws the global batch's mask)."""
    from .reference import dropout_threshold
    dev.launch(dev.kernel("dropout.cl", "dropout"), (n,), None, x.data, y.data, u32(key), u32(step),
               u32(dropout_threshold(p)), f32(1.0 / (1.0 - p)), u32(base))


# -- delta rule of the fast-weight memory (kernels/delta.cl) --------------------------------------------
DELTA_WG = 64   # work-group of the GPU variant: WG columns of one sequence
DELTA_NB = (4, 2, 1)   # float8 column blocks per work-item of the CPU variant, the first that divides H/8


def delta_scratch(B: int, S: int, H: int, variant: str = "cpu") -> dict[str, tuple[tuple, type]]:
    """{name: (shape, dtype)} of the scratch of fast_weights_delta_forward / _backward, the same for
    both variants: gm, the forward's masked decayed Gram matrix, and u = post − m, both read by the
    backward; dgm, the backward's P = decay(V·Uᵀ). 2·B·S² + N·H floats (8 MiB at B=64, S=64,
    H=384; one H×H matrix per sequence would be B·H² floats, 36 MiB). Not listed: when S % 4 or
    H % 8 is not 0 the Gram products go through gemm(trans_b), whose ops workspace "gemm_bt" holds
    B·S·H floats (model.gemm_scratch's (S, S, H, B) entry)."""
    if variant not in ("cpu", "gpu"):
        raise ValueError(f"unknown kernel variant {variant!r}: cpu or gpu")
    f = np.float32
    return {"gm": ((B, S, S), f), "dgm": ((B, S, S), f), "u": ((B * S, H), f)}


def _delta_decay(dev, eta, lam, S):
    """w (S,) = η·λ^d on the device, computed in float64 as Model.decay_table (the same bits);
    uploaded once per (η, λ, S) and kept (a few recent tables)."""
    tables = dev.__dict__.setdefault("_delta_decay", {})
    key = (float(eta), float(lam), int(S))
    w = tables.get(key)
    if w is None:
        if len(tables) >= 8:
            tables.clear()
        w = tables[key] = dev.to_device((key[0] * key[1] ** np.arange(S, dtype=np.float64)).astype(f32))
    return w


def _delta_solve(dev, name, gm, rhs, outs, S, H, B):
    if dev.variant == "gpu":
        dev.launch(dev.kernel("delta.cl", name + "_wg", (("WG", DELTA_WG),)), (-(-H // DELTA_WG) * DELTA_WG, B),
                   (DELTA_WG, 1), gm.data, rhs.data, i32(S), i32(H), *(o.data for o in outs))
    elif _rows8(H, rhs, *outs):
        nb = next(n for n in DELTA_NB if H // 8 % n == 0)
        # work-groups of one item: PoCL's choice for this grid (NULL) ran ~2x slower here
        dev.launch(dev.kernel("delta.cl", name + "8", (("NB", nb),)), (H // 8 // nb, B), (1, 1),
                   gm.data, rhs.data, i32(S), i32(H), *(o.data for o in outs))
    else:
        dev.launch(dev.kernel("delta.cl", name), (H, B), None, gm.data, rhs.data, i32(S), i32(H),
                   *(o.data for o in outs))


def fast_weights_delta_forward(dev, k, post, eta, lam, m, B, S, H, scratch):
    """m (N,H) = A_{t−1}·k_t of the delta rule A_t = λ·A_{t−1} + η·(post_t − A_{t−1}k_t)·k_tᵀ,
    A_{−1} = 0, per sequence of S rows; k, post (N,H), N = B·S; m overwritten. As a triangular
    solve with Gm = decay(K·Kᵀ) (kernels/delta.cl). scratch: buffers of delta_scratch(B, S, H);
    leaves Gm in scratch["gm"] and u = post − m in scratch["u"] for the backward."""
    w, gm = _delta_decay(dev, eta, lam, S), scratch["gm"]
    causal_dots_decay(dev, k, k, w, gm, B, S, H, tmp=gm)   # the mask is element-wise: in place is safe
    _delta_solve(dev, "fast_weights_delta_forward", gm, post, (m, scratch["u"]), S, H, B)


def fast_weights_delta_backward(dev, dm, k, eta, lam, dk, B, S, H, scratch):
    """dk (N,H) = ∂(Σ dm·m)/∂k of fast_weights_delta_forward (post constant), overwritten; dm (N,H).
    Reads the forward's scratch["gm"] and scratch["u"] (call it after the forward on the same k and
    post; post itself is not needed again), leaves them intact (a second call gives the same dk).
    v = (I + Gm)⁻ᵀ·dm is solved into dk, then dk = P·K + Pᵀ·K with P = decay(V·Uᵀ)."""
    w, dgm = _delta_decay(dev, eta, lam, S), scratch["dgm"]
    _delta_solve(dev, "fast_weights_delta_backward", scratch["gm"], dm, (dk,), S, H, B)
    causal_dots_decay(dev, dk, scratch["u"], w, dgm, B, S, H, tmp=dgm)
    gemm(dev, dgm, k, dk, S, H, S, batch=B)
    gemm(dev, dgm, k, dk, S, H, S, beta=1.0, trans_a=True, batch=B)


# -- causal self-attention and the transformer's embedding (kernels/attention.cl) ------------------------
def tok_pos_embed_forward(dev, wte, tok, wpe, x, N, S, C):
    """x (N,C) = wte (V,C)[tok (N,)] + wpe (≥S,C)[n mod S]: token plus position within its window."""
    dev.launch(dev.kernel("attention.cl", "tok_pos_embed_forward"), (C, N), None,
               wte.data, tok.data, wpe.data, i32(S), i32(C), x.data)


def heads_split(dev, x, out, N, S, n_head, d, parts=1):
    """out (parts, B·n_head, S, d) from x (N, parts·C), C = n_head·d, N = B·S: part p, head h of
    row b·S + t is out[p, b·n_head + h, t] = x[b·S + t, p·C + h·d : p·C + (h+1)·d]."""
    _heads(dev, "heads_split", x, out, N, S, n_head, d, parts)


def _heads(dev, name, x, out, N, S, n_head, d, parts):
    if d % 8 == 0 and dev.variant != "gpu":   # a float8 per work-item; on GPUs a float per item coalesces
        dev.launch(dev.kernel("attention.cl", name + "8"), (parts * n_head * d // 8, N), None,
                   x.data, i32(S), i32(n_head), i32(d), out.data)
        return
    dev.launch(dev.kernel("attention.cl", name), (parts * n_head * d, N), None,
               x.data, i32(S), i32(n_head), i32(d), out.data)


def heads_merge(dev, x, out, N, S, n_head, d, parts=1):
    """The inverse of heads_split: out (N, parts·C) from x (parts, B·n_head, S, d)."""
    _heads(dev, "heads_merge", x, out, N, S, n_head, d, parts)


def causal_softmax(dev, s, p, R, S, scale):
    """p (R,S) = softmax over τ ≤ t of scale·s (R,S) per row, t = row mod S; 0 for τ > t."""
    if dev.variant == "gpu":
        wg = _red_wg(dev)
        dev.launch(dev.kernel("attention.cl", "causal_softmax_wg", (("WG", wg),)), (R * wg,), (wg,),
                   s.data, i32(S), f32(scale), p.data)
        return
    dev.launch(dev.kernel("attention.cl", "causal_softmax"), (R,), None, s.data, i32(S), f32(scale), p.data)


def causal_softmax_backward(dev, p, dp, ds, R, S, scale):
    """ds (R,S) = scale·p ⊙ (dp − Σ_τ p·dp) per row: the gradient of the scores of causal_softmax
    from that of its probabilities dp (R,S). ds may be dp (in place)."""
    if dev.variant == "gpu":
        wg = _red_wg(dev)
        dev.launch(dev.kernel("attention.cl", "causal_softmax_backward_wg", (("WG", wg),)), (R * wg,), (wg,),
                   p.data, dp.data, i32(S), f32(scale), ds.data)
        return
    dev.launch(dev.kernel("attention.cl", "causal_softmax_backward"), (R,), None,
               p.data, dp.data, i32(S), f32(scale), ds.data)


def attention_forward(dev, qkv, p, y, B, S, n_head, d, scale):
    """Fused causal attention of every head (CPU variant, d % 8 == 0): from qkv (N, 3C) (q | k | v,
    head h at columns h·d of each), p (B·n_head, S, S) = causal_softmax(scale·q·kᵀ) and y (N, C)
    = p·v with head h at columns h·d. No split, transpose or merge: one launch."""
    dev.launch(dev.kernel("attention.cl", "attention_forward8", (("D8", d // 8),)), (S, B * n_head), None,
               qkv.data, i32(S), i32(n_head), f32(scale), p.data, y.data)


def attention_backward(dev, qkv, p, dy, ds, dqkv, B, S, n_head, d, scale):
    """The backward of attention_forward: dqkv (N, 3C) = [dq | dk | dv] from dy (N, C) and the
    forward's qkv and p; ds (B·n_head, S, S) is scratch (the scores' gradient)."""
    defines = (("D8", d // 8),)
    dev.launch(dev.kernel("attention.cl", "attention_backward_rows8", defines), (S, B * n_head), None,
               qkv.data, p.data, dy.data, i32(S), i32(n_head), f32(scale), ds.data, dqkv.data)
    dev.launch(dev.kernel("attention.cl", "attention_backward_cols8", defines), (S, B * n_head), None,
               qkv.data, p.data, ds.data, dy.data, i32(S), i32(n_head), dqkv.data)


# -- the slot memory read (kernels/memory.cl) -------------------------------------------------------
def memory_softmax(dev, a, slot, N, Ms):
    """In place: a (N,Ms) holds the scores q·Kᵀ and becomes their softmax over the slots (max
    subtracted); slot (N,) int = argmax_s of the scores, the first maximum (lowest s on ties)."""
    if dev.variant == "gpu":
        wg = _red_wg(dev)
        dev.launch(dev.kernel("memory.cl", "memory_softmax_wg", (("WG", wg),)), (N * wg,), (wg,),
                   a.data, i32(Ms), slot.data)
        return
    name = "memory_softmax8" if _rows8(Ms, a) else "memory_softmax"   # float8 chunks: 3.2 -> 1.0 ms at 1600×512
    dev.launch(dev.kernel("memory.cl", name), (N,), None, a.data, i32(Ms), slot.data)


def memory_softmax_backward(dev, a, da, N, Ms):
    """In place: da (N,Ms), the gradient of the probabilities a, becomes that of the scores,
    a ⊙ (da − Σ_s a·da) per row."""
    if dev.variant == "gpu":
        wg = _red_wg(dev)
        dev.launch(dev.kernel("memory.cl", "memory_softmax_backward_wg", (("WG", wg),)), (N * wg,), (wg,),
                   a.data, da.data, i32(Ms))
        return
    name = "memory_softmax_backward8" if _rows8(Ms, a, da) else "memory_softmax_backward"
    dev.launch(dev.kernel("memory.cl", name), (N,), None, a.data, da.data, i32(Ms))


def memory_write(dev, mem, sums, starts, shared, N, w, delta2, Ms, M):
    """The memory's local write, in place on mem (Ms,M): per slot s with count c (N when shared,
    else starts[s+1] − starts[s]) and target t = normalise(sums[0 if shared else s] / c),
    mem[s] ← normalise((1−w)·mem[s] + w·t); slots with c = 0 untouched. delta2 (Ms,) = |Δmem[s]|².
    sums: (1,M) when shared (the sum over every row), else (Ms,M) (bucket_sums per slot)."""
    args = (mem.data, sums.data, starts.data, i32(int(shared)), i32(N), f32(w), i32(M), delta2.data)
    if dev.variant == "gpu":
        wg = _red_wg(dev)
        dev.launch(dev.kernel("memory.cl", "memory_write_wg", (("WG", wg),)), (Ms * wg,), (wg,), *args)
        return
    dev.launch(dev.kernel("memory.cl", "memory_write"), (Ms,), None, *args)


def memory_usage_update(dev, usage, starts, Ms):
    """usage (Ms,) int32 += the slot counts starts[s+1] − starts[s] (bucket_sort of the arg-max slots)."""
    dev.launch(dev.kernel("memory.cl", "memory_usage_update"), (Ms,), None, usage.data, starts.data)


# -- GRU (kernels/gru.cl) --------------------------------------------------------------------------------
def gru_gates_forward(dev, gx, gh, b_i, b_h, hs, gates, y, t, B, S, Hd):
    """Step t of a GRU layer (PyTorch nn.GRU's gates [r | z | n]): from gx (N,3Hd) rows b·S+t
    (x·W_i), gh (B,3Hd) (h_{t−1}·W_h), the biases b_i, b_h (3Hd,) and h_{t−1} = hs rows t·B..;
    writes h_t to hs ((S+1)·B, Hd) rows (t+1)·B.. and to y (N,Hd) rows b·S+t, and
    [r | z | n | hn] to gates (S·B, 4Hd) rows t·B.. (hn = gh_n + b_hn). The CPU variant takes eight
    units per work-item (gru_gates_forward8) when Hd % 8 == 0: the same values."""
    vec = dev.variant != "gpu" and _rows8(Hd, gx, gh, b_i, b_h, hs, gates, y)   # float8 items: 4-5x on PoCL
    dev.launch(dev.kernel("gru.cl", "gru_gates_forward8" if vec else "gru_gates_forward"), (Hd // 8 if vec else Hd, B),
               None, gx.data, gh.data, b_i.data, b_h.data, i32(t), i32(S), i32(Hd), hs.data, gates.data, y.data)


def gru_gates_backward(dev, dy, gates, hs, carry, dgx, dgh, t, B, S, Hd):
    """The backward of gru_gates_forward at step t: dh = dy (N,Hd) row b·S+t + carry (B,Hd) (∂L/∂h_t
    through the later steps; not read at t = S−1); writes dgx (N,3Hd) rows b·S+t = ∂ of x·W_i + b_i,
    dgh (S·B,3Hd) rows t·B.. = ∂ of h_{t−1}·W_h + b_h, and carry = dh·z (ops.gemm adds dgh_t·W_hᵀ:
    ∂L/∂h_{t−1})."""
    vec = dev.variant != "gpu" and _rows8(Hd, dy, gates, hs, carry, dgx, dgh)
    dev.launch(dev.kernel("gru.cl", "gru_gates_backward8" if vec else "gru_gates_backward"),
               (Hd // 8 if vec else Hd, B), None, dy.data, gates.data, hs.data, i32(t), i32(S), i32(Hd),
               carry.data, dgx.data, dgh.data)


# -- the lattice layer (kernels/lattice.cl) --------------------------------------------------------------
# One work-item per output element with fixed-order loops: the same kernels on both variants. States
# are (N·Q, C) views into one (K+1)-state buffer: the kernels take (buffer, element offset) for them.
# The per-cell kernels name their group (one cell's C, W·C or Hc items): with rows = 37³ PoCL's own
# choice for local = NULL made bias_tanh 4x slower per element than at rows = 2¹⁴.
def _cell_group(*dims):
    return (*dims, 1) if math.prod(dims) <= 256 else None



def lattice_write(dev, x, a, b, s, N, n2, Q, C):
    """s (N·Q, C) = the front face x (N,n²)·a + b (cells i < n²), 0 elsewhere."""
    bs, os_ = _buf(s)
    assert os_ == 0
    dev.launch(dev.kernel("lattice.cl", "lattice_write"), (C, Q, N), None, x.data, a.data, b.data, i32(n2), i32(Q),
               i32(C), bs)


def lattice_read(dev, s, rv, y, off, N, n2, Q, C):
    """y (N,n²) = Σ_c s[r, off+i, c]·rv_c (s a (N·Q, C) view)."""
    bs, os_ = _buf(s)
    dev.launch(dev.kernel("lattice.cl", "lattice_read"), (n2, N), None, bs, i32(os_), rv.data, i32(off), i32(Q), i32(C),
               y.data)


def lattice_read_backward(dev, dy, rv, ds, off, N, n2, Q, C):
    """ds (N·Q, C) = dy[r, i−off]·rv_c on the read face (cells off..off+n²−1), 0 elsewhere."""
    dev.launch(dev.kernel("lattice.cl", "lattice_read_backward"), (C, Q, N), None, dy.data, rv.data, i32(off), i32(n2),
               i32(Q), i32(C), ds.data)


def lattice_face_dot(dev, u, v, out, off, N, n2, Q, C):
    """out (C,) = Σ_{r,i} u[r,i]·v[r, off+i, c], or Σ_{r,i} v[r, off+i, c] with u None."""
    bv, ov = _buf(v)
    dev.launch(dev.kernel("lattice.cl", "lattice_face_dot"), (C,), None, (v if u is None else u).base_data,
               i32(u is not None), bv, i32(ov), i32(off), i32(n2), i32(Q), i32(C), i32(N), out.data)


def lattice_gather(dev, s, table, P, W, rows, Q, C):
    """P (rows, W·C): the perception of every cell, s[r·Q + table[i,k]] (0 for −1) in slot k."""
    bs, os_ = _buf(s)
    dev.launch(dev.kernel("lattice.cl", "lattice_gather"), (C, W, rows), _cell_group(C, W), bs, i32(os_), table.data, i32(W),
               i32(Q), i32(C), P.data)


def lattice_gather_backward(dev, dP, ptr, idx, ds, W, rows, Q, C):
    """ds (rows, C) += the adjoint of lattice_gather applied to dP (rows, W·C), through the reverse
    table (ptr, idx) (engine.reference.lattice.reverse_table): fixed order, no atomics."""
    dev.launch(dev.kernel("lattice.cl", "lattice_gather_backward"), (C, rows), _cell_group(C), dP.data, ptr.data, idx.data,
               i32(W), i32(Q), i32(C), ds.data)


def lattice_bias_tanh(dev, h, b, rows, Hc):
    """h (rows, Hc) = tanh(h + b) in place."""
    dev.launch(dev.kernel("lattice.cl", "lattice_bias_tanh"), (Hc, rows), _cell_group(Hc), h.data, b.data, i32(Hc))


def lattice_tanh_backward(dev, dh, h, n):
    """dh (n,) *= 1 − h² in place."""
    dev.launch(dev.kernel("lattice.cl", "lattice_tanh_backward"), (n,), None, dh.data, h.data)


COLSUM_CHUNK = 1024   # rows a work-item sums in lattice_colsum_part


def colsum_parts(rows: int) -> int:
    """Partial sums lattice_colsum takes for `rows` rows (0: one stage, a loop per column)."""
    return -(-rows // COLSUM_CHUNK) if rows > 4 * COLSUM_CHUNK else 0


def lattice_colsum(dev, X, out, rows, U, beta=0.0, part=None):
    """out (U,) = beta·out + Σ_j X (rows, U)[j]. Up to 4·COLSUM_CHUNK rows: one loop per column (j
    ascending); beyond, chunks of COLSUM_CHUNK rows summed in parallel into part (colsum_parts(rows)·U
    floats), then the chunks in order (a fixed order either way: deterministic, no atomics)."""
    P = colsum_parts(rows)
    if P:
        dev.launch(dev.kernel("lattice.cl", "lattice_colsum_part"), (U, P), None, X.data, i32(rows), i32(U),
                   i32(COLSUM_CHUNK), part.data)
    else:   # the reduce stage over the rows themselves: one loop per column
        part, P = X, rows
    dev.launch(dev.kernel("lattice.cl", "lattice_colsum_reduce"), (U,), None, part.data, i32(P), i32(U), f32(beta),
               out.data)


def lattice_gate_softmax(dev, g, bg, rows, E):
    """g (rows, E) = softmax(g + bg) per row, in place."""
    dev.launch(dev.kernel("lattice.cl", "lattice_gate_softmax"), (rows,), None, g.data, bg.data, i32(E))


def lattice_gate_mix(dev, s, g, dl, e, rows, E, C):
    """s (rows, C) += g[:, e]·dl (s a view)."""
    bs, os_ = _buf(s)
    dev.launch(dev.kernel("lattice.cl", "lattice_gate_mix"), (C, rows), None, bs, i32(os_), g.data, dl.data, i32(e),
               i32(E), i32(C))


def lattice_gate_split(dev, ds, g, dl, e, dd, dg, rows, E, C):
    """dd (rows, C) = g[:, e]·ds; dg[:, e] = Σ_c ds·dl (the gate weight's gradient)."""
    dev.launch(dev.kernel("lattice.cl", "lattice_gate_split"), (rows,), None, ds.data, g.data, dl.data, i32(e), i32(E),
               i32(C), dd.data, dg.data)


def lattice_gate_softmax_backward(dev, g, dg, rows, E):
    """dg (rows, E) = g ⊙ (dg − Σ_e g·dg) in place: the gradient of the gate's logits."""
    dev.launch(dev.kernel("lattice.cl", "lattice_gate_softmax_backward"), (rows,), None, g.data, dg.data, i32(E))


# -- the embedding-regression head (kernels/embed_head.cl, engine/layers/embed_head.py) ------------
def embed_head_rows(dev, z, y, D, w_mse, w_cos, inv_n, rows_mse, rows_cos, loss_rows, zz, dz, N):
    """Per row of z, y (N,D): rows_mse, rows_cos, loss_rows = w_mse·mse + w_cos·(1 − cos), zz = |z_n|²
    (N,), and dz (N,D) = inv_n·∂loss_n/∂z_n."""
    args = (z.data, y.data, i32(D), f32(w_mse), f32(w_cos), f32(inv_n), rows_mse.data, rows_cos.data,
            loss_rows.data, zz.data, dz.data)
    if dev.variant == "gpu":
        wg = _red_wg(dev)
        dev.launch(dev.kernel("embed_head.cl", "embed_head_rows_wg", (("WG", wg),)), (N * wg,), (wg,), *args)
    else:
        dev.launch(dev.kernel("embed_head.cl", "embed_head_rows"), (N,), None, *args)


def embed_head_div(dev, G, zz, N, Wd, div_rows, q):
    """From G = z·zᵀ (N,N) and zz (N,): Wd (N,N) = c_nm/den_nm off the diagonal, div_rows (N,) = Σ_{m≠n}
    c_nm², q (N,) = the |z_n|-dependent part of ∂Div/∂z_n's coefficient (kernels/embed_head.cl)."""
    args = (G.data, zz.data, i32(N), Wd.data, div_rows.data, q.data)
    if dev.variant == "gpu":
        wg = _red_wg(dev)
        dev.launch(dev.kernel("embed_head.cl", "embed_head_div_wg", (("WG", wg),)), (N * wg,), (wg,), *args)
    else:
        dev.launch(dev.kernel("embed_head.cl", "embed_head_div"), (N,), None, *args)


def embed_head_div_grad(dev, dzd, q, z, D, k, dz, N):
    """dz (N,D) += k·(dzd − q_n·z_n)."""
    dev.launch(dev.kernel("embed_head.cl", "embed_head_div_grad"), (D, N), None,
               dzd.data, q.data, z.data, i32(D), f32(k), dz.data)


def embed_head_reduce(dev, loss_rows, rows_cos, div_rows, N, use_div, w_div, inv_pairs, out):
    """out (4,) = [mean loss (+ w_div·Div), Σ rows_cos, N, N·mean]."""
    args = (loss_rows.data, rows_cos.data, div_rows.data, i32(N), i32(use_div), f32(w_div), f32(inv_pairs),
            out.data)
    if dev.variant == "gpu":
        wg = _red_wg(dev)
        dev.launch(dev.kernel("embed_head.cl", "embed_head_reduce_wg", (("WG", wg),)), (wg,), (wg,), *args)
    else:
        dev.launch(dev.kernel("embed_head.cl", "embed_head_reduce"), (1,), None, *args)
