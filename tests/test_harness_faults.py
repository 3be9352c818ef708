"""The runner under concurrency, crashes and bad input: nothing lost, nothing left RUNNING,
nothing silent (issue 9). Real processes against real SQLite stores in temp directories.

    python -m pytest tests/test_harness_faults.py -q

Each test reproduces a failure of the harness as it was (named in its docstring) and checks
the state it must leave instead: the store usable, every run ended, one line per error.
"""
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_experiments import Store, _env, cli, error_lines, last_line, mlflow_client, series
from test_experiments import template_db  # noqa: F401  (the fixture: one migrated database per module)

pytestmark = pytest.mark.opencl

SMOKE_FAST = ["--set", "train.steps=20", "--set", "train.eval_every=10"]


@pytest.fixture
def store(template_db, tmp_path):
    return Store(template_db, tmp_path / "store")


def start(module, *args, cwd, tag, uri=None):
    out, err = Path(cwd) / f"{tag}.out", Path(cwd) / f"{tag}.err"
    with open(out, "w") as fo, open(err, "w") as fe:
        p = subprocess.Popen([sys.executable, "-m", module, *map(str, args)], cwd=cwd, env=_env(uri),
                             stdout=fo, stderr=fe, text=True)
    return p, out, err


def statuses(cl) -> list[str]:
    ids = [e.experiment_id for e in cl.search_experiments()]
    return [r.info.status for r in cl.search_runs(ids, max_results=1000)] if ids else []


# -- the store: many processes at once, interrupted creation --------------------------------------
def test_four_first_runs_at_once_in_a_fresh_folder_all_finish(tmp_path, dev):
    """Was: all of them failed ('table _alembic_tmp_tags already exists') and the half-migrated
    mlflow.db broke every later command in the folder."""
    procs = [start("experiments.run", "smoke", *SMOKE_FAST, cwd=tmp_path, tag=f"r{i}") for i in range(4)]
    codes = [p.wait(timeout=600) for p, _, _ in procs]
    errs = [e.read_text() for _, _, e in procs]
    assert codes == [0, 0, 0, 0], "\n".join(x[-1500:] for x in errs)
    ids = {last_line(o.read_text()) for _, o, _ in procs}
    assert len(ids) == 4
    cl = mlflow_client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert sorted(statuses(cl)) == ["FINISHED"] * 4
    assert not any(n.endswith(".tmp") or ".broken-" in n for n in os.listdir(tmp_path))
    after = cli("experiments.compare", cwd=tmp_path)        # the store stays usable
    assert after.returncode == 0, after.stderr
    assert all(i in after.stdout for i in ids)


def test_interrupted_store_creation_leaves_no_store(tmp_path, monkeypatch):
    """Was: Ctrl+C while MLflow created its tables left a half-migrated mlflow.db."""
    import mlflow.store.db.utils as dbu
    from experiments.tracking import _store_state, prepare_sqlite_store
    real = dbu._initialize_tables

    def interrupted(engine):
        dbu.InitialBase.metadata.create_all(engine)   # some tables exist when the signal lands
        raise KeyboardInterrupt
    monkeypatch.setattr(dbu, "_initialize_tables", interrupted)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(KeyboardInterrupt):
        prepare_sqlite_store(uri)
    assert os.listdir(tmp_path) == []                     # no store, no temp file
    monkeypatch.setattr(dbu, "_initialize_tables", real)
    prepare_sqlite_store(uri)
    assert _store_state(tmp_path / "mlflow.db") == "ready"
    assert mlflow_client(uri).search_experiments()[0].name == "Default"


def test_half_built_store_without_runs_is_rebuilt_one_with_runs_is_refused(tmp_path, capsys):
    """A store left half-migrated by an older version: rebuilt when it holds nothing (moved aside,
    not deleted); reported in one line, never touched, when it holds runs."""
    from experiments.tracking import TrackingError, _store_state, prepare_sqlite_store
    empty = tmp_path / "a" / "mlflow.db"
    empty.parent.mkdir()
    con = sqlite3.connect(empty)
    con.executescript("CREATE TABLE experiments (experiment_id INTEGER); CREATE TABLE _alembic_tmp_tags (x);"
                      "CREATE TABLE runs (run_uuid TEXT); CREATE TABLE alembic_version (version_num TEXT);"
                      "INSERT INTO alembic_version VALUES ('451aebb31d03');")
    con.close()
    assert _store_state(empty) == "broken"
    prepare_sqlite_store(f"sqlite:///{empty}")
    assert _store_state(empty) == "ready"
    aside = [p.name for p in empty.parent.iterdir() if ".broken-" in p.name]
    assert len(aside) == 1 and "moved to" in capsys.readouterr().err

    full = tmp_path / "b" / "mlflow.db"
    full.parent.mkdir()
    con = sqlite3.connect(full)
    con.executescript("CREATE TABLE runs (run_uuid TEXT); INSERT INTO runs VALUES ('x');"
                      "CREATE TABLE alembic_version (version_num TEXT); INSERT INTO alembic_version VALUES ('old');")
    con.close()
    before = full.read_bytes()
    with pytest.raises(TrackingError, match="holds runs.*mlflow db upgrade") as exc:
        prepare_sqlite_store(f"sqlite:///{full}")
    assert "\n" not in str(exc.value)
    assert full.read_bytes() == before and len(list(full.parent.iterdir())) == 1


def test_dataset_logged_by_two_processes_at_once_is_retried(monkeypatch):
    """Was: 'UNIQUE constraint failed: datasets.experiment_id, datasets.name, datasets.digest'
    failed the run (and the sweep trial) when two workers logged the same new dataset."""
    from types import SimpleNamespace

    import numpy as np

    from experiments.tracking import log_dataset
    calls = []

    class Client:
        def log_inputs(self, run_id, datasets):
            calls.append(datasets[0].dataset.digest)
            if len(calls) == 1:
                raise Exception("(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id, "
                                "datasets.name, datasets.digest")
    cfg = SimpleNamespace(data=SimpleNamespace(path=""))
    trainer = SimpleNamespace(cfg=cfg, n_chars=10, vocab=SimpleNamespace(size=3), data_sha256="ab" * 32,
                              train_ids=np.zeros(9), val_ids=np.zeros(1))
    log_dataset(Client(), "run", trainer)
    assert calls == ["ab" * 10, "ab" * 10]


# -- nothing created before the input is known to be valid ---------------------------------------
@pytest.mark.parametrize("args", [
    ["experiments.run", "smokee"],
    ["experiments.run", "smoke", "--set", "optim.lrr=1"],
    ["experiments.run", "--resume", "0" * 32],
    ["experiments.reproduce", "0" * 32],
    ["experiments.compare"],
])
def test_a_refused_command_creates_no_store(tmp_path, args):
    """Was: an empty mlflow.db created before failing on an unknown run id (and for compare)."""
    r = cli(*args, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert len(error_lines(r.stderr)) == 1 and "Traceback" not in r.stderr, r.stderr
    assert os.listdir(tmp_path) == [], os.listdir(tmp_path)


@pytest.mark.parametrize("args,word", [
    (["--out", "afile"], "is an existing file"),
    (["--set", "model.hidden_dim=100000"], "CL_DEVICE_MAX_MEM_ALLOC_SIZE"),
    (["--set", "data.path=missing.txt"], "does not exist"),
])
def test_bad_output_data_or_model_size_is_refused_before_the_store(tmp_path, args, word):
    """Was: --out an existing file noticed after training (FileExistsError traceback); a model too
    large for the device a pyopencl INVALID_BUFFER_SIZE traceback after the store was made."""
    (tmp_path / "afile").write_text("x")
    r = cli("experiments.run", "smoke", *args, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = error_lines(r.stderr)
    assert len(lines) == 1 and word in lines[0], r.stderr
    assert sorted(os.listdir(tmp_path)) == ["afile"]


def test_store_in_a_folder_that_cannot_be_written_fails_at_once(tmp_path):
    """Was: 104 s of MLflow connection retries (37 lines) before the error. /sys refuses new
    files even to root, which is how CI runs."""
    t0 = time.monotonic()
    r = cli("experiments.run", "smoke", "--tracking-uri", "sqlite:////sys/fs/mlflow.db", cwd=tmp_path)
    assert time.monotonic() - t0 < 30
    assert r.returncode == 2
    lines = error_lines(r.stderr)
    assert len(lines) == 1 and "cannot create files in /sys/fs" in lines[0], r.stderr


def test_compare_csv_into_a_missing_folder_is_one_line(store):
    r = store.run("experiments.compare", "--csv", "nodir/out.csv")
    assert r.returncode == 2
    lines = error_lines(r.stderr)
    assert len(lines) == 1 and "nodir" in lines[0] and "Traceback" not in r.stderr, r.stderr


# -- processes that die without cleaning up --------------------------------------------------------
# long enough to be killed mid-way (~5 s at 300 steps/s); after the checkpoint at step 300 every
# evaluation (400, 500, ...) logs steps past it, which a resume recomputes
KILL_ARGS = ["--set", "train.steps=1500", "--set", "train.eval_every=100", "--set", "train.checkpoint_every=300",
             "--set", "train.log_every=5"]


def _wait_for_checkpoint(cl, proc, timeout=240.0):
    """The run's id once its first checkpoint (step 300) is on disk. The file is written by the
    training thread itself, so this does not lag like the store's metrics (written at low priority)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before it could be killed"
        exp = cl.get_experiment_by_name("hybrid-lm")
        runs = cl.search_runs([exp.experiment_id]) if exp else []
        path = runs[0].data.tags.get("checkpoint_path", "") if runs else ""
        if path and os.path.exists(path):
            return runs[0].info.run_id
        time.sleep(0.02)
    raise AssertionError("no checkpoint in time")


@pytest.fixture(scope="module")
def sigkilled(template_db, tmp_path_factory):
    """`smoke` SIGKILLed after its first checkpoint (and a metric past it); then --resume. The same
    command runs uninterrupted in a store of its own for reference."""
    base = tmp_path_factory.mktemp("sigkill")
    s = type("S", (), {})()
    s.killed, s.whole = Store(template_db, base / "killed"), Store(template_db, base / "whole")
    ref = start("experiments.run", "smoke", *KILL_ARGS, "--tracking-uri", s.whole.uri, cwd=s.whole.dir, tag="w")
    proc, _, _ = start("experiments.run", "smoke", *KILL_ARGS, "--tracking-uri", s.killed.uri,
                       cwd=s.killed.dir, tag="k")
    try:
        s.run_id = _wait_for_checkpoint(s.killed.client, proc)
        proc.kill()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    s.after_kill = s.killed.client.get_run(s.run_id)
    s.resume = s.killed.run("experiments.run", "--resume", s.run_id)
    s.after = s.killed.client.get_run(s.run_id)
    assert ref[0].wait(timeout=600) == 0, ref[2].read_text()[-2000:]
    s.ref_id = last_line(ref[1].read_text())
    return s


def test_sigkilled_run_is_resumed_to_the_uninterrupted_metrics(sigkilled):
    """Was: the run stayed RUNNING for good and --resume refused it ('only KILLED or FAILED')."""
    s = sigkilled
    assert s.after_kill.info.status == "RUNNING"             # nothing could end it ...
    assert s.resume.returncode == 0, s.resume.stderr[-3000:]  # ... but --resume sees its process is gone
    assert last_line(s.resume.stdout) == s.run_id
    assert s.after.info.status == "FINISHED"
    a, b = s.after.data.metrics, s.whole.client.get_run(s.ref_id).data.metrics
    for key in ("val_loss", "val_acc", "val_bpc", "train_loss", "grad_norm", "proto_perplexity"):
        assert a[key] == b[key], key
    for key in ("val_loss", "train_loss", "grad_norm"):       # each step logged once, as uninterrupted
        assert series(s.killed.client, s.run_id, key) == series(s.whole.client, s.ref_id, key), key


def test_a_resumed_run_does_not_log_a_step_twice():
    """A SIGKILLed run may have logged metrics past its last checkpoint; the resumed run
    recomputes those steps (bit for bit) and must not log them a second time."""
    from types import SimpleNamespace

    from mlflow.entities import Metric

    from experiments.tracking import MlflowLogger
    logged = [Metric("train_loss", 2.0, 0, 1100), Metric("val_loss", 2.1, 0, 1100), Metric("lr", 1e-3, 0, 1095)]
    sent = []

    class Client:
        def get_run(self, run_id):
            return SimpleNamespace(data=SimpleNamespace(_metric_objs=logged))

        def get_metric_history(self, run_id, key):
            return []

        def download_artifacts(self, *a):
            raise OSError("none")

        def log_batch(self, run_id, metrics=()):
            sent.extend((m.key, m.step) for m in metrics)
    logger = MlflowLogger(Client(), "run")
    logger.restore(1000)
    logger._send(1050, {"train_loss": 1.0, "lr": 1.0})
    logger._send(1100, {"train_loss": 1.0, "val_loss": 1.0, "lr": 1.0})
    logger._send(1105, {"train_loss": 1.0, "lr": 1.0}, flush=True)
    logger._bg.join()
    assert sent == [("lr", 1100), ("train_loss", 1105), ("lr", 1105)]


def test_the_heartbeat_beats_while_the_tracker_is_idle():
    """A live run on another host is told from a dead one by its heartbeat: it must beat even
    when no metric is written for a long time (slow steps, a long evaluation)."""
    from experiments.tracking import _Background
    beats = []
    bg = _Background(lambda: beats.append(time.monotonic()), idle_s=0.05)
    deadline = time.monotonic() + 10
    while len(beats) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    bg.submit(lambda: None)
    bg.join()
    assert len(beats) >= 3


def test_liveness_tells_a_dead_owner_from_a_live_one():
    from experiments import liveness
    assert liveness.owner_alive(liveness.owner()) is True
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    dead = liveness.owner(p.pid)
    p.wait()
    assert liveness.owner_alive(dead) is False and liveness.is_stale(dead, None)
    h, pid, start = liveness.owner().rsplit(":", 2)
    assert liveness.owner_alive(f"{h}:{pid}:{int(start) + 1}") is False   # the pid, reused by another process
    other = "elsewhere.example:1:1"
    assert liveness.owner_alive(other) is None
    assert not liveness.is_stale(other, liveness.now_ms() - 1000)
    assert liveness.is_stale(other, liveness.now_ms() - 1000 * (liveness.GRACE_S + 1))
    assert not liveness.is_stale("", None)


def test_a_run_whose_process_died_is_failed_by_the_next_run(template_db, tmp_path):
    """No run stays RUNNING for good: the next run in the experiment marks a dead one FAILED, with why."""
    s = Store(template_db, tmp_path)
    proc, _, _ = start("experiments.run", "smoke", *KILL_ARGS, "--tracking-uri", s.uri, cwd=tmp_path, tag="k")
    try:
        rid = _wait_for_checkpoint(s.client, proc)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert s.client.get_run(rid).info.status == "RUNNING"
    r = s.run("experiments.run", "smoke", *SMOKE_FAST)
    assert r.returncode == 0, r.stderr[-2000:]
    dead = s.client.get_run(rid)
    assert dead.info.status == "FAILED"
    assert f"pid {proc.pid}" in dead.data.tags["error"] and "--resume" in dead.data.tags["error"]


def test_a_live_run_cannot_be_resumed_twice(template_db, tmp_path):
    s = Store(template_db, tmp_path)
    proc, _, _ = start("experiments.run", "smoke", *KILL_ARGS, "--tracking-uri", s.uri, cwd=tmp_path, tag="k")
    try:
        rid = _wait_for_checkpoint(s.client, proc)
        r = s.run("experiments.run", "--resume", rid)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert r.returncode == 2
    lines = error_lines(r.stderr)
    assert len(lines) == 1 and "still running" in lines[0] and f"pid {proc.pid}" in lines[0], r.stderr


# -- resume --------------------------------------------------------------------------------------
@pytest.fixture
def killed_run(template_db, tmp_path_factory):
    """A smoke run stopped by SIGTERM soon after its checkpoint at step 300 of 1500 (KILLED,
    checkpoint logged)."""
    d = tmp_path_factory.mktemp("killed")
    s = Store(template_db, d)
    proc, _, err = start("experiments.run", "smoke", *KILL_ARGS, "--tracking-uri", s.uri, cwd=d, tag="k")
    try:
        s.run_id = _wait_for_checkpoint(s.client, proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 130, err.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    return s


def test_resume_refuses_a_key_that_cannot_change(killed_run):
    """Was: --resume RUN_ID --set ... silently ignored."""
    s = killed_run
    for item, word in (("model.hidden_dim=64", "model.hidden_dim"), ("optim.lr=1", "optim.lr"),
                       ("train.stepz=9", "did you mean")):
        r = s.run("experiments.run", "--resume", s.run_id, "--set", item)
        assert r.returncode == 2, r.stderr
        lines = error_lines(r.stderr)
        assert len(lines) == 1 and word in lines[0], r.stderr
    assert s.client.get_run(s.run_id).info.status == "KILLED"


def test_resume_applies_and_records_train_steps(killed_run):
    s, rid = killed_run, killed_run.run_id
    r = s.run("experiments.run", "--resume", rid, "--set", "train.steps=800", "--set", "train.eval_every=400")
    assert r.returncode == 0, r.stderr[-2000:]
    run = s.client.get_run(rid)
    assert run.info.status == "FINISHED"
    assert [st for st, _ in series(s.client, rid, "val_loss")][-2:] == [400, 800]
    record = json.loads(run.data.tags["resume_overrides"])
    assert record[0]["set"] == ["train.steps=800", "train.eval_every=400"] and record[0]["from_step"] < 400


def test_resume_falls_back_to_the_logged_checkpoint(killed_run):
    """Was: a corrupt local checkpoint stopped the resume although the run's artifact was intact."""
    s, rid = killed_run, killed_run.run_id
    local = Path(s.client.get_run(rid).data.tags["checkpoint_path"])
    ours = s.dir / "local-ckpt.npz"
    data = bytearray(local.read_bytes())
    data[len(data) // 2] ^= 0xFF
    ours.write_bytes(bytes(data))
    s.client.set_tag(rid, "checkpoint_path", str(ours))
    r = s.run("experiments.run", "--resume", rid, "--set", "train.steps=600")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "corrupt" in r.stderr and "trying the copy logged with the run" in r.stderr
    assert s.client.get_run(rid).info.status == "FINISHED"


# -- progress and the summary ---------------------------------------------------------------------
def test_run_prints_progress_and_a_summary_when_not_on_a_terminal(store):
    """Was: nothing at all on stderr for the whole run, only the run id at the end."""
    r = store.run("experiments.run", "smoke")
    assert r.returncode == 0, r.stderr
    rid = last_line(r.stdout)
    lines = error_lines(r.stderr)
    assert any(ln.startswith("step ") and "/30" in ln for ln in lines), r.stderr
    summary = lines[-1]
    exp_id = store.client.get_run(rid).info.experiment_id
    assert summary.startswith("finished: val_loss ")
    final = store.client.get_run(rid).data.metrics
    assert f"{final['val_loss']:.4f}" in summary and f"{final['val_bpc']:.3f} bpc" in summary
    assert f"mlflow ui --backend-store-uri sqlite:///{store.db}" in summary
    assert f"#/experiments/{exp_id}/runs/{rid}" in summary
    assert str(store.dir / "runs" / rid) in summary


def test_ctrl_c_while_loading_is_one_line(store, monkeypatch, capsys):
    """Was: a KeyboardInterrupt traceback when Ctrl+C landed while the data loaded."""
    import experiments.run as runner

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(runner, "Trainer", interrupted)
    code = runner.main(["smoke", "--tracking-uri", store.uri, "--out", str(store.dir / "runs")])
    assert code == 130
    err = capsys.readouterr().err
    assert len(error_lines(err)) == 1 and "interrupted" in err
    assert statuses(store.client) == []


def test_a_signal_during_a_runs_final_writes_reaches_the_callers_handler(store, monkeypatch):
    """A signal that comes after the loop (while the run writes its artifacts) can no longer stop
    the run; the runner keeps it and passes it on to the handler that was there before (a study's
    or a sweep's stop request), for a new run and for a resumed one. Was: lost on resume."""
    import engine.train
    from experiments import presets
    from experiments import run as runner
    from experiments.tracking import MlflowLogger
    cfg = presets.get("smoke").config({"train.steps": 20, "train.eval_every": 10, "train.checkpoint_every": 10})
    out = str(store.dir / "runs")

    class StopAt10(engine.train.Callback):
        def on_start(self, trainer):
            self.trainer = trainer

        def on_log(self, rec):
            if rec["step"] == 10:
                self.trainer.request_stop()

    killed_id, summary = runner.launch(cfg, "smoke", [], store.uri, out_root=out, progress=False, callbacks=[StopAt10()])
    assert summary["status"] == "killed"
    got = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))
    finish = MlflowLogger.finish

    def finish_with_a_signal(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)          # arrives while the run writes its artifacts
        time.sleep(0.05)
        return finish(self, *args, **kwargs)

    monkeypatch.setattr(MlflowLogger, "finish", finish_with_a_signal)
    try:
        new_id, summary = runner.launch(cfg, "smoke", [], store.uri, out_root=out, progress=False)
        assert summary["status"] == "finished" and got == [signal.SIGTERM]
        summary = runner.resume(killed_id, store.uri, out, progress=False)
        assert summary["status"] == "finished" and got == [signal.SIGTERM, signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert {store.client.get_run(i).info.status for i in (new_id, killed_id)} == {"FINISHED"}
