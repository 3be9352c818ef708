"""The delta rule of the fast-weight memory on the device (kernels/delta.cl, engine.ops) against
its numpy reference (engine.reference.fast_weights_delta_forward / _backward), both kernel variants.

    python -m pytest tests/test_delta.py -q

The reference runs the recurrence on A in float64 from the same float32 inputs; the device
solves the equivalent triangular systems in float32 (kernels/delta.cl's header), so each
tolerance covers float32 rounding only. The reference's own backward is checked against float64
finite differences in tests/test_reference.py (test_delta_rule_backward_matches_finite_differences).
Key: B sequences of S positions, N = B·S rows, H hidden.
"""
import numpy as np
import pytest

from engine import ops
from engine import reference as ref

pytestmark = pytest.mark.opencl

f32, f64 = np.float32, np.float64
VARIANTS = ["dev", "gpu_dev"]   # the device's own family (CPU on PoCL) and the forced GPU family


def unit_rows(x):
    return (x / np.sqrt(np.sum(x * x, axis=1, keepdims=True) + 1e-6)).astype(f32)


def gelu(x):
    return 0.5 * x * (1.0 + np.tanh(0.7978845608 * (x + 0.044715 * x ** 3)))


def inputs(seed, B, S, H, post_kind):
    """k unit-norm rows as row_normalize gives them; post spikes {0,1} or GELU activity. The
    activity case builds the keys from the same non-negative activity, so keys are far from
    orthogonal (cosines ~0.5-0.8), as in the model: the solves are then strongly coupled."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((B * S, H)) + 0.3
    h = gelu(a)
    k = unit_rows(h if post_kind == "activity" else rng.standard_normal((B * S, H)))
    post = (h > 0.5 if post_kind == "spikes" else h).astype(f32)
    dm = rng.standard_normal((B * S, H)).astype(f32)
    return k, post, dm


def run(d, k, post, dm, B, S, H, eta, lam, backward_twice=False):
    """m and dk from the device, outputs filled with NaN first (they must be overwritten)."""
    scratch = {name: d.empty(shape, dtype) for name, (shape, dtype) in ops.delta_scratch(B, S, H, d.variant).items()}
    kd, pd, dmd = d.to_device(k), d.to_device(post), d.to_device(dm)
    m, dk = d.to_device(np.full((B * S, H), np.nan, f32)), d.to_device(np.full((B * S, H), np.nan, f32))
    ops.fast_weights_delta_forward(d, kd, pd, eta, lam, m, B, S, H, scratch)
    ops.fast_weights_delta_backward(d, dmd, kd, eta, lam, dk, B, S, H, scratch)
    first = dk.get()
    if backward_twice:   # the forward's scratch survives the backward
        dk.fill(np.nan)
        ops.fast_weights_delta_backward(d, dmd, kd, eta, lam, dk, B, S, H, scratch)
        np.testing.assert_array_equal(dk.get(), first)
    return m.get(), first


def reference(k, post, dm, B, S, eta, lam):
    k, post, dm = (np.asarray(a, f64) for a in (k, post, dm))
    return (ref.fast_weights_delta_forward(k, post, B, S, eta, lam),
            ref.fast_weights_delta_backward(dm, k, post, B, S, eta, lam))


CASES = [  # (B, S, H, post, eta, lam)
    (3, 7, 24, "spikes", 0.8, 0.9),      # float8 solve (H % 8 == 0), Gram through gemm + mask (S % 4 != 0)
    (3, 7, 21, "activity", 1.0, 0.97),   # H not a multiple of 4 or 8: scalar solve, partial GPU work-group
    (2, 8, 24, "activity", 1.0, 0.5),    # the one-pass causal_dots_decay Gram (S % 4 == 0, H % 8 == 0)
    (2, 12, 64, "spikes", 1.0, 1.0),     # NB = 4 column blocks per CPU work-item; no decay
    (1, 70, 20, "spikes", 0.6, 0.95),    # S > the GPU work-group (64): several staged tiles of Gm per step
    (2, 40, 16, "activity", 1.0, 0.5),   # λ = 0.5: inverting the recurrence would gain 2 per step (2⁴⁰)
]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("B,S,H,post_kind,eta,lam", CASES)
def test_delta_rule_matches_reference(request, variant, B, S, H, post_kind, eta, lam):
    d = request.getfixturevalue(variant)
    k, post, dm = inputs([B, S, H, len(post_kind)], B, S, H, post_kind)
    m, dk = run(d, k, post, dm, B, S, H, eta, lam, backward_twice=True)
    want_m, want_dk = reference(k, post, dm, B, S, eta, lam)
    # m: float32 Gram dots over H ≤ 64 unit-norm terms, then sums of < S terms of size ≤ |u| in
    # the solve; observed ≤ 2.3e-7 on |m| ≤ 1.7 (≤ 1.5e-6 at B=2, S=64, H=384, η=1.9): ≥ 10x
    # margin. A missing, doubled or misplaced term is O(0.1).
    np.testing.assert_allclose(m, want_m, rtol=1e-5, atol=2e-6)
    # dk: two solves, a Gram and two S-term products on values up to ~20; observed ≤ 1.3e-6,
    # i.e. ≤ 2.6e-7 of max |dk| (≤ 4e-7 at the reference size): atol 2e-6 of the largest
    # gradient leaves ~8x margin for another device's rounding (contracted multiply-adds)
    scale = float(np.abs(want_dk).max())
    np.testing.assert_allclose(dk, want_dk, rtol=1e-5, atol=2e-6 * scale)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("S", [1, 2])
def test_delta_rule_short_sequences(request, variant, S):
    d = request.getfixturevalue(variant)
    B, H, eta, lam = 4, 24, 0.9, 0.8
    k, post, dm = inputs([S, 5], B, S, H, "spikes")
    m, dk = run(d, k, post, dm, B, S, H, eta, lam)
    want_m, want_dk = reference(k, post, dm, B, S, eta, lam)
    first = np.arange(B) * S
    np.testing.assert_array_equal(m[first], 0)                   # nothing is written before step 0
    if S == 1:
        np.testing.assert_array_equal(dk, 0)                     # m does not depend on k at all
        return
    # S = 2: m_1 = η·(k_0·k_1)·post_0 and dk from one product each way: a few roundings
    np.testing.assert_allclose(m, want_m, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dk, want_dk, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_delta_rule_reruns_are_bit_identical(request, variant):
    d = request.getfixturevalue(variant)
    B, S, H = 3, 16, 40
    k, post, dm = inputs(9, B, S, H, "activity")
    first = run(d, k, post, dm, B, S, H, 1.0, 0.9)
    for a, b in zip(run(d, k, post, dm, B, S, H, 1.0, 0.9), first):   # fixed summation order: same bits
        np.testing.assert_array_equal(a, b)


def test_delta_scratch_is_bounded_by_the_sequence_not_the_state():
    """Scratch is 2·B·S² + N·H floats for either variant: no H×H matrix per sequence."""
    B, S, H = 64, 64, 384
    for variant in ("cpu", "gpu"):
        sizes = ops.delta_scratch(B, S, H, variant)
        total = sum(int(np.prod(shape)) * np.dtype(dt).itemsize for shape, dt in sizes.values())
        assert total == 4 * (2 * B * S * S + B * S * H) == 8 * 2**20
        assert total < 4 * B * H * H / 4     # a quarter of one A per sequence (36 MiB)
    with pytest.raises(ValueError, match="variant"):
        ops.delta_scratch(B, S, H, "tpu")
