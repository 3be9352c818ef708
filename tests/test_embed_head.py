"""The embedding-regression head (engine/layers/embed_head.py, kernels/embed_head.cl) against its
float64 reference (engine/reference/embed_head.py), and the reference's gradient against central
finite differences at every element of z, with the diversity term off and on.

    python -m pytest tests/test_embed_head.py -q
"""
import numpy as np
import pytest

from engine.config import Config
from engine.layers import build as build_device
from engine.model import Model
from engine.models import LayerDecl
from engine.reference.embed_head import COS_EPS, embed_head_backward, embed_head_forward

f32 = np.float32
WEIGHTS = [dict(w_mse=1.0, w_cos=0.5, w_div=0.0), dict(w_mse=0.7, w_cos=1.3, w_div=0.4)]


def _data(N, D, seed, tiny=None, zero=None):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((N, D)).astype(f32).astype(np.float64)
    y = rng.standard_normal((N, D)).astype(f32).astype(np.float64)
    z[1] = 0.6 * y[1] + 0.1 * z[1]   # one row close to its target: cos near 1
    if tiny is not None:             # |z||y| < 1e-8: the cosine's constant-denominator branch
        z[tiny] *= 1e-10
    if zero is not None:
        z[zero] = 0.0
    return z, y


@pytest.mark.parametrize("w", WEIGHTS, ids=["div off", "div on"])
def test_reference_gradient_matches_finite_differences_at_every_element(w):
    """Central differences in float64 at every z[n, d] (N = 7, D = 5), one row in the
    |z||y| ≤ 1e-8 branch (its step 1e-13 keeps it there). Observed relative error ≤ 3.6e-10 (div off
    and on); a wrong term is ≥ 1e-2."""
    N, D, tiny = 7, 5, 4
    z, y = _data(N, D, 3, tiny=tiny)
    assert np.sqrt((z[tiny] ** 2).sum() * (y[tiny] ** 2).sum()) < COS_EPS
    loss, cache = embed_head_forward(z, y, **w)
    dz = embed_head_backward(cache)
    if w["w_div"]:
        assert cache["div"] > 0
    worst = 0.0
    for n in range(N):
        eps = 1e-13 if n == tiny else 1e-6
        for d in range(D):
            old = z[n, d]
            z[n, d] = old + eps
            lp = embed_head_forward(z, y, **w)[0]
            z[n, d] = old - eps
            lm = embed_head_forward(z, y, **w)[0]
            z[n, d] = old
            fd = (lp - lm) / (2 * eps)
            err = abs(fd - dz[n, d]) / max(1.0, abs(fd))
            worst = max(worst, err)
            assert err <= 1e-6, (n, d, fd, dz[n, d])
    assert worst < 1e-6


def test_reference_zero_row_and_collapse():
    """A zero row: cos = 0 and its gradient is the expression's, (w_mse·(2/D)(0 − y) − w_cos·y/1e-8)/N.
    A collapsed batch (every row one direction, either sign): Div = 1 exactly."""
    N, D = 5, 6
    z, y = _data(N, D, 4, zero=2)
    w = dict(w_mse=1.0, w_cos=0.5, w_div=0.0)
    loss, cache = embed_head_forward(z, y, **w)
    assert cache["rows_cos"][2] == 0.0
    dz = embed_head_backward(cache)
    want = (1.0 * 2 / D * (0 - y[2]) - 0.5 * y[2] / COS_EPS) / N
    np.testing.assert_allclose(dz[2], want, rtol=1e-12)
    v = np.arange(1.0, D + 1)
    zc = np.stack([v * s for s in (1.0, 2.0, -0.5, 3.0, 1.5)])
    _, c1 = embed_head_forward(zc, y, w_mse=1.0, w_cos=0.5, w_div=0.3)
    assert abs(c1["div"] - 1.0) < 1e-12
    _, c2 = embed_head_forward(np.eye(N, D), y, w_mse=1.0, w_cos=0.5, w_div=0.3)
    assert c2["div"] == 0.0     # orthogonal rows: no penalty


class Head:
    """The head alone on the device (a Model of one layer), targets set in ws.y as floats."""

    def __init__(self, dev, B, S, D, w):
        self.layer = build_device(LayerDecl("embed_head", "head", "", dict(D=D, **w)))
        self.model = Model(dev, Config(), 13, layers=[self.layer])
        self.ws, self.dev = self.model.workspace(B, S), dev

    def run(self, z, y):
        self.ws.y = self.dev.to_device(y.astype(f32))   # the task's (N, D) float32 targets
        c = self.ws.ctx["head"]
        zd = self.dev.to_device(z.astype(f32))
        self.layer.forward(c, zd)
        assert self.layer.outputs(c) is zd
        b = c.b
        return (self.ws.loss_out.get(), b.rows_cos.get(), b.rows_mse.get(), self.layer.backward(c, None).get())


@pytest.mark.opencl
@pytest.mark.parametrize("variant", ["cpu", "gpu"])
@pytest.mark.parametrize("w", WEIGHTS, ids=["div off", "div on"])
@pytest.mark.parametrize("B,S", [(4, 16), (7, 10)], ids=["N=64", "N=70"])
def test_device_matches_reference(dev, gpu_dev, variant, w, B, S):
    """D = 384 (the student's width); N = 70 is more rows than the GPU work-group of 64."""
    d = dev if variant == "cpu" else gpu_dev
    N, D = B * S, 384
    z, y = _data(N, D, 5)
    head = Head(d, B, S, D, w)
    out, rows_cos, rows_mse, dz = head.run(z, y)
    loss, cache = embed_head_forward(z, y, **w)
    want_dz = embed_head_backward(cache)
    # float32 sums of D = 384 products against float64, observed on both variants: loss ≤ 1.4e-7
    # relative, the summed cosine ≤ 5.7e-7 relative, rows_cos ≤ 4.7e-7 absolute, rows_mse ≤ 7.3e-7
    # relative, dz ≤ 5.7e-7 of the largest |dz| (div on: the Gram matrix's products); a wrong term
    # is ≥ 1e-3
    np.testing.assert_allclose(out[0], loss, rtol=2e-6)
    np.testing.assert_allclose(out[1], cache["rows_cos"].sum(), rtol=2e-6, atol=2e-6)
    assert out[2] == N
    np.testing.assert_allclose(out[3], N * loss, rtol=2e-6)
    np.testing.assert_allclose(rows_cos, cache["rows_cos"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(rows_mse, cache["rows_mse"], rtol=2e-6)
    np.testing.assert_allclose(dz, want_dz, rtol=0, atol=5e-6 * np.abs(want_dz).max())
    again = head.run(z, y)   # two runs: the same bits
    assert all(a.tobytes() == b.tobytes() for a, b in zip(again, (out, rows_cos, rows_mse, dz)))


@pytest.mark.opencl
@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_device_zero_row_is_the_references(dev, gpu_dev, variant):
    """A zero row z_n: cos 0 and the 1e-8-floor gradient (~1e7 here), the same on the device."""
    d = dev if variant == "cpu" else gpu_dev
    B, S, D, w = 2, 4, 24, WEIGHTS[1]
    z, y = _data(B * S, D, 6, zero=3)
    out, rows_cos, _, dz = Head(d, B, S, D, w).run(z, y)
    loss, cache = embed_head_forward(z, y, **w)
    want = embed_head_backward(cache)
    assert rows_cos[3] == 0.0 and np.isfinite(out).all()
    np.testing.assert_allclose(out[0], loss, rtol=2e-6)
    # float32 rounding of y/1e-8 and of O(1) terms: observed ≤ 2.9e-7 of each row's own scale
    for n in range(B * S):
        np.testing.assert_allclose(dz[n], want[n], rtol=0, atol=1e-6 * np.abs(want[n]).max(), err_msg=str(n))
