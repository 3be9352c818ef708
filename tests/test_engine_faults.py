"""Bad input to the engine is refused before training with one line and nothing lost:
resume settings, the output folder, a model too large for the device, interrupts, progress.

    python -m pytest tests/test_engine_faults.py -q

Key: B batch, S sequence, E embedding, H hidden, T prototypes (tiny sizes from conftest).
"""
import errno
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import B, E, H, S, T, TEXT

import engine.checkpoint as ckpt_mod
import engine.train as train_mod
from engine.checkpoint import CheckpointError, load_checkpoint
from engine.config import Config, apply_overrides
from engine.device import Device, DeviceError, format_bytes
from engine.optim import make_optimizer, optimizer_class
from engine.tasks import char_lm
from engine.model import device_buffers, gemm_scratch, model_buffers, workspace_buffers
from engine.train import Trainer, TrainingError, check_resume_steps, format_duration, main, make_progress

REPO = Path(__file__).resolve().parent.parent
SIZES = [f"model.embedding_dim={E}", f"model.hidden_dim={H}", f"model.num_prototypes={T}",
         f"train.batch_size={B}", f"train.seq_len={S}", "train.steps=12", "train.eval_every=6",
         "train.eval_batches=2", "train.checkpoint_every=6", "optim.warmup_steps=3", "train.log_every=3"]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def config(text_file, *extra):
    return apply_overrides(Config(), [f"data.path={text_file}", *SIZES, *extra])


def cli_args(text_file, *extra):
    return [a for o in [f"data.path={text_file}", *SIZES, *extra] for a in ("--set", o)]


@pytest.fixture(scope="module")
def checkpoint6(text_file, dev, tmp_path_factory):
    """A finished 6-step run's checkpoint (train.steps=6), never modified by the tests."""
    out = tmp_path_factory.mktemp("run6")
    summary = Trainer(config(text_file, "train.steps=6"), str(out), device=dev).train()
    assert summary["step"] == 6
    return summary["checkpoint"]


def one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    return lines[0]


def no_model(*args, **kwargs):
    raise AssertionError("the Model (device buffers) was allocated before the check")


# ------------------------------------------------------------------ 1. settings that cannot change on resume
@pytest.mark.opencl
@pytest.mark.parametrize("key,value,have", [("train.batch_size", 8, B), ("train.seq_len", 4, S)])
def test_resume_refuses_a_changed_batch_shape(text_file, dev, checkpoint6, monkeypatch, key, value, have):
    cfg = config(text_file, f"{key}={value}")
    monkeypatch.setattr(train_mod, "Model", no_model)     # refused up front, before any allocation
    with pytest.raises(CheckpointError) as exc:
        Trainer(cfg, resume=checkpoint6, device=dev)
    assert str(exc.value) == (f"checkpoint {checkpoint6!r} is incompatible: {key!r} is {have} in the "
                              f"checkpoint but {value} in this run; it cannot change on resume")


@pytest.mark.opencl
def test_cli_resume_with_another_batch_size_is_one_line(checkpoint6, dev, capsys):
    assert main(["--resume", checkpoint6, "--set", "train.batch_size=8", "--set", "train.steps=12"]) == 2
    out = capsys.readouterr()
    assert out.out == ""
    assert one_line(out.err) == (f"error: checkpoint {checkpoint6!r} is incompatible: 'train.batch_size' is "
                                 f"{B} in the checkpoint but 8 in this run; it cannot change on resume")


# ------------------------------------------------------------------ 2. train.steps at or below the checkpoint
@pytest.mark.opencl
@pytest.mark.parametrize("steps", [6, 2])
def test_cli_resume_needs_steps_above_the_checkpoint(checkpoint6, dev, capsys, steps):
    assert main(["--resume", checkpoint6, "--set", f"train.steps={steps}"]) == 2
    out = capsys.readouterr()
    assert out.out == ""
    assert one_line(out.err) == (f"error: checkpoint {checkpoint6!r} is at step 6; train.steps must be "
                                 f"above it to resume (got train.steps={steps})")


@pytest.mark.opencl
def test_trainer_refuses_steps_below_and_accepts_equal(text_file, dev, checkpoint6):
    with pytest.raises(CheckpointError, match=r"is at step 6; train.steps must be at or above it to resume "
                                              r"\(got train.steps=5\)$"):
        Trainer(config(text_file, "train.steps=5"), resume=checkpoint6, device=dev)
    done = Trainer(config(text_file, "train.steps=6"), resume=checkpoint6, device=dev)
    assert done.remaining_steps == 0
    summary = done.train()
    assert summary["status"] == "finished" and summary["step"] == 6
    assert summary["final"] == load_checkpoint(checkpoint6)[1]["history"][-1]   # the run's own last evaluation
    assert Trainer(config(text_file, "train.steps=10"), resume=checkpoint6, device=dev).remaining_steps == 4


def test_check_resume_steps_rule():
    check_resume_steps(7, 6, "c.npz")
    check_resume_steps(6, 6, "c.npz", allow_equal=True)
    with pytest.raises(CheckpointError, match=r"^checkpoint 'c.npz' is at step 6; train.steps must be above"):
        check_resume_steps(6, 6, "c.npz")
    with pytest.raises(CheckpointError, match="must be at or above it"):
        check_resume_steps(5, 6, "c.npz", allow_equal=True)


# ------------------------------------------------------------------ 3. interrupts
@pytest.mark.opencl
def test_stop_without_out_says_no_checkpoint_was_written(text_file, dev, capsys, monkeypatch):
    train = Trainer.train

    def stop_at_3(self, progress=None):
        updates = self.model.local_updates

        def then_stop(ws):
            updates(ws)
            if self.model.step == 3:
                self.request_stop()     # what the SIGINT/SIGTERM handler does
        self.model.local_updates = then_stop
        return train(self, progress)
    monkeypatch.setattr(Trainer, "train", stop_at_3)
    assert main(cli_args(text_file)) == 130
    err = capsys.readouterr().err
    assert "None" not in err
    assert re.fullmatch(r"stopped at step 3/12 in 0:0\d  no evaluation yet  no checkpoint written "
                        r"\(no --out given\)", err.strip().splitlines()[-1]), err


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs a named pipe")
@pytest.mark.parametrize("sig,ignored", [(signal.SIGINT, False), (signal.SIGTERM, False), (signal.SIGINT, True)],
                         ids=["SIGINT", "SIGTERM", "SIGINT ignored at start"])
def test_interrupt_while_loading_is_one_line(tmp_path, sig, ignored):
    """The corpus is a named pipe: the run blocks reading it inside Trainer(...) until the signal.
    ignored: the run starts with SIGINT ignored (inherited, as a child of a suite run in the
    background can be; two full CI runs hung here before engine.train set its own handler)."""
    fifo = tmp_path / "slow.txt"
    os.mkfifo(fifo)
    out = tmp_path / "out"
    start = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignored else None
    p = subprocess.Popen([sys.executable, "-m", "engine.train", "--set", f"data.path={fifo}", "--out", str(out)],
                         cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=start)
    deadline = time.monotonic() + 300   # a guard against a hang only: a loaded 2-core machine took > 60 s to start
    while True:        # opening the write end succeeds once the run has opened the pipe to read
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError as exc:
            assert exc.errno == errno.ENXIO and time.monotonic() < deadline and p.poll() is None, exc
            time.sleep(0.02)
    try:
        status = Path(f"/proc/{p.pid}/status")
        masks = [ln for ln in status.read_text().splitlines() if ln.startswith(("SigBlk", "SigIgn", "SigCgt"))] \
            if status.exists() else []
        p.send_signal(sig)
        try:
            stdout, stderr = p.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
            raise AssertionError(f"the run ignored signal {sig} for 60 s; its signal masks then: {masks}") from None
    finally:
        os.close(fd)
    assert p.returncode == 130, stderr
    assert stdout == "" and one_line(stderr) == "interrupted before training started; nothing written"
    assert not out.exists()


# ------------------------------------------------------------------ 4. the output folder, before and during training
@pytest.mark.opencl
def test_trainer_checks_the_out_folder_before_allocating(text_file, dev, tmp_path, monkeypatch):
    monkeypatch.setattr(train_mod, "Model", no_model)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(CheckpointError, match=rf"^checkpoint folder {re.escape(repr(str(a_file)))} is an "
                                              r"existing file, not a directory$"):
        Trainer(config(text_file), str(a_file), device=dev)
    (tmp_path / "o" / "checkpoint.npz").mkdir(parents=True)
    with pytest.raises(CheckpointError, match=r"checkpoint\.npz' is a directory$"):
        Trainer(config(text_file), str(tmp_path / "o"), device=dev)
    monkeypatch.setattr(ckpt_mod.shutil, "disk_usage", lambda p: SimpleNamespace(total=10**9, used=10**9, free=1000))
    out = tmp_path / "new" / "deeper"
    with pytest.raises(CheckpointError, match=r"has too little free space: checkpoints need .* MiB \(2 x .*\), "
                                              r"0\.0 MiB free on "):
        Trainer(config(text_file), str(out), device=dev)
    assert not (tmp_path / "new").exists()


@pytest.mark.opencl
def test_cli_out_is_a_file_is_one_line_before_training(text_file, dev, tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("keep me")
    assert main(cli_args(text_file) + ["--out", str(a_file)]) == 2
    out = capsys.readouterr()
    assert out.out == ""                                   # no evaluation ran
    assert one_line(out.err) == f"error: checkpoint folder {str(a_file)!r} is an existing file, not a directory"
    assert a_file.read_text() == "keep me"


@pytest.mark.opencl
def test_expected_checkpoint_size_bounds_the_real_one(text_file, dev, tmp_path):
    trainer = Trainer(config(text_file), str(tmp_path), device=dev)
    size = os.path.getsize(trainer.train()["checkpoint"])
    assert size <= trainer.checkpoint_nbytes <= size + 64 * 1024, (size, trainer.checkpoint_nbytes)


def enospc_after(n_ok):
    """np.lib.format.write_array that fails with ENOSPC once n_ok checkpoints were written."""
    real, calls = np.lib.format.write_array, {"saves": 0}

    def write_array(fp, array, *args, **kwargs):
        if calls["saves"] >= n_ok:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fp, array, *args, **kwargs)
    return write_array, calls


@pytest.mark.opencl
def test_disk_full_mid_run_keeps_the_last_checkpoint(text_file, dev, tmp_path, monkeypatch):
    write_array, calls = enospc_after(1)
    monkeypatch.setattr(np.lib.format, "write_array", write_array)

    class CountSaves(train_mod.Callback):
        def on_checkpoint(self, path, step):
            calls["saves"] += 1
    trainer = Trainer(config(text_file), str(tmp_path), [CountSaves()], device=dev)
    path = str(tmp_path / "checkpoint.npz")
    with pytest.raises(TrainingError) as exc:
        trainer.train()
    assert str(exc.value) == (f"cannot write checkpoint {path!r} at step 12 (No space left on device); "
                              f"the last good checkpoint is kept")
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["checkpoint.npz"]      # the temp file is gone
    assert load_checkpoint(path)[1]["step"] == 6


@pytest.mark.opencl
def test_cli_disk_full_at_the_first_checkpoint(text_file, dev, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(np.lib.format, "write_array", enospc_after(0)[0])
    assert main(cli_args(text_file) + ["--out", str(tmp_path)]) == 1
    path = str(tmp_path / "checkpoint.npz")
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: cannot write checkpoint {path!r} at step 6 (No space left on device); no checkpoint was written")
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------ 5. a model too large for the device
def is_pocl_sized(dev) -> bool:
    return dev.device.max_mem_alloc_size < 37 * 2**30


@pytest.mark.opencl
def test_huge_hidden_dim_is_refused_before_allocation(text_file, dev, monkeypatch):
    if not is_pocl_sized(dev):
        pytest.skip("this device could hold a 37 GiB buffer")
    monkeypatch.setattr(train_mod, "Model", no_model)
    monkeypatch.setattr(char_lm, "val_batches", no_model)
    t0 = time.perf_counter()
    with pytest.raises(DeviceError) as exc:
        Trainer(config(text_file, "model.hidden_dim=100000"), device=dev)
    assert time.perf_counter() - t0 < 2.0
    limit = format_bytes(dev.device.max_mem_alloc_size)
    assert str(exc.value) == (f"buffer 'model.W_hebb' (100000, 100000) needs 37.3 GiB, more than one buffer "
                              f"may hold on {dev.name} (CL_DEVICE_MAX_MEM_ALLOC_SIZE {limit})")


@pytest.mark.opencl
def test_huge_batch_is_refused_before_any_large_allocation(text_file, dev, monkeypatch, capsys):
    if not is_pocl_sized(dev):
        pytest.skip("this device could hold a 92 GiB buffer")
    monkeypatch.setattr(train_mod, "Model", no_model)
    monkeypatch.setattr(char_lm, "val_batches", no_model)   # (B,S) host arrays come after the check
    cfg = apply_overrides(Config(), [f"data.path={text_file}", "train.batch_size=1000000"])
    with pytest.raises(DeviceError) as exc:
        Trainer(cfg, device=dev)
    assert str(exc.value).startswith("buffer 'workspace.embed.a' (64000000, 384) needs 91.6 GiB, more than one "
                                     f"buffer may hold on {dev.name} (CL_DEVICE_MAX_MEM_ALLOC_SIZE")
    monkeypatch.undo()
    assert main(["--set", f"data.path={text_file}", "--set", "train.batch_size=1000000"]) == 2
    assert one_line(capsys.readouterr().err) == f"error: {exc.value}"


def test_check_memory_limits():
    fake = SimpleNamespace(name="Fake", device=SimpleNamespace(max_mem_alloc_size=2**30, global_mem_size=3 * 2**30))
    check = Device.check_memory
    check(fake, {"a": ((2**28,), np.float32), "b": ((2**27,), np.float32)})       # 1 GiB + 0.5 GiB fit
    with pytest.raises(DeviceError, match=r"^buffer 'b' \(3, 134217728\) needs 1\.5 GiB, more than one buffer "
                                          r"may hold on Fake \(CL_DEVICE_MAX_MEM_ALLOC_SIZE 1\.0 GiB\)$"):
        check(fake, {"a": ((4,), np.float32), "b": ((3, 2**27), np.float32)})
    with pytest.raises(DeviceError, match=r"^the model needs 4\.0 GiB of device memory \(largest: buffer 'a' "
                                          r"\(268435456,\) needs 1\.0 GiB\), more than Fake has "
                                          r"\(CL_DEVICE_GLOBAL_MEM_SIZE 3\.0 GiB\)$"):
        check(fake, {k: ((2**28,), np.float32) for k in "abcd"})
    fake.device.max_mem_alloc_size = fake.device.global_mem_size = 2**40
    with pytest.raises(DeviceError, match=r"^buffer 'i' \(2147483648,\) has 2,147,483,648 elements; the kernels "
                                          r"index with 32-bit ints"):
        check(fake, {"i": ((2**31,), np.int8)})


def arrays_of(obj, skip=()):
    import pyopencl.array as cla
    return {k: (tuple(v.shape), v.dtype) for k, v in vars(obj).items() if isinstance(v, cla.Array) and k not in skip}


def model_arrays(m):
    """The model's buffers and its layers' state."""
    return {**arrays_of(m), **{k: (tuple(v.shape), v.dtype) for k, v in m.st.items()}}


def optim_arrays(opt):
    """The optimiser's state and its gradient-norm tables."""
    return {**{k: (tuple(v.shape), v.dtype) for k, v in opt.state.items()},
            **arrays_of(opt)}


def workspace_arrays(ws):
    """The batch's buffers and every layer's, as `<layer>.<buffer>`."""
    out = arrays_of(ws)
    for layer, ns in ws.buf.items():
        out.update({f"{layer}.{k}": v for k, v in arrays_of(ns).items()})
    return out


def declared(d):
    return {k: (tuple(shape), np.dtype(dtype)) for k, (shape, dtype) in d.items()}


@pytest.mark.opencl
@pytest.mark.parametrize("hebb,batch,device,opt,extra", [
    ("fast_weights", B, "dev", "adamw", ()), ("shadow", 256, "dev", "adamw", ()),
    ("modulate", 256, "gpu_dev", "adamw", ()), ("off", 2, "dev", "sgd", ()),
    ("fast_weights", B, "dev", "adamw", ("model.num_layers=2", "hebb.norm=layernorm", "proto.mode=token")),
    ("fast_weights", 256, "dev", "adamw", ("model.num_layers=3", "proto.mode=key"))])
def test_declared_buffers_are_what_is_allocated(request, hebb, batch, device, opt, extra):
    """What the memory check sizes (engine.model.*_buffers, gemm_scratch) is what a training step,
    its local rules, telemetry and an evaluation allocate: N = 256·8 = 2048 takes the K-split
    products, batch 2 (N < V) the unfolded embedding."""
    from engine.data import Vocab
    from engine.model import param_specs
    from engine.params import init_params
    d = request.getfixturevalue(device)
    cfg = apply_overrides(Config(), [f"model.embedding_dim={E}", f"model.hidden_dim={H}",
                                     f"model.num_prototypes={T}", f"hebb.mode={hebb}", f"optim.name={opt}",
                                     *extra])
    vocab = Vocab.from_text(TEXT)
    V = vocab.size
    saved = d.__dict__.pop("_workspace", None)   # ops.gemm's scratch, as a fresh device has it
    try:
        m = train_mod.Model(d, cfg, V)
        m.set_params(init_params(param_specs(m.layers), 0))
        ws = m.workspace(batch, S)
        ids = vocab.encode(TEXT)[:batch * S + 1]
        ws.x.set(np.resize(ids[:-1], batch * S))
        ws.y.set(np.resize(ids[1:], batch * S))
        opt = make_optimizer(d, cfg, m)
        train_mod.train_step(m, opt, ws)
        m.telemetry(ws)
        m.local_updates(ws)
        m.forward(ws)
        d.finish()
        scratch = {f"ops.{k}": ((a.size,), a.dtype) for k, a in d.__dict__.get("_workspace", {}).items()}
    finally:
        d.__dict__.pop("_workspace", None)
        if saved is not None:
            d._workspace = saved
    assert model_arrays(m) == declared(model_buffers(cfg, V))
    assert workspace_arrays(ws) == declared(workspace_buffers(cfg, V, batch, S))
    assert scratch == declared({f"ops.{k}": v for k, v in gemm_scratch(cfg, V, batch, S, d.variant).items()})
    assert ("ops.gemm_partial" in scratch) == (batch == 256)
    n = m.layout.total
    assert optim_arrays(opt) == declared(optimizer_class(cfg.optim.name).buffers(n))
    allocated = {f"model.{k}": v for k, v in model_arrays(m).items()}
    allocated.update({f"optim.{k}": v for k, v in optim_arrays(opt).items()})
    allocated.update({f"workspace.{k}": v for k, v in workspace_arrays(ws).items()})
    assert {**allocated, **scratch} == declared(device_buffers(cfg, V, batch, S, d.variant))


# ------------------------------------------------------------------ 8. progress without a terminal, summary line
def fake_clock(monkeypatch, times):
    """engine.train's own view of `time` (only its monotonic clock is read by the progress)."""
    it = iter(times)
    monkeypatch.setattr(train_mod, "time", SimpleNamespace(monotonic=lambda: next(it)))


def rec(step, loss=2.412, tok=41_200.4):
    return {"step": step, "train_loss": loss, "tokens_per_s": tok}


def test_plain_progress_lines_when_stderr_is_not_a_terminal(capsys, monkeypatch):
    fake_clock(monkeypatch, [100.0, 112.0, 113.0])
    update, bar = make_progress(2000, interval=0)
    assert bar is None and update is not None
    update(rec(400))
    update(rec(2000, 1.5, 9.6))
    assert capsys.readouterr().err.splitlines() == [
        "step 400/2000  loss 2.412  41,200 tok/s  elapsed 0:12  remaining 0:48",
        "step 2000/2000  loss 1.500  10 tok/s  elapsed 0:13  remaining 0:00"]


def test_plain_progress_is_throttled_and_counts_from_the_resumed_step(capsys, monkeypatch):
    fake_clock(monkeypatch, [0.0, 1.0, 6.0, 8.0, 3720.0])
    update, _ = make_progress(1000, 500, interval=5)
    for step in (510, 600, 620, 900):      # at 1 s: the first; 6 s: printed; 8 s: too soon; 3720 s: printed
        update(rec(step))
    assert capsys.readouterr().err.splitlines() == [
        "step 510/1000  loss 2.412  41,200 tok/s  elapsed 0:01  remaining 0:49",
        "step 600/1000  loss 2.412  41,200 tok/s  elapsed 0:06  remaining 0:24",
        "step 900/1000  loss 2.412  41,200 tok/s  elapsed 1:02:00  remaining 15:30"]


def test_format_duration():
    assert [format_duration(s) for s in (0, 7.4, 59.6, 754, 3723)] == ["0:00", "0:07", "1:00", "12:34", "1:02:03"]


@pytest.mark.opencl
def test_cli_ends_with_one_summary_line(text_file, dev, tmp_path, capsys):
    assert main(cli_args(text_file) + ["--out", str(tmp_path)]) == 0
    out = capsys.readouterr()
    last = [__import__("json").loads(line) for line in out.out.splitlines()][-1]
    path = str(tmp_path / "checkpoint.npz")
    assert re.fullmatch(rf"finished at step 12/12 in 0:0\d  val_loss {last['val_loss']:.4f}  "
                        rf"val_bpc {last['val_bpc']:.4f}  checkpoint {re.escape(path)}",
                        out.err.strip().splitlines()[-1]), out.err


@pytest.mark.opencl
def test_a_kernel_that_does_not_build_is_one_line_naming_the_file_and_the_error(dev, tmp_path, monkeypatch):
    """Was: a TypeError from the error path itself (pyopencl's exc.what is a record, not callable)."""
    from engine import device as device_mod
    from engine.device import DeviceError
    (tmp_path / "broken.cl").write_text("__kernel void k(__global float* x) { float half = 1.0f; x[0] = half; }\n")
    monkeypatch.setattr(device_mod, "KERNEL_DIR", tmp_path)
    with pytest.raises(DeviceError) as exc:
        dev.program("broken.cl")
    msg = str(exc.value)
    assert msg.startswith("building kernels/broken.cl failed: ") and "\n" not in msg, msg
