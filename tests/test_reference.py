"""Pure-numpy tests of engine/reference.py: backward functions vs float64 finite differences,
plus hand-computed values for the loss, optimiser, hash and local rules.

    python -m pytest tests/test_reference.py -q

Key: B batch, S sequence, N = B*S, E embedding, H hidden, V vocabulary, T prototypes.
"""
import dataclasses
import itertools
import math

import numpy as np
import pytest

from engine import reference as ref

B, S, E, H, V, T = 2, 5, 4, 6, 7, 3
N = B * S
FD_STEP = 1e-6          # central differences in float64: truncation ~1e-12, round-off ~1e-10


def numerical_grad(f, X, step=FD_STEP):
    """Central finite differences of the scalar f() w.r.t. every entry of X (perturbed in place)."""
    g = np.zeros_like(X)
    for i in np.ndindex(X.shape):
        old = X[i]
        X[i] = old + step
        fp = f()
        X[i] = old - step
        fm = f()
        X[i] = old
        g[i] = (fp - fm) / (2 * step)
    return g


def rng_(seed=0):
    return np.random.default_rng(seed)


# ----------------------------------------------------------------------------- kernel-level backward vs FD

def test_embedding_forward_backward():
    r = rng_(1)
    W = r.standard_normal((V, E))
    x = np.array([3, 0, 3, 6, 1, 3, 2, 0, 5, 6], dtype=np.int32)    # repeated ids, id 4 absent
    G = r.standard_normal((N, E))                                   # L = sum(G * e)
    np.testing.assert_array_equal(ref.embedding_forward(W, x)[2], W[3])
    fd = numerical_grad(lambda: np.sum(G * ref.embedding_forward(W, x)), W)
    dW = ref.embedding_backward(G, x, V)
    np.testing.assert_allclose(dW, fd, rtol=1e-6, atol=1e-8)
    np.testing.assert_array_equal(dW[4], 0)                          # absent id gets no gradient
    np.testing.assert_allclose(dW[3], G[0] + G[2] + G[5], rtol=1e-15, atol=0)


def test_gelu_values_and_backward():
    a = np.array([-1.0, 0.0, 1.0, 2.5])
    # GELU(a) = a * Phi(a); Phi(1) = 0.8413447460685429, Phi(2.5) = 0.9937903346742238 (normal tables)
    want = np.array([-1.0 * (1 - 0.8413447460685429), 0.0, 0.8413447460685429, 2.5 * 0.9937903346742238])
    np.testing.assert_allclose(ref.gelu_forward(a), want, rtol=1e-12, atol=1e-15)
    a32 = a.astype(np.float32)
    assert ref.gelu_forward(a32).dtype == np.float32
    assert ref.gelu_backward(a32, a32).dtype == np.float32
    np.testing.assert_allclose(ref.gelu_forward(a32), want, rtol=1e-6, atol=1e-7)
    r = rng_(2)
    A = r.standard_normal((N, H)) * 2
    G = r.standard_normal((N, H))
    fd = numerical_grad(lambda: np.sum(G * ref.gelu_forward(A)), A)
    np.testing.assert_allclose(ref.gelu_backward(G, A), fd, rtol=1e-6, atol=1e-8)


def test_spikes_forward():
    h = np.array([[0.2, 0.5, 0.7], [-1.0, 0.5000001, 3.0]], dtype=np.float32)
    s = ref.spikes_forward(h, 0.5)
    assert s.dtype == np.float32
    np.testing.assert_array_equal(s, [[0, 0, 1], [0, 1, 1]])        # strict >: h == theta is no spike


def test_row_normalize_backward():
    r = rng_(3)
    Hm = r.standard_normal((N, H))
    Hm[0] *= 1e-2                                                    # a small row: the eps matters
    G = r.standard_normal((N, H))
    k, inv_norm = ref.row_normalize_forward(Hm)
    np.testing.assert_allclose(k[1], Hm[1] / math.sqrt(Hm[1] @ Hm[1] + 1e-6), rtol=1e-14, atol=0)
    fd = numerical_grad(lambda: np.sum(G * ref.row_normalize_forward(Hm)[0]), Hm)
    np.testing.assert_allclose(ref.row_normalize_backward(G, k, inv_norm), fd, rtol=1e-6, atol=1e-8)


def fast_weights_loop(k, post, B_, S_, eta, lam):
    """The recurrent definition, one explicit (H,H) matrix A_t per step, reset per sequence."""
    m = np.zeros_like(k)
    for b in range(B_):
        A = np.zeros((k.shape[1], k.shape[1]))
        for t in range(S_):
            n = b * S_ + t
            m[n] = A @ k[n]                                          # m_t = A_{t-1} k_t
            A = lam * A + eta * np.outer(post[n], k[n])
    return m


@pytest.mark.parametrize("lam", [0.9, 0.0, 1.0])
def test_fast_weights_forward_matches_recurrence(lam):
    r = rng_(4)
    k, _ = ref.row_normalize_forward(r.standard_normal((N, H)))
    post = r.standard_normal((N, H))
    m = ref.fast_weights_forward(k, post, B, S, 0.7, lam)
    np.testing.assert_allclose(m, fast_weights_loop(k, post, B, S, 0.7, lam), rtol=0, atol=1e-12)
    np.testing.assert_array_equal(m[[0, S]], 0)                      # first position of each sequence: A_{-1} = 0
    assert np.abs(m[S + 1]).max() > 1e-3                             # memory does act within a sequence


def test_fast_weights_backward():
    r = rng_(5)
    k = r.standard_normal((N, H))
    post = r.standard_normal((N, H))
    G = r.standard_normal((N, H))
    fd = numerical_grad(lambda: np.sum(G * ref.fast_weights_forward(k, post, B, S, 0.7, 0.8)), k)
    dk = ref.fast_weights_backward(G, k, post, B, S, 0.7, 0.8)
    np.testing.assert_allclose(dk, fd, rtol=1e-6, atol=1e-8)


def test_fast_weights_state_norm():
    r = rng_(6)
    k, post = r.standard_normal((N, H)), r.standard_normal((N, H))
    eta, lam = 0.7, 0.8
    norms = []
    for b in range(B):
        A = np.zeros((H, H))
        for t in range(S):
            A = lam * A + eta * np.outer(post[b * S + t], k[b * S + t])
        norms.append(np.linalg.norm(A, "fro"))
    got = ref.fast_weights_state_norm(k, post, B, S, eta, lam)
    assert abs(got - np.mean(norms)) <= 1e-12 * np.mean(norms)
    assert abs(norms[0] - norms[1]) > 1e-3                           # the mean is over distinct sequences


def test_modulate_forward_backward():
    h = np.array([[1.0, 0.0]])
    W = np.array([[0.0, 1.0], [0.0, 0.0]])                          # h W = [0, 1], h W^T = [0, 0]
    np.testing.assert_allclose(ref.modulate_forward(h, W, 0.5), [[1.0, 0.5]], rtol=0, atol=1e-15)
    r = rng_(7)
    Hm, Wh, G = r.standard_normal((N, H)), r.standard_normal((H, H)), r.standard_normal((N, H))
    fd = numerical_grad(lambda: np.sum(G * ref.modulate_forward(Hm, Wh, 0.3)), Hm)
    np.testing.assert_allclose(ref.modulate_backward(G, Wh, 0.3), fd, rtol=1e-6, atol=1e-8)


def test_proto_assign_and_feature():
    P = np.array([[10.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    v = np.array([[1.0, 1.1], [0.2, 3.0], [3.0, -0.1]])
    # cosine ignores |P_0| = 10: row 0 is closer in angle to [0,1]; dot prefers P_0
    np.testing.assert_array_equal(ref.proto_assign(v, P, "cosine"), [1, 1, 0])
    np.testing.assert_array_equal(ref.proto_assign(v, P, "dot"), [0, 1, 0])
    k = ref.proto_assign(v, P, "cosine")
    assert k.dtype == np.int32                                       # ties P_1 == P_2 -> lowest index 1
    z = ref.proto_feature_forward(v, P, k, 0.5)
    np.testing.assert_allclose(z, v + 0.5 * P[[1, 1, 0]], rtol=0, atol=1e-15)


# ----------------------------------------------------------------------------- loss

def test_softmax_xent_values_and_backward():
    r = rng_(8)
    logits = r.standard_normal((N, V)) * 3
    y = r.integers(0, V, N).astype(np.int32)
    y[[2, 7]] = ref.PAD
    loss, rows, dlogits, nv = ref.softmax_xent_forward(logits, y)
    assert nv == N - 2
    n = 0
    want0 = math.log(sum(math.exp(l) for l in logits[n])) - logits[n, y[n]]
    assert abs(rows[0] - want0) <= 1e-12
    assert abs(loss - rows.sum() / (N - 2)) <= 1e-12
    np.testing.assert_array_equal(rows[[2, 7]], 0)
    np.testing.assert_array_equal(dlogits[[2, 7]], 0)
    fd = numerical_grad(lambda: ref.softmax_xent_forward(logits, y)[0], logits)
    np.testing.assert_allclose(dlogits, fd, rtol=1e-6, atol=1e-8)
    # zero logits: loss = log V on every valid row
    assert abs(ref.softmax_xent_forward(np.zeros((N, V)), y)[0] - math.log(V)) <= 1e-12


def test_softmax_xent_ignores_pad():
    r = rng_(9)
    logits = r.standard_normal((N, V))
    y = r.integers(0, V, N).astype(np.int32)
    y[3] = ref.PAD
    before = ref.softmax_xent_forward(logits, y)
    logits2 = logits.copy()
    logits2[3] = r.standard_normal(V) * 100 + 50                    # large values: must not overflow into loss
    after = ref.softmax_xent_forward(logits2, y)
    assert after[0] == before[0]
    np.testing.assert_array_equal(after[2], before[2])
    # all PAD: loss 0, gradient 0, Nv 0
    loss, rows, dlogits, nv = ref.softmax_xent_forward(logits, np.full(N, ref.PAD, np.int32))
    assert (loss, nv) == (0, 0)
    assert not dlogits.any() and not rows.any()
    # float32 in, float32 out
    l32 = ref.softmax_xent_forward(logits.astype(np.float32), y)
    assert l32[2].dtype == np.float32 and l32[0].dtype == np.float32
    assert abs(float(l32[0]) - before[0]) < 1e-6


def test_layernorm_backward_matches_finite_differences():
    rng = rng_(21)
    x = rng.standard_normal((N, H)) * 2.0 + 0.5
    gamma, beta = rng.standard_normal(H), rng.standard_normal(H)
    w = rng.standard_normal((N, H))                       # loss = Σ w·y
    loss = lambda: float(np.sum(w * ref.layernorm_forward(x, gamma, beta)[0]))
    y, cache = ref.layernorm_forward(x, gamma, beta)
    np.testing.assert_allclose(y.mean(axis=1), beta.mean() + 0 * y.mean(axis=1), atol=10)   # shape sanity
    xhat = cache["xhat"]
    np.testing.assert_allclose(xhat.mean(axis=1), 0, atol=1e-12)                         # normalised rows
    np.testing.assert_allclose((xhat ** 2).mean(axis=1), 1, rtol=1e-4)                   # var/(var+eps)
    dx, dgamma, dbeta = ref.layernorm_backward(w, cache)
    # central differences in float64: observed agreement ~1e-9 on O(1) gradients
    np.testing.assert_allclose(dx, numerical_grad(loss, x), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(dgamma, numerical_grad(loss, gamma), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(dbeta, numerical_grad(loss, beta), rtol=1e-6, atol=1e-8)


def test_delta_rule_overwrites_where_the_sum_rule_adds():
    e1, e2 = np.eye(3)[0], np.eye(3)[1]
    k = np.stack([e1, e1, e1, e2])                         # the same key written twice, then read
    post = np.array([[1.0, 0, 0], [0, 2.0, 0], [0, 0, 0], [0, 0, 0]])
    delta = ref.fast_weights_delta_forward(k, post, 1, 4, 1.0, 1.0)
    summ = ref.fast_weights_forward(k, post, 1, 4, 1.0, 1.0)
    np.testing.assert_array_equal(delta[0], 0)              # nothing written before the first step
    np.testing.assert_allclose(delta[1], summ[1])          # after one write the two rules agree
    np.testing.assert_allclose(delta[2], [0, 2.0, 0])      # the second write replaced the first
    np.testing.assert_allclose(summ[2], [1.0, 2.0, 0])     # ... which the sum rule keeps adding to
    np.testing.assert_allclose(delta[3], 0)                # an orthogonal key retrieves nothing


def test_delta_rule_backward_matches_finite_differences():
    rng = rng_(23)
    k = rng.standard_normal((N, H)) * 0.5
    post = (rng.random((N, H)) > 0.5).astype(np.float64)
    w = rng.standard_normal((N, H))
    eta, lam = 0.7, 0.6
    loss = lambda: float(np.sum(w * ref.fast_weights_delta_forward(k, post, B, S, eta, lam)))
    dk = ref.fast_weights_delta_backward(w, k, post, B, S, eta, lam)
    # central differences in float64 through S = 5 recurrent steps: observed ~1e-9
    np.testing.assert_allclose(dk, numerical_grad(loss, k), rtol=1e-6, atol=1e-8)


def test_batchnorm_backward_matches_finite_differences_and_keeps_running_statistics():
    rng = rng_(22)
    x = rng.standard_normal((N, H)) * 1.5 - 0.7
    gamma, beta = rng.standard_normal(H), rng.standard_normal(H)
    w = rng.standard_normal((N, H))
    loss = lambda: float(np.sum(w * ref.batchnorm_forward(x, gamma, beta)[0]))
    y, cache = ref.batchnorm_forward(x, gamma, beta)
    np.testing.assert_allclose(cache["xhat"].mean(axis=0), 0, atol=1e-12)              # normalised columns
    dx, dgamma, dbeta = ref.batchnorm_backward(w, cache)
    # central differences in float64: observed agreement ~1e-9 on O(1) gradients
    np.testing.assert_allclose(dx, numerical_grad(loss, x), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(dgamma, numerical_grad(loss, gamma), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(dbeta, numerical_grad(loss, beta), rtol=1e-6, atol=1e-8)
    rm, rv = np.zeros(H), np.ones(H)
    ref.batchnorm_running(rm, rv, cache, N, 0.1)
    np.testing.assert_allclose(rm, 0.1 * x.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(rv, 0.9 + 0.1 * x.var(axis=0, ddof=1), rtol=1e-12)       # unbiased, as torch
    np.testing.assert_allclose(ref.batchnorm_eval(x, gamma, beta, x.mean(axis=0), x.var(axis=0)), y, rtol=1e-12)


def test_dropout_mask_is_the_counter_hash_and_drops_a_fraction_p():
    key = ref.dropout_key(7, 2)
    assert key == ref.hash_u32(7, 2, 0x5BD1E995) and key != ref.dropout_key(7, 3)
    keep = ref.dropout_mask(1000, 0.25, key, 11)
    thr = ref.dropout_threshold(0.25)
    assert thr == 2 ** 30
    assert [bool(k) for k in keep[:50]] == [ref.hash_u32(key, 11, i) >= thr for i in range(50)]  # scalar hash
    assert abs(1 - keep.mean() - 0.25) < 0.04                       # binomial sd ≈ 0.014
    assert (keep != ref.dropout_mask(1000, 0.25, key, 12)).any()    # another step, another mask
    assert ref.dropout_mask(100, 0.0, key, 11).all()
    x = rng_(3).standard_normal((10, 100))
    y = ref.dropout_forward(x, 0.25, key, 11)
    kept = ref.dropout_mask(1000, 0.25, key, 11).reshape(10, 100)
    np.testing.assert_array_equal(y[kept], x[kept] * (1.0 / 0.75))   # inverted dropout: scaled by 1/(1−p)
    assert not y[~kept].any()
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        ref.dropout_threshold(1.0)


# ----------------------------------------------------------------------------- optimiser

def test_adamw_step_matches_hand_computation():
    lr, b1, b2, eps, wd, clip_norm, clip_value = 0.1, 0.9, 0.99, 1e-8, 0.01, 1.0, 2.0
    params = {"w": np.array([1.5]), "b": np.array([-0.5])}
    grads = {"w": np.array([3.0]), "b": np.array([-4.0])}
    m = {k: np.zeros(1) for k in params}
    v = {k: np.zeros(1) for k in params}
    mask = {"w": True, "b": False}

    # by hand: gnorm = sqrt(9 + 16) = 5 before clipping; clamp -> (2, -2); scale = 1/(5 + 1e-6)
    hand = {"w": 1.5, "b": -0.5}
    hm, hv = {"w": 0.0, "b": 0.0}, {"w": 0.0, "b": 0.0}
    for t in (1, 2):
        gn = ref.adamw_step(params, grads, m, v, t, lr, b1, b2, eps, wd, mask, clip_norm, clip_value)
        assert abs(gn - 5.0) <= 1e-12
        for name, g_raw, decay in (("w", 3.0, wd), ("b", -4.0, 0.0)):
            g = max(-2.0, min(2.0, g_raw)) * min(1.0, 1.0 / (5.0 + 1e-6))
            hm[name] = b1 * hm[name] + (1 - b1) * g
            hv[name] = b2 * hv[name] + (1 - b2) * g * g
            mh, vh = hm[name] / (1 - b1 ** t), hv[name] / (1 - b2 ** t)
            hand[name] = hand[name] - lr * (mh / (math.sqrt(vh) + eps) + decay * hand[name])
            assert abs(params[name][0] - hand[name]) <= 1e-14
            assert abs(m[name][0] - hm[name]) <= 1e-15 and abs(v[name][0] - hv[name]) <= 1e-15
    np.testing.assert_array_equal(grads["w"], [3.0])                # grads are not modified
    # the decay really acted on w only: w's first step differs from b's mirror image by lr*wd*w
    assert abs(hand["w"] - 1.5 + 2 * 0.1) > 1e-4

    # clipping disabled: the first step is -lr * sign(g) (Adam's bias-corrected first step)
    p = {"w": np.array([0.0])}
    ref.adamw_step(p, {"w": np.array([7.0])}, {"w": np.zeros(1)}, {"w": np.zeros(1)}, 1,
                   0.1, 0.9, 0.999, 0.0, 0.0, {"w": True}, 0.0, 0.0)
    assert abs(p["w"][0] + 0.1) <= 1e-12


def test_sgd_step_matches_hand_computation():
    lr, mu, wd, clip_norm, clip_value = 0.1, 0.9, 0.01, 1.0, 2.0
    params = {"w": np.array([1.5]), "b": np.array([-0.5])}
    grads = {"w": np.array([3.0]), "b": np.array([-4.0])}
    vel = {k: np.zeros(1) for k in params}
    mask = {"w": True, "b": False}
    hand, hvel = {"w": 1.5, "b": -0.5}, {"w": 0.0, "b": 0.0}
    for _ in range(3):
        gn = ref.sgd_step(params, grads, vel, lr, mu, wd, mask, clip_norm, clip_value)
        assert abs(gn - 5.0) <= 1e-12                          # before clipping
        for name, g_raw, decay in (("w", 3.0, wd), ("b", -4.0, 0.0)):
            g = max(-2.0, min(2.0, g_raw)) * min(1.0, 1.0 / (5.0 + 1e-6)) + decay * hand[name]
            hvel[name] = mu * hvel[name] + g
            hand[name] -= lr * hvel[name]
            assert abs(params[name][0] - hand[name]) <= 1e-14 and abs(vel[name][0] - hvel[name]) <= 1e-14
    np.testing.assert_array_equal(grads["w"], [3.0])
    # no momentum, no clipping, no decay: plain gradient descent
    p = {"w": np.array([1.0])}
    ref.sgd_step(p, {"w": np.array([7.0])}, {"w": np.zeros(1)}, 0.1, 0.0, 0.0, {"w": True}, 0.0, 0.0)
    assert abs(p["w"][0] - (1.0 - 0.7)) <= 1e-12


# ----------------------------------------------------------------------------- hash and local rules

def hash_numpy_u32(seed, step, t):
    """Independent implementation on numpy uint32 (wraps modulo 2^32 like the device)."""
    u = np.uint32
    with np.errstate(over="ignore"):
        h = u(seed) * u(0x9E3779B1) + u(step) * u(0x85EBCA77) + u(t) * u(0xC2B2AE3D) + u(0x27D4EB2F)
        h ^= h >> u(16)
        h *= u(0x85EBCA6B)
        h ^= h >> u(13)
        h *= u(0xC2B2AE35)
        h ^= h >> u(16)
    return int(h)


def test_hash_u32_known_values():
    known = {(0, 0, 0): 2349025055, (0, 1, 0): 1111856246, (1, 1, 0): 3243631369,
             (42, 7, 3): 1134379989, (1234, 100000, 15): 2703277603,
             (2**32 - 1, 2**32 - 1, 2**32 - 1): 1157015162}
    for args, want in known.items():
        assert ref.hash_u32(*args) == want
        assert hash_numpy_u32(*args) == want
    outs = [ref.hash_u32(s, st, t) for s in range(3) for st in range(1, 20) for t in range(8)]
    assert all(0 <= o <= 0xFFFFFFFF for o in outs)
    assert len(set(outs)) == len(outs)                               # no collisions on a small grid


def test_hebbian_update():
    r = rng_(10)
    W = r.standard_normal((H, H))
    h, post = r.standard_normal((N, H)), (r.random((N, H)) > 0.5).astype(float)
    want = 0.9 * W + 0.05 * sum(np.outer(h[n], post[n]) for n in range(N)) / N
    ref.hebbian_update(W, h, post, lr=0.05, decay=0.1)
    np.testing.assert_allclose(W, want, rtol=0, atol=1e-14)


def test_proto_update_kmeans_step_and_reseed():
    r = rng_(11)
    v = r.standard_normal((N, H))
    P0 = r.standard_normal((T, H))
    k = np.array([0, 0, 1, 0, 1, 1, 0, 0, 1, 0], dtype=np.int32)      # prototype 2 gets nothing
    usage0 = np.array([0.5, 0.4, 0.1])
    lr, rho, thr, seed, step = 0.3, 0.5, 0.5, 17, 5

    P, usage = P0.copy(), usage0.copy()
    ref.proto_update(P, usage, v, k, lr, rho, thr, seed, step)
    mu0 = v[k == 0].mean(axis=0)
    np.testing.assert_allclose(P[0], P0[0] + lr * (mu0 - P0[0]), rtol=0, atol=1e-14)
    np.testing.assert_allclose(P[1], P0[1] + lr * (v[k == 1].mean(axis=0) - P0[1]), rtol=0, atol=1e-14)
    np.testing.assert_allclose(usage[:2], [0.5 * 0.5 + 0.5 * 0.6, 0.5 * 0.4 + 0.5 * 0.4], rtol=0, atol=1e-15)
    # usage_2 = 0.5*0.1 + 0 = 0.05 < 0.5/3: dead, re-seeded to v[hash mod N], usage 1/T
    j = ref.hash_u32(seed, step, 2) % N
    assert j not in {ref.hash_u32(seed, step, t) % N for t in (0, 1, 3)} | \
        {ref.hash_u32(seed, st, 2) % N for st in (step - 1, step + 1)}   # the index pins (seed, step, t)
    np.testing.assert_array_equal(P[2], v[j])
    assert usage[2] == 1.0 / T

    # threshold 0 disables re-seeding: the empty prototype stays where it was
    P, usage = P0.copy(), usage0.copy()
    ref.proto_update(P, usage, v, k, lr, rho, 0.0, seed, step)
    np.testing.assert_array_equal(P[2], P0[2])
    assert abs(usage[2] - 0.05) <= 1e-15


def test_kmeanspp_init():
    r = rng_(12)
    v = r.standard_normal((N, H)).astype(np.float32)
    P = ref.kmeanspp_init(v, T, seed=5)
    assert P.dtype == np.float32 and P.shape == (T, H)
    first = np.random.default_rng([5, 2]).integers(N)
    np.testing.assert_array_equal(P[0], v[first])
    np.testing.assert_array_equal(ref.kmeanspp_init(v, T, seed=5), P)        # deterministic
    # D^2 sampling never re-picks a chosen point while others are left: T = N gives a permutation
    full = ref.kmeanspp_init(v, N, seed=5)
    assert sorted(map(tuple, full.tolist())) == sorted(map(tuple, v.tolist()))
    # all points identical: D^2 sums to 0, falls back to uniform picks
    same = ref.kmeanspp_init(np.ones((N, H)), T, seed=5)
    np.testing.assert_array_equal(same, 1.0)


# ----------------------------------------------------------------------------- whole model vs FD

def test_init_params_draw_order_and_scale():
    r = np.random.default_rng(9)
    W_emb, W1, W2 = r.standard_normal((V, E)), r.standard_normal((E, H)), r.standard_normal((H, V))
    p = ref.init_params(V, E, H, seed=9, dtype=np.float32)
    np.testing.assert_array_equal(p["W_emb"], W_emb.astype(np.float32))
    np.testing.assert_array_equal(p["W1"], (W1 / math.sqrt(E)).astype(np.float32))
    np.testing.assert_array_equal(p["W2"], (W2 / math.sqrt(H)).astype(np.float32))
    assert p["b1"].shape == (H,) and p["b2"].shape == (V,) and not p["b1"].any() and not p["b2"].any()
    assert all(a.dtype == np.float32 for a in p.values())
    np.testing.assert_array_equal(ref.init_params(V, E, H, seed=9, dtype=np.float64)["W1"], W1 / math.sqrt(E))


def make_problem(wiring, seed=0):
    """float64 params, state and batch, with spike threshold and prototypes chosen away from ties."""
    params = ref.init_params(V, E, H, seed, dtype=np.float64)
    r = rng_(seed + 100)
    x = r.integers(0, V, (B, S)).astype(np.int32)
    y = r.integers(0, V, (B, S)).astype(np.int32)
    y[1, 2] = ref.PAD
    state = ref.init_state(H, T, np.float64)
    state["W_hebb"] = r.standard_normal((H, H)) * 0.3
    # theta in the middle of the widest gap between h values around the median: mixed spikes, margin
    _, c0 = ref.model_forward(params, state, x, y, ref.Wiring())
    hs = np.sort(c0["h"].ravel())
    mid = hs[len(hs) // 4: 3 * len(hs) // 4]
    i = int(np.argmax(np.diff(mid)))
    theta = float(0.5 * (mid[i] + mid[i + 1]))
    wiring = dataclasses.replace(wiring, spike_threshold=theta)
    assert np.abs(c0["h"] - theta).min() > 1e-3
    _, c1 = ref.model_forward(params, state, x, y, dataclasses.replace(wiring, proto_mode="off"))
    state["P"] = ref.kmeanspp_init(c1["ht"], T, seed)
    return params, state, x, y, wiring


WIRINGS = list(itertools.product(ref.HEBB_MODES, ref.PROTO_MODES, ref.HEBB_POSTS))


@pytest.mark.parametrize("hebb_mode,proto_mode,hebb_post", WIRINGS)
def test_model_gradients_match_finite_differences(hebb_mode, proto_mode, hebb_post):
    wiring = ref.Wiring(hebb_mode=hebb_mode, hebb_lr=0.6, hebb_decay=0.2, hebb_strength=0.7,
                        hebb_post=hebb_post, proto_mode=proto_mode, proto_strength=0.5,
                        proto_similarity="cosine" if hebb_post == "spikes" else "dot")
    params, state, x, y, wiring = make_problem(wiring)
    loss0, cache0 = ref.model_forward(params, state, x, y, wiring)
    grads = ref.model_backward(params, state, cache0, wiring)
    # post is a constant for backprop: hold it at its unperturbed value (matters for post = activity)
    frozen = cache0["post"] if hebb_post == "activity" else None

    checked = total = 0
    for name, p in params.items():
        for i in np.ndindex(p.shape):
            total += 1
            old = p[i]
            vals, same = [], True
            for delta in (FD_STEP, -FD_STEP):
                p[i] = old + delta
                loss, c = ref.model_forward(params, state, x, y, wiring, frozen_post=frozen)
                vals.append(loss)
                # spikes and argmax are piecewise constant: skip a coordinate that crosses an edge
                same &= np.array_equal(c["s"], cache0["s"])
                if proto_mode != "off":
                    same &= np.array_equal(c["assign"], cache0["assign"])
            p[i] = old
            if not same:
                continue
            checked += 1
            fd = (vals[0] - vals[1]) / (2 * FD_STEP)
            assert abs(grads[name][i] - fd) <= 1e-8 + 1e-6 * abs(fd), (name, i, grads[name][i], fd)
    assert checked >= 0.95 * total, (checked, total)
    assert max(np.abs(g).max() for g in grads.values()) > 1e-3       # a non-trivial gradient was checked


def test_wiring_rejects_unknown_modes():
    with pytest.raises(ValueError, match="hebb_mode"):
        ref.Wiring(hebb_mode="fastweights")
    with pytest.raises(ValueError, match="proto_similarity"):
        ref.Wiring(proto_similarity="l2")


def test_model_wirings_change_the_forward():
    """The wirings are live: each variant's h~ / z differs from the plain path in the intended way."""
    base = ref.Wiring(hebb_lr=0.6, hebb_decay=0.2, hebb_strength=0.7, proto_strength=0.5)
    params, state, x, y, base = make_problem(base)
    _, c_off = ref.model_forward(params, state, x, y, base)
    np.testing.assert_array_equal(c_off["z"], c_off["h"])
    _, c_mod = ref.model_forward(params, state, x, y, dataclasses.replace(base, hebb_mode="modulate"))
    np.testing.assert_allclose(c_mod["ht"], c_off["h"] + 0.7 * c_off["h"] @ state["W_hebb"], rtol=0, atol=1e-14)
    _, c_fw = ref.model_forward(params, state, x, y, dataclasses.replace(base, hebb_mode="fast_weights"))
    k, _ = ref.row_normalize_forward(c_off["h"])
    m = fast_weights_loop(k, c_off["s"], B, S, 0.6, 0.8)
    np.testing.assert_allclose(c_fw["ht"], c_off["h"] + m, rtol=0, atol=1e-12)
    assert np.abs(m).max() > 1e-2
    _, c_ft = ref.model_forward(params, state, x, y, dataclasses.replace(base, proto_mode="feature"))
    np.testing.assert_allclose(c_ft["z"], c_off["h"] + 0.5 * state["P"][c_ft["assign"]], rtol=0, atol=1e-15)
    # float32 forward agrees with float64 to float32 accuracy
    p32 = {k_: v_.astype(np.float32) for k_, v_ in params.items()}
    s32 = {"W_hebb": state["W_hebb"].astype(np.float32), "P": state["P"].astype(np.float32),
           "usage": state["usage"].astype(np.float32)}
    w = dataclasses.replace(base, hebb_mode="fast_weights", proto_mode="feature")
    l64, _ = ref.model_forward(params, state, x, y, w)
    l32, c32 = ref.model_forward(p32, s32, x, y, w)
    assert c32["logits"].dtype == np.float32 and abs(float(l32) - l64) < 1e-5


@pytest.mark.parametrize("hebb_mode", ["shadow", "modulate"])
def test_local_updates_follow_the_wiring(hebb_mode):
    w = ref.Wiring(hebb_mode=hebb_mode, hebb_lr=0.5, hebb_decay=0.1, proto_mode="shadow", proto_lr=0.5)
    params, state, x, y, w = make_problem(w)
    W0, P0 = state["W_hebb"].copy(), state["P"].copy()
    _, cache = ref.model_forward(params, state, x, y, w)
    ref.local_updates(state, cache, w, seed=0, step=1)
    np.testing.assert_allclose(state["W_hebb"], 0.9 * W0 + 0.5 * cache["h"].T @ cache["s"] / N, rtol=0, atol=1e-14)
    assert np.abs(state["P"] - P0).max() > 1e-3
    off = dataclasses.replace(w, hebb_mode="fast_weights", proto_mode="off")
    W1, P1 = state["W_hebb"].copy(), state["P"].copy()
    ref.local_updates(state, cache, off, seed=0, step=2)
    np.testing.assert_array_equal(state["W_hebb"], W1)              # fast_weights does not touch W_hebb
    np.testing.assert_array_equal(state["P"], P1)


# ----------------------------------------------------------------------------- training

OPTIM = dict(lr=0.05, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.01, clip_norm=1.0, clip_value=0.0)


@pytest.mark.parametrize("hebb_mode,proto_mode", [("off", "off"), ("shadow", "shadow"),
                                                  ("fast_weights", "feature"), ("modulate", "feature")])
def test_train_steps_loss_decreases(hebb_mode, proto_mode):
    r = rng_(13)
    x = r.integers(0, V, (B, S)).astype(np.int32)
    y = np.roll(x, -1, axis=1)
    y[:, -1] = ref.PAD
    params = ref.init_params(V, E, H, seed=3, dtype=np.float32)
    state = ref.init_state(H, T, np.float32)
    w = ref.Wiring(hebb_mode=hebb_mode, proto_mode=proto_mode, hebb_lr=0.1, hebb_decay=0.1,
                   proto_reseed_threshold=0.1)
    losses = ref.train_steps(params, state, [(x, y)], w, OPTIM, seed=3, steps=30)
    assert len(losses) == 30 and all(np.isfinite(losses))
    assert losses[-1] < 0.8 * losses[0], losses
    assert params["W1"].dtype == np.float32
    if proto_mode != "off":
        assert state["P"] is not None and state["P"].dtype == np.float32
    # determinism: the same run gives the same bits
    params2, state2 = ref.init_params(V, E, H, seed=3, dtype=np.float32), ref.init_state(H, T, np.float32)
    assert ref.train_steps(params2, state2, [(x, y)], w, OPTIM, seed=3, steps=30) == losses


def test_train_steps_lr_callable_and_kmeanspp_init():
    r = rng_(14)
    batches = [tuple(r.integers(0, V, (B, S)).astype(np.int32) for _ in "xy") for _ in range(2)]
    w = ref.Wiring(proto_mode="shadow", proto_lr=0.0)
    params = ref.init_params(V, E, H, seed=1, dtype=np.float64)
    s0 = ref.init_state(H, T, np.float64)
    _, c0 = ref.model_forward(params, s0, *batches[0], ref.Wiring())
    want_P = ref.kmeanspp_init(c0["ht"], T, seed=1)
    s0["P"] = want_P
    want_losses = [float(ref.model_forward(params, s0, *batches[i], w)[0]) for i in (0, 1, 0)]
    state = ref.init_state(H, T, np.float64)
    seen = []
    frozen = dict(OPTIM, lr=lambda step: seen.append(step) or 0.0)  # lr 0: params frozen
    before = {k: v.copy() for k, v in params.items()}
    losses = ref.train_steps(params, state, batches, w, frozen, seed=1, steps=3)
    assert seen == [1, 2, 3]
    assert losses == want_losses                                     # batches are cycled in order
    assert abs(losses[0] - losses[1]) > 1e-3
    for k in params:
        np.testing.assert_array_equal(params[k], before[k])
    np.testing.assert_array_equal(state["P"], want_P)                # proto_lr 0 keeps the k-means++ init
