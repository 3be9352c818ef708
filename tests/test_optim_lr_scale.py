"""Per-tensor learning rates (engine.params.ParamSpec.lr_scale): the optimiser's lr chunk mask
(engine.model.Layout.lr_mask) on the device against the numpy reference optimiser
(engine.reference.adamw_step / sgd_step with lr_scale), both kernel variants.

    python -m pytest tests/test_optim_lr_scale.py -q
"""
from types import SimpleNamespace

import numpy as np
import pytest

from engine import reference as ref
from engine.config import Config, apply_overrides
from engine.model import CHUNK, Layout
from engine.optim import SGD, AdamW
from engine.params import ParamSpec

f32 = np.float32
# two scaled tensors (one over two chunks), one frozen by a zero rate, one at the optimiser's rate
SPECS = [ParamSpec("a", (40, 30), lr_scale=0.5), ParamSpec("b", (7,), decay=False, lr_scale=2.0),
         ParamSpec("frozen", (5, 3), lr_scale=0.0), ParamSpec("c", (9,), decay=True)]
SCALES = {"a": 0.5, "b": 2.0, "frozen": 0.0, "c": 1.0}


def test_lr_mask_is_each_chunks_lr_scale():
    lay = Layout.of(SPECS)
    want = [0.5, 0.5, 2.0, 0.0, 1.0]                  # a takes 1200 elements: two chunks
    np.testing.assert_array_equal(lay.lr_mask(), np.array(want, f32))
    assert lay.lr_mask().dtype == f32 and len(lay.lr_mask()) == lay.total // CHUNK
    assert Layout.of([ParamSpec("w", (3,))]).lr_mask().tolist() == [1.0]   # the default: 1.0


def test_optimizer_declares_its_lr_mask_buffer():
    for cls in (AdamW, SGD):
        buf = cls.buffers(4 * CHUNK, CHUNK)
        assert buf["lr_mask"] == ((4,), f32) and buf["wd_mask"] == ((4,), f32)


def _setup(dev, name, steps):
    lay = Layout.of(SPECS)
    o = apply_overrides(Config(), [f"optim.name={name}", "optim.weight_decay=0.5", "optim.clip_norm=2.0"]).optim
    rng = np.random.default_rng(11)
    params = {s.name: rng.standard_normal(s.shape).astype(f32) for s in SPECS}
    grads = [{s.name: (0.7 * rng.standard_normal(s.shape)).astype(f32) for s in SPECS} for _ in range(steps)]

    def flat(d):
        out = np.zeros(lay.total, f32)
        for k, a in d.items():
            out[lay.offsets[k]:lay.offsets[k] + a.size] = a.ravel()
        return out

    def unflat(a):
        return {k: a[lay.offsets[k]:lay.offsets[k] + lay.size(k)].reshape(lay.shapes[k]) for k in lay.names}

    opt = (AdamW if name == "adamw" else SGD)(dev, o, lay, CHUNK)
    model = SimpleNamespace(theta=dev.to_device(flat(params)), grad=dev.zeros((lay.total,), f32), step=0)
    return lay, o, params, grads, flat, unflat, opt, model


def _reference(name, o, params, grads, lr, lr_scale):
    p = {k: v.astype(np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(a) for k, a in p.items()}
    decay = {s.name: s.decay for s in SPECS}
    for t, g in enumerate(grads, 1):
        g = {k: a.astype(np.float64) for k, a in g.items()}
        if name == "sgd":
            ref.sgd_step(p, g, m, lr, o.momentum, o.weight_decay, decay, o.clip_norm, o.clip_value, lr_scale)
        else:
            ref.adamw_step(p, g, m, v, t, lr, o.beta1, o.beta2, o.eps, o.weight_decay, decay, o.clip_norm,
                           o.clip_value, lr_scale)
    return p


@pytest.mark.opencl
@pytest.mark.parametrize("variant", ["cpu", "gpu"])
@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_scaled_rates_match_the_reference_and_zero_does_not_move(dev, gpu_dev, variant, name):
    d = dev if variant == "cpu" else gpu_dev
    steps, lr = 3, 0.05
    lay, o, params, grads, flat, unflat, opt, model = _setup(d, name, steps)
    for g in grads:
        model.grad.set(flat(g))
        opt.step(model, lr)
    got = unflat(model.theta.get())
    want = _reference(name, o, params, grads, lr, SCALES)
    unscaled = _reference(name, o, params, grads, lr, None)
    for k in ("a", "b", "c"):
        # a few float32 operations per element on O(1) values over 3 steps: observed ≤ 4.7e-7; the
        # update is ≥ 1e-2 (lr·scale·O(1)), and a scale applied wrongly moves it by ≥ 1e-2
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)
    for k in ("a", "b"):   # the scale acts: the unscaled update is far from it
        assert np.abs(unscaled[k] - want[k]).max() > 1e-2, k
    np.testing.assert_array_equal(want["c"], unscaled["c"])   # scale 1: the reference's own bits
    assert got["frozen"].tobytes() == params["frozen"].tobytes()   # lr_scale 0: not one bit moves
    used = np.zeros(lay.total, bool)
    for k in lay.names:
        used[lay.offsets[k]:lay.offsets[k] + lay.size(k)] = True
    assert not model.theta.get()[~used].any()   # gaps stay zero
