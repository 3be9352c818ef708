"""Data parallelism (engine/parallel.py): the combination kernels against their numpy reference,
and training on two contexts of the CPU device against one device with the same global batch.

Tolerance of two devices against one: 1e-5 relative on every logged training loss and every
validation loss over 12 steps. The two runs differ only in the order of the gradient sums (each
replica sums its slice's rows, then the master adds the replicas weighted by their valid
targets), a few float32 ulps per step; the forward passes are row for row the same.
"""
import numpy as np
import pytest

from engine import ops
from engine.config import Config, ConfigError, apply_overrides
from engine.parallel import check_parallel, device_specs, split_batch
from engine.reference import combine_replicas, dropout_mask

pytestmark = pytest.mark.opencl
f32 = np.float32

SMALL = ["model.hidden_dim=32", "model.embedding_dim=16", "model.num_prototypes=6", "train.seq_len=16",
         "train.steps=12", "train.eval_every=6", "train.log_every=3", "train.eval_batches=2"]
WIRINGS = {   # the local rules that read batch statistics, and none
    "fast_weights+feature": [],
    "modulate+token": ["hebb.mode=modulate", "proto.mode=token"],
    "shadow+feature+activity": ["hebb.mode=shadow", "hebb.post=activity", "proto.similarity=dot"],
    "delta+layernorm+off": ["hebb.rule=delta", "hebb.norm=layernorm", "proto.mode=off"],
}


def _combine(dev, G, L):
    D, n = G.shape
    g, out = dev.zeros((n,)), dev.zeros((4,))
    Gd, Ld = dev.to_device(G.ravel()), dev.to_device(L.ravel())
    dev.launch(dev.kernel("parallel.cl", "combine_grads"), (n,), None, Gd.data, Ld.data, np.int32(D), np.int32(n), g.data)
    dev.launch(dev.kernel("parallel.cl", "combine_loss"), (1,), None, Ld.data, np.int32(D), out.data)
    return g.get(), out.get()


def test_combine_matches_reference_and_reruns_bit_for_bit(dev):
    rng = np.random.default_rng(0)
    G = rng.standard_normal((3, 1000)).astype(f32)
    L = np.array([[2.0, 7, 30, 60.0], [0, 0, 0, 0], [3.0, 4, 10, 30.0]], f32)   # replica 1: all padding
    g, out = _combine(dev, G, L)
    rg, rout = combine_replicas(G.astype(np.float64), L.astype(np.float64))
    np.testing.assert_allclose(g, rg, rtol=1e-6, atol=1e-7)   # float32 weights and a sum of 3 terms
    np.testing.assert_allclose(out, rout, rtol=1e-7)
    np.testing.assert_array_equal(out, [90 / 40, 11, 40, 90])
    g2, _ = _combine(dev, G, L)
    np.testing.assert_array_equal(g, g2)
    g0, out0 = _combine(dev, G, np.zeros_like(L))   # no valid target anywhere: a zero gradient, loss 0
    assert not g0.any() and not out0.any()


def test_dropout_of_a_slice_draws_the_global_mask(dev):
    """The kernel's base index: a replica holding elements [base, base+n) of the global batch
    draws exactly those elements of the one-device mask."""
    n_total, base, n, p = 900, 300, 240, 0.3
    key = ops.dropout_key(3, 1)
    x = np.ones(n, f32)
    y = dev.zeros((n,))
    ops.dropout(dev, dev.to_device(x), y, n, p, key, 17, base)
    expected = dropout_mask(n_total, p, key, 17)[base:base + n] / (1 - p)
    np.testing.assert_allclose(y.get(), expected, rtol=1e-6)


def test_split_and_specs():
    assert split_batch(5, 2) == [(0, 3), (3, 2)]
    assert split_batch(6, 3) == [(0, 2), (2, 2), (4, 2)]
    with pytest.raises(ConfigError, match="smaller than the 3 devices"):
        split_batch(2, 3)
    assert device_specs("0:0, 0:0") == ["0:0", "0:0"]
    assert device_specs("") == [""]
    from engine.device import DeviceError
    with pytest.raises(DeviceError, match="empty entry"):
        device_specs("0:0,")
    cfg = apply_overrides(Config(), ["train.batch_size=1", "device=0:0,0:0"])
    with pytest.raises(ConfigError, match="batch_size=1 is smaller"):
        check_parallel(cfg, 2)


def test_all_is_every_gpu_or_every_device(dev):
    from engine.device import device_type_name, list_devices
    devices = list_devices()
    gpus = [f"{p}:{d}" for p, d, _, x in devices if device_type_name(x) == "GPU"]
    assert device_specs("all") == (gpus or [f"{p}:{d}" for p, d, _, _ in devices])


def _spec_of(dev) -> str:
    """"P:D" of the fixture's device (PYOPENCL_CTX may point it at a GPU)."""
    from engine.device import list_devices
    return next(f"{p}:{d}" for p, d, _, x in list_devices() if x == dev.device)


def _train(device, extra, B=6, out=None, resume=None, steps=None):
    from engine.train import Trainer
    cfg = apply_overrides(Config(), SMALL + [f"train.batch_size={B}", f"device={device}"] + extra
                          + ([f"train.steps={steps}"] if steps else []))
    logs = []

    class Log:
        def __getattr__(self, name):
            return lambda *a, **k: None

        def on_log(self, rec):
            logs.append(rec)
    t = Trainer(cfg, out, [Log()], resume=resume)
    summary = t.train()
    return t, [r["train_loss"] for r in logs], [h["val_loss"] for h in summary["history"]], logs


@pytest.mark.parametrize("wiring", list(WIRINGS))
def test_two_contexts_train_as_one_device(dev, wiring):
    """device=0:0,0:0 (two contexts on PoCL's CPU device) against one device, B = 5 split 3 + 2:
    the same losses within 1e-5 (module docstring), a bit-identical rerun, identical replicas, the
    same prototype histogram telemetry (gathered from both slices)."""
    spec = _spec_of(dev)
    one, l1, v1, logs1 = _train("", WIRINGS[wiring], B=5)
    two, l2, v2, logs2 = _train(f"{spec},{spec}", WIRINGS[wiring], B=5)
    assert two.replicas is not None and two.replicas.D == 2 and one.replicas is None
    np.testing.assert_allclose(l2, l1, rtol=1e-5)
    np.testing.assert_allclose(v2, v1, rtol=1e-5)
    if "proto_counts" in logs1[-1]:
        assert sum(logs2[-1]["proto_counts"]) == 5 * 16   # every row of both slices
    r = two.replicas
    np.testing.assert_array_equal(r.models[0].theta.get(), r.models[1].theta.get())
    for s in r.models[0].state_specs:
        if s.checkpoint:
            np.testing.assert_array_equal(r.models[0].st[s.name].get(), r.models[1].st[s.name].get())
    _, l3, v3, _ = _train(f"{spec},{spec}", WIRINGS[wiring], B=5)
    assert l3 == l2 and v3 == v2


def test_two_device_run_resumes_as_if_never_stopped(dev, tmp_path):
    """A two-device run stopped at its step-6 checkpoint and resumed to 12 logs the losses of the
    uninterrupted run, bit for bit (the checkpoint is the master's; the replicas get its state)."""
    spec = _spec_of(dev)
    two = f"{spec},{spec}"
    _, full, vfull, _ = _train(two, WIRINGS["modulate+token"], B=5)
    first, l1, _, _ = _train(two, WIRINGS["modulate+token"], B=5, out=str(tmp_path), steps=6)
    _, l2, v2, _ = _train(two, WIRINGS["modulate+token"], B=5, out=str(tmp_path), resume=first.checkpoint_path())
    assert l1 + l2 == full
    assert v2[-1] == vfull[-1]


@pytest.mark.parametrize("spec,batch,message", [
    ("SPEC,77:7", 4, "error: no OpenCL device '77:7'"),
    ("SPEC,SPEC", 1, "error: train.batch_size=1 is smaller than the 2 devices")])
def test_bad_device_lists_are_one_line_errors(dev, capsys, spec, batch, message):
    from engine.train import main
    spec = spec.replace("SPEC", _spec_of(dev))
    assert main(["--set", f"device={spec}", "--set", f"train.batch_size={batch}", "--set", "train.steps=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message) and "\n" not in err
