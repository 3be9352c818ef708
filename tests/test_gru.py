"""The GRU layer (engine/layers/gru.py, kernels/gru.cl) beyond the layer contract's cases: the
reference's backpropagation through time against float64 central differences at every element,
the gate kernels against their references on both variants, a carried state (generation), the
memory check, PyTorch's nn.GRU from the same weights, the initialisations.

    python -m pytest tests/test_gru.py -q

Tiny sizes (B=3 sequences of S=5, I=6 inputs, Hd=8 units) so the file runs in seconds on PoCL.
"""
import math

import numpy as np
import pytest

from engine import ops
from engine.config import Config
from engine.layers.gru import GRU
from engine.model import Model, gemm_scratch
from engine.params import init_params
from engine.reference.gru import GRU as RefGRU
from engine.reference.gru import gru_gates_backward, gru_gates_forward

B, S, I, Hd = 3, 5, 6, 8
N = B * S
f32, f64 = np.float32, np.float64
VARIANTS = ["dev", "gpu_dev"]   # the device's own family (CPU on PoCL) and the forced GPU family


def f32able(a):
    return np.asarray(a, f64).astype(f32).astype(f64)


def setup(seed=0, I=I, Hd=Hd, init="kaiming", B=B, S=S):
    """(layer, params, x, R, h0): parameters drawn by the declarations plus noise (biases away from
    0), an input, an upstream gradient R of sum(y·R) and a carried state, all float32-representable."""
    layer = GRU("gru", I=I, Hd=Hd, init=init)
    rng = np.random.default_rng(seed)
    params = {k: f32able(v + 0.3 * rng.standard_normal(v.shape))
              for k, v in init_params(layer.params(), 3, f64).items()}
    x = f32able(rng.standard_normal((B * S, I)))
    R = f32able(rng.standard_normal((B * S, Hd)))
    h0 = f32able(0.5 * rng.standard_normal((B, Hd)))
    return layer, params, x, R, h0


def ref_run(params, x, R, h0=None, B=B, S=S, Hd=Hd, I=I):
    ref = RefGRU("gru", I=I, Hd=Hd)
    y, cache = ref.forward(params, {}, x, dict(B=B, S=S, **({} if h0 is None else {"fw_state": h0})))
    dx, grads = ref.backward(params, {}, cache, R)
    return y, cache["last"], dx, grads


def device_run(dev, layer, params, x, R, h0=None, B=B, S=S):
    """(y, last state, dx, grads) of one forward and backward of the layer alone on dev."""
    model = Model(dev, Config(), 1, layers=[layer])
    model.set_params(params)
    c = model.workspace(B, S).ctx[layer.name]
    c.fw_state = None if h0 is None else dev.to_device(h0.astype(f32))
    y = layer.forward(c, dev.to_device(x.astype(f32))).get().astype(f64)
    last = layer.last_state(c).get().astype(f64)
    dx = layer.backward(c, dev.to_device(R.astype(f32))).get().astype(f64)
    return y, last, dx, {k: v.astype(f64) for k, v in model.get_grads().items()}


def close(got, want, rtol, atol_rel, what):
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol_rel * max(1.0, np.abs(want).max()), err_msg=what)


# -- the reference --------------------------------------------------------------------------------
@pytest.mark.parametrize("carried", [False, True])
def test_reference_bptt_matches_finite_differences(carried):
    """Every element of x and of the four parameters: central differences (ε = 1e-6) of sum(y·R)
    in float64 over S = 5 steps (x at t = 0 reaches the loss through four recurrences). With a
    carried h_{−1} ≠ 0 the h_{−1}·W_h term of dW_h is exercised too. Observed |fd − g| ≤ 4e-9
    (the differences' rounding, ~1e-16·|sum|/ε); allowed 3e-8; a wrong term is ≥ 1e-3."""
    _, params, x, R, h0 = setup(1)
    h0 = h0 if carried else None
    _, _, dx, grads = ref_run(params, x, R, h0)

    def obj():
        return float(np.sum(ref_run(params, x, R, h0)[0] * R))

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
        np.testing.assert_allclose(g, fd, rtol=0, atol=3e-8, err_msg=name)
    assert np.abs(dx.reshape(B, S, I)[:, 0]).min() > 0   # the first position's input has a gradient


def test_reference_carried_state_is_the_whole_sequence():
    """Six forwards of S = 1, each from the last one's state, are the forward of S = 6 (float64:
    the same operations, so equal to rounding)."""
    _, params, x, _, h0 = setup(2, B=B, S=6)
    ref = RefGRU("gru", I=I, Hd=Hd)
    y, cache = ref.forward(params, {}, x, dict(B=B, S=6, fw_state=h0))
    xs = x.reshape(B, 6, I)
    state = h0
    for t in range(6):
        y1, c1 = ref.forward(params, {}, xs[:, t], dict(B=B, S=1, fw_state=state))
        np.testing.assert_allclose(y1, y.reshape(B, 6, Hd)[:, t], rtol=0, atol=1e-14)
        state = c1["last"]
    np.testing.assert_allclose(state, cache["last"], rtol=0, atol=1e-14)


# -- the kernels ----------------------------------------------------------------------------------
@pytest.mark.opencl
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("Hd_", [8, 6])   # 8: the CPU variant's float8 kernels, 6: the scalar ones
def test_gate_kernels_match_reference(request, variant, Hd_):
    """One step t = 2 of gru_gates_forward and gru_gates_backward against their references;
    float32 against float64 of a few operations per element (exp_fast: ~1e-7 absolute):
    observed ≤ 1.5e-7 absolute (forward), ≤ 1e-7 relative to the largest (backward); a wrong
    gate or a swapped [r|z|n] block is ≥ 1e-2."""
    dev = request.getfixturevalue(variant)
    rng = np.random.default_rng(4)
    t, H3 = 2, 3 * Hd_

    def arr(*shape):
        return f32able(rng.standard_normal(shape))

    gx, gh, b_i, b_h, hs, dy, carry = arr(N, H3), arr(B, H3), arr(H3), arr(H3), arr((S + 1) * B, Hd_), arr(N, Hd_), \
        arr(B, Hd_)
    d = {k: dev.to_device(v.astype(f32)) for k, v in dict(gx=gx, gh=gh, b_i=b_i, b_h=b_h, hs=hs, dy=dy,
                                                           carry=carry).items()}
    d.update(gates=dev.zeros((S * B, 4 * Hd_)), y=dev.zeros((N, Hd_)), dgx=dev.zeros((N, H3)),
             dgh=dev.zeros((S * B, H3)))
    ops.gru_gates_forward(dev, d["gx"], d["gh"], d["b_i"], d["b_h"], d["hs"], d["gates"], d["y"], t, B, S, Hd_)
    rows = np.arange(B) * S + t
    want_h, want_g = gru_gates_forward(gx[rows], gh, b_i, b_h, hs[t * B:(t + 1) * B])
    np.testing.assert_allclose(d["hs"].get()[(t + 1) * B:(t + 2) * B], want_h, rtol=0, atol=1e-6)
    np.testing.assert_allclose(d["y"].get()[rows], want_h, rtol=0, atol=1e-6)
    gates = d["gates"].get().astype(f64)
    np.testing.assert_allclose(gates[t * B:(t + 1) * B], want_g, rtol=0, atol=1e-6 * np.abs(want_g).max())
    ops.gru_gates_backward(dev, d["dy"], d["gates"], d["hs"], d["carry"], d["dgx"], d["dgh"], t, B, S, Hd_)
    gt = gates[t * B:(t + 1) * B]
    want_dgx, want_dgh, want_carry = gru_gates_backward(dy[rows] + carry, gt, hs[t * B:(t + 1) * B])
    np.testing.assert_allclose(d["dgx"].get()[rows], want_dgx, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(d["dgh"].get()[t * B:(t + 1) * B], want_dgh, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(d["carry"].get(), want_carry, rtol=1e-5, atol=1e-6)
    # at t = S−1 the carry is not read (nothing comes back from beyond the sequence)
    d["carry"].set(np.full((B, Hd_), np.nan, f32))
    ops.gru_gates_backward(dev, d["dy"], d["gates"], d["hs"], d["carry"], d["dgx"], d["dgh"], S - 1, B, S, Hd_)
    assert np.isfinite(d["carry"].get()).all()


@pytest.mark.opencl
def test_float8_gate_kernels_are_the_scalar_ones_bit_for_bit(dev):
    """The CPU variant's float8 kernels give the scalar kernels' (the GPU variant's) bits."""
    H3, t = 3 * Hd, 1
    host = dict(gx=(N, H3), gh=(B, H3), b_i=(H3,), b_h=(H3,), hs=((S + 1) * B, Hd), dy=(N, Hd), carry=(B, Hd))
    out = {}
    for suffix, div in (("", 1), ("8", 8)):
        a = {k: dev.to_device(np.random.default_rng(5).standard_normal(s).astype(f32)) for k, s in host.items()}
        a.update(gates=dev.zeros((S * B, 4 * Hd)), y=dev.zeros((N, Hd)), dgx=dev.zeros((N, H3)),
                 dgh=dev.zeros((S * B, H3)))
        i = np.int32
        dev.launch(dev.kernel("gru.cl", "gru_gates_forward" + suffix), (Hd // div, B), None, a["gx"].data,
                   a["gh"].data, a["b_i"].data, a["b_h"].data, i(t), i(S), i(Hd), a["hs"].data, a["gates"].data,
                   a["y"].data)
        dev.launch(dev.kernel("gru.cl", "gru_gates_backward" + suffix), (Hd // div, B), None, a["dy"].data,
                   a["gates"].data, a["hs"].data, i(t), i(S), i(Hd), a["carry"].data, a["dgx"].data, a["dgh"].data)
        out[suffix] = {k: a[k].get() for k in ("hs", "gates", "y", "dgx", "dgh", "carry")}
    for k in out[""]:
        assert out[""][k].tobytes() == out["8"][k].tobytes(), k


# -- the layer on the device ----------------------------------------------------------------------
@pytest.mark.opencl
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("Hd_,carried", [(8, True), (6, False), (6, True)])
def test_layer_matches_reference(request, variant, Hd_, carried):
    """Forward, the last state, dx and the four gradients against the float64 reference, with and
    without a carried state, Hd = 6 (the scalar kernels on both variants). float32 over S = 5
    recurrent steps: observed ≤ 4e-7 relative to the largest element; allowed 2e-6 (forward),
    3e-6 (gradients); a wrong term is ≥ 1e-3."""
    dev = request.getfixturevalue(variant)
    layer, params, x, R, h0 = setup(6, Hd=Hd_)
    h0 = h0 if carried else None
    y, last, dx, grads = device_run(dev, layer, params, x, R, h0)
    want_y, want_last, want_dx, want_g = ref_run(params, x, R, h0, Hd=Hd_)
    close(y, want_y, 1e-5, 2e-6, "y")
    close(last, want_last, 1e-5, 2e-6, "last state")
    close(dx, want_dx, 1e-4, 3e-6, "dx")
    for k, g in want_g.items():
        close(grads[k], g, 1e-4, 3e-6, k)


@pytest.mark.opencl
@pytest.mark.parametrize("variant", VARIANTS)
def test_carried_state_equals_the_whole_sequence(request, variant):
    """Generation: six forwards of S = 1, each given the last one's GRU.last_state as fw_state
    (the view itself, and once as a {layer name: state} dict), give the forward of S = 6 and its
    last state. Same kernels and the same sums per element: observed equal to the bit on both
    variants; allowed 1e-6 (another device's gemm tiling of the x·W_i rows may round differently)."""
    dev = request.getfixturevalue(variant)
    layer, params, x, _, h0 = setup(7, S=6)
    model = Model(dev, Config(), 1, layers=[layer])
    model.set_params(params)
    c6, c1 = model.workspace(B, 6).ctx[layer.name], model.workspace(B, 1).ctx[layer.name]
    c6.fw_state = dev.to_device(h0.astype(f32))
    y6 = layer.forward(c6, dev.to_device(x.astype(f32))).get().reshape(B, 6, Hd)
    last6 = layer.last_state(c6).get()
    xs = x.reshape(B, 6, I)
    c1.fw_state = dev.to_device(h0.astype(f32))
    for t in range(6):
        y1 = layer.forward(c1, dev.to_device(np.ascontiguousarray(xs[:, t], f32))).get()
        np.testing.assert_allclose(y1, y6[:, t], rtol=0, atol=1e-6, err_msg=f"t={t}")
        c1.fw_state = layer.last_state(c1) if t % 2 else {layer.name: layer.last_state(c1)}
    np.testing.assert_allclose(layer.last_state(c1).get(), last6, rtol=0, atol=1e-6)
    c6.fw_state = None   # training: every sequence starts at 0, whatever the last forward left
    y0 = layer.forward(c6, dev.to_device(x.astype(f32))).get()
    np.testing.assert_allclose(y0, ref_run(params, x, np.zeros((B * 6, Hd)), S=6)[0], rtol=1e-5, atol=2e-6)


@pytest.mark.opencl
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("Bs", [16, 128])
def test_declared_buffers_are_what_a_step_allocates(request, variant, Bs):
    """buffers() and the scratch sized from products() (engine.model.gemm_scratch) are exactly what
    a forward and backward allocate: N = 16·16 = 256 takes the packed weight gradients on the CPU
    variant, N = 128·16 = 2048 the K-split ones."""
    dev = request.getfixturevalue(variant)
    layer = GRU("gru", I=8, Hd=16)
    S_ = 16
    saved = dev.__dict__.pop("_workspace", None)   # ops.gemm's scratch, as a fresh device has it
    try:
        model = Model(dev, Config(), 1, layers=[layer])
        model.set_params(init_params(layer.params(), 0))
        ws = model.workspace(Bs, S_)
        c = ws.ctx[layer.name]
        layer.forward(c, dev.zeros((Bs * S_, 8)))
        layer.backward(c, dev.zeros((Bs * S_, 16)))
        dev.finish()
        scratch = {k: ((a.size,), a.dtype) for k, a in dev.__dict__.get("_workspace", {}).items()}
    finally:
        dev.__dict__.pop("_workspace", None)
        if saved is not None:
            dev._workspace = saved
    declared = {k: (tuple(s), np.dtype(t)) for k, (s, t) in layer.buffers(Bs, S_).items()}
    assert {k: (tuple(a.shape), a.dtype) for k, a in vars(ws.buf[layer.name]).items()} == declared
    want = {k: (tuple(s), np.dtype(t)) for k, (s, t) in gemm_scratch(Config(), 1, Bs, S_, dev.variant, [layer]).items()}
    assert scratch == want
    assert ("gemm_partial" in scratch) == (Bs == 128)
    assert ("gemm_apack" in scratch) == (dev.variant != "gpu")


# -- PyTorch's nn.GRU -----------------------------------------------------------------------------
def _torch_gru(params, x, R, h0, dtype):
    """(y, h_N, dx, grads) of torch.nn.GRU with the layer's weights (weight_ih_l0 = W_iᵀ, ...)."""
    import torch
    tdt = {f32: torch.float32, f64: torch.float64}[dtype]
    gru = torch.nn.GRU(I, Hd, batch_first=True).to(tdt)
    with torch.no_grad():
        gru.weight_ih_l0.copy_(torch.tensor(params["W_i"].T))
        gru.weight_hh_l0.copy_(torch.tensor(params["W_h"].T))
        gru.bias_ih_l0.copy_(torch.tensor(params["b_i"]))
        gru.bias_hh_l0.copy_(torch.tensor(params["b_h"]))
    xt = torch.tensor(x.reshape(B, S, I), dtype=tdt, requires_grad=True)
    out, hN = gru(xt, torch.tensor(h0[None], dtype=tdt))
    (out * torch.tensor(R.reshape(B, S, Hd), dtype=tdt)).sum().backward()
    grads = {"W_i": gru.weight_ih_l0.grad.T, "W_h": gru.weight_hh_l0.grad.T, "b_i": gru.bias_ih_l0.grad,
             "b_h": gru.bias_hh_l0.grad}
    return (out.detach().reshape(N, Hd).double().numpy(), hN.detach()[0].double().numpy(),
            xt.grad.reshape(N, I).double().numpy(), {k: v.double().numpy() for k, v in grads.items()})


def test_reference_is_torch_gru():
    """The reference's maths and gate order are nn.GRU's: both in float64 from the same weights and
    state, outputs, last state and every gradient equal to 1e-12 (observed 2e-15)."""
    pytest.importorskip("torch")
    _, params, x, R, h0 = setup(8)
    want = _torch_gru(params, x, R, h0, f64)
    got = ref_run(params, x, R, h0)
    for name, a, b in zip(("y", "last", "dx"), got[:3], want[:3]):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12, err_msg=name)
    for k in params:
        np.testing.assert_allclose(got[3][k], want[3][k], rtol=0, atol=1e-12, err_msg=k)


@pytest.mark.opencl
@pytest.mark.parametrize("variant", VARIANTS)
def test_device_is_torch_gru(request, variant):
    """The device layer against nn.GRU in float32 from the same weights (the loss sum(y·R) and every
    gradient): two float32 implementations, observed ≤ 5e-7 relative to the largest element (the
    loss: 2e-7); allowed 2e-6 (forward, loss), 3e-6 (gradients) of it, rtol 1e-4."""
    pytest.importorskip("torch")
    dev = request.getfixturevalue(variant)
    layer, params, x, R, h0 = setup(9)
    y, last, dx, grads = device_run(dev, layer, params, x, R, h0)
    ty, tlast, tdx, tgrads = _torch_gru(params, x, R, h0, f32)
    close(float(np.sum(y * R)), float(np.sum(ty * R)), 2e-6, 0, "loss")
    close(y, ty, 1e-5, 2e-6, "y")
    close(last, tlast, 1e-5, 2e-6, "last state")
    close(dx, tdx, 1e-4, 3e-6, "dx")
    for k in params:
        close(grads[k], tgrads[k], 1e-4, 3e-6, k)


# -- declarations ---------------------------------------------------------------------------------
def test_initialisations_and_decay():
    """kaiming: W ~ N(0, 2/fan_in) (fan_in I for W_i, Hd for W_h), biases 0; torch: every parameter
    U(−1/√Hd, 1/√Hd); weight decay on the weights only; a bad init or size is refused by name."""
    big = GRU("g", I=64, Hd=128)
    p = init_params(big.params(), 0, f64)
    assert [s.name for s in big.params()] == ["W_i", "b_i", "W_h", "b_h"]
    assert [s.decay for s in big.params()] == [True, False, True, False]
    assert abs(p["W_i"].std() / math.sqrt(2 / 64) - 1) < 0.02 and abs(p["W_h"].std() / math.sqrt(2 / 128) - 1) < 0.02
    assert not p["b_i"].any() and not p["b_h"].any()
    t = init_params(GRU("g", I=64, Hd=128, init="torch").params(), 0, f64)
    bound = 1 / math.sqrt(128)
    for k, v in t.items():
        assert np.abs(v).max() <= bound and np.abs(v).max() > 0.95 * bound, k
        assert abs(v.std() / (bound / math.sqrt(3)) - 1) < 0.1, k   # U(−a, a): std a/√3
    with pytest.raises(ValueError, match="g: GRU init must be one of"):
        GRU("g", I=2, Hd=2, init="xavier")
    with pytest.raises(ValueError, match="GRU sizes must be positive"):
        GRU("g", I=0, Hd=2)
