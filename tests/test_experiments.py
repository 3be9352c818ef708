"""experiments/: named experiments as tracked MLflow runs, read back from a real SQLite store.

    python -m pytest tests/test_experiments.py -q

Every runner test starts `python -m experiments.*` as a subprocess (cwd = a temporary
directory, so `runs/` and `mlruns/` land there) against `sqlite:///<tmp>/mlflow.db`, and
reads the run back with `mlflow.MlflowClient`. Creating an MLflow database (migrations)
is slow, so one empty, migrated database is made per module and copied for each store.
One `smoke` run is shared by the read-back, reproduce and compare tests.
"""
import csv
import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from engine.config import Config
from experiments import presets
from experiments.tracking import TIMING_PREFIXES

pytestmark = pytest.mark.opencl

REPO = Path(__file__).resolve().parent.parent
RUN_ID = re.compile(r"^[0-9a-f]{32}$")
SMOKE_STEPS = 30
STEPS, EVAL = 3000, 500  # long enough for the run to be mid-way when signalled
SIGTERM_ARGS = ["--set", f"train.steps={STEPS}", "--set", f"train.eval_every={EVAL}",
                "--set", f"train.checkpoint_every={EVAL}", "--set", "train.log_every=5"]
PARAM_NAMES = ("W_emb", "W1", "b1", "W2", "b2")


# -- helpers -------------------------------------------------------------------------------------
def _env(uri: str | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("MLFLOW_TRACKING_URI", None)
    if uri:
        env["MLFLOW_TRACKING_URI"] = uri
    env["PYTHONUNBUFFERED"] = "1"
    return env


def cli(module: str, *args, cwd, uri_env: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m module args` in `cwd`; the store comes from --tracking-uri in args or `uri_env`."""
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=cwd, env=_env(uri_env),
                          capture_output=True, text=True, timeout=timeout)


def popen(module: str, *args, cwd: Path, tag: str) -> tuple[subprocess.Popen, Path, Path]:
    out, err = cwd / f"{tag}.out", cwd / f"{tag}.err"
    with open(out, "w") as fo, open(err, "w") as fe:
        p = subprocess.Popen([sys.executable, "-m", module, *map(str, args)], cwd=cwd, env=_env(),
                             stdout=fo, stderr=fe, text=True)
    return p, out, err


def last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else ""


def error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.strip()]


def mlflow_client(uri: str):
    from mlflow import MlflowClient
    return MlflowClient(tracking_uri=uri)


def series(cl, run_id: str, key: str) -> list[tuple[int, float]]:
    hist = cl.get_metric_history(run_id, key)
    return [(m.step, m.value) for m in sorted(hist, key=lambda m: (m.step, m.timestamp))]


def model_keys(cl, run_id: str) -> set[str]:
    """Metric keys whose values depend on the maths only (no timings)."""
    return {k for k in cl.get_run(run_id).data.metrics if not k.startswith(TIMING_PREFIXES)}


def all_runs(cl) -> list:
    ids = [e.experiment_id for e in cl.search_experiments()]
    return cl.search_runs(ids, max_results=1000) if ids else []


class Store:
    """A tracking store: a copy of the migrated template database in its own directory."""

    def __init__(self, template: Path, directory: Path):
        directory.mkdir(parents=True, exist_ok=True)
        self.dir = directory
        self.db = directory / "mlflow.db"
        shutil.copyfile(template, self.db)
        self.uri = f"sqlite:///{self.db}"
        self.client = mlflow_client(self.uri)

    def run(self, module: str, *args, **kw) -> subprocess.CompletedProcess:
        return cli(module, *args, "--tracking-uri", self.uri, cwd=self.dir, **kw)

    def new_experiment(self, name: str) -> str:
        return self.client.create_experiment(name, artifact_location=str(self.dir / "mlruns" / name))


class Collect:
    """engine.train.Callback keeping every record (the in-process reference)."""

    def __init__(self):
        self.logs, self.evals = [], []

    def on_start(self, trainer): ...
    def on_checkpoint(self, path, step): ...
    def on_end(self, summary): ...

    def on_log(self, rec):
        self.logs.append(rec)

    def on_eval(self, rec):
        self.evals.append(rec)


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def template_db(tmp_path_factory, dev):
    """An empty MLflow database with every migration applied (made once, copied per store)."""
    d = tmp_path_factory.mktemp("mlflow-template")
    db = d / "mlflow.db"
    code = "import sys; from mlflow import MlflowClient; MlflowClient(sys.argv[1]).search_experiments(max_results=1)"
    r = subprocess.run([sys.executable, "-c", code, f"sqlite:///{db}"], cwd=d, env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and db.exists(), r.stderr
    return db


@pytest.fixture
def store(template_db, tmp_path):
    return Store(template_db, tmp_path / "store")


@pytest.fixture(scope="module")
def shared(template_db, tmp_path_factory):
    """One `python -m experiments.run smoke` into a module-level store, shared by many tests."""
    s = Store(template_db, tmp_path_factory.mktemp("shared"))
    proc = s.run("experiments.run", "smoke")
    assert proc.returncode == 0, proc.stderr[-3000:]
    s.proc = proc
    s.run_id = last_line(proc.stdout)
    return s


@pytest.fixture(scope="module")
def smoke_cfg() -> Config:
    return presets.get("smoke").config()


@pytest.fixture(scope="module")
def artifacts(shared, tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("artifacts")
    return Path(shared.client.download_artifacts(shared.run_id, "", str(dst)))


@pytest.fixture(scope="module")
def engine_run(dev, smoke_cfg):
    """The same smoke config trained in this process, untracked, on the same device."""
    from engine.train import Trainer
    rec = Collect()
    trainer = Trainer(smoke_cfg, None, [rec], device=dev)
    summary = trainer.train()
    return trainer, summary, rec


@pytest.fixture(scope="module")
def reproduction(shared):
    """`python -m experiments.reproduce` of the shared smoke run: (process, new run id)."""
    proc = shared.run("experiments.reproduce", shared.run_id)
    m = re.search(r"new run ([0-9a-f]{32})", proc.stdout)
    return proc, (m.group(1) if m else None)


# -- 1. read-back of a smoke run -------------------------------------------------------------------
def test_smoke_run_finishes_and_prints_its_run_id(shared):
    assert shared.proc.returncode == 0
    assert RUN_ID.match(last_line(shared.proc.stdout)), shared.proc.stdout
    run = shared.client.get_run(shared.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "smoke-s0"
    assert shared.client.get_experiment(run.info.experiment_id).name == "hybrid-lm"
    assert "error" not in run.data.tags


def test_smoke_params_are_the_resolved_config(shared, smoke_cfg):
    params = shared.client.get_run(shared.run_id).data.params
    flat = smoke_cfg.flat()
    assert len(flat) > 30
    for key, value in flat.items():
        assert params.get(key) == str(value), key
    assert params["model.hidden_dim"] == "32" and params["train.steps"] == "30"  # the preset, not the defaults
    assert params["experiment"] == "smoke"
    assert json.loads(params["overrides"]) == []
    assert set(params) == set(flat) | {"experiment", "overrides"}


def test_smoke_tags_describe_code_device_and_data(shared, dev):
    import mlflow
    import pyopencl

    from engine.data import default_corpus
    from engine.device import kernel_source_hash
    run = shared.client.get_run(shared.run_id)
    tags = run.data.tags
    commit = tags["git_commit"]
    assert re.fullmatch(r"[0-9a-f]{40}", commit)
    # HEAD itself, or an ancestor when the lead committed while this test ran
    assert subprocess.run(["git", "merge-base", "--is-ancestor", commit, "HEAD"], cwd=REPO).returncode == 0
    assert tags["git_dirty"] in ("true", "false")
    assert tags["version.pyopencl"] == pyopencl.VERSION_TEXT
    assert tags["version.numpy"] == np.__version__
    assert tags["version.mlflow"] == mlflow.__version__
    assert tags["opencl.platform"] == dev.platform_name
    assert tags["opencl.driver"] == dev.driver_version
    assert tags["opencl.device"] == dev.name
    tuning = json.loads(tags["opencl.tuning"])   # engine.tune: the cpu variant tunes nothing
    assert tuning == {} if dev.variant == "cpu" else set(tuning) == {"gemm_tile", "gemm_block", "red_wg"}
    assert json.loads(tags["opencl.devices"]) == [f"{dev.name} [{dev.platform_name}]"]   # one device
    assert tags["kernel_hash"] == kernel_source_hash()
    sha = hashlib.sha256(default_corpus().encode("utf-8")).hexdigest()
    assert tags["data_sha256"] == sha
    assert tags["seed"] == "0"
    assert tags["checkpoint_path"] == str(shared.dir / "runs" / shared.run_id / "checkpoint.npz")
    assert os.path.exists(tags["checkpoint_path"])

    inputs = run.inputs.dataset_inputs
    assert len(inputs) == 1
    ds = inputs[0].dataset
    assert ds.digest == sha[:20]
    assert {(t.key, t.value) for t in inputs[0].tags} == {("mlflow.data.context", "training")}
    assert json.loads(ds.profile)["characters"] == len(default_corpus())


def test_smoke_metrics_are_logged_at_the_configured_steps(shared, smoke_cfg):
    cl, rid = shared.client, shared.run_id
    keys = set(cl.get_run(rid).data.metrics)
    want = {"train_loss", "lr", "grad_norm", "clipped_frac", "val_loss", "val_acc", "val_bpc",
            "proto_perplexity", "proto_dead", "hebb_norm", "spike_rate", "tokens_per_s", "step_ms",
            "kernel_ms/gemm_nn"} | {f"grad_norm.{p}" for p in PARAM_NAMES}
    assert want <= keys, want - keys
    tc = smoke_cfg.train
    log_steps = list(range(tc.log_every, tc.steps + 1, tc.log_every))
    assert log_steps == [5, 10, 15, 20, 25, 30]
    assert [s for s, _ in series(cl, rid, "train_loss")] == log_steps
    for key in ("lr", "grad_norm", "grad_norm.W1", "spike_rate", "tokens_per_s"):
        assert [s for s, _ in series(cl, rid, key)] == log_steps, key
    for key in ("val_loss", "val_acc", "val_bpc", "kernel_ms/gemm_nn", "step_ms"):   # per evaluation
        assert [s for s, _ in series(cl, rid, key)] == [10, 20, 30], key
    # val_bpc is val_loss in bits
    for (_, loss), (_, bpc) in zip(series(cl, rid, "val_loss"), series(cl, rid, "val_bpc")):
        assert bpc == pytest.approx(loss / math.log(2), rel=1e-12)
    # step_ms is the sum of the per-kernel times of the same evaluation window
    kernels = [k for k in keys if k.startswith("kernel_ms/")]
    by_step = {s: 0.0 for s in (10, 20, 30)}
    for k in kernels:
        for s, v in series(cl, rid, k):
            by_step[s] += v
    for s, v in series(cl, rid, "step_ms"):
        assert v == pytest.approx(by_step[s], rel=1e-9)


def test_smoke_metrics_equal_the_untracked_engine_exactly(shared, engine_run):
    """Same config, same device: every non-timing value MLflow holds is bit-identical to the
    engine's own records (float32 values survive MLflow's float64 exactly)."""
    trainer, summary, rec = engine_run
    cl, rid = shared.client, shared.run_id
    assert summary["status"] == "finished"
    final = cl.get_run(rid).data.metrics
    assert final["val_loss"] == summary["history"][-1]["val_loss"]
    assert final["val_acc"] == summary["history"][-1]["val_acc"]
    expected: dict[str, list] = {}
    for r in rec.logs:
        for k, v in r.items():
            if isinstance(v, (int, float)) and k != "step" and not k.startswith(TIMING_PREFIXES):
                expected.setdefault(k.replace("grad_norm/", "grad_norm.", 1), []).append((r["step"], float(v)))
    for r in rec.evals:
        for k in ("val_loss", "val_acc", "val_bpc", "val_f1", "proto_changed"):
            if k in r:
                expected.setdefault(k, []).append((r["step"], float(r[k])))
    assert set(expected) == model_keys(cl, rid)
    for key, want in expected.items():
        assert series(cl, rid, key) == want, key
    # the learning-rate schedule as the optimiser defines it
    assert [v for _, v in series(cl, rid, "lr")] == [trainer.opt.lr_at(s) for s in range(5, 31, 5)]


def test_smoke_config_and_checkpoint_artifacts(shared, artifacts, smoke_cfg):
    from engine.checkpoint import load_checkpoint
    assert Config.from_json((artifacts / "config.json").read_text()) == smoke_cfg
    arrays, meta = load_checkpoint(artifacts / "checkpoint" / "checkpoint.npz")
    assert meta["step"] == SMOKE_STEPS
    assert Config.from_dict(meta["config"]) == smoke_cfg
    assert [h["step"] for h in meta["history"]] == [10, 20, 30]
    assert meta["history"][-1]["val_loss"] == shared.client.get_run(shared.run_id).data.metrics["val_loss"]
    # the logged checkpoint is the one in runs/<run id>/
    assert (artifacts / "checkpoint" / "checkpoint.npz").read_bytes() == \
        Path(shared.client.get_run(shared.run_id).data.tags["checkpoint_path"]).read_bytes()


def test_smoke_prototype_histograms(artifacts, smoke_cfg, engine_run):
    _, _, rec = engine_run
    tc, T = smoke_cfg.train, smoke_cfg.model.num_prototypes
    from matplotlib.image import imread
    names = sorted(p.name for p in (artifacts / "proto_hist").iterdir())
    assert names == [f"step_{s:07d}.{ext}" for s in (10, 20, 30) for ext in ("json", "png")] + ["usage.png"]
    for s in (10, 20, 30):
        h = json.loads((artifacts / "proto_hist" / f"step_{s:07d}.json").read_text())
        assert h["step"] == s
        assert len(h["counts"]) == T
        assert sum(h["counts"]) == h["assigned"] == tc.batch_size * tc.seq_len  # every position of the batch
        assert h["counts"] == next(r["proto_counts"] for r in rec.logs if r["step"] == s)
        # the thumbnail's bars: one column per prototype, heights ∝ counts (rounded to pixels)
        img = imread(artifacts / "proto_hist" / f"step_{s:07d}.png")
        height, width = img.shape[:2]
        bar = width // T
        bars = (img[:, ::bar][:, :T, 2] < 0.9).sum(axis=0) - 1                  # blue pixels over the baseline
        want = np.rint((height - 4) * np.array(h["counts"]) / max(h["counts"])).astype(int)
        np.testing.assert_array_equal(bars, want)
    usage = imread(artifacts / "proto_hist" / "usage.png")                      # all evaluations, labelled
    assert usage.ndim == 3 and usage.shape[0] > 200


def test_smoke_text_samples(artifacts):
    names = sorted(p.name for p in (artifacts / "samples").iterdir())
    assert names == ["step_0000010.txt", "step_0000020.txt", "step_0000030.txt"]
    for n in names:
        text = (artifacts / "samples" / n).read_text(encoding="utf-8")
        assert text.startswith("The ") and text.endswith("\n")
        assert len(text) == len("The ") + 200 + 1  # prompt, 200 sampled characters, newline


def test_smoke_kernel_timings_and_loss_curves(shared, artifacts, smoke_cfg):
    with open(artifacts / "kernel_timings.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["kernel", "calls", "total_ms", "mean_us", "share_of_step_time"]
    table = {r[0]: (int(r[1]), float(r[2]), float(r[3]), float(r[4])) for r in rows[1:]}
    assert "gemm_nn" in table
    shares = [v[3] for v in table.values()]
    assert abs(sum(shares) - 1.0) <= 5e-5 * len(shares) + 1e-9  # each share is rounded to 4 decimals
    assert shares == sorted(shares, reverse=True)
    # the table's totals are the per-step metrics times the steps of each evaluation window
    cl, rid, every = shared.client, shared.run_id, smoke_cfg.train.eval_every
    assert set(table) == {k[len("kernel_ms/"):] for k in cl.get_run(rid).data.metrics if k.startswith("kernel_ms/")}
    grand = sum(every * v for k in table for _, v in series(cl, rid, f"kernel_ms/{k}"))
    for name, (calls, total_ms, mean_us, share) in table.items():
        total = every * sum(v for _, v in series(cl, rid, f"kernel_ms/{name}"))
        assert calls >= 1
        assert total_ms == pytest.approx(total, abs=6e-4), name
        assert mean_us == pytest.approx(1000 * total / calls, abs=6e-3), name
        assert share == pytest.approx(total / grand, abs=6e-5), name
    png = (artifacts / "loss_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


# -- 2. command-line errors ---------------------------------------------------------------------------
def test_list_names_every_experiment_with_its_description(tmp_path):
    r = cli("experiments.run", "--list", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == len(presets.EXPERIMENTS)
    for line, (name, exp) in zip(lines, presets.EXPERIMENTS.items()):
        assert line.split(None, 1) == [name, exp.description]
    assert not (tmp_path / "mlflow.db").exists()  # listing touches no store


def test_unknown_experiment_name_suggests_the_closest(store):
    r = store.run("experiments.run", "ablation_no_heb")
    assert r.returncode == 2
    lines = error_lines(r.stderr)
    assert len(lines) == 1, r.stderr
    assert "ablation_no_heb" in lines[0] and "'ablation_no_hebb'" in lines[0]
    assert r.stdout == ""
    assert all_runs(store.client) == []


def test_unknown_config_key_suggests_the_closest(store):
    r = store.run("experiments.run", "smoke", "--set", "model.hiden_dim=8")
    assert r.returncode == 2
    lines = error_lines(r.stderr)
    assert len(lines) == 1, r.stderr
    assert "model.hiden_dim" in lines[0] and "did you mean" in lines[0] and "model.hidden_dim" in lines[0]
    assert all_runs(store.client) == []


def test_unreachable_tracking_server_fails_fast(tmp_path):
    t = time.monotonic()
    r = cli("experiments.run", "smoke", "--tracking-uri", "http://127.0.0.1:9", cwd=tmp_path, timeout=60)
    assert time.monotonic() - t < 15
    assert r.returncode == 2
    lines = error_lines(r.stderr)
    assert len(lines) == 1 and "unreachable" in lines[0] and "http://127.0.0.1:9" in lines[0], r.stderr
    assert r.stdout == ""
    assert sorted(os.listdir(tmp_path)) == []  # no run directory, no local store


def _free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_smoke_run_against_an_http_tracking_server(tmp_path, dev):
    """An http:// MLflow server (started here, on loopback) works like the local store:
    the run, its metrics and its artifacts (uploaded through the server) read back."""
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path}/srv.db",
         "--artifacts-destination", str(tmp_path / "srv-artifacts"), "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = f"http://127.0.0.1:{port}"
    try:
        import urllib.request
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(uri + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, "mlflow server did not start"
            time.sleep(0.5)
        work = tmp_path / "work"
        work.mkdir()
        r = cli("experiments.run", "smoke", "--tracking-uri", uri, cwd=work)
        assert r.returncode == 0, r.stderr
        run_id = last_line(r.stdout)
        cl = mlflow_client(uri)
        run = cl.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert [s for s, _ in series(cl, run_id, "val_loss")] == [10, 20, 30]
        names = {a.path for a in cl.list_artifacts(run_id)}
        assert {"config.json", "kernel_timings.csv", "loss_curves.png", "checkpoint"} <= names
        # the artifacts went through the server into its destination, not into ./mlruns
        assert any((tmp_path / "srv-artifacts").rglob("config.json"))
        assert not (work / "mlruns").exists()
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_sqlite_store_in_a_missing_directory_is_a_user_error(tmp_path):
    missing = tmp_path / "nope" / "deeper"
    r = cli("experiments.run", "smoke", "--tracking-uri", f"sqlite:///{missing}/mlflow.db", cwd=tmp_path)
    assert r.returncode == 2
    lines = error_lines(r.stderr)
    assert len(lines) == 1 and "does not exist" in lines[0], r.stderr
    assert not (tmp_path / "nope").exists()
    assert sorted(os.listdir(tmp_path)) == []


def test_unknown_experiment_name_touches_no_store(tmp_path):
    """With the default store (sqlite:///mlflow.db in the current directory) a mistyped name must
    be the only line on stderr and must not leave a database behind."""
    r = cli("experiments.run", "ablation_no_heb", cwd=tmp_path)
    assert r.returncode == 2
    assert "ablation_no_hebb" in last_line(r.stderr)
    assert not (tmp_path / "mlflow.db").exists()
    assert len(error_lines(r.stderr)) == 1, r.stderr


# -- 3. reproduce -----------------------------------------------------------------------------------
def test_reproduce_matches_bit_for_bit_on_the_same_device(shared, reproduction):
    proc, new_id = reproduction
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert new_id and new_id != shared.run_id
    n = len(model_keys(shared.client, shared.run_id))
    verdict = [ln for ln in proc.stdout.splitlines() if ln.startswith(("MATCH", "MISMATCH"))]
    assert verdict == [f"MATCH: {n}/{n} metric series bit-identical (same device); new run {new_id}"]
    new = shared.client.get_run(new_id)
    assert new.info.status == "FINISHED"
    assert new.data.tags["reproduces"] == shared.run_id
    assert new.info.experiment_id == shared.client.get_run(shared.run_id).info.experiment_id
    assert new.data.params["experiment"] == "smoke"
    for key in model_keys(shared.client, shared.run_id):
        assert series(shared.client, new_id, key) == series(shared.client, shared.run_id, key), key


def test_reproduce_reports_a_mismatch(shared, reproduction):
    """A value logged into the original afterwards must be noticed. The original here is the
    reproduction run (a second smoke run), so the shared one stays clean."""
    _, second = reproduction
    assert second
    cl = shared.client
    cl.log_metric(second, "val_loss", 123.0, step=10)
    n = len(model_keys(cl, second))
    r = shared.run("experiments.reproduce", second)
    assert r.returncode == 1, r.stderr[-3000:]
    verdict = [ln for ln in r.stdout.splitlines() if ln.startswith(("MATCH", "MISMATCH"))]
    assert len(verdict) == 1 and verdict[0].startswith(f"MISMATCH: {n - 1}/{n} metric series"), r.stdout
    rows = {ln.split()[0]: ln.split() for ln in r.stdout.splitlines() if ln.strip()}
    assert rows["val_loss"][-1] == "False" and rows["val_acc"][-1] == "True" and rows["train_loss"][-1] == "True"
    third = re.search(r"new run ([0-9a-f]{32})", verdict[0]).group(1)
    assert cl.get_run(third).data.tags["reproduces"] == second


def test_reproduce_unknown_run_id(shared):
    before = len(all_runs(shared.client))
    r = shared.run("experiments.reproduce", "0" * 32)
    assert r.returncode == 2
    lines = error_lines(r.stderr)
    assert len(lines) == 1 and "unknown run id" in lines[0] and "0" * 32 in lines[0], r.stderr
    assert len(all_runs(shared.client)) == before


def test_reproduce_run_without_config_json(shared):
    cl = shared.client
    bare = cl.create_run(shared.new_experiment("bare")).info.run_id
    cl.set_terminated(bare, "FINISHED")
    before = len(all_runs(cl))
    r = shared.run("experiments.reproduce", bare)
    assert r.returncode == 2
    # MLflow's own "Downloading artifacts" progress bar may precede the one error line
    lines = [ln for ln in error_lines(r.stderr) if not ln.startswith("Downloading artifacts")]
    assert len(lines) == 1 and "config.json" in lines[0] and bare in lines[0], r.stderr
    assert lines[0].startswith("error: ")
    assert len(all_runs(cl)) == before  # nothing was launched


# -- 4. SIGTERM, then resume ------------------------------------------------------------------------------
def _wait_for_train_step(cl, proc, min_step: int, timeout: float = 180.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before it could be interrupted"
        exp = cl.get_experiment_by_name("hybrid-lm")
        if exp is not None:
            runs = cl.search_runs([exp.experiment_id])
            if runs:
                rid = runs[0].info.run_id
                steps = [m.step for m in cl.get_metric_history(rid, "train_loss")]
                if steps and max(steps) >= min_step:
                    return rid
        time.sleep(0.05)
    raise AssertionError(f"no train_loss at step >= {min_step} within {timeout} s")


class Interrupted:
    """What the SIGTERM scenario observed, step by step (the tests below check it)."""


@pytest.fixture(scope="module")
def interrupted(template_db, tmp_path_factory):
    """`smoke` for STEPS steps, SIGTERM once train_loss reached step 40, then --resume; meanwhile
    the same command runs uninterrupted in a store of its own (the reference)."""
    from engine.checkpoint import load_checkpoint
    base = tmp_path_factory.mktemp("sigterm")
    s = Interrupted()
    s.killed, s.whole = Store(template_db, base / "killed"), Store(template_db, base / "whole")
    ref, ref_out, ref_err = popen("experiments.run", "smoke", *SIGTERM_ARGS, "--tracking-uri", s.whole.uri,
                                  cwd=s.whole.dir, tag="whole")
    try:
        proc, out, err = popen("experiments.run", "smoke", *SIGTERM_ARGS, "--tracking-uri", s.killed.uri,
                               cwd=s.killed.dir, tag="killed")
        try:
            s.run_id = _wait_for_train_step(s.killed.client, proc, 40)
            proc.send_signal(signal.SIGTERM)
            s.kill_code = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        s.kill_stdout, s.kill_stderr = out.read_text(), err.read_text()
        cl = s.killed.client
        s.after_kill = cl.get_run(s.run_id)
        s.last_logged = max(st for st, _ in series(cl, s.run_id, "train_loss"))
        s.checkpoint_path = s.after_kill.data.tags.get("checkpoint_path", "")
        s.kill_meta = load_checkpoint(s.checkpoint_path)[1] if os.path.exists(s.checkpoint_path) else None
        s.kill_artifacts = {a.path for a in cl.list_artifacts(s.run_id, "checkpoint")}
        if s.kill_code == 130:
            s.resume = s.killed.run("experiments.run", "--resume", s.run_id)
            s.after_resume = cl.get_run(s.run_id)
            s.resume_meta = load_checkpoint(s.checkpoint_path)[1]
            s.resume_again = s.killed.run("experiments.run", "--resume", s.run_id)
            s.after_resume_again = cl.get_run(s.run_id)
        s.ref_code = ref.wait(timeout=300)
    finally:
        if ref.poll() is None:
            ref.kill()
            ref.wait()
    s.ref_stderr = ref_err.read_text()
    s.ref_id = last_line(ref_out.read_text())
    return s


def test_sigterm_stops_after_the_step_with_a_checkpoint(interrupted):
    s = interrupted
    assert s.kill_code == 130, s.kill_stderr[-3000:]
    assert last_line(s.kill_stdout) == s.run_id
    assert s.after_kill.info.status == "KILLED"
    assert "error" not in s.after_kill.data.tags
    assert s.checkpoint_path == str(s.killed.dir / "runs" / s.run_id / "checkpoint.npz")
    assert s.kill_meta is not None
    assert 40 <= s.last_logged <= s.kill_meta["step"] < STEPS  # written at the stop, not only every 500 steps
    assert s.kill_artifacts == {"checkpoint/checkpoint.npz"}


def test_resume_finishes_the_same_run(interrupted):
    s = interrupted
    assert s.resume.returncode == 0, s.resume.stderr[-3000:]
    assert last_line(s.resume.stdout) == s.run_id
    assert s.after_resume.info.status == "FINISHED"
    assert s.after_resume.data.tags["resumed_from_step"] == str(s.kill_meta["step"])
    assert s.resume_meta["step"] == STEPS
    assert len(all_runs(s.killed.client)) == 1  # resumed in place, no new run


def test_resumed_run_equals_an_uninterrupted_run(interrupted):
    s = interrupted
    assert s.ref_code == 0, s.ref_stderr[-3000:]
    cl, wc = s.killed.client, s.whole.client
    a, b = s.after_resume.data.metrics, wc.get_run(s.ref_id).data.metrics
    for key in ("val_loss", "val_acc", "train_loss"):
        assert a[key] == b[key], key
    assert [st for st, _ in series(cl, s.run_id, "val_loss")] == list(range(EVAL, STEPS + 1, EVAL))
    assert series(cl, s.run_id, "val_loss") == series(wc, s.ref_id, "val_loss")
    keys = model_keys(cl, s.run_id)
    assert keys == model_keys(wc, s.ref_id)
    for key in sorted(keys):  # every non-timing series, step for step, no step logged twice
        assert series(cl, s.run_id, key) == series(wc, s.ref_id, key), key


def test_resuming_a_finished_run_is_a_user_error(interrupted):
    s = interrupted
    r = s.resume_again
    assert r.returncode == 2
    lines = error_lines(r.stderr)
    assert len(lines) == 1 and "FINISHED" in lines[0] and s.run_id in lines[0], r.stderr
    assert s.after_resume_again.info.status == "FINISHED"


def test_resumed_run_timing_table_covers_the_whole_run(interrupted, tmp_path):
    """adamw runs once per optimiser step, so its call count is the number of steps the table covers.
    After a resume it may miss only the steps between the last logging point and the stop."""
    s = interrupted
    def calls(cl, rid, kernel):
        p = cl.download_artifacts(rid, "kernel_timings.csv", str(tmp_path / rid))
        with open(p, newline="") as f:
            return {r["kernel"]: int(r["calls"]) for r in csv.DictReader(f)}[kernel]
    whole = calls(s.whole.client, s.ref_id, "adamw")
    assert whole == STEPS
    resumed = calls(s.killed.client, s.run_id, "adamw")
    assert 0 <= whole - resumed < 5, (whole, resumed, s.kill_meta["step"])


# -- 5. a failing run ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def failed(shared):
    """smoke with a learning rate that overflows the weights: non-finite loss at the first log (step 5)."""
    r = shared.run("experiments.run", "smoke", "--experiment-name", "failing", "--set", "optim.lr=1e30",
                   "--set", "optim.clip_norm=0", "--set", "optim.weight_decay=0")
    return r, last_line(r.stdout)


def test_non_finite_training_fails_the_run(shared, failed):
    r, rid = failed
    assert r.returncode == 1, r.stderr[-3000:]
    assert RUN_ID.match(rid)
    run = shared.client.get_run(rid)
    assert run.info.status == "FAILED"
    err = run.data.tags["error"]
    assert err.startswith("TrainingError: non-finite value at step 5")
    assert "\n" not in err
    assert last_line(r.stderr) == f"error: {err}"
    assert "val_loss" not in run.data.metrics  # it failed before the first evaluation
    assert [s for s, _ in series(shared.client, rid, "train_loss")] == []  # nothing non-finite was logged


def test_failed_run_without_checkpoint_cannot_be_resumed(shared, failed):
    _, rid = failed
    r = shared.run("experiments.run", "--resume", rid)
    assert r.returncode == 2
    assert last_line(r.stderr) == f"error: run {rid} has no checkpoint to resume from"
    assert shared.client.get_run(rid).info.status == "FAILED"


def test_failure_message_names_only_an_existing_checkpoint(shared, failed):
    _, rid = failed
    err = shared.client.get_run(rid).data.tags["error"]
    for path in re.findall(r"checkpoint kept at (\S+)", err):
        assert os.path.exists(path), err


# -- 6. compare --------------------------------------------------------------------------------------------------
def test_compare_tables_and_csv(shared, tmp_path):
    # seed 1 goes to the store named by $MLFLOW_TRACKING_URI (no flag)
    r = cli("experiments.run", "smoke", "--set", "seed=1", cwd=shared.dir, uri_env=shared.uri)
    assert r.returncode == 0, r.stderr[-3000:]
    seed1 = last_line(r.stdout)
    cl = shared.client
    s1 = cl.get_run(seed1)
    assert s1.data.params["seed"] == "1" and s1.data.tags["seed"] == "1"
    assert json.loads(s1.data.params["overrides"]) == ["seed=1"]
    assert s1.data.metrics["val_loss"] != cl.get_run(shared.run_id).data.metrics["val_loss"]

    out = tmp_path / "out.csv"
    r = shared.run("experiments.compare", "--csv", out)
    assert r.returncode == 0, r.stderr[-3000:]
    exp = cl.get_experiment_by_name("hybrid-lm")
    runs = {x.info.run_id: x for x in cl.search_runs([exp.experiment_id])}
    assert {shared.run_id, seed1} <= set(runs)
    for rid in runs:
        assert rid in r.stdout
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(row["run_id"] for row in rows) == sorted(runs)  # one row per run
    for row in rows:
        mlf = runs[row["run_id"]]
        assert float(row["val_loss"]) == mlf.data.metrics["val_loss"]
        assert row["seed"] == mlf.data.params["seed"] and row["status"] == mlf.info.status
        assert row["experiment"] == "smoke"
    assert {row["seed"] for row in rows if row["run_id"] in (shared.run_id, seed1)} == {"0", "1"}

    # per experiment (and config): the finished runs that are not reproductions, with a t interval
    from scipy import stats as sps
    from experiments.compare import group_labels
    done = [x for x in runs.values() if x.info.status == "FINISHED" and "reproduces" not in x.data.tags]
    labels = group_labels(done)
    group = labels[shared.run_id]
    vals = [x.data.metrics["val_loss"] for x in done if labels[x.info.run_id] == group]
    assert len(vals) >= 2 and labels[seed1] == group   # the seed does not split a group
    lo, hi = sps.t.interval(0.95, len(vals) - 1, loc=np.mean(vals), scale=sps.sem(vals))
    rows = [ln for ln in r.stdout.splitlines() if ln.startswith(group + "  ")]
    assert rows, r.stdout
    assert rows[-1].split()[len(group.split()):][:3] == [str(len(vals)), f"{np.mean(vals):.4f}", f"[{lo:.4f},"]
    assert f"{hi:.4f}]" in rows[-1] and f"{np.std(vals, ddof=1):.4f}" in rows[-1]


def test_compare_without_runs_is_a_user_error(shared):
    r = shared.run("experiments.compare", "--experiment-name", "no-such-experiment")
    assert r.returncode == 2
    assert error_lines(r.stderr) == ["error: no MLflow experiment named 'no-such-experiment'"]
    shared.new_experiment("empty")
    r = shared.run("experiments.compare", "--experiment-name", "empty")
    assert r.returncode == 2
    assert error_lines(r.stderr) == ["error: no runs to compare"]


# -- early stopping and the test split (issue 14) -------------------------------------------------
def test_early_stop_best_checkpoint_and_test_metrics_reach_mlflow(store, dev, tmp_path, monkeypatch):
    """A tiny run in this process whose val_loss is a constructed function of the step (best at 4,
    patience 2: stops at 8): the test metrics at the best step, best_val_loss, best_step, stop_step,
    the tag early_stopped, val_f1 at every evaluation and best.npz beside checkpoint.npz."""
    from conftest import B, E, H, S, T, TEXT

    from engine.config import apply_overrides
    from engine.tasks.char_lm import CharLM
    from experiments.run import launch
    table = {2: 3.0, 4: 2.0, 6: 2.5, 8: 2.4, 10: 1.5, 12: 1.4}
    real = CharLM.evaluate

    def evaluate(self, model, ws, split="val"):
        metrics, assign = real(self, model, ws, split)
        if split == "val":
            metrics["val_loss"] = table[model.step]
        return metrics, assign
    monkeypatch.setattr(CharLM, "evaluate", evaluate)
    monkeypatch.chdir(store.dir)
    text = tmp_path / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    cfg = apply_overrides(Config(), [f"data.path={text}", f"model.embedding_dim={E}", f"model.hidden_dim={H}",
                                     f"model.num_prototypes={T}", f"train.batch_size={B}", f"train.seq_len={S}",
                                     "train.steps=12", "train.eval_every=2", "optim.warmup_steps=2",
                                     "train.log_every=2", "data.val_fraction=0.15", "data.test_fraction=0.1",
                                     "train.patience=2"])
    rid, summary = launch(cfg, "tiny", [], store.uri, out_root=str(store.dir / "runs"), progress=False)
    cl = store.client
    run = cl.get_run(rid)
    metrics = run.data.metrics
    assert run.info.status == "FINISHED" and run.data.tags["early_stopped"] == "true" and summary["step"] == 8
    for k in ("test_loss", "test_acc", "test_bpc", "test_f1"):
        assert series(cl, rid, k) == [(4, summary["test"][k])], k   # the step of the parameters evaluated
    assert (metrics["best_val_loss"], metrics["best_step"], metrics["stop_step"]) == (2.0, 4, 8)
    assert series(cl, rid, "val_f1") == [(r["step"], r["val_f1"]) for r in summary["history"]]
    assert sorted(a.path for a in cl.list_artifacts(rid, "checkpoint")) == ["checkpoint/best.npz",
                                                                            "checkpoint/checkpoint.npz"]
