"""Every kernel wrapper of engine/ops.py against its numpy reference (engine/reference.py).

    python -m pytest tests/test_kernels.py -q

Inputs are random float32; references are computed in float64 from the same
float32 values, so each tolerance only has to cover the kernel's own float32
rounding (stated beside each assertion). Data movement and integer kernels
must match exactly.
Key: B batch, S sequence, N = B*S, E embedding, H hidden, V vocabulary, T prototypes.
"""
import itertools

import numpy as np
import pytest

from engine import ops
from engine import reference as ref

pytestmark = pytest.mark.opencl

f32, f64, i32 = np.float32, np.float64, np.int32
EPS32 = float(np.finfo(f32).eps)


def rand(rng, *shape, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(f32)


def as64(a):
    return np.asarray(a, dtype=f64)


# ----------------------------------------------------------------------------- gemm / transpose

GEMM_SHAPES = [  # (M, N, K, batch)
    (37, 29, 13, 1),    # odd sizes: scalar path with edge tiles in M and N
    (37, 29, 13, 3),    # batched, odd
    (16, 24, 8, 1),     # N % 8 == 0 and full tiles: float8 path
    (20, 16, 32, 2),    # float8 path with an M edge tile, batched
]


def _gemm_case(dev, rng, M, N, K, batch, ta, tb, alpha, beta, c0, offset):
    """Run ops.gemm with C placed `offset` elements into a guarded buffer; return (C, guard, ref)."""
    A = rand(rng, batch, *((K, M) if ta else (M, K)))
    Bm = rand(rng, batch, *((N, K) if tb else (K, N)))
    size = batch * M * N
    big = np.full(offset + size + 11, 12345.0, f32)         # sentinels around C catch stray stores
    big[offset:offset + size] = c0.ravel()
    big_d = dev.to_device(big)
    ops.gemm(dev, dev.to_device(A), dev.to_device(Bm), big_d[offset:offset + size], M, N, K,
             alpha=alpha, beta=beta, trans_a=ta, trans_b=tb, batch=batch)
    out = big_d.get()
    opA = as64(A).transpose(0, 2, 1) if ta else as64(A)
    opB = as64(Bm).transpose(0, 2, 1) if tb else as64(Bm)
    want = alpha * (opA @ opB)
    if beta != 0:
        want = want + beta * as64(c0).reshape(batch, M, N)
    guard = np.concatenate([out[:offset], out[offset + size:]])
    return out[offset:offset + size].reshape(batch, M, N), guard, want


@pytest.mark.parametrize("ta,tb", list(itertools.product([False, True], repeat=2)))
@pytest.mark.parametrize("M,N,K,batch", GEMM_SHAPES)
def test_gemm_matches_numpy(dev, M, N, K, batch, ta, tb):
    rng = np.random.default_rng([M, N, K, batch, ta, tb])
    for alpha, beta in [(1.0, 0.0), (1.0, 1.0), (0.7, -1.3)]:
        c0 = rand(rng, batch, M, N)
        offset = 8 if N % 8 == 0 else 3                      # keep the float8 path aligned
        got, guard, want = _gemm_case(dev, rng, M, N, K, batch, ta, tb, alpha, beta, c0, offset)
        # float32 products summed in k order over K <= 32 terms of N(0,1) size: the error is
        # below K·2⁻²⁴·Σ|a||b| ≈ 1e-4 in the worst case, ~1e-6 typically; a wrong index is O(1)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4, err_msg=f"alpha={alpha} beta={beta}")
        np.testing.assert_array_equal(guard, 12345.0)        # no store outside C (edge tiles masked)


@pytest.mark.parametrize("M,N,K,batch", GEMM_SHAPES + [(5, 3, 100, 1)])
def test_gemm_gpu_variant_matches_numpy(gpu_dev, M, N, K, batch):
    """kernels/gemm_gpu.cl (local-memory tiles, chosen on GPUs) on this device."""
    rng = np.random.default_rng([M, N, K, 99])
    for ta, tb in itertools.product([False, True], repeat=2):
        for alpha, beta in [(1.0, 0.0), (0.7, -1.3)]:
            c0 = rand(rng, batch, M, N) if beta else np.full((batch, M, N), np.nan, f32)
            got, guard, want = _gemm_case(gpu_dev, rng, M, N, K, batch, ta, tb, alpha, beta, c0, 8)
            # same k-ascending float32 sums as the CPU kernels; K <= 100 terms: as above
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4, err_msg=f"ta={ta} tb={tb}")
            np.testing.assert_array_equal(guard, 12345.0)


@pytest.mark.parametrize("M,N,K,batch", GEMM_SHAPES)
def test_gemm_beta_zero_never_reads_c(dev, M, N, K, batch):
    rng = np.random.default_rng([7, M, N])
    for ta, tb in itertools.product([False, True], repeat=2):
        c0 = np.full((batch, M, N), np.nan, f32)
        got, _, want = _gemm_case(dev, rng, M, N, K, batch, ta, tb, 0.5, 0.0, c0, 8)
        assert np.isfinite(got).all(), "beta = 0 read the NaNs in C"
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)   # as above


# (16,24): packed A panels (N >= M; N % 16 = 8 takes the 8-column tail); (8,32): packed, whole tiles;
# (24,16): plain gemm_tn chunks (N < M); (13,10): the scalar edge kernel's chunks
@pytest.mark.parametrize("M,N,K", [(16, 24, 4096), (8, 32, 2048), (24, 16, 4096), (13, 10, 2048 + 256)])
def test_gemm_long_k_split_matches_numpy_and_is_deterministic(dev, M, N, K):
    """Aᵀ·B with a long K goes through per-chunk partials and gemm_reduce."""
    assert ops._k_chunk(K) > 0   # this shape takes the split path
    rng = np.random.default_rng([K, M])
    for alpha, beta in [(1.0, 0.0), (0.5, 2.0)]:
        c0 = rand(rng, 1, M, N)
        got, guard, want = _gemm_case(dev, rng, M, N, K, 1, True, False, alpha, beta, c0, 8)
        # K = 4096 float32 products of N(0,1): sums of size ~64, float32 error ≲ K·2⁻²⁴·64 ≈ 2e-2 worst,
        # ~1e-4 typical; a missing or doubled chunk is O(10)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-3)
        np.testing.assert_array_equal(guard, 12345.0)
    a, b = dev.to_device(rand(rng, K, M)), dev.to_device(rand(rng, K, N))
    outs = []
    for _ in range(2):
        c = dev.zeros((M, N))
        dev.take_timings()
        ops.gemm(dev, a, b, c, M, N, K, trans_a=True)
        outs.append(c.get())
        ran = set(dev.take_timings())
        assert ("gemm_tn_split" in ran) == (N >= M and M % 4 == 0 and N % 8 == 0), ran   # the path meant
        assert "gemm_reduce" in ran
    np.testing.assert_array_equal(outs[0], outs[1])   # chunk partials summed in a fixed order


@pytest.mark.parametrize("variant", ["dev", "gpu_dev"])   # the GPU's: 16×16 tiles, partial at both edges
@pytest.mark.parametrize("R,C,batch", [(13, 7, 3), (16, 24, 2), (37, 21, 2)])   # element-wise / 8×8 blocks
def test_transpose_exact(request, variant, R, C, batch):
    dev = request.getfixturevalue(variant)
    rng = np.random.default_rng(1)
    x = rand(rng, batch, R, C)
    out = dev.to_device(np.full((batch + 1, C, R), np.nan, f32))   # a guard matrix after the batch
    dev.take_timings()
    ops.transpose(dev, dev.to_device(x), out, R, C, batch)
    if variant == "gpu_dev":
        assert "transpose_wg" in dev.take_timings()
    got = out.get()
    np.testing.assert_array_equal(got[:batch], x.transpose(0, 2, 1))   # pure data movement: exact
    assert np.isnan(got[batch]).all()                                  # nothing written past the end


# ----------------------------------------------------------------------------- data

def test_gather_windows_exact(dev):
    rng = np.random.default_rng(2)
    ids = rng.integers(0, 50, size=200).astype(i32)
    S, offsets = 9, np.array([0, 17, 190, 55], i32)            # 190 + 9 + 1 = 200: last window at the end
    B = len(offsets)
    x, y = dev.empty((B * S,), i32), dev.empty((B * S,), i32)
    ops.gather_windows(dev, dev.to_device(ids), dev.to_device(offsets), S, x, y)
    idx = offsets[:, None] + np.arange(S)
    np.testing.assert_array_equal(x.get().reshape(B, S), ids[idx])
    np.testing.assert_array_equal(y.get().reshape(B, S), ids[idx + 1])


def _host_bucket_sort(keys, nb):
    perm = np.argsort(keys, kind="stable").astype(i32)        # grouped by key, position order inside
    starts = np.concatenate([[0], np.cumsum(np.bincount(keys, minlength=nb))]).astype(i32)
    return starts, perm


@pytest.mark.parametrize("variant,N,nb", [("cpu", 41, 10), ("gpu", 41, 10), ("gpu", 4096, 150)])
def test_bucket_sort_groups_positions_by_key_in_order(dev, gpu_dev, variant, N, nb):
    """Both variants (the GPU one: a work-item per bucket; nb = 150 > its 64 items) give exactly
    the stable counting sort."""
    d = dev if variant == "cpu" else gpu_dev
    rng = np.random.default_rng(3)
    present = [0, 2, 3, 7, 9] if nb == 10 else rng.choice(nb, 90, replace=False)
    keys = rng.choice(present, size=N).astype(i32)            # some buckets empty
    starts, perm = d.empty((nb + 1,), i32), d.empty((N,), i32)
    d.take_timings()
    ops.bucket_sort(d, d.to_device(keys), N, nb, starts, perm)
    assert ("bucket_sort_wg" if variant == "gpu" else "bucket_sort") in d.take_timings()
    want_starts, want_perm = _host_bucket_sort(keys, nb)
    np.testing.assert_array_equal(starts.get(), want_starts)
    np.testing.assert_array_equal(perm.get(), want_perm)


# ----------------------------------------------------------------------------- embedding

def test_embedding_forward_backward(dev):
    rng = np.random.default_rng(4)
    V, E = 11, 6
    x = np.array([3, 0, 3, 6, 1, 3, 2, 0, 5, 6, 10, 3, 1], i32)  # repeated ids; 4, 7, 8, 9 absent
    N = len(x)
    W = rand(rng, V, E)
    e = dev.empty((N, E))
    ops.embedding_forward(dev, dev.to_device(W), dev.to_device(x), e, N, E)
    np.testing.assert_array_equal(e.get(), ref.embedding_forward(W, x))   # a copy: exact

    de = rand(rng, N, E)
    starts, perm = _host_bucket_sort(x, V)
    dW = dev.to_device(np.full((V, E), np.nan, f32))             # every row must be written
    ops.embedding_backward(dev, dev.to_device(de), dev.to_device(perm), dev.to_device(starts), dW, V, E)
    # the reference adds rows in increasing n from 0 in float32, like the kernel: bit-identical
    np.testing.assert_array_equal(dW.get(), ref.embedding_backward(de, x, V))
    assert not dW.get()[[4, 7, 8, 9]].any()


# ----------------------------------------------------------------------------- GELU, bias, colsum, spikes

def test_bias_gelu_forward_and_gelu_backward(dev):
    rng = np.random.default_rng(5)
    N, H = 19, 23
    a, b = rand(rng, N, H, scale=2.0), rand(rng, H)
    a_d, h = dev.to_device(a), dev.empty((N, H))
    ops.bias_gelu_forward(dev, a_d, dev.to_device(b), h, N, H)
    np.testing.assert_array_equal(a_d.get(), a + b)           # one float32 add each side: exact
    want_h = ref.gelu_forward(as64(a + b))
    # erf_fast (kernels/fastmath.cl) is off by up to 8.5e-6 near a = 0 today (see
    # test_fastmath_precision_as_documented), so |Δh| ≲ 0.5·|a|·8.5e-6: measured ≤ 1.4e-6
    # for |a| < 10. The tanh approximation of GELU is off by up to 5e-4: it fails here
    np.testing.assert_allclose(h.get(), want_h, rtol=1e-5, atol=1e-5)

    dh = rand(rng, N, H)
    da = dev.empty((N, H))
    ops.gelu_backward(dev, dev.to_device(dh), a_d, da, N, H)
    want_da = ref.gelu_backward(as64(dh), as64(a + b))
    # Φ from erf_fast as above (measured |ΔGELU'| ≤ 4.2e-6, at a ≈ 0), φ from exp_fast (≤ 9e-6 rel.)
    np.testing.assert_allclose(da.get(), want_da, rtol=1e-5, atol=1e-5)


def test_add_bias_and_colsum(dev):
    rng = np.random.default_rng(6)
    N, C = 37, 13
    X, b = rand(rng, N, C), rand(rng, C)
    X_d = dev.to_device(X)
    ops.add_bias(dev, X_d, dev.to_device(b), N, C)
    np.testing.assert_array_equal(X_d.get(), X + b)           # one float32 add: exact

    out = dev.empty((C,))
    ops.colsum(dev, dev.to_device(X), out, N, C)
    # float32 sum of N = 37 N(0,1) terms in order: error ≲ N·2⁻²⁴·Σ|x| ≈ 1e-4 worst case
    np.testing.assert_allclose(out.get(), as64(X).sum(axis=0), rtol=1e-5, atol=1e-5)


def test_colsum8_equals_the_scalar_sum_bit_for_bit(dev):
    """C % 8 == 0 takes colsum8 (eight columns per work-item): the same row order per column,
    so exactly the numbers of the scalar kernel, which is checked against float64 as above."""
    rng = np.random.default_rng(16)
    N, C = 301, 24
    X = dev.to_device(rand(rng, N, C))
    dev.take_timings()
    vec = dev.empty((C,))
    ops.colsum(dev, X, vec, N, C)
    assert "colsum8" in dev.take_timings()
    scalar = dev.empty((C,))
    dev.launch(dev.kernel("layers.cl", "colsum"), (C,), None, X.data, np.int32(N), np.int32(C), scalar.data)
    np.testing.assert_array_equal(vec.get(), scalar.get())
    np.testing.assert_allclose(vec.get(), as64(X.get()).sum(axis=0), rtol=1e-5, atol=1e-4)   # N = 301: as above


def test_spikes_forward_is_strict_threshold(dev):
    rng = np.random.default_rng(7)
    N, H, theta = 9, 11, 0.5
    h = rand(rng, N, H)
    h[0, :3] = [0.5, np.nextafter(f32(0.5), f32(1)), np.nextafter(f32(0.5), f32(0))]
    s = dev.empty((N, H))
    ops.spikes_forward(dev, dev.to_device(h), theta, s, N, H)
    np.testing.assert_array_equal(s.get(), ref.spikes_forward(h, f32(theta)))   # a comparison: exact
    np.testing.assert_array_equal(s.get()[0, :3], [0, 1, 0])


# ----------------------------------------------------------------------------- row normalisation

@pytest.mark.parametrize("H", [24, 20])                      # float8 rows / scalar rows
def test_row_normalize_forward_backward(dev, H):
    rng = np.random.default_rng([8, H])
    N = 17
    h = rand(rng, N, H)
    h[3] = 0                                                  # the 1e-6 keeps a zero row finite
    k, inv = dev.empty((N, H)), dev.empty((N,))
    dev.take_timings()
    ops.row_normalize_forward(dev, dev.to_device(h), k, inv, N, H)
    ops.row_inv_norm(dev, dev.to_device(h), inv2 := dev.empty((N,)), N, H)
    suffix = "8" if H % 8 == 0 else ""
    assert {"row_normalize_forward" + suffix, "row_inv_norm" + suffix} <= set(dev.take_timings())
    np.testing.assert_allclose(inv2.get(), ref.row_normalize_forward(as64(h))[1], rtol=1e-5, atol=0)  # as below
    want_k, want_inv = ref.row_normalize_forward(as64(h))
    # sum of H = 24 squares in float32 then sqrt: relative error ≲ (H+2)·2⁻²⁴ ≈ 2e-6
    np.testing.assert_allclose(k.get(), want_k, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(inv.get(), want_inv, rtol=1e-5, atol=0)

    dk, dh0 = rand(rng, N, H), rand(rng, N, H)
    dh = dev.to_device(dh0)                                   # the kernel ACCUMULATES into dh
    ops.row_normalize_backward(dev, dev.to_device(dk), k, inv, dh, N, H)
    assert "row_normalize_backward" + suffix in dev.take_timings()
    want = as64(dh0) + ref.row_normalize_backward(as64(dk), as64(k.get()), as64(inv.get()))
    # a 24-term dot and a few products per entry, O(1) values: float32 error ~1e-6
    np.testing.assert_allclose(dh.get(), want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- fast weights

def _fw_inputs(rng, B, S, H, eta, lam):
    k, _ = ref.row_normalize_forward(rand(rng, B * S, H))
    post = (rng.random((B * S, H)) < 0.3).astype(f32)         # spikes: 0/1
    w = (eta * lam ** np.arange(S, dtype=f64)).astype(f32)    # w[d] = η·λ^d, as Model.decay_table
    return k.astype(f32), post, w


def test_causal_decay_mask_exact(dev):
    rng = np.random.default_rng(9)
    B, S = 3, 7
    G = rand(rng, B, S, S)
    w = (0.8 * 0.6 ** np.arange(S)).astype(f32)
    Gm = dev.to_device(np.full((B, S, S), np.nan, f32))      # every entry must be written
    ops.causal_decay_mask(dev, dev.to_device(G), dev.to_device(w), Gm, B, S)
    t, tau = np.arange(S)[:, None], np.arange(S)[None, :]
    wmat = np.where(tau < t, w[np.maximum(t - 1 - tau, 0)], f32(0))
    np.testing.assert_array_equal(Gm.get(), wmat[None] * G)   # one float32 product: exact


@pytest.mark.parametrize("S,H", [(8, 24), (12, 16), (6, 24), (8, 20)])   # fused / fused / fallbacks
def test_causal_dots_decay_matches_product_and_mask(dev, S, H):
    """causal_dots_decay (X·Yᵀ and the causal decay mask in one pass) against numpy; every
    entry written (NaN-filled output); S % 4 != 0 or H % 8 != 0 take gemm + causal_decay_mask."""
    rng = np.random.default_rng([S, H])
    B = 3
    X, Y = rand(rng, B * S, H), rand(rng, B * S, H)
    w = (0.8 * 0.6 ** np.arange(S)).astype(f32)
    out = dev.to_device(np.full((B, S, S), np.nan, f32))
    dev.take_timings()
    ops.causal_dots_decay(dev, dev.to_device(X), dev.to_device(Y), dev.to_device(w), out, B, S, H,
                          tmp=dev.empty((B, S, S)))
    fused = S % 4 == 0 and H % 8 == 0
    assert ("causal_dots_decay" in dev.take_timings()) == fused
    t, tau = np.arange(S)[:, None], np.arange(S)[None, :]
    wmat = np.where(tau < t, as64(w)[np.maximum(t - 1 - tau, 0)], 0.0)
    want = wmat[None] * np.einsum("bth,bsh->bts", as64(X).reshape(B, S, H), as64(Y).reshape(B, S, H))
    got = out.get()
    assert np.isfinite(got).all()
    np.testing.assert_array_equal(got * (wmat[None] == 0), 0.0)              # τ ≥ t: exactly 0
    # dots of H ≤ 24 products of N(0,1) values (in 8 lanes, then across them): float32 error ≲ 1e-5
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("eta,lam", [(1.0, 0.5), (0.3, 0.9)])
def test_fast_weights_pipeline_forward_backward(dev, eta, lam):
    """The kernel sequence of Model.forward / Model.backward for hebb.mode = fast_weights."""
    rng = np.random.default_rng(10)
    B, S, H = 3, 8, 24
    N = B * S
    h = rand(rng, N, H)
    k_d, inv_d = dev.empty((N, H)), dev.empty((N,))
    ops.row_normalize_forward(dev, dev.to_device(h), k_d, inv_d, N, H)
    post = (rng.random((N, H)) < 0.3).astype(f32)
    w_d = dev.to_device((eta * lam ** np.arange(S, dtype=f64)).astype(f32))
    post_d = dev.to_device(post)
    G, Gm, Q = dev.empty((B, S, S)), dev.empty((B, S, S)), dev.empty((B, S, S))
    m = dev.zeros((N, H))
    ops.gemm(dev, k_d, k_d, G, S, S, H, trans_b=True, batch=B)
    ops.causal_decay_mask(dev, G, w_d, Gm, B, S)
    ops.gemm(dev, Gm, post_d, m, S, H, S, beta=1.0, batch=B)

    k64, inv64 = ref.row_normalize_forward(as64(h))
    want_m = ref.fast_weights_forward(k64, as64(post), B, S, eta, lam)
    # K·Kᵀ over H = 24 terms of unit-norm rows, then ≤ S = 8 weighted sums: float32 error ~1e-6
    np.testing.assert_allclose(m.get(), want_m, rtol=1e-5, atol=1e-5)
    assert np.abs(want_m).max() > 0.1                         # the memory is not trivially zero

    dm = rand(rng, N, H)
    dm_d, dK, dh = dev.to_device(dm), dev.empty((N, H)), dev.empty((N, H))
    ops.gemm(dev, dm_d, post_d, Q, S, S, H, trans_b=True, batch=B)          # dGm = dM·Postᵀ
    ops.causal_decay_mask(dev, Q, w_d, Gm, B, S)                             # dG
    ops.gemm(dev, Gm, k_d, dK, S, H, S, batch=B)                             # dG·K
    ops.gemm(dev, Gm, k_d, dK, S, H, S, beta=1.0, trans_a=True, batch=B)     # + dGᵀ·K
    dev.cl.enqueue_copy(dev.queue, dh.data, dm_d.data)
    ops.row_normalize_backward(dev, dK, k_d, inv_d, dh, N, H)
    dk64 = ref.fast_weights_backward(as64(dm), k64, as64(post), B, S, eta, lam)
    want_dh = as64(dm) + ref.row_normalize_backward(dk64, k64, inv64)
    # two chained products over H = 24 and S = 8 terms of O(1) values, then the row-norm
    # Jacobian (inv_norm ~ 0.2): float32 error ~1e-5 at most
    np.testing.assert_allclose(dK.get(), dk64, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(dh.get(), want_dh, rtol=1e-5, atol=1e-5)


def test_fw_state_norm(dev):
    rng = np.random.default_rng(11)
    B, S, H, eta, lam = 3, 8, 24, 0.7, 0.8
    k, post, w = _fw_inputs(rng, B, S, H, eta, lam)
    k_d, post_d = dev.to_device(k), dev.to_device(post)
    G, Q, out = dev.empty((B, S, S)), dev.empty((B, S, S)), dev.empty((B,))
    ops.gemm(dev, k_d, k_d, G, S, S, H, trans_b=True, batch=B)
    ops.gemm(dev, post_d, post_d, Q, S, S, H, trans_b=True, batch=B)
    ops.fw_state_norm(dev, G, Q, dev.to_device(w), out, B, S)
    per_seq = [ref.fast_weights_state_norm(as64(k[b * S:(b + 1) * S]), as64(post[b * S:(b + 1) * S]),
                                           1, S, eta, lam) for b in range(B)]
    # S² = 64 products of float32 Gram entries, then a sqrt: relative error ≲ 1e-5
    np.testing.assert_allclose(out.get(), per_seq, rtol=2e-5, atol=0)
    assert np.ptp(per_seq) > 1e-3                              # sequences differ: the order is checked


# ----------------------------------------------------------------------------- loss

@pytest.mark.parametrize("n_pad", [0, 5, 23])
def test_count_valid_softmax_xent_loss_reduce(dev, n_pad):
    rng = np.random.default_rng([12, n_pad])
    N, V = 23, 17
    logits = rand(rng, N, V, scale=3.0)
    y = rng.integers(0, V, size=N).astype(i32)
    y[1] = 0                                                  # id 0 (UNK) is a valid target
    y[rng.permutation(N)[:n_pad]] = ref.PAD
    y[np.nonzero(y != ref.PAD)[0][:3]] = np.argmax(logits, axis=1)[y != ref.PAD][:3]  # some hits
    nv, loss_rows, hits = dev.empty((1,), i32), dev.empty((N,)), dev.empty((N,))
    dlogits, out = dev.to_device(np.full((N, V), np.nan, f32)), dev.empty((4,))
    logits_d, y_d = dev.to_device(logits), dev.to_device(y)
    ops.count_valid(dev, y_d, N, nv)
    ops.softmax_xent(dev, logits_d, y_d, nv, loss_rows, hits, dlogits, N, V)
    ops.loss_reduce(dev, loss_rows, hits, nv, out, N)

    loss, rows, dl, n_valid = ref.softmax_xent_forward(as64(logits), y)
    valid = y != ref.PAD
    want_hits = (valid & (np.argmax(logits, axis=1) == y)).astype(f32)
    assert nv.get()[0] == n_valid == N - n_pad
    # log-sum-exp of V = 17 terms with exp_fast (see test_fastmath_precision_as_documented) and log: ≲ 1e-5 absolute on O(5) values
    np.testing.assert_allclose(loss_rows.get(), rows, rtol=1e-5, atol=2e-5)
    # p/Nv: exp_fast's error on one term and on the normaliser, ≲ 2e-5 relative; entries ≤ 1/Nv
    np.testing.assert_allclose(dlogits.get(), dl, rtol=2e-5, atol=1e-8)
    np.testing.assert_array_equal(hits.get(), want_hits)      # argmax, first maximum: exact
    got = out.get()
    np.testing.assert_allclose(got[[0, 3]], [loss, rows.sum()], rtol=1e-5, atol=1e-6)  # N-term float32 sums
    np.testing.assert_array_equal(got[[1, 2]], [want_hits.sum(), n_valid])              # counts: exact
    if n_pad == N:
        assert not dlogits.get().any() and got[0] == 0


@pytest.mark.parametrize("V,ld", [(17, 24), (16, 16), (3, 8)])
def test_softmax_xent8_with_row_padding(dev, V, ld):
    """Rows ld % 8 == 0 apart take softmax_xent8: NaN in the pad columns is never read
    (masked) and the pad columns of dlogits are never written; values as the scalar
    kernel's, checked against the float64 reference."""
    rng = np.random.default_rng([V, ld])
    N = 21
    logits = rand(rng, N, V, scale=3.0)
    logits[4, :] = logits[4, 0]                               # all tied: the first maximum is the argmax
    y = rng.integers(0, V, size=N).astype(i32)
    y[[2, 9]] = ref.PAD
    y[4] = 0
    y[5] = np.argmax(logits[5])
    padded = np.full((N, ld), np.nan, f32)
    padded[:, :V] = logits
    nv, loss_rows, hits = dev.empty((1,), i32), dev.empty((N,)), dev.empty((N,))
    dl = dev.to_device(np.full((N, ld), 7.0, f32))
    y_d = dev.to_device(y)
    ops.count_valid(dev, y_d, N, nv)
    dev.take_timings()
    ops.softmax_xent(dev, dev.to_device(padded), y_d, nv, loss_rows, hits, dl, N, V, ld=ld)
    assert "softmax_xent8" in dev.take_timings()
    _, rows, want_dl, _ = ref.softmax_xent_forward(as64(logits), y)
    got = dl.get()
    np.testing.assert_array_equal(got[:, V:], 7.0)            # pad columns untouched
    # as in the scalar test: exp_fast and log, V ≤ 17 terms (the sum in 8 lanes, then across them)
    np.testing.assert_allclose(loss_rows.get(), rows, rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(got[:, :V], want_dl, rtol=2e-5, atol=1e-8)
    want_hits = ((y != ref.PAD) & (np.argmax(logits, axis=1) == y)).astype(f32)
    np.testing.assert_array_equal(hits.get(), want_hits)      # first maximum, exact
    assert hits.get()[4] == 1.0 and hits.get()[5] == 1.0


def test_fastmath_precision_as_documented(dev):
    """GELU' and softmax at the precision fastmath.cl's header promises (erf_fast ~3e-7
    absolute, exp_fast < 1e-7 + |x|·6e-8 relative), which the reference (math.erf, numpy exp) meets.
    (Reducing to f in [0, 1) instead of [-0.5, 0.5] gave 8.5e-6 near a = 0: this test caught it.)"""
    a = np.linspace(-6, 6, 4801).astype(f32).reshape(-1, 1)  # f -> 1 happens near a = 0
    N = a.shape[0]
    da = dev.empty((N, 1))
    ops.gelu_backward(dev, dev.to_device(np.ones_like(a)), dev.to_device(a), da, N, 1)
    # Φ off by ≤ 0.6e-7, a·φ by ≤ 0.24·3e-7, plus ~3 float32 roundings of O(1) values:
    # ≤ 5e-7 as documented (1.5e-7 with the fix); today 4.1e-6
    np.testing.assert_allclose(da.get(), ref.gelu_backward(np.ones((N, 1)), as64(a)), rtol=0, atol=5e-7)

    rng = np.random.default_rng(17)
    Nl, V = 64, 50
    logits = rng.uniform(-8, 0, (Nl, V)).astype(f32)          # exp arguments in [-8, 0]
    y = np.zeros(Nl, i32)
    nv, loss_rows, hits, dl = dev.empty((1,), i32), dev.empty((Nl,)), dev.empty((Nl,)), dev.empty((Nl, V))
    y_d = dev.to_device(y)
    ops.count_valid(dev, y_d, Nl, nv)
    ops.softmax_xent(dev, dev.to_device(logits), y_d, nv, loss_rows, hits, dl, Nl, V)
    want = ref.softmax_xent_forward(as64(logits), y)[2]
    # p = e/Σe: 2·3e-7 from exp_fast plus a few roundings ≲ 1e-6; 2e-6 leaves room
    # (7e-7 with the fix); today 7.7e-6. Column 0 is p − 1 (cancellation): left out
    np.testing.assert_allclose(dl.get()[:, 1:], want[:, 1:], rtol=2e-6, atol=0)


# ----------------------------------------------------------------------------- optimiser

OPT_CHUNK = 64          # small chunks so each tensor spans several (the engine uses 1024)
OPT_SHAPES = {"W_emb": (30, 16), "W1": (16, 24), "b1": (24,), "W2": (24, 30), "b2": (30,)}


class OptLayout:
    """The optimiser tests' flat buffer: OPT_SHAPES, each starting at a multiple of OPT_CHUNK
    (gaps are zero and must stay zero), as the engine's Layout with small chunks."""

    def __init__(self):
        self.offsets, pos, self.owner = {}, 0, []
        for name, shape in OPT_SHAPES.items():
            self.offsets[name] = pos
            n_ch = -(-int(np.prod(shape)) // OPT_CHUNK)
            pos += n_ch * OPT_CHUNK
            self.owner += [name] * n_ch
        self.n, self.n_chunks = pos, pos // OPT_CHUNK

    def flat(self, d):
        out = np.zeros(self.n, f32)
        for k, a in d.items():
            out[self.offsets[k]:self.offsets[k] + a.size] = a.ravel()
        return out

    def unflat(self, a):
        return {k: a[self.offsets[k]:self.offsets[k] + int(np.prod(s))].reshape(s) for k, s in OPT_SHAPES.items()}

    def decay_mask(self):
        return np.array([o in ref.DECAYED for o in self.owner], f32)


@pytest.mark.parametrize("clip_norm,clip_value", [(0.0, 0.0), (1.0, 0.0), (0.0, 0.3), (2.0, 0.3)])
def test_sgd_momentum(dev, clip_norm, clip_value):
    rng = np.random.default_rng([17, int(clip_norm * 10), int(clip_value * 10)])
    lay = OptLayout()
    offsets, n, n_chunks, flat = lay.offsets, lay.n, lay.n_chunks, lay.flat
    params = {k: rand(rng, *s) for k, s in OPT_SHAPES.items()}
    grads = {k: rand(rng, *s, scale=0.5) for k, s in OPT_SHAPES.items()}
    vel = {k: rand(rng, *s, scale=0.1) for k, s in OPT_SHAPES.items()}

    theta_d, grad_d, vel_d = (dev.to_device(flat(d)) for d in (params, grads, vel))
    wd_mask = dev.to_device(lay.decay_mask())
    partial, gnorm = dev.empty((n_chunks,)), dev.empty((1,))
    lr, mu, wd = 0.05, 0.9, 0.5                                # large wd: a wrong mask is visible
    ops.sumsq_chunks(dev, grad_d, partial, n_chunks, OPT_CHUNK)
    ops.global_norm(dev, partial, n_chunks, gnorm)
    ones = dev.to_device(np.ones(n_chunks, f32))                # lr_mask: every tensor at lr
    ops.sgd_momentum(dev, theta_d, grad_d, vel_d, wd_mask, ones, gnorm, n, lr, mu, wd, clip_norm, clip_value,
                     OPT_CHUNK)
    p64, v64 = ({k: as64(a) for k, a in d.items()} for d in (params, vel))
    ref.sgd_step(p64, {k: as64(a) for k, a in grads.items()}, v64, lr, mu, wd,
                 {k: k in ref.DECAYED for k in OPT_SHAPES}, clip_norm, clip_value)
    # three float32 operations per element on O(1) values: 1e-6 absolute; a wrong clip or decay is ≥ 1e-3
    np.testing.assert_allclose(theta_d.get(), flat(p64), rtol=0, atol=1e-6)
    np.testing.assert_allclose(vel_d.get(), flat(v64), rtol=0, atol=1e-6)
    gaps = np.ones(n, bool)
    for k, a in params.items():
        gaps[offsets[k]:offsets[k] + a.size] = False
    assert not theta_d.get()[gaps].any() and not vel_d.get()[gaps].any()   # gaps stay zero


@pytest.mark.parametrize("clip_norm,clip_value", [(0.0, 0.0), (1.0, 0.0), (0.0, 0.3), (2.0, 0.3)])
def test_sumsq_global_norm_adamw(dev, clip_norm, clip_value):
    rng = np.random.default_rng([13, int(clip_norm * 10), int(clip_value * 10)])
    lay = OptLayout()
    offsets, n, n_chunks, flat = lay.offsets, lay.n, lay.n_chunks, lay.flat
    params = {k: rand(rng, *s) for k, s in OPT_SHAPES.items()}
    grads = {k: rand(rng, *s, scale=0.5) for k, s in OPT_SHAPES.items()}
    m = {k: rand(rng, *s, scale=0.1) for k, s in OPT_SHAPES.items()}
    v = {k: (rng.random(s) * 0.2).astype(f32) for k, s in OPT_SHAPES.items()}

    theta_d, grad_d, m_d, v_d = (dev.to_device(flat(d)) for d in (params, grads, m, v))
    wd_mask = dev.to_device(lay.decay_mask())
    partial, gnorm = dev.empty((n_chunks,)), dev.empty((1,))
    t, lr, b1, b2, eps, wd = 3, 0.05, 0.9, 0.99, 1e-8, 0.5    # large wd: a wrong mask is visible
    ops.sumsq_chunks(dev, grad_d, partial, n_chunks, OPT_CHUNK)
    ops.global_norm(dev, partial, n_chunks, gnorm)
    ones = dev.to_device(np.ones(n_chunks, f32))                # lr_mask: every tensor at lr
    ops.adamw(dev, theta_d, grad_d, m_d, v_d, wd_mask, ones, gnorm, n, lr, b1, b2, eps, wd,
              1 - b1 ** t, 1 - b2 ** t, clip_norm, clip_value, OPT_CHUNK)

    g_flat = as64(flat(grads))
    want_partial = (g_flat ** 2).reshape(n_chunks, OPT_CHUNK).sum(axis=1)
    # float32 sums of 64 squares (in order), then of the chunk sums: relative error ≲ 64·2⁻²⁴ ≈ 4e-6
    np.testing.assert_allclose(partial.get(), want_partial, rtol=1e-5, atol=0)
    p64, m64, v64 = ({k: as64(a) for k, a in d.items()} for d in (params, m, v))
    want_gnorm = ref.adamw_step(p64, {k: as64(a) for k, a in grads.items()}, m64, v64, t, lr, b1, b2,
                                eps, wd, {k: k in ref.DECAYED for k in OPT_SHAPES}, clip_norm, clip_value)
    np.testing.assert_allclose(gnorm.get()[0], want_gnorm, rtol=1e-5)   # as the partial sums
    if clip_norm:
        assert want_gnorm > clip_norm                          # the clipping branch is exercised
    if clip_value:
        assert np.abs(g_flat).max() > clip_value
    got = {"theta": theta_d.get(), "m": m_d.get(), "v": v_d.get()}
    for what, want in (("theta", p64), ("m", m64), ("v", v64)):
        for k, a in lay.unflat(got[what]).items():
            # a handful of float32 operations per element, O(1) values; the update itself is
            # ~lr = 0.05, so an error in clipping or decay (≥ 1e-3) cannot hide in 1e-5
            np.testing.assert_allclose(a, want[k], rtol=1e-5, atol=1e-6, err_msg=f"{what}.{k}")
        used = np.zeros(n, bool)
        for k, s in OPT_SHAPES.items():
            used[offsets[k]:offsets[k] + int(np.prod(s))] = True
        assert not got[what][~used].any(), f"{what}: padding between tensors changed"


def test_accumulate_step_stats(dev):
    acc = dev.to_device(np.array([1.5, 2.0, 3.0], f32))
    loss_out = dev.to_device(np.array([2.25, 7.0, 20.0, 45.0], f32))   # [mean loss, hits, Nv, sum]
    want = np.array([1.5, 2.0, 3.0])
    # (gnorm, clip_norm): below the limit, above it, clipping off with a huge norm
    for gnorm, clip_norm, clipped in [(0.5, 1.0, 0), (3.0, 1.0, 1), (1e6, 0.0, 0), (1.5, 1.0, 1)]:
        ops.accumulate_step_stats(dev, loss_out, dev.to_device(np.array([gnorm], f32)), clip_norm, acc)
        want += [2.25, clipped, 1]
        np.testing.assert_array_equal(acc.get(), want)          # sums of quarters and ones: exact


# ----------------------------------------------------------------------------- prototypes

def _separated_inputs(rng, N, T, H, similarity, dup=None, margin=1e-3):
    """v (N,H), P (T,H) whose best and second-best similarity differ by > margin in every row
    (float32 rounding cannot flip an argmax); P rows have different norms so cosine ≠ dot.
    dup = (i, j): P[j] is an exact copy of P[i] (an exact tie, resolved to the lower index)."""
    P = rand(rng, T, H) * rng.uniform(0.3, 3.0, size=(T, 1)).astype(f32)
    if dup:
        P[dup[1]] = P[dup[0]]
    keep = [t for t in range(T) if not dup or t != dup[1]]
    rows = []
    while len(rows) < N:
        v = rand(rng, H)
        sim = np.sort(ref.proto_similarity(as64(v[None]), as64(P[keep]), similarity)[0])
        if sim[-1] - sim[-2] > margin:
            rows.append(v)
    return np.stack(rows), P


@pytest.mark.parametrize("similarity", ["cosine", "dot"])
def test_row_inv_norm_and_proto_argmax(dev, similarity):
    rng = np.random.default_rng([14, similarity == "cosine"])
    N, T, H = 40, 7, 24
    v, P = _separated_inputs(rng, N, T, H, similarity, dup=(2, 5))
    cosine = int(similarity == "cosine")
    v_d, P_d = dev.to_device(v), dev.to_device(P)
    scores, inv_v, inv_p, k = dev.empty((N, T)), dev.empty((N,)), dev.empty((T,)), dev.empty((N,), i32)
    ops.gemm(dev, v_d, P_d, scores, N, T, H, trans_b=True)    # as Model._assign
    ops.row_inv_norm(dev, v_d, inv_v, N, H)
    ops.row_inv_norm(dev, P_d, inv_p, T, H)
    ops.proto_argmax(dev, scores, inv_v, inv_p, k, N, T, cosine)
    # H = 24 squares summed in float32, then 1/sqrt: relative error ≲ 2e-6
    np.testing.assert_allclose(inv_v.get(), 1 / np.sqrt((as64(v) ** 2).sum(1) + 1e-6), rtol=1e-5)
    np.testing.assert_allclose(inv_p.get(), 1 / np.sqrt((as64(P) ** 2).sum(1) + 1e-6), rtol=1e-5)
    want = ref.proto_assign(as64(v), as64(P), similarity)
    np.testing.assert_array_equal(k.get(), want)              # inputs separated by > 1e-3: exact
    assert (want == 2).any() and not (k.get() == 5).any()     # exact tie 2 = 5 goes to the lower index
    other = ref.proto_assign(as64(v), as64(P), "dot" if cosine else "cosine")
    assert (other != want).sum() >= 3                          # the similarity choice matters here


def test_proto_feature_forward_and_qerr(dev):
    rng = np.random.default_rng(15)
    N, T, H, beta = 21, 6, 24, 0.7
    ht, P = rand(rng, N, H), rand(rng, T, H)
    k = rng.integers(0, T, size=N).astype(i32)
    ht_d, P_d, k_d = dev.to_device(ht), dev.to_device(P), dev.to_device(k)
    z, q = dev.empty((N, H)), dev.empty((N,))
    ops.proto_feature_forward(dev, ht_d, P_d, k_d, beta, z, N, H)
    want = ref.proto_feature_forward(as64(ht), as64(P), k, beta)
    np.testing.assert_allclose(z.get(), want, rtol=1e-6, atol=1e-6)   # one multiply-add (maybe fused)
    ops.proto_qerr_rows(dev, ht_d, P_d, k_d, q, N, H)
    want_q = ((as64(ht) - as64(P)[k]) ** 2).sum(axis=1)
    np.testing.assert_allclose(q.get(), want_q, rtol=1e-5, atol=0)   # 24-term float32 sum of squares


def test_bucket_sums8_equals_the_scalar_kernel_bit_for_bit(dev):
    """H % 8 == 0 takes bucket_sums8: the same member order per prototype, so the same bits
    as bucket_sums (which the next test checks against float64)."""
    rng = np.random.default_rng(26)
    N, T, H = 50, 7, 32
    v = dev.to_device(rand(rng, N, H))
    k = dev.to_device(rng.integers(0, T - 1, size=N).astype(i32))     # prototype T-1 has no members
    starts, perm = dev.empty((T + 1,), i32), dev.empty((N,), i32)
    ops.bucket_sort(dev, k, N, T, starts, perm)
    vec, scalar = dev.empty((T, H)), dev.empty((T, H))
    dev.take_timings()
    ops.proto_sums(dev, v, perm, starts, vec, T, H)
    assert "bucket_sums8" in dev.take_timings()
    dev.launch(dev.kernel("layers.cl", "bucket_sums"), (H, T), None, v.data, perm.data, starts.data, i32(H), scalar.data)
    np.testing.assert_array_equal(vec.get(), scalar.get())
    assert not vec.get()[T - 1].any()


def test_proto_sums_update_usage_with_reseed(dev):
    """bucket_sort + proto_sums + proto_update + proto_usage_update as Model.local_updates."""
    rng = np.random.default_rng(16)
    N, T, H = 30, 6, 24
    lr, rho, threshold, seed, step = 0.3, 0.9, 0.5, 0xDEADBEEF, 7   # seed > 2³¹: uint32 arithmetic
    v, P = rand(rng, N, H), rand(rng, T, H)
    k = rng.choice([0, 1, 2, 5], size=N).astype(i32)          # 3 and 4 get no members
    k[:3] = [0, 1, 2]
    k[rng.permutation(np.arange(3, N))[:1]] = 5               # keep 5 present
    usage = np.array([0.2, 0.2, 0.2, 0.2, 0.01, 0.01], f32)
    # threshold/T = 0.083: t=4 (no members, usage → 0.009) is re-seeded; t=3 (→ 0.18) is not;
    # t=5 has members but usage → 0.009 + 0.1·c/N: re-seeded only if c ≤ 2, keep it well clear
    c5 = int((k == 5).sum())
    assert abs(rho * 0.01 + (1 - rho) * c5 / N - threshold / T) > 1e-3
    P_d, usage_d, v_d, k_d = dev.to_device(P), dev.to_device(usage), dev.to_device(v), dev.to_device(k)
    starts, perm, sums = dev.empty((T + 1,), i32), dev.empty((N,), i32), dev.empty((T, H))
    ops.bucket_sort(dev, k_d, N, T, starts, perm)
    ops.proto_sums(dev, v_d, perm, starts, sums, T, H)
    ops.proto_update(dev, P_d, sums, starts, usage_d, v_d, lr, rho, threshold, seed, step, N, T, H)
    ops.proto_usage_update(dev, usage_d, starts, rho, threshold, N, T)

    want_sums = np.stack([as64(v)[k == t].sum(axis=0) for t in range(T)])
    np.testing.assert_allclose(sums.get(), want_sums, rtol=1e-5, atol=1e-5)   # ≤ 30-term float32 sums
    P64, u64 = as64(P), as64(usage)
    ref.proto_update(P64, u64, as64(v), k, lr, rho, threshold, seed, step)
    got_P, got_u = P_d.get(), usage_d.get()
    # a mean of ≤ 30 rows and one step towards it in float32: ~1e-6 on O(1) values
    np.testing.assert_allclose(got_P, P64, rtol=1e-5, atol=1e-5)
    # the kernel's 1−ρ (in float32) differs from float64's by 1e-9: relative 1e-6 is ample
    np.testing.assert_allclose(got_u, u64, rtol=1e-5, atol=0)
    np.testing.assert_array_equal(got_P[3], P[3])            # no members, alive: unchanged
    np.testing.assert_array_equal(got_P[4], v[ref.hash_u32(seed, step, 4) % N])   # same hash ⇒ same row
    assert got_u[4] == f32(1) / f32(T)
    assert not np.allclose(got_P[4], P[4])                    # the re-seed actually moved it


# -- LayerNorm (kernels/norm.cl) ------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["dev", "gpu_dev"])
@pytest.mark.parametrize("N,C", [(7, 24), (5, 130), (3, 1), (37, 21)])   # N, C past the 16×16 groups
def test_layernorm_forward_backward(request, variant, N, C):
    d = request.getfixturevalue(variant)
    rng = np.random.default_rng([31, N, C])
    x, gamma, beta, dy = rand(rng, N, C, scale=2.0) + f32(0.3), rand(rng, C), rand(rng, C), rand(rng, N, C)
    want_y, cache = ref.layernorm_forward(as64(x), as64(gamma), as64(beta))
    want_dx, want_dg, want_db = ref.layernorm_backward(as64(dy), cache)

    def run():
        xd, gd, bd, dyd = (d.to_device(a) for a in (x, gamma, beta, dy))
        y, dx = d.empty((N, C)), d.empty((N, C))
        mean, rstd, dg, db = d.empty((N,)), d.empty((N,)), d.empty((C,)), d.empty((C,))
        ops.layernorm_forward(d, xd, gd, bd, y, mean, rstd, N, C)
        ops.layernorm_backward(d, dyd, xd, gd, mean, rstd, dx, dg, db, N, C)
        return [a.get() for a in (y, dx, dg, db, rstd)]

    d.take_timings()
    y, dx, dg, db, rstd = run()
    ran = set(d.take_timings())
    wg = variant == "gpu_dev"
    assert {"layernorm_forward_wg", "layernorm_backward_wg", "layernorm_param_grads_wg"} <= ran if wg else \
        {"layernorm_forward_rows", "layernorm_backward_rows", "layernorm_param_grads"} <= ran, ran
    # float32 sums of C terms and a few operations per element on O(1) values: observed ≤ 2e-6
    np.testing.assert_allclose(y, want_y, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(rstd, cache["rstd"].ravel(), rtol=1e-5)
    np.testing.assert_allclose(dx, want_dx, rtol=1e-4, atol=1e-4 if C > 1 else 1e-2)
    np.testing.assert_allclose(dg, want_dg, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(db, want_db, rtol=1e-5, atol=1e-6)
    for a, b in zip(run(), (y, dx, dg, db, rstd)):   # a fixed summation order: the same bits again
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("variant", ["dev", "gpu_dev"])
@pytest.mark.parametrize("N,C", [(40, 24), (130, 5), (2, 3)])
def test_batchnorm_train_eval_backward(request, variant, N, C):
    d = request.getfixturevalue(variant)
    rng = np.random.default_rng([37, N, C])
    x, gamma, beta, dy = rand(rng, N, C, scale=2.0) + f32(0.4), rand(rng, C), rand(rng, C), rand(rng, N, C)
    rm0, rv0 = rand(rng, C, scale=0.1), (rng.random(C) + 0.5).astype(f32)
    want_y, cache = ref.batchnorm_forward(as64(x), as64(gamma), as64(beta))
    want_dx, want_dg, want_db = ref.batchnorm_backward(as64(dy), cache)
    want_rm, want_rv = as64(rm0), as64(rv0)
    ref.batchnorm_running(want_rm, want_rv, cache, N, 0.1)

    def run():
        xd, gd, bd, dyd, rm, rv = (d.to_device(a) for a in (x, gamma, beta, dy, rm0, rv0))
        y, dx, ye = d.empty((N, C)), d.empty((N, C)), d.empty((N, C))
        mean, rstd, dg, db, me, re = (d.empty((C,)) for _ in range(6))
        ops.batchnorm_forward(d, xd, gd, bd, y, mean, rstd, rm, rv, N, C, momentum=0.1)
        ops.batchnorm_backward(d, dyd, xd, gd, mean, rstd, dx, dg, db, N, C)
        ops.batchnorm_forward(d, xd, gd, bd, ye, me, re, rm, rv, N, C, training=False)
        return [a.get() for a in (y, dx, dg, db, rm, rv, ye)]

    y, dx, dg, db, rm, rv, ye = run()
    # float32 column sums of N terms, a few operations per element on O(1) values
    np.testing.assert_allclose(y, want_y, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dx, want_dx, rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(dg, want_dg, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(db, want_db, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rm, want_rm, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(rv, want_rv, rtol=1e-5)
    # evaluation uses the running statistics (the updated ones), not the batch's
    np.testing.assert_allclose(ye, ref.batchnorm_eval(as64(x), as64(gamma), as64(beta), want_rm, want_rv),
                               rtol=1e-4, atol=1e-5)
    for a, b in zip(run(), (y, dx, dg, db, rm, rv, ye)):   # a fixed summation order: the same bits again
        np.testing.assert_array_equal(a, b)


# -- dropout (kernels/dropout.cl) --------------------------------------------------------------------
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5])
def test_dropout_mask_equals_the_reference_bit_for_bit(dev, p):
    rng = np.random.default_rng(41)
    n = 5000
    x = rand(rng, n)
    key = ops.dropout_key(3, 1)
    xd, yd = dev.to_device(x), dev.empty((n,))
    ops.dropout(dev, xd, yd, n, p, key, 17)
    want = ref.dropout_forward(x, p, key, 17)          # float32 x·(1/(1−p)) on both sides
    np.testing.assert_array_equal(yd.get(), want)
    # the backward pass is the same call on the gradient: the same positions are zero
    gd = dev.empty((n,))
    ops.dropout(dev, dev.to_device(np.ones(n, f32)), gd, n, p, key, 17)
    np.testing.assert_array_equal(gd.get() == 0, want == 0 if p else np.zeros(n, bool))



@pytest.mark.parametrize("variant", ["dev", "gpu_dev"])
@pytest.mark.parametrize("N,V,ld", [(23, 17, 24), (21, 130, 136), (6, 3, 3)])
def test_argmax_rows_is_the_first_maximum_and_the_loss_kernels_hits(request, variant, N, V, ld):
    """argmax_rows (CPU) and argmax_rows_wg (a work-group per row; V = 130 > its 64 items,
    3 < them) against np.argmax: exact, ties to the lowest index (an all-tied row, a tie
    across two work-items), pad columns (NaN) never read; the predictions are the ones whose
    matches softmax_xent counts as hits."""
    d = request.getfixturevalue(variant)
    rng = np.random.default_rng([47, V])
    logits = rand(rng, N, V, scale=3.0)
    logits[4, :] = logits[4, 0]
    logits[5, [V - 1, 1]] = logits[5].max() + 1               # a tie: column 1 wins
    padded = np.full((N, ld), np.nan, f32)
    padded[:, :V] = logits
    logits_d, pred = d.to_device(padded), d.empty((N,), i32)
    d.take_timings()
    ops.argmax_rows(d, logits_d, pred, N, V, ld)
    _ran(d, "argmax_rows_wg" if variant == "gpu_dev" else "argmax_rows")
    want = ref.argmax_rows(padded, V)
    np.testing.assert_array_equal(pred.get(), want)
    assert want[4] == 0 and want[5] == 1
    y = rng.integers(0, V, size=N).astype(i32)
    y[::3] = want[::3]
    y[2] = ref.PAD
    nv, rows, hits = d.empty((1,), i32), d.empty((N,)), d.empty((N,))
    y_d = d.to_device(y)
    ops.count_valid(d, y_d, N, nv)
    ops.softmax_xent(d, logits_d, y_d, nv, rows, hits, d.empty((N, ld)), N, V, ld=ld)
    np.testing.assert_array_equal(hits.get(), ((y != ref.PAD) & (pred.get() == y)).astype(f32))


# ----------------------------------------------------------------------------- GPU reductions (issue 12)

def test_gpu_reductions_match_reference_and_rerun_bit_for_bit(gpu_dev):
    """The work-group tree reductions the GPU variant uses (kernels/reduce.cl): column sums,
    count of valid targets, the loss summary, chunk sums of squares and the global norm, against
    float64, with the `_wg` kernels seen running and two runs giving the same bits."""
    dev = gpu_dev
    rng = np.random.default_rng(31)
    N, C = 301, 37                                   # C not a multiple of 16: a partial group
    X = rand(rng, N, C)
    n_chunks, chunk = 7, 1024
    g = rand(rng, n_chunks * chunk, scale=0.5)
    y = rng.integers(0, 9, 1000).astype(i32)
    y[rng.permutation(1000)[:137]] = ref.PAD
    rows, hits = rand(rng, 1000).__abs__(), (rng.random(1000) < 0.3).astype(f32)
    rows[y == ref.PAD] = 0

    def run():
        dev.take_timings()
        cs, nv, out = dev.empty((C,)), dev.empty((1,), i32), dev.empty((4,))
        partial, gnorm = dev.empty((n_chunks,)), dev.empty((1,))
        ops.colsum(dev, dev.to_device(X), cs, N, C)
        ops.count_valid(dev, dev.to_device(y), 1000, nv)
        ops.loss_reduce(dev, dev.to_device(rows), dev.to_device(hits), nv, out, 1000)
        ops.sumsq_chunks(dev, dev.to_device(g), partial, n_chunks, chunk)
        ops.global_norm(dev, partial, n_chunks, gnorm)
        names = set(dev.take_timings())
        return names, [a.get() for a in (cs, nv, out, partial, gnorm)]

    names, (cs, nv, out, partial, gnorm) = run()
    assert {"colsum_wg", "count_valid_wg", "loss_reduce_wg", "sumsq_chunks_wg", "global_norm_wg"} <= names
    # float32 sums of ≤ 1024 terms in a tree: relative error ≲ log2(n)·2⁻²⁴·Σ|x|/|Σx|, ≤ 1e-5 here
    np.testing.assert_allclose(cs, as64(X).sum(axis=0), rtol=1e-5, atol=1e-4)
    assert nv[0] == int((y != ref.PAD).sum())
    valid = int((y != ref.PAD).sum())
    np.testing.assert_allclose(out, [as64(rows).sum() / valid, hits.sum(), valid, as64(rows).sum()], rtol=1e-5)
    want = (as64(g) ** 2).reshape(n_chunks, chunk).sum(axis=1)
    np.testing.assert_allclose(partial, want, rtol=1e-5)
    np.testing.assert_allclose(gnorm[0], np.sqrt(want.sum()), rtol=1e-5)
    _, again = run()
    assert all(a.tobytes() == b.tobytes() for a, b in zip(again, (cs, nv, out, partial, gnorm)))


# ----------------------------------------------------------------------------- GPU row kernels (issue 12)
# The work-group variants of the kernels that loop over a row (or a column, a bucket, a
# sequence) in one work-item on the CPU: against float64, their `_wg` kernel seen running, a
# rerun bit-identical. Row lengths straddle the work-group (64 items, 16 lanes): shorter, longer
# and not a multiple.

def _ran(dev, *names):
    ran = set(dev.take_timings())
    assert set(names) <= ran, ran


@pytest.mark.parametrize("N,V,ld", [(23, 17, 17), (21, 130, 136), (6, 3, 8)])
def test_gpu_softmax_xent_matches_reference_and_the_cpu_argmax(dev, gpu_dev, N, V, ld):
    """softmax_xent_wg: a work-group per row (V = 130 > its 64 items, 3 < them), PAD rows, an
    all-tied row and ties across items; hits exactly those of the CPU kernel (an argmax), pad
    columns untouched."""
    rng = np.random.default_rng([43, V])
    logits = rand(rng, N, V, scale=3.0)
    logits[4, :] = logits[4, 0]                               # all tied: the first column wins
    if V > 64:
        logits[5, [70, 6]] = logits[5].max() + 1              # one item's two columns (6 + 64, 6): 6
        logits[7, [100, 40]] = logits[7].max() + 1            # items 36 and 40: the lower index, 40
    y = rng.integers(0, V, size=N).astype(i32)
    y[[2, N - 1]] = ref.PAD
    y[4] = 0
    if V > 64:
        y[5], y[7] = 6, 40
    padded = np.full((N, ld), np.nan, f32)
    padded[:, :V] = logits

    def run(d):
        nv, rows, hits = d.empty((1,), i32), d.empty((N,)), d.empty((N,))
        dl = d.to_device(np.full((N, ld), 7.0, f32))
        y_d = d.to_device(y)
        ops.count_valid(d, y_d, N, nv)
        d.take_timings()
        ops.softmax_xent(d, d.to_device(padded), y_d, nv, rows, hits, dl, N, V, ld=ld)
        return [a.get() for a in (rows, hits, dl)]

    rows, hits, dl = run(gpu_dev)
    _ran(gpu_dev, "softmax_xent_wg")
    _, want_rows, want_dl, _ = ref.softmax_xent_forward(as64(logits), y)
    # as test_count_valid_softmax_xent_loss_reduce: exp_fast and log over ≤ 130 terms, here summed
    # in a tree (more accurate than in order): ≲ 1e-5 absolute on O(5) values
    np.testing.assert_allclose(rows, want_rows, rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(dl[:, :V], want_dl, rtol=2e-5, atol=1e-8)   # p/Nv: exp_fast's error, as there
    np.testing.assert_array_equal(dl[:, V:], 7.0)
    np.testing.assert_array_equal(hits, run(dev)[1])          # the same argmax as the CPU kernel: exact
    np.testing.assert_array_equal(hits, ((y != ref.PAD) & (np.argmax(logits, axis=1) == y)).astype(f32))
    assert hits[4] == 1 and (V < 64 or hits[5] == hits[7] == 1)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(run(gpu_dev), (rows, hits, dl)))


@pytest.mark.parametrize("similarity", ["cosine", "dot"])
@pytest.mark.parametrize("T,H", [(7, 24), (150, 130)])
def test_gpu_proto_kernels_match_reference_and_the_cpu_argmax(dev, gpu_dev, similarity, T, H):
    """row_inv_norm_wg, proto_argmax_wg (T = 150: prototypes strided over the 64 items) and
    proto_qerr_rows_wg against float64; k bit for bit the CPU kernel's from the same scores,
    exact ties (a duplicated prototype, and across items) to the lowest index."""
    rng = np.random.default_rng([44, T, similarity == "cosine"])
    N = 33
    v, P = _separated_inputs(rng, N, T, H, similarity, dup=(2, 5))
    cosine = int(similarity == "cosine")

    def run(d):
        v_d, P_d = d.to_device(v), d.to_device(P)
        scores, inv_v, inv_p, k, q = d.empty((N, T)), d.empty((N,)), d.empty((T,)), d.empty((N,), i32), d.empty((N,))
        ops.gemm(d, v_d, P_d, scores, N, T, H, trans_b=True)    # as BioAssociative._assign
        s = scores.get()
        # row 0 (dot): an exact tie of 133, 70 and 69 (items 5, 6, 5 of 64) goes to 69; row 1:
        # nothing above -inf, index 0 (the serial loop's start)
        s[0, [133, 70, 69] if T > 64 else [6, 3]] = s[0].max() + 1
        s[1, :] = -np.inf
        scores.set(s)
        d.take_timings()
        ops.row_inv_norm(d, v_d, inv_v, N, H)
        ops.row_inv_norm(d, P_d, inv_p, T, H)
        ops.proto_argmax(d, scores, inv_v, inv_p, k, N, T, cosine)
        ops.proto_qerr_rows(d, v_d, P_d, k, q, N, H)
        return s, [a.get() for a in (inv_v, inv_p, k, q)]

    s, (inv_v, inv_p, k, q) = run(gpu_dev)
    _ran(gpu_dev, "row_inv_norm_wg", "proto_argmax_wg", "proto_qerr_rows_wg")
    # H ≤ 130 squares summed in float32 (a tree), then 1/sqrt: relative error ≲ 2e-6
    np.testing.assert_allclose(inv_v, 1 / np.sqrt((as64(v) ** 2).sum(1) + 1e-6), rtol=1e-5)
    np.testing.assert_allclose(inv_p, 1 / np.sqrt((as64(P) ** 2).sum(1) + 1e-6), rtol=1e-5)
    want = ref.proto_assign(as64(v), as64(P), similarity)
    np.testing.assert_array_equal(k[2:], want[2:])           # inputs separated by > 1e-3: exact
    assert not (k == 5).any() and (T > 64 or (want == 2).any())   # the duplicate 2 = 5 goes to 2
    assert k[1] == 0 and (cosine or k[0] == (69 if T > 64 else 3))
    # the CPU kernel on the GPU variant's scores and norms: the same k, bit for bit
    cpu_k = dev.empty((N,), i32)
    ops.proto_argmax(dev, dev.to_device(s), dev.to_device(inv_v), dev.to_device(inv_p), cpu_k, N, T, cosine)
    np.testing.assert_array_equal(k, cpu_k.get())
    # |v − P_k|² over H ≤ 130 terms in float32: relative error ≲ 1e-6
    np.testing.assert_allclose(q, ((as64(v) - as64(P)[k]) ** 2).sum(axis=1), rtol=1e-5, atol=0)
    again = run(gpu_dev)[1]
    assert all(a.tobytes() == b.tobytes() for a, b in zip(again, (inv_v, inv_p, k, q)))


@pytest.mark.parametrize("H", [24, 130])
def test_gpu_row_normalize_matches_reference(gpu_dev, H):
    """row_normalize_forward_wg / _backward_wg (H = 130 > 64 items, not a multiple), a zero row."""
    dev = gpu_dev
    rng = np.random.default_rng([45, H])
    N = 17
    h, dk, dh0 = rand(rng, N, H), rand(rng, N, H), rand(rng, N, H)
    h[3] = 0

    def run():
        k, inv, dh = dev.empty((N, H)), dev.empty((N,)), dev.to_device(dh0)
        dev.take_timings()
        ops.row_normalize_forward(dev, dev.to_device(h), k, inv, N, H)
        ops.row_normalize_backward(dev, dev.to_device(dk), k, inv, dh, N, H)   # accumulates into dh
        return [a.get() for a in (k, inv, dh)]

    k, inv, dh = run()
    _ran(dev, "row_normalize_forward_wg", "row_normalize_backward_wg")
    want_k, want_inv = ref.row_normalize_forward(as64(h))
    # as test_row_normalize_forward_backward: a float32 sum of H squares (a tree here), then sqrt
    np.testing.assert_allclose(k, want_k, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(inv, want_inv, rtol=1e-5, atol=0)
    want = as64(dh0) + ref.row_normalize_backward(as64(dk), as64(k), as64(inv))
    np.testing.assert_allclose(dh, want, rtol=1e-5, atol=1e-5)   # an H-term dot and a few products
    assert all(a.tobytes() == b.tobytes() for a, b in zip(run(), (k, inv, dh)))


@pytest.mark.parametrize("S", [8, 11])   # S² = 64 = the work-group, and 121 (strided, partial)
def test_gpu_fw_state_norm_matches_reference(gpu_dev, S):
    dev = gpu_dev
    rng = np.random.default_rng([46, S])
    B, H, eta, lam = 3, 24, 0.7, 0.8
    k, post, w = _fw_inputs(rng, B, S, H, eta, lam)
    G = np.einsum("bth,bsh->bts", *(as64(a).reshape(B, S, H) for a in (k, k))).astype(f32)
    Q = np.einsum("bth,bsh->bts", *(as64(a).reshape(B, S, H) for a in (post, post))).astype(f32)

    def run():
        out = dev.empty((B,))
        dev.take_timings()
        ops.fw_state_norm(dev, dev.to_device(G), dev.to_device(Q), dev.to_device(w), out, B, S)
        return out.get()

    got = run()
    _ran(dev, "fw_state_norm_wg")
    per_seq = [ref.fast_weights_state_norm(as64(k[b * S:(b + 1) * S]), as64(post[b * S:(b + 1) * S]),
                                           1, S, eta, lam) for b in range(B)]
    # S² ≤ 121 products of float32 Gram entries (rounded from float64 here), then a sqrt: ≲ 1e-5
    np.testing.assert_allclose(got, per_seq, rtol=2e-5, atol=0)
    assert np.ptp(per_seq) > 1e-3 and run().tobytes() == got.tobytes()


@pytest.mark.parametrize("C", [37, 24])
def test_gpu_bucket_sums_match_reference(gpu_dev, C):
    """bucket_sums_wg (embedding_backward, proto_sums): one bucket holds half the rows (strided
    over 16 member lanes), one is empty, C not a multiple of 16."""
    dev = gpu_dev
    rng = np.random.default_rng([47, C])
    N, nb = 301, 10
    X = rand(rng, N, C)
    keys = rng.choice([0, 1, 2, 4, 5, 6, 7, 8, 9], size=N).astype(i32)
    keys[rng.permutation(N)[:N // 2]] = 6                       # a crowded bucket; 3 stays empty
    starts, perm = _host_bucket_sort(keys, nb)

    def run():
        out, dW = dev.to_device(np.full((nb, C), np.nan, f32)), dev.to_device(np.full((nb, C), np.nan, f32))
        X_d, p_d, s_d = dev.to_device(X), dev.to_device(perm), dev.to_device(starts)
        dev.take_timings()
        ops.proto_sums(dev, X_d, p_d, s_d, out, nb, C)
        ops.embedding_backward(dev, X_d, p_d, s_d, dW, nb, C)
        return out.get(), dW.get()

    got, dW = run()
    _ran(dev, "bucket_sums_wg")
    want = np.stack([as64(X)[keys == t].sum(axis=0) for t in range(nb)])
    # float32 sums of ≤ 170 N(0,1) terms (16 strided lanes, then a tree): error ≲ 3e-5 absolute
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(got[3], 0.0)                  # the empty bucket: zeros, written
    np.testing.assert_array_equal(dW, got)                      # the same kernel behind both names
    assert run()[0].tobytes() == got.tobytes()


@pytest.mark.parametrize("S,H", [(8, 24), (6, 20)])
def test_gpu_causal_dots_decay_takes_the_tiled_products(gpu_dev, S, H):
    """On the GPU variant causal_dots_decay is X·Yᵀ by the tiled gemm, then causal_decay_mask
    (never the fused per-item kernel), into out through tmp = out as the delta rule calls it."""
    dev = gpu_dev
    rng = np.random.default_rng([48, S, H])
    B = 3
    X, Y = rand(rng, B * S, H), rand(rng, B * S, H)
    w = (0.8 * 0.6 ** np.arange(S)).astype(f32)
    out = dev.to_device(np.full((B, S, S), np.nan, f32))
    dev.take_timings()
    ops.causal_dots_decay(dev, dev.to_device(X), dev.to_device(Y), dev.to_device(w), out, B, S, H, tmp=out)
    ran = set(dev.take_timings())
    assert "causal_decay_mask" in ran and "causal_dots_decay" not in ran, ran
    t, tau = np.arange(S)[:, None], np.arange(S)[None, :]
    wmat = np.where(tau < t, as64(w)[np.maximum(t - 1 - tau, 0)], 0.0)
    want = wmat[None] * np.einsum("bth,bsh->bts", as64(X).reshape(B, S, H), as64(Y).reshape(B, S, H))
    got = out.get()
    np.testing.assert_array_equal(got * (wmat[None] == 0), 0.0)              # τ ≥ t: exactly 0
    # as test_causal_dots_decay_matches_product_and_mask: H ≤ 24-term dots in float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
