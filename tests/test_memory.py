"""The slot memory read (engine/layers/memory.py): its kernels and its local write rule on both
kernel variants against the float64 reference (engine/reference/memory.py), the write modes'
defining properties, the telemetry against numpy, bit-identical reruns, and the memory check.
Forward and backward against the reference and finite differences: tests/test_layer_contract.py.

    python -m pytest tests/test_memory.py -q
"""
import numpy as np
import pytest

from engine import ops
from engine.config import Config
from engine.layers.embed import EmbedGelu
from engine.layers.head import CharHead
from engine.layers.memory import MemoryRead
from engine.model import Model, gemm_scratch, model_buffers, param_specs, workspace_buffers
from engine.optim import make_optimizer
from engine.params import init_params
from engine.reference import memory as rm
from engine.reference.layers import CharHead as RefHead
from engine.train import train_step

B, S, E, M, Ms, V = 3, 4, 6, 8, 10, 7
N = B * S


def _dev(dev, gpu_dev, variant):
    return dev if variant == "cpu" else gpu_dev


class Run:
    """A memory read followed by the character head, on the device and in the reference, driven
    by hand: forward (the head's logits for the value write), then the memory's local_update."""

    def __init__(self, dev, mode, w=0.3, memory=True, seed=0):
        self.mem = MemoryRead("mem", E=E, M=M, Ms=Ms, V=V, memory=memory, write_mode=mode, write_strength=w, seed=3)
        self.head = CharHead("head", V=V, H=M)
        self.ref, self.ref_head = rm.MemoryRead("mem", E=E, M=M, Ms=Ms, V=V, memory=memory, write_mode=mode,
                                                write_strength=w, seed=3), RefHead("head", V=V, H=M)
        self.model = Model(dev, Config(), V, layers=[self.mem, self.head])
        params = init_params(param_specs([self.mem, self.head]), seed)
        rng = np.random.default_rng(seed)
        params["b_q"] = (0.1 * rng.standard_normal(M)).astype(np.float32)
        params["b2"] = (0.1 * rng.standard_normal(V)).astype(np.float32)
        self.model.set_params(params)
        self.p = {k: v.astype(np.float64) for k, v in params.items()}
        self.st = {k: v.astype(np.float64) for k, v in self.model.get_state().items()}
        self.x = rng.standard_normal((N, E)).astype(np.float32)
        self.y = rng.integers(0, V, N).astype(np.int32)
        self.dev = dev
        self.ws = self.model.workspace(B, S)
        self.ws.y.set(self.y)
        self.c = self.ws.ctx["mem"]
        self.xd = dev.to_device(self.x)

    def device_step(self):
        out = self.mem.forward(self.c, self.xd)
        self.head.forward(self.ws.ctx["head"], out)
        self.mem.local_update(self.c)

    def reference_step(self):
        c = dict(B=B, S=S, y=self.y)
        y, cache = self.ref.forward(self.p, self.st, self.x.astype(np.float64), c)
        _, hc = self.ref_head.forward(self.p, {}, y, c)
        self.ref.local_update(self.st, cache, 1, p=self.p, logits=hc["logits"])
        self.cache = cache

    def device_state(self) -> dict:
        st = {k: a.get() for k, a in self.model.st.items()}
        return {**self.model.get_params(), **st}


# -- kernels -----------------------------------------------------------------------------------------
@pytest.mark.opencl
@pytest.mark.parametrize("variant", ["cpu", "gpu"])
@pytest.mark.parametrize("slots", [150, 160])   # CPU: the serial kernels, the float8 ones
def test_memory_softmax_and_its_argmax(dev, gpu_dev, variant, slots):
    """More slots than the GPU group of 64, ties at the maximum (across GPU lanes, float8 lanes
    and chunks): the first maximum wins on both variants; a and ds within float32 of float64."""
    d = _dev(dev, gpu_dev, variant)
    rng = np.random.default_rng(1)
    s = (3 * rng.standard_normal((N, slots))).astype(np.float32)
    s[0, [7, 90]] = s[0].max() + 1.0
    s[1, [130, 3]] = s[1].max() + 1.0
    s[2, [17, 9]] = s[2].max() + 1.0                       # the same float8 lane, two chunks
    a, slot = d.to_device(s), d.empty((N,), np.int32)
    ops.memory_softmax(d, a, slot, N, slots)
    want_a, want_slot = rm.memory_softmax(s.astype(np.float64))
    np.testing.assert_array_equal(slot.get(), want_slot)
    assert list(slot.get()[:3]) == [7, 3, 9]
    np.testing.assert_allclose(a.get(), want_a, rtol=2e-6, atol=1e-7)   # exp_fast: ~1e-7 relative
    da = rng.standard_normal((N, slots)).astype(np.float32)
    dd = d.to_device(da)
    ops.memory_softmax_backward(d, a, dd, N, slots)
    np.testing.assert_allclose(dd.get(), rm.memory_softmax_backward(want_a, da.astype(np.float64)),
                               rtol=1e-5, atol=1e-7)


# -- the write rule against the reference ------------------------------------------------------------
@pytest.mark.opencl
@pytest.mark.parametrize("variant", ["cpu", "gpu"])
@pytest.mark.parametrize("mode", ["mean", "slot", "none"])
def test_write_matches_reference(dev, gpu_dev, variant, mode):
    """K, Vals, usage and the per-slot |Δ|² after two steps (forward, local_update) of each write
    mode, device against float64. float32 rows of 8 normalised values: observed ≤ 3e-7; a wrong
    term (a slot's count, the mix weight) moves an element by ≥ 1e-2."""
    run = Run(_dev(dev, gpu_dev, variant), mode)
    for _ in range(2):
        run.device_step()
        run.reference_step()
        np.testing.assert_array_equal(run.c.b.slot.get(), run.cache["slot"])   # the discontinuity first
    got = run.device_state()
    for k in ("K", "Vals", "W_q"):
        np.testing.assert_allclose(got[k], run.p[k], rtol=1e-5, atol=2e-6, err_msg=k)
    np.testing.assert_array_equal(got["usage"], run.st["usage"])
    np.testing.assert_allclose(got["W_u"], run.st["W_u"], rtol=1e-6, atol=0)
    for k in ("dK2", "dV2"):
        np.testing.assert_allclose(got[k], run.st[k], rtol=1e-4, atol=1e-10, err_msg=k)
    if mode != "none":
        assert np.sum(run.st["dK2"]) > 1e-3 and np.sum(run.st["dV2"]) > 1e-3   # something was written


@pytest.mark.opencl
@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_mean_write_collapses_the_keys(dev, gpu_dev, variant):
    """Every slot is pulled to the same k̄ (q does not depend on K): the mean pairwise key cosine
    rises step by step towards 1, as far as (1−w)^k predicts; the telemetry measures it."""
    run = Run(_dev(dev, gpu_dev, variant), "mean", w=0.3)
    cos = [rm.key_cosine(run.model.get_params()["K"].astype(np.float64))]
    for _ in range(16):
        run.device_step()
        cos.append(run.mem.telemetry(run.c)["mem_key_cosine"])
    assert cos[0] < 0.5
    assert all(b > a - 1e-6 for a, b in zip(cos, cos[1:])), cos
    assert cos[-1] > 0.999, cos   # the part orthogonal to k̄ shrinks by about 0.7 per write: 0.7^16 ≈ 3e-3


@pytest.mark.opencl
@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_slot_write_leaves_unaddressed_slots_bit_identical(dev, gpu_dev, variant):
    run = Run(_dev(dev, gpu_dev, variant), "slot")
    before = run.model.get_params()
    run.device_step()
    after = run.model.get_params()
    hit = np.bincount(run.c.b.slot.get(), minlength=Ms) > 0
    assert 0 < hit.sum() < Ms   # the case has both kinds
    for k in ("K", "Vals"):
        assert after[k][~hit].tobytes() == before[k][~hit].tobytes(), k
        assert np.all(np.abs(after[k][hit] - before[k][hit]).max(axis=1) > 1e-4), k
    dK2 = run.model.st["dK2"].get()
    assert np.all(dK2[~hit] == 0) and np.all(dK2[hit] > 0)


@pytest.mark.opencl
@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_no_write_leaves_the_memory_and_counts_usage(dev, gpu_dev, variant):
    run = Run(_dev(dev, gpu_dev, variant), "none")
    before = run.model.get_params()
    run.device_step()
    run.device_step()
    after = run.model.get_params()
    assert all(after[k].tobytes() == before[k].tobytes() for k in before)
    np.testing.assert_array_equal(run.model.st["usage"].get(), 2 * np.bincount(run.c.b.slot.get(), minlength=Ms))
    tel = run.mem.telemetry(run.c)
    assert tel["mem_write_norm_K"] == 0.0 and tel["mem_write_norm_Vals"] == 0.0


@pytest.mark.opencl
def test_no_memory_ablation_has_no_rule(dev):
    """memory=False: read = q, no K, Vals or state, local_update and telemetry do nothing."""
    run = Run(dev, "mean", memory=False)
    assert set(run.model.get_params()) == {"W_q", "b_q", "W2", "b2"} and not run.model.st
    run.device_step()
    assert run.mem.local_reads(run.c) == [] and run.mem.telemetry(run.c) == {}
    np.testing.assert_allclose(run.c.b.q.get(), run.ref.forward(run.p, {}, run.x.astype(np.float64), {})[0],
                               rtol=1e-5, atol=1e-6)


# -- telemetry, determinism --------------------------------------------------------------------------
@pytest.mark.opencl
@pytest.mark.parametrize("variant", ["cpu", "gpu"])
@pytest.mark.parametrize("mode", ["mean", "slot"])
def test_telemetry_matches_numpy(dev, gpu_dev, variant, mode):
    """Counts and perplexities exactly (the same integers); the key cosine (a sum of Ms·M float32
    terms) within 1e-5; the write norms to float32 rounding."""
    run = Run(_dev(dev, gpu_dev, variant), mode)
    for _ in range(3):
        run.device_step()
        run.reference_step()
    got = run.mem.telemetry(run.c)
    want = run.ref.telemetry(run.p, run.st, run.cache)
    assert set(got) == set(want)
    for k in ("mem_usage_counts", "mem_never_used", "mem_batch_used"):
        assert got[k] == want[k], k
    for k in ("mem_usage_perplexity", "mem_batch_perplexity"):
        assert got[k] == pytest.approx(want[k], rel=1e-12), k
    assert got["mem_key_cosine"] == pytest.approx(want["mem_key_cosine"], abs=1e-5)
    for k in ("mem_write_norm_K", "mem_write_norm_Vals"):
        assert got[k] == pytest.approx(want[k], rel=1e-4), k
    assert sum(got["mem_usage_counts"]) == 3 * N
    if mode == "slot":
        assert got["mem_never_used"] > 0   # ten slots, twelve rows, three steps: some never addressed


@pytest.mark.opencl
@pytest.mark.parametrize("variant", ["cpu", "gpu"])
@pytest.mark.parametrize("mode", ["mean", "slot"])
def test_reruns_are_bit_identical(dev, gpu_dev, variant, mode):
    def states():
        run = Run(_dev(dev, gpu_dev, variant), mode)
        for _ in range(3):
            run.device_step()
        return run.device_state()

    a, b = states(), states()
    assert all(a[k].tobytes() == b[k].tobytes() for k in a if k not in ("kinv", "kcol"))


def _stack(mode):
    """embed_gelu -> memory_read -> char_head: the device layers and their references."""
    from engine.reference import layers as rl
    args = (dict(V=V, E=5, H=E), dict(E=E, M=M, Ms=Ms, V=V, write_mode=mode, write_strength=0.2, seed=2),
            dict(V=V, H=M))
    dev_layers = [cls(name, **a) for cls, name, a in zip((EmbedGelu, MemoryRead, CharHead), ("embed", "mem", "head"),
                                                          args)]
    ref_layers = [cls(name, **a) for cls, name, a in zip((rl.EmbedGelu, rm.MemoryRead, rl.CharHead),
                                                          ("embed", "mem", "head"), args)]
    return dev_layers, ref_layers


@pytest.mark.opencl
@pytest.mark.parametrize("variant", ["cpu", "gpu"])
@pytest.mark.parametrize("mode", ["mean", "slot"])
def test_training_steps_match_the_reference_model(dev, gpu_dev, variant, mode):
    """Five steps as the Trainer runs them (forward, backward, AdamW, then the write on the
    parameters the optimiser just moved) against RefModel.train_steps in float64 (which hands
    the memory its parameters and the head's logits): losses, parameters and state."""
    from engine.reference.model import RefModel
    d = _dev(dev, gpu_dev, variant)
    cfg = Config()
    layers, ref_layers = _stack(mode)
    m = Model(d, cfg, V, layers=layers)
    m.set_params(init_params(param_specs(layers), cfg.seed))
    opt = make_optimizer(d, cfg, m)
    ws = m.workspace(B, S)
    rng = np.random.default_rng(4)
    data = [(rng.integers(0, V, (B, S)).astype(np.int32), rng.integers(0, V, (B, S)).astype(np.int32))
            for _ in range(5)]
    losses = []
    for x, y in data:
        ws.x.set(x.ravel())
        ws.y.set(y.ravel())
        train_step(m, opt, ws)
        losses.append(float(ws.loss_out.get()[0]))
        m.local_updates(ws)
    ref = RefModel.__new__(RefModel)   # a family's RefModel, from these declarations
    ref.cfg, ref.V, ref.decl, ref.layers, ref.specs = cfg, V, layers, ref_layers, param_specs(layers)
    params, state = ref.init()
    want = ref.train_steps(params, state, data, 5, opt.lr_at)
    # float32 vs float64 over five steps, no arg-max flip: observed ≤ 1e-6 relative
    np.testing.assert_allclose(losses, want, rtol=1e-5)
    got = m.get_params()
    for k in params:
        np.testing.assert_allclose(got[k], params[k], rtol=1e-5, atol=1e-5, err_msg=k)
    for k, v in m.get_state().items():
        np.testing.assert_allclose(v, state[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert m.get_state()["usage"].sum() == 5 * N


def test_bad_write_mode_is_an_error():
    with pytest.raises(ValueError, match="write_mode"):
        MemoryRead("mem", E=E, M=M, Ms=Ms, V=V, write_mode="avg")


# -- the memory check ---------------------------------------------------------------------------------
def _declared(d):
    return {k: (tuple(shape), np.dtype(dtype)) for k, (shape, dtype) in d.items()}


def _allocated(obj):
    return {k: (tuple(a.shape), a.dtype) for k, a in obj.items()}


@pytest.mark.opencl
@pytest.mark.parametrize("variant", ["cpu", "gpu"])
@pytest.mark.parametrize("mode,batch,memory", [("mean", B, True), ("slot", 64, True),   # N = 256: packed dW
                                               ("none", B, True), ("mean", B, False)])
def test_declared_buffers_are_what_a_step_allocates(dev, gpu_dev, variant, mode, batch, memory):
    """embed_gelu -> memory_read -> char_head: a training step, telemetry, the local rules and an
    evaluation allocate exactly what model_buffers, workspace_buffers and gemm_scratch declare."""
    d = _dev(dev, gpu_dev, variant)
    layers = [EmbedGelu("embed", V=V, E=5, H=E),
              MemoryRead("mem", E=E, M=M, Ms=Ms, V=V, write_mode=mode, memory=memory), CharHead("head", V=V, H=M)]
    cfg = Config()
    saved = d.__dict__.pop("_workspace", None)
    try:
        m = Model(d, cfg, V, layers=layers)
        m.set_params(init_params(param_specs(layers), 0))
        ws = m.workspace(batch, S)
        rng = np.random.default_rng(0)
        ws.x.set(rng.integers(0, V, batch * S).astype(np.int32))
        ws.y.set(rng.integers(0, V, batch * S).astype(np.int32))
        train_step(m, make_optimizer(d, cfg, m), ws)
        tel = m.telemetry(ws)
        m.local_updates(ws)
        m.forward(ws, training=False)
        d.finish()
        scratch = {k: ((a.size,), a.dtype) for k, a in d.__dict__.get("_workspace", {}).items()}
    finally:
        d.__dict__.pop("_workspace", None)
        if saved is not None:
            d._workspace = saved
    assert ("mem_key_cosine" in tel) == memory
    assert _allocated(m.st) | {"theta": ((m.layout.total,), np.dtype(np.float32)),
                               "grad": ((m.layout.total,), np.dtype(np.float32))} == \
        _declared(model_buffers(cfg, V, layers))
    ws_arrays = {"x": ws.x, "y": ws.y, "offsets": ws.offsets}
    ws_arrays.update({f"{name}.{k}": a for name, b in ws.buf.items() for k, a in vars(b).items()})
    assert _allocated(ws_arrays) == _declared(workspace_buffers(cfg, V, batch, S, layers))
    assert scratch == _declared(gemm_scratch(cfg, V, batch, S, d.variant, layers))
    assert ("gemm_apack" in scratch) == (batch == 64 and d.variant != "gpu")
