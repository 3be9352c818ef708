"""The lattice layer (engine/layers/lattice.py, kernels/lattice.cl) beyond the layer contract's
cases: the reference's backward against float64 central differences at every element, the device
against the reference on both kernel variants (every parameter gradient and dx, two runs
bit-identical), the K = 0 front-face read, the one-cell-per-step light cone, the host tables,
the argument checks, the learning-rate scales, states() and the telemetry.

    python -m pytest tests/test_lattice.py -q

Tiny lattices (n = 3, D = 3 or 4, C = 2, Hc = 4, K ≤ 3, N = 2 rows): the kernels take their sizes
as arguments (no per-size defines), so PoCL compiles each program once.
"""
import math

import numpy as np
import pytest

from engine.config import Config
from engine.layers.lattice import Lattice
from engine.model import Model
from engine.params import init_params
from engine.reference.lattice import Lattice as RefLattice
from engine.reference.lattice import lattice_links, lattice_neighbours, reverse_table

f32, f64 = np.float32, np.float64
N = 2
TINY = dict(n=3, D=3, C=2, Hc=4, K=3)
CASES = {
    "local6": dict(TINY),
    "local26": dict(TINY, neighbours=26),
    "distant+gate": dict(TINY, experts=("local", "distant"), R=3, seed=5),
    "all+gate": dict(TINY, experts=("local", "distant", "functional"), R=3, dk=2, seed=5),
    "K0": dict(TINY, K=0),
    # N·13³ = 4394 rows: the weight gradients in a 4096-row head and a 298-row tail
    # (engine.layers.lattice.wgrad_parts), the bias gradients in two stages (ops.colsum_parts)
    "long rows": dict(n=13, D=13, C=2, Hc=4, K=2, experts=("local", "distant"), R=2, seed=5),
}


def f32able(a):
    return np.asarray(a, f64).astype(f32).astype(f64)


def setup(kw, seed=0):
    """(device layer, reference layer, params, x, R): the declared initialisation plus noise (biases
    away from 0, W2 away from its small scale), all float32-representable."""
    layer, ref = Lattice("lat", **kw), RefLattice("lat", **kw)
    rng = np.random.default_rng(seed)
    params = {k: f32able(v + 0.3 * rng.standard_normal(v.shape)) for k, v in init_params(layer.params(), 3, f64).items()}
    x = f32able(rng.standard_normal((N, layer.n2)))
    R = f32able(rng.standard_normal((N, layer.n2)))
    return layer, ref, params, x, R


def ref_run(ref, params, x, R):
    y, cache = ref.forward(params, {}, x, dict(B=N, S=1))
    dx, grads = ref.backward(params, {}, cache, R)
    return y, cache, dx, grads


def device_run(dev, layer, params, x, R):
    model = Model(dev, Config(), 1, layers=[layer])
    model.set_params(params)
    c = model.workspace(N, 1).ctx[layer.name]
    y = layer.forward(c, dev.to_device(x.astype(f32))).get().astype(f64)
    dx = layer.backward(c, dev.to_device(R.astype(f32))).get().astype(f64)
    return y, dx, {k: v.astype(f64) for k, v in model.get_grads().items()}, c


# -- the reference ------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["local6", "local26", "distant+gate", "all+gate"])
def test_reference_backward_matches_finite_differences(case):
    """Every element of x and of every parameter: central differences (ε = 1e-6) of sum(y·R) in
    float64 through K = 3 steps. Observed |fd − g| ≤ 6.1e-10 (the differences' rounding,
    ~1e-16·|sum|/ε); allowed 3e-8 + 1e-7·|g|; a wrong term is ≥ 1e-3."""
    _, ref, params, x, R = setup(CASES[case], seed=1)
    _, _, dx, grads = ref_run(ref, params, x, R)
    assert set(grads) == set(params)

    def obj():
        return float(np.sum(ref.forward(params, {}, x, dict(B=N, S=1))[0] * R))

    eps = 1e-6
    for name, arr, g in [("x", x, dx)] + [(k, params[k], grads[k]) for k in params]:
        fd = np.zeros_like(arr)
        for i in np.ndindex(arr.shape):
            old = arr[i]
            arr[i] = old + eps
            lp = obj()
            arr[i] = old - eps
            lm = obj()
            arr[i] = old
            fd[i] = (lp - lm) / (2 * eps)
        np.testing.assert_allclose(g, fd, rtol=1e-7, atol=3e-8, err_msg=name)
        assert np.abs(g).max() > 1e-3, name   # every tensor has a gradient to check


def test_k0_reads_the_front_face():
    """K = 0 (the face maps alone): y = x·(a·r) + b·r, equal to float64 rounding (the sum over c
    is taken in another order: observed ≤ 1e-15; allowed 1e-13)."""
    _, ref, params, x, _ = setup(CASES["K0"])
    y, _ = ref.forward(params, {}, x, dict(B=N, S=1))
    want = x * (params["a"] @ params["r"]) + params["b"] @ params["r"]
    np.testing.assert_allclose(y, want, rtol=0, atol=1e-13)


@pytest.mark.parametrize("K,reaches", [(1, False), (2, True), (3, True)])
def test_information_travels_one_cell_per_step(K, reaches):
    """With the local expert alone, K steps carry a value K cells: with K < D − 1 = 2 the back face
    cannot see the front, so y does not depend on x and dy/dx is exactly 0 (reference and, below,
    device); with K ≥ D − 1 every input reaches the output."""
    _, ref, params, x, R = setup(dict(TINY, K=K, neighbours=26))
    y, _, dx, _ = ref_run(ref, params, x, R)
    y2, _ = ref.forward(params, {}, x + 1.0, dict(B=N, S=1))
    if reaches:
        assert np.abs(dx).min() > 0 and np.abs(y2 - y).max() > 1e-6
    else:
        assert not dx.any() and np.array_equal(y, y2)


# -- the host tables ----------------------------------------------------------------------------------
def test_tables():
    """The neighbour table: cell itself first, −1 exactly outside the lattice, symmetric (j is a
    neighbour of i iff i is one of j); the links: R distinct cells other than the cell, the same
    from the same seed; the reverse table lists every (j, slot) once, ascending."""
    n, D = 3, 4
    for P in (6, 26):
        t = lattice_neighbours(n, D, P)
        assert t.shape == (n * n * D, 1 + P) and np.array_equal(t[:, 0], np.arange(n * n * D))
        pairs = {(i, int(j)) for i in range(t.shape[0]) for j in t[i, 1:] if j >= 0}
        assert pairs == {(j, i) for i, j in pairs}
        interior = (1 * n + 1) * n + 1   # (x, y, z) = (1, 1, 1): no border
        assert (t[interior] >= 0).all() and (t[0] < 0).sum() == {6: 3, 26: 19}[P]
        assert t[0, 1:7].tolist()[:2] == ([-1, 1] if P == 6 else [-1, -1])
    links = lattice_links(36, 5, seed=3)
    assert all(len(set(row[1:])) == 5 and row[0] not in row[1:] for row in links.tolist())
    assert np.array_equal(links, lattice_links(36, 5, seed=3)) and not np.array_equal(links, lattice_links(36, 5, 4))
    ptr, idx = reverse_table(t)
    W = t.shape[1]
    assert ptr[-1] == (t >= 0).sum()
    for i in range(t.shape[0]):
        m = idx[ptr[i]:ptr[i + 1]]
        assert (np.diff(m) > 0).all() and (t.ravel()[m] == i).all()


def test_arguments_are_checked():
    for kw, msg in [(dict(n=0), "n must be"), (dict(neighbours=8), "neighbours must be 6 or 26"),
                    (dict(experts=("distant",)), "contain 'local'"), (dict(experts=("local", "global")), "experts"),
                    (dict(K=-1), "K"), (dict(experts=("local", "distant"), R=27), "R"),
                    (dict(rates={"locl": 1.0}), "rates"), (dict(w2_scale=0.0), "w2_scale")]:
        with pytest.raises(ValueError, match=msg):
            Lattice("lat", **dict(TINY, **kw))


def test_rates_set_each_experts_learning_rate_scale():
    layer = Lattice("lat", prefix="L.", **CASES["all+gate"],
                    rates={"local": 1.0, "distant": 0.5, "functional": 0.25, "gate": 2.0})
    scale = {s.name: s.lr_scale for s in layer.params()}
    assert scale == {"L.a": 1.0, "L.b": 1.0, "L.r": 1.0, "L.W1": 1.0, "L.b1": 1.0, "L.W2": 1.0, "L.W1d": 0.5,
                     "L.b1d": 0.5, "L.W2d": 0.5, "L.Wq": 0.25, "L.Wk": 0.25, "L.Wv": 0.25, "L.Wg": 2.0, "L.bg": 2.0}
    specs = {s.name: s for s in Lattice("lat", C=8, Hc=32).params()}
    assert specs["W2"].scale == pytest.approx(0.1 / math.sqrt(32)) and specs["r"].scale == pytest.approx(1 / math.sqrt(8))


# -- the device ---------------------------------------------------------------------------------------
@pytest.mark.opencl
@pytest.mark.parametrize("variant", ["dev", "gpu_dev"])
@pytest.mark.parametrize("case", list(CASES))
def test_device_matches_reference(request, variant, case):
    """Forward, dx and every parameter gradient; float32 against float64 through K = 3 steps:
    observed ≤ 4e-7 relative to max(1, the largest element) on both variants; allowed rtol 1e-4
    and 3e-6·max; a wrong term is ≥ 1e-3. Two runs: the same bits."""
    dev = request.getfixturevalue(variant)
    layer, ref, params, x, R = setup(CASES[case])
    y, dx, grads, c = device_run(dev, layer, params, x, R)
    want_y, cache, want_dx, want_g = ref_run(ref, params, x, R)

    def close(got, want, what):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=3e-6 * max(1.0, np.abs(want).max()), err_msg=what)

    close(y, want_y, "forward")
    close(dx, want_dx, "dx")
    assert set(grads) == set(want_g)
    for k, g in want_g.items():
        close(grads[k], g, k)
    states = layer.states(c)   # (N, K+1, D, n, n, C), against the reference's s_t (N, Q, C)
    want_states = np.stack(cache["states"], axis=1).reshape(states.shape)
    np.testing.assert_allclose(states, want_states, rtol=1e-4, atol=1e-5 * np.abs(want_states).max())
    tel = layer.telemetry(c)
    for t in range(layer.K + 1):
        assert tel[f"lattice/state_norm/t{t}"] == pytest.approx(np.sqrt(np.mean(cache["states"][t] ** 2)), rel=1e-5)
    if layer.gated:
        mean = np.concatenate(cache["gates"]).reshape(-1, layer.E).mean(axis=0)
        assert [tel[f"lattice/gate/{e}"] for e in layer.experts] == pytest.approx(mean, rel=1e-5)
    y2, dx2, grads2, _ = device_run(dev, layer, params, x, R)
    assert y2.tobytes() == y.tobytes() and dx2.tobytes() == dx.tobytes()
    assert all(grads2[k].tobytes() == grads[k].tobytes() for k in grads)


@pytest.mark.opencl
def test_device_light_cone(dev):
    """K = 1 < D − 1 with the local expert: dx is exactly 0 on the device too."""
    layer, _, params, x, R = setup(dict(TINY, K=1))
    _, dx, _, _ = device_run(dev, layer, params, x, R)
    assert not dx.any()
