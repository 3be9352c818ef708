"""sweeps/: Optuna studies whose trials are nested MLflow runs, read back from real stores.

    python -m pytest tests/test_sweeps.py -q          # ~5 min on a busy 2-core machine

Every sweep runs `python -m sweeps.run` as a subprocess (cwd = a temporary directory, so
runs/, mlruns/ and the default Optuna files land there) at tiny model sizes, against
`sqlite:///<tmp>/mlflow.db` (a copy of one migrated template: creating an MLflow database
takes ~10 s), then reads the Optuna study (`optuna.load_study`) and the MLflow runs
(`mlflow.MlflowClient`) back. The failing-trial test drives `sweeps.study.Objective` and
`sweeps.run.optimize` in-process. The PostgreSQL test starts a private server
(tests/pg.py), SIGKILLs a worker in the middle of a trial and lets a second worker
recover the study after the heartbeat grace period (sweeps.study.GRACE_S, ~30 s).

Fixed seeds: `--sampler-seed 1` for the 3-trial study (trials 1-2 are TPE start-up
draws, which do not depend on objective values), `--sampler-seed 0` for the pruning
study (its trial 3 draws hebb.lr = 3.69, proto.lr = 0.78: validation loss ~6.7 at the
first check against a median of ~4.8, so MedianPruner prunes it every time).
The transformer family (section i): 2 trials of `transformer_balance` at n_layer 1, width
16, 5 steps, one of its runs reproduced bit for bit and compared (~22 s).
"""
import csv
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from pg import PostgresServer

pytestmark = pytest.mark.opencl

REPO = Path(__file__).resolve().parent.parent
RUN_ID = re.compile(r"^[0-9a-f]{32}$")
HYBRID_DEFAULTS = {"optim.lr": 0.003, "hebb.lr": 1.0, "proto.lr": 0.05}
SEARCHED = tuple(HYBRID_DEFAULTS)
# lr_balance's ranges (sweeps/spaces.py), written out so a changed range is noticed
RANGES = {"optim.lr": (1e-4, 3e-2), "hebb.lr": (1e-3, 10.0), "proto.lr": (1e-3, 1.0)}
TINY = {"model.hidden_dim": 32, "model.embedding_dim": 16, "model.num_prototypes": 8, "train.batch_size": 8,
        "train.seq_len": 16, "train.eval_batches": 1, "train.log_every": 5}
UNREACHABLE_PG = "postgresql+psycopg2://u@127.0.0.1:9/x"


# -- helpers -------------------------------------------------------------------------------------
def tiny(steps: int = 20, eval_every: int = 10, **extra) -> list[str]:
    """--set arguments: tiny sizes (the sweep base `hybrid` is full size otherwise)."""
    sets = {**TINY, "train.steps": steps, "train.eval_every": eval_every, **extra}
    out = []
    for k, v in sets.items():
        out += ["--set", f"{k}={v}"]
    return out


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    for k in ("MLFLOW_TRACKING_URI", "OPTUNA_WORKER"):
        env.pop(k, None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def sweep(*args, cwd, module: str = "sweeps.run", timeout: float = 420) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def popen_sweep(*args, cwd: Path, tag: str) -> subprocess.Popen:
    with open(cwd / f"{tag}.out", "w") as fo, open(cwd / f"{tag}.err", "w") as fe:
        return subprocess.Popen([sys.executable, "-m", "sweeps.run", *map(str, args)], cwd=cwd, env=_env(),
                                stdout=fo, stderr=fe, text=True)


def ok(p: subprocess.CompletedProcess) -> str:
    """Asserts a sweep exited 0; returns the parent run id (the last stdout line)."""
    assert p.returncode == 0, f"exit {p.returncode}\nstdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-6000:]}"
    lines = p.stdout.strip().splitlines()
    assert lines and RUN_ID.match(lines[-1]), f"last stdout line is not a run id: {p.stdout[-500:]!r}"
    return lines[-1]


def lines_of(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


def mlflow_client(uri: str):
    from mlflow import MlflowClient
    return MlflowClient(tracking_uri=uri)


def all_runs(uri: str) -> list:
    from mlflow.entities import ViewType
    cl = mlflow_client(uri)
    ids = [e.experiment_id for e in cl.search_experiments(view_type=ViewType.ALL)]
    return cl.search_runs(ids, run_view_type=ViewType.ALL, max_results=10000) if ids else []


def children(cl, run) -> list:
    return cl.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'",
                          max_results=1000)


def best_val_loss(cl, run_id: str) -> float:
    hist = cl.get_metric_history(run_id, "val_loss")
    assert hist, f"run {run_id} logged no val_loss"
    return min(m.value for m in hist)


def load_trials(storage, name: str):
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=True)


def states(trials) -> list[str]:
    return [t.state.name for t in trials]


def finished(trials) -> list:
    return [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]


def assert_none_running(uri: str):
    running = [(r.info.run_name, r.info.run_id) for r in all_runs(uri) if r.info.status == "RUNNING"]
    assert not running, f"MLflow runs left RUNNING: {running}"


def wait_for_running_repeat(uri: str, exp_name: str, proc: subprocess.Popen, cwd: Path, tag: str,
                            timeout: float = 180):
    """The first repeat (grandchild) run of the study that is RUNNING: a trial is mid-training."""
    cl = mlflow_client(uri)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"sweep exited {proc.returncode} before a repeat ran:\n{(cwd / f'{tag}.err').read_text()[-4000:]}")
        exp = cl.get_experiment_by_name(exp_name)
        if exp is not None:
            runs = cl.search_runs([exp.experiment_id], "tags.repeat = '0' and attributes.status = 'RUNNING'")
            if runs:
                return runs[0]
        time.sleep(0.1)
    proc.kill()
    pytest.fail(f"no repeat run became RUNNING within {timeout} s")


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def template_db(tmp_path_factory, dev):
    """An empty, migrated MLflow SQLite database (needs the OpenCL `dev`: skip/fail as the others)."""
    d = tmp_path_factory.mktemp("mlflow-template")
    uri = f"sqlite:///{d}/mlflow.db"
    mlflow_client(uri).search_experiments(max_results=1)
    return d / "mlflow.db"


def new_store(template: Path, directory: Path) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, directory / "mlflow.db")
    return f"sqlite:///{directory}/mlflow.db"


@pytest.fixture(scope="module")
def errors_dir(template_db, tmp_path_factory):
    d = tmp_path_factory.mktemp("errors")
    return d, new_store(template_db, d)


@pytest.fixture(scope="module")
def searched_set(errors_dir):
    """`--set optim.lr=...` on lr_balance, which searches optim.lr."""
    d, uri = errors_dir
    p = sweep("lr_balance", "--set", "optim.lr=0.1", "--tracking-uri", uri, "--storage", f"sqlite:///{d}/set.db",
              "--experiment-name", "set-searched", *tiny(), cwd=d, timeout=120)
    return p, uri


@pytest.fixture(scope="module")
def unreachable_storage(template_db, tmp_path_factory):
    d = tmp_path_factory.mktemp("unreachable-storage")
    uri = new_store(template_db, d)
    t = time.monotonic()
    p = sweep("lr_balance", "--storage", UNREACHABLE_PG, "--tracking-uri", uri, *tiny(), cwd=d, timeout=120)
    return SimpleNamespace(p=p, seconds=time.monotonic() - t, uri=uri, dir=d)


def _snapshot(d: Path, uri: str, storage: str, study: str, parent: str) -> SimpleNamespace:
    """Everything a test reads about a finished sweep, frozen now (later sweeps resume it)."""
    cl = mlflow_client(uri)
    art = d / f"artifacts-{time.monotonic_ns()}"
    art.mkdir()
    files = {a.path for a in cl.list_artifacts(parent)}
    figures = {a.path: a.file_size for a in cl.list_artifacts(parent, "figures")}
    csv_path = Path(cl.download_artifacts(parent, "trials.csv", str(art)))
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    best = None
    if "best_params.json" in files:
        with open(cl.download_artifacts(parent, "best_params.json", str(art))) as f:
            best = json.load(f)
    return SimpleNamespace(dir=d, uri=uri, storage=storage, study=study, parent=parent,
                           trials=load_trials(storage, study), runs=all_runs(uri), files=files,
                           figures=figures, csv_rows=rows, csv_path=csv_path, best=best, parent_run=cl.get_run(parent))


STUDY3_ARGS = ("lr_balance", "--trials", 3, "--repeats", 2, "--sampler-seed", 1)


@pytest.fixture(scope="module")
def study3(template_db, tmp_path_factory):
    """One worker, SQLite storage: 3 trials of 2 repeats, sampler seed 1."""
    d = tmp_path_factory.mktemp("study3")
    uri = new_store(template_db, d)
    storage = f"sqlite:///{d}/optuna.db"
    args = (*STUDY3_ARGS, "--storage", storage, "--tracking-uri", uri, *tiny())
    p = sweep(*args, cwd=d)
    parent = ok(p)
    return SimpleNamespace(args=args, snap=_snapshot(d, uri, storage, "lr_balance", parent), stderr=p.stderr)


@pytest.fixture(scope="module")
def resumed(study3):
    """study3's command again with --trials 5 (adds 2 trials), then once more (adds none)."""
    s = study3.snap
    args = list(study3.args)
    args[args.index("--trials") + 1] = 5
    first = ok(sweep(*args, cwd=s.dir))
    snap5 = _snapshot(s.dir, s.uri, s.storage, s.study, first)
    second = ok(sweep(*args, cwd=s.dir))
    snap5b = _snapshot(s.dir, s.uri, s.storage, s.study, second)
    return SimpleNamespace(before=s, after=snap5, again=snap5b)


# -- a. the command line -----------------------------------------------------------------------------
def test_list_shows_lr_balance_keys_and_ranges(errors_dir):
    d, _ = errors_dir
    p = sweep("--list", cwd=d, timeout=120)
    assert p.returncode == 0, p.stderr
    out = p.stdout.splitlines()
    assert any(ln.startswith("lr_balance ") for ln in out), p.stdout
    start = next(i for i, ln in enumerate(out) if ln.startswith("lr_balance "))
    shown = {}
    for ln in out[start + 1:]:
        m = re.match(r"^\s+(\S+)\s+log-uniform \[([^,\]]+), ([^\]]+)\]", ln)
        if not m:
            break
        shown[m.group(1)] = (float(m.group(2)), float(m.group(3)))
    assert shown == RANGES
    assert not list(d.glob("optuna*")), "--list must not touch a storage"


def test_unknown_space_exits_2_with_suggestion(errors_dir):
    d, uri = errors_dir
    p = sweep("lr_balanse", "--tracking-uri", uri, "--storage", f"sqlite:///{d}/unknown.db", cwd=d, timeout=120)
    assert p.returncode == 2, p.stderr
    err = lines_of(p.stderr)
    assert len(err) == 1 and err[0].startswith("error: "), p.stderr
    assert "'lr_balanse'" in err[0] and "did you mean 'lr_balance'" in err[0]


def test_set_of_a_searched_key_exits_2(searched_set):
    p, uri = searched_set
    assert p.returncode == 2, p.stderr
    err = lines_of(p.stderr)
    assert len(err) == 1 and err[0].startswith("error: ") and "optim.lr" in err[0], p.stderr
    assert "searches" in err[0]
    cl = mlflow_client(uri)
    exp = cl.get_experiment_by_name("set-searched")
    assert exp is None or all(r.data.tags.get("trial_number") is None for r in cl.search_runs([exp.experiment_id])), \
        "no trial may run with a rejected --set"


def test_set_of_a_searched_key_leaves_no_mlflow_run(searched_set):
    p, uri = searched_set
    assert p.returncode == 2, p.stderr
    cl = mlflow_client(uri)
    exp = cl.get_experiment_by_name("set-searched")
    runs = cl.search_runs([exp.experiment_id]) if exp else []
    assert [(r.info.run_name, r.info.status) for r in runs] == []


def test_unreachable_storage_exits_2_fast_without_mlflow_run(unreachable_storage):
    u = unreachable_storage
    assert u.p.returncode == 2, u.p.stderr
    assert u.seconds < 45, f"took {u.seconds:.1f} s"
    err = [ln for ln in lines_of(u.p.stderr) if ln.startswith("error: ")]
    assert len(err) == 1, u.p.stderr
    assert "127.0.0.1:9" in err[0] and "storage" in err[0]
    assert "Traceback" not in u.p.stderr
    assert u.p.stdout.strip() == ""
    assert all_runs(u.uri) == [], "no MLflow run may be created when the storage is unusable"
    assert mlflow_client(u.uri).get_experiment_by_name("sweep-lr_balance") is None


def test_unreachable_storage_error_is_one_line(unreachable_storage):
    assert len(lines_of(unreachable_storage.p.stderr)) == 1, unreachable_storage.p.stderr


def test_unreachable_tracking_exits_2(errors_dir):
    d, _ = errors_dir
    t = time.monotonic()
    p = sweep("lr_balance", "--tracking-uri", "http://127.0.0.1:9", "--storage", f"sqlite:///{d}/tracking.db",
              *tiny(), cwd=d, timeout=120)
    assert p.returncode == 2, p.stderr
    assert time.monotonic() - t < 45
    err = lines_of(p.stderr)
    assert len(err) == 1 and err[0].startswith("error: ") and "http://127.0.0.1:9" in err[0], p.stderr
    assert not (d / "tracking.db").exists(), "the tracking store is checked before the Optuna storage is created"


# -- b. one worker, SQLite ---------------------------------------------------------------------------
def test_study_trials_and_defaults_first(study3):
    s = study3.snap
    assert states(s.trials) == ["COMPLETE"] * 3
    assert [t.number for t in s.trials] == [0, 1, 2]
    assert s.trials[0].params == HYBRID_DEFAULTS
    from experiments import presets
    flat = presets.get("hybrid").config().flat()
    assert {k: flat[k] for k in SEARCHED} == HYBRID_DEFAULTS
    for t in s.trials[1:]:
        assert set(t.params) == set(SEARCHED)
        assert t.params != HYBRID_DEFAULTS
        for k, v in t.params.items():
            assert RANGES[k][0] <= v <= RANGES[k][1], (k, v)
    assert s.trials[1].params != s.trials[2].params
    for t in s.trials:
        assert math.isfinite(t.value) and 0 < t.value < 10


def test_trial_child_runs_and_repeat_runs(study3):
    s = study3.snap
    cl = mlflow_client(s.uri)
    by_id = {r.info.run_id: r for r in s.runs}
    for t in s.trials:
        rid = t.user_attrs["mlflow_run_id"]
        child = by_id[rid]
        assert child.data.tags["mlflow.parentRunId"] == s.parent
        assert child.data.tags["trial_number"] == str(t.number)
        assert child.data.tags["trial_state"] == "COMPLETE"
        assert child.info.status == "FINISHED"
        assert child.data.metrics["objective"] == pytest.approx(t.value, rel=0, abs=1e-12)
        for k, v in t.params.items():
            assert child.data.params[k] == repr(v)
        kids = [r for r in s.runs if r.data.tags.get("mlflow.parentRunId") == rid]
        assert sorted(r.data.tags["repeat"] for r in kids) == ["0", "1"]
        bests = []
        for r in sorted(kids, key=lambda r: r.data.tags["repeat"]):
            rep = int(r.data.tags["repeat"])
            assert r.info.status == "FINISHED"
            assert r.data.tags["trial_number"] == str(t.number)
            assert r.data.params["seed"] == str(rep), "repeat r trains with seed base + r"
            for k, v in t.params.items():  # the suggestion reached the training config
                assert float(r.data.params[k]) == pytest.approx(v, rel=1e-12)
            assert r.data.params["train.steps"] == "20" and r.data.params["model.hidden_dim"] == "32"
            bests.append(best_val_loss(cl, r.info.run_id))
        assert statistics.fmean(bests) == pytest.approx(t.value, rel=1e-12)
        assert bests[0] != bests[1], "the two repeats must train different seeds"
    assert len(s.runs) == 1 + 3 + 6


def test_parent_run_tags_and_report_artifacts(study3):
    import optuna
    s = study3.snap
    parent = s.parent_run
    tags = parent.data.tags
    assert parent.info.status == "FINISHED"
    assert tags["sweep_study"] == "lr_balance"
    assert tags["optuna_storage"] == s.storage
    assert tags["optuna_sampler"].startswith("TPESampler(")
    assert tags["optuna_sampler_seed"] == "1"
    assert tags["optuna_pruner"].startswith("MedianPruner(")
    assert tags["optuna_version"] == optuna.__version__
    assert "mlflow.parentRunId" not in tags
    best = min(s.trials, key=lambda t: t.value)
    assert parent.data.metrics["best_value"] == pytest.approx(best.value, abs=1e-12)
    # trials.csv: one row per trial with its state, value and parameters
    assert len(s.csv_rows) == 3
    for row, t in zip(sorted(s.csv_rows, key=lambda r: int(r["number"])), s.trials):
        assert int(row["number"]) == t.number and row["state"] == "COMPLETE"
        assert float(row["value"]) == pytest.approx(t.value, rel=1e-12)
        assert float(row["params_optim.lr"]) == pytest.approx(t.params["optim.lr"], rel=1e-12)
        assert row["user_attrs_mlflow_run_id"] == t.user_attrs["mlflow_run_id"]
    import pandas as pd  # the same table through pandas, as a user would read it
    df = pd.read_csv(s.csv_path)
    assert len(df) == 3 and set(df["state"]) == {"COMPLETE"}
    assert s.best == {"trial": best.number, "value": pytest.approx(best.value, abs=1e-12), "params": best.params,
                      "mlflow_run_id": best.user_attrs["mlflow_run_id"]}
    expected = {"optimization_history", "param_importances", "parallel_coordinate",
                "contour_hebb.lr__optim.lr", "contour_hebb.lr__proto.lr", "contour_optim.lr__proto.lr"}
    assert {Path(p).stem for p in s.figures} == expected
    assert all(p.endswith(".png") and size > 1000 for p, size in s.figures.items()), s.figures


def test_sweep_ends_with_a_summary_line(study3):
    """Last stderr line: best trial against the defaults (trial 0), the counts, where the report is."""
    s = study3.snap
    err = lines_of(study3.stderr)
    assert [ln.split(" (")[0] for ln in err if ln.startswith("trial ")] == \
           [f"trial {n} COMPLETE value {t.value:.4f}" for n, t in enumerate(s.trials)], study3.stderr
    last = err[-1]
    best = min(s.trials, key=lambda t: t.value)
    params = ", ".join(f"{k}={v:.4g}" for k, v in best.params.items())
    assert last.startswith(f"sweep: best trial {best.number}: {best.value:.4f} ({params}); "), last
    base = s.trials[0]
    if best.number == 0:
        assert "; no improvement on the defaults (trial 0); " in last, last
    else:
        gain = base.value - best.value
        assert f"; {gain:.4f} better than the defaults (trial 0: {base.value:.4f}, " \
               f"{100 * gain / base.value:.1f} %); " in last, last
    assert "; 3 finished (3 complete, 0 pruned), 0 failed; " in last, last
    exp_id = s.parent_run.info.experiment_id
    assert last.endswith(f"; report: parent run {s.parent}, mlflow ui --backend-store-uri {s.uri}, "
                         f"then http://127.0.0.1:5000/#/experiments/{exp_id}/runs/{s.parent}"), last


def test_no_run_left_running(study3):
    s = study3.snap
    assert [r.info.run_name for r in s.runs if r.info.status == "RUNNING"] == []
    assert {r.info.experiment_id for r in s.runs} == {s.parent_run.info.experiment_id}
    exp = mlflow_client(s.uri).get_experiment(s.parent_run.info.experiment_id)
    assert exp.name == "sweep-lr_balance"


# -- c. resume ---------------------------------------------------------------------------------------
def test_resume_adds_missing_trials_under_the_same_parent(resumed):
    before, after, again = resumed.before, resumed.after, resumed.again
    assert after.parent == before.parent and again.parent == before.parent
    assert [t.number for t in after.trials] == [0, 1, 2, 3, 4]
    assert len(finished(after.trials)) == 5
    for old, new in zip(before.trials, after.trials[:3]):  # the first session's trials are untouched
        assert (new.state, new.value, new.params, new.datetime_complete) == \
               (old.state, old.value, old.params, old.datetime_complete)
    # the third run adds nothing, changes nothing
    assert [(t.number, t.state, t.value, t.datetime_complete) for t in again.trials] == \
           [(t.number, t.state, t.value, t.datetime_complete) for t in after.trials]
    cl = mlflow_client(before.uri)
    kids = children(cl, again.parent_run)
    assert sorted(int(r.data.tags["trial_number"]) for r in kids) == [0, 1, 2, 3, 4]
    assert {t.user_attrs["mlflow_run_id"] for t in again.trials} == {r.info.run_id for r in kids}
    assert len([r for r in again.runs if r.data.tags.get("mlflow.runName", "").startswith("study-")]) == 1
    assert again.parent_run.info.status == "FINISHED"
    assert len(again.csv_rows) == 5, "the report is refreshed on resume"
    assert_none_running(before.uri)


def test_resume_suggests_new_points(resumed):
    old = [t.params for t in resumed.before.trials]
    new = [t.params for t in resumed.after.trials[3:]]
    assert all(p not in old for p in new), f"resumed trials re-evaluate earlier points: {new}"


# -- d. reproducibility ------------------------------------------------------------------------------
def test_same_seed_same_params(study3, template_db, tmp_path_factory):
    d = tmp_path_factory.mktemp("study3-again")
    uri = new_store(template_db, d)
    storage = f"sqlite:///{d}/optuna.db"
    ok(sweep(*STUDY3_ARGS, "--storage", storage, "--tracking-uri", uri, *tiny(), cwd=d))
    trials = load_trials(storage, "lr_balance")
    first = [t.params for t in study3.snap.trials]
    assert [t.params for t in trials] == first
    assert len({json.dumps(p, sort_keys=True) for p in first}) == 3  # not trivially equal


# -- e. pruning --------------------------------------------------------------------------------------
def test_median_pruner_prunes_a_bad_trial(template_db, tmp_path_factory):
    d = tmp_path_factory.mktemp("pruning")
    uri = new_store(template_db, d)
    storage = f"sqlite:///{d}/optuna.db"
    parent = ok(sweep("lr_balance", "--trials", 4, "--repeats", 1, "--sampler-seed", 0, "--pruner", "median",
                      "--storage", storage, "--tracking-uri", uri, *tiny(steps=40, eval_every=10), cwd=d))
    trials = load_trials(storage, "lr_balance")
    assert states(trials) == ["COMPLETE", "COMPLETE", "COMPLETE", "PRUNED"]
    pruned = trials[3]
    # pruned at the first check (step 10 = n_warmup_steps), clearly above the median there
    assert sorted(pruned.intermediate_values) == [10]
    median = statistics.median(t.intermediate_values[10] for t in trials[:3])
    assert pruned.intermediate_values[10] > median + 0.5
    assert all(sorted(t.intermediate_values) == [10, 20, 30, 40] for t in trials[:3])
    cl = mlflow_client(uri)
    runs = all_runs(uri)
    by_id = {r.info.run_id: r for r in runs}
    for t in trials:
        child = by_id[t.user_attrs["mlflow_run_id"]]
        assert child.data.tags["mlflow.parentRunId"] == parent
        kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == child.info.run_id]
        assert [r.data.tags["repeat"] for r in kids] == ["0"]
        if t.state.name == "PRUNED":
            assert child.data.tags["trial_state"] == "PRUNED"
            assert child.info.status == "KILLED"
            assert "objective" not in child.data.metrics
            rep = kids[0]
            assert rep.data.tags.get("pruned") == "true"
            assert rep.info.status == "KILLED"
            assert [m.step for m in cl.get_metric_history(rep.info.run_id, "val_loss")] == [10]
        else:
            assert child.data.tags["trial_state"] == "COMPLETE" and child.info.status == "FINISHED"
            assert "pruned" not in kids[0].data.tags and kids[0].info.status == "FINISHED"
    assert_none_running(uri)


# -- f. a failing trial --------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:Fixed parameter")
def test_non_finite_trial_fails_and_the_study_goes_on(template_db, tmp_path, monkeypatch, caplog):
    import logging

    import optuna

    from sweeps import spaces
    from sweeps.run import optimize
    from sweeps.study import Objective, make_sampler, parent_run
    monkeypatch.chdir(tmp_path)
    uri = new_store(template_db, tmp_path)
    space = spaces.get("lr_balance")
    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/optuna.db", study_name="diverge",
                                sampler=make_sampler(0), pruner=optuna.pruners.NopPruner(), direction="minimize")
    # out of the searched range on purpose: Adam at lr 1e6 overflows within the first log interval
    study.enqueue_trial({**space.defaults(), "optim.lr": 1e6})
    cl = mlflow_client(uri)
    parent = parent_run(cl, "diverge", study, {"sweep_study": "diverge"})
    fixed = tiny(steps=20, eval_every=10)[1::2]
    objective = Objective(space, fixed, 1, uri, "diverge", parent, str(tmp_path / "runs"))
    optuna.logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING, logger="optuna"):
            optimize(study, objective, 2)
    finally:
        optuna.logging.disable_propagation()
    trials = study.get_trials()
    assert states(trials) == ["FAIL", "COMPLETE", "COMPLETE"], "the study goes on after a failed trial"
    bad = trials[0]
    assert bad.params["optim.lr"] == 1e6 and bad.value is None
    # Optuna records only the state: the reason is the trial's user attr `error`, one line
    assert bad.user_attrs["error"].startswith("TrainingError: ") and "non-finite" in bad.user_attrs["error"]
    assert "\n" not in bad.user_attrs["error"]
    assert all("error" not in t.user_attrs for t in trials[1:])
    reasons = [r.getMessage() for r in caplog.records if "Trial 0 failed" in r.getMessage()]
    assert reasons and "non-finite" in reasons[0], [r.getMessage() for r in caplog.records]
    child = cl.get_run(bad.user_attrs["mlflow_run_id"])
    assert child.info.status == "FAILED"
    assert child.data.tags["trial_state"] == "FAIL"
    assert child.data.tags["mlflow.parentRunId"] == parent
    assert "non-finite" in child.data.tags["error"]
    assert "objective" not in child.data.metrics
    kids = children(cl, child)
    assert len(kids) == 1 and kids[0].info.status == "FAILED" and "non-finite" in kids[0].data.tags["error"]
    for t in trials[1:]:
        run = cl.get_run(t.user_attrs["mlflow_run_id"])
        assert run.info.status == "FINISHED" and run.data.metrics["objective"] == pytest.approx(t.value, abs=1e-12)
    cl.set_terminated(parent, "FINISHED")
    assert_none_running(uri)


# -- Ctrl+C ------------------------------------------------------------------------------------------
def test_sigint_stops_the_sweep(template_db, tmp_path):
    uri = new_store(template_db, tmp_path)
    storage = f"sqlite:///{tmp_path}/optuna.db"
    proc = popen_sweep("lr_balance", "--trials", 1, "--repeats", 1, "--pruner", "none", "--storage", storage,
                       "--tracking-uri", uri, *tiny(steps=150, eval_every=50), cwd=tmp_path, tag="int")
    try:
        wait_for_running_repeat(uri, "sweep-lr_balance", proc, tmp_path, "int")
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    trials = load_trials(storage, "lr_balance")
    runs = all_runs(uri)
    parent = next(r for r in runs if r.info.run_name.startswith("study-"))
    assert (rc, parent.info.status) == (130, "KILLED"), (tmp_path / "int.err").read_text()[-3000:]
    # the stopped trial is FAIL with its reason, and queued again so that resuming evaluates it
    assert states(trials) == ["FAIL", "WAITING"]
    assert trials[0].user_attrs["error"].startswith("interrupted")
    assert trials[1].user_attrs["retry_of"] == 0 and trials[1].params == trials[0].params == HYBRID_DEFAULTS
    assert_none_running(uri)


# -- g. two workers, journal storage ----------------------------------------------------------------------
def test_two_workers_share_a_journal_study(template_db, tmp_path):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    new_store(template_db, tmp_path)
    parent = ok(sweep("lr_balance", "--workers", 2, "--trials", 4, "--repeats", 1, "--sampler-seed", 7,
                      "--tracking-uri", "sqlite:///mlflow.db", *tiny(), cwd=tmp_path))
    journal = tmp_path / "optuna-journal.log"
    assert journal.exists() and not (tmp_path / "optuna.db").exists()
    trials = load_trials(JournalStorage(JournalFileBackend(str(journal))), "lr_balance")
    # A worker checks the count only when its own trial ends: the other one may be mid-trial when the
    # 4th finishes and then adds a 5th. So 4 <= finished <= 4 + (workers - 1).
    assert 4 <= len(finished(trials)) <= 5, states(trials)
    assert len(finished(trials)) == len(trials), f"no failed or unfinished trial: {states(trials)}"
    assert [t.params for t in trials].count(HYBRID_DEFAULTS) == 1, "the defaults are enqueued once"
    assert len({json.dumps(t.params, sort_keys=True) for t in trials}) == len(trials), \
        "workers must not suggest the same points"
    spans = sorted((t.datetime_start, t.datetime_complete) for t in trials)
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:])), "two trials ran at the same time"
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cl = mlflow_client(uri)
    parent_run = cl.get_run(parent)
    assert parent_run.info.status == "FINISHED" and parent_run.data.tags["workers"] == "2"
    kids = children(cl, parent_run)
    assert {r.info.run_id for r in kids} == {t.user_attrs["mlflow_run_id"] for t in trials}
    for t in trials:
        run = cl.get_run(t.user_attrs["mlflow_run_id"])
        assert run.data.tags["trial_number"] == str(t.number)
        assert run.data.tags["trial_state"] == t.state.name
    assert_none_running(uri)


# -- h. PostgreSQL, a worker SIGKILLed mid-trial ------------------------------------------------------------
def test_postgres_killed_worker_trial_is_retried_and_its_runs_failed(template_db, tmp_path):
    import optuna

    from sweeps.study import GRACE_S
    with PostgresServer() as pg_url:
        uri = new_store(template_db, tmp_path)
        # slow enough trials (150 steps) that worker A is caught inside a repeat; --pruner none:
        # every trial of B completes
        cmd = ("lr_balance", "--storage", pg_url, "--trials", 4, "--repeats", 1, "--study-name", "kill",
               "--sampler-seed", 3, "--pruner", "none", "--tracking-uri", uri, *tiny(steps=150, eval_every=50))
        a = popen_sweep(*cmd, cwd=tmp_path, tag="A")
        try:
            rep = wait_for_running_repeat(uri, "sweep-kill", a, tmp_path, "A")
            os.kill(a.pid, signal.SIGKILL)
            killed_at = time.monotonic()
            assert a.wait(timeout=30) == -signal.SIGKILL
        finally:
            if a.poll() is None:
                a.kill()
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage = optuna.storages.RDBStorage(pg_url)  # read-only use: no heartbeat of its own
        trials = optuna.load_study(study_name="kill", storage=storage).get_trials()
        assert states(trials) == ["RUNNING"], "worker A died inside trial 0"
        killed = trials[0]
        assert killed.params == HYBRID_DEFAULTS
        child_id = killed.user_attrs["mlflow_run_id"]
        assert rep.data.tags["mlflow.parentRunId"] == child_id
        cl = mlflow_client(uri)
        assert cl.get_run(child_id).info.status == "RUNNING" and cl.get_run(rep.info.run_id).info.status == "RUNNING"
        parent = optuna.load_study(study_name="kill", storage=storage).user_attrs["mlflow_parent_run_id"]
        # the trial's last heartbeat is at or before the kill: stale once GRACE_S have passed since
        time.sleep(max(0.0, killed_at + GRACE_S + 2 - time.monotonic()))
        b = sweep(*cmd, cwd=tmp_path, timeout=300)
        assert ok(b) == parent, "worker B reuses the study's parent run"
        trials = optuna.load_study(study_name="kill", storage=storage).get_trials()
    st = states(trials)
    assert st.count("COMPLETE") == 4 and st.count("FAIL") == 1 and len(trials) == 5, st
    assert trials[0].state.name == "FAIL"
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == 0]
    assert len(retries) == 1, [t.system_attrs for t in trials]
    retry = retries[0]
    retry_cb = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or \
        optuna.storages.RetryFailedTrialCallback
    assert retry_cb.retried_trial_number(retry) == 0
    assert retry.state.name == "COMPLETE" and retry.params == killed.params
    assert retry.user_attrs["mlflow_run_id"] != child_id
    runs = {r.info.run_id: r for r in all_runs(uri)}
    for rid in (child_id, rep.info.run_id):
        r = runs[rid]
        assert r.info.status == "FAILED", (r.info.run_name, r.info.status)
        assert "worker died" in r.data.tags.get("error", "") and "heartbeat" in r.data.tags["error"]
    assert runs[child_id].data.tags["trial_state"] == "FAIL"
    for t in trials[1:]:
        r = runs[t.user_attrs["mlflow_run_id"]]
        assert r.data.tags["mlflow.parentRunId"] == parent and r.data.tags["trial_number"] == str(t.number)
        assert r.info.status == "FINISHED" and r.data.metrics["objective"] == pytest.approx(t.value, abs=1e-12)
    assert runs[parent].info.status == "FINISHED"
    assert runs[parent].data.tags["optuna_storage"].startswith("postgresql+psycopg2://postgres")
    assert [r.info.run_name for r in runs.values() if r.info.status == "RUNNING"] == []


# -- i. the transformer family: transformer_balance, its runs reproduced and compared ---------------------
TRANSFORMER_DEFAULTS = {"optim.lr": 1e-3, "hebb.lr": 1.0, "proto.lr": 0.05}   # transformer_hebb_proto's
TINY_TRANSFORMER = {"transformer.n_layer": 1, "transformer.n_embd": 16, "transformer.block_size": 16,
                    "train.seq_len": 16, "train.batch_size": 4, "model.num_prototypes": 8, "train.steps": 5,
                    "train.eval_every": 5, "train.log_every": 5, "train.eval_batches": 1}


@pytest.fixture(scope="module")
def transformer_study(template_db, tmp_path_factory):
    """2 trials of transformer_balance (1 repeat, sampler seed 2) at tiny sizes, then
    `experiments.reproduce` of trial 1's run: (snapshot, repeat run per trial, reproduce process)."""
    d = tmp_path_factory.mktemp("transformer")
    uri = new_store(template_db, d)
    storage = f"sqlite:///{d}/optuna.db"
    sets = [a for k, v in TINY_TRANSFORMER.items() for a in ("--set", f"{k}={v}")]
    parent = ok(sweep("transformer_balance", "--trials", 2, "--repeats", 1, "--sampler-seed", 2, "--storage", storage,
                      "--tracking-uri", uri, *sets, cwd=d))
    snap = _snapshot(d, uri, storage, "transformer_balance", parent)
    repeats = {t.number: next(r for r in snap.runs if r.data.tags.get("mlflow.parentRunId") == t.user_attrs[
        "mlflow_run_id"]) for t in snap.trials}
    rep = sweep(repeats[1].info.run_id, "--tracking-uri", uri, cwd=d, module="experiments.reproduce")
    return SimpleNamespace(snap=snap, repeats=repeats, reproduce=rep)


def test_transformer_balance_searches_the_three_rates_of_its_base():
    from sweeps import spaces
    space = spaces.get("transformer_balance")
    assert space.base == "transformer_hebb_proto" and space.defaults() == TRANSFORMER_DEFAULTS
    assert {p.key: (p.low, p.high) for p in space.params} == RANGES


def test_transformer_trials_differ_in_the_rates_and_log_attention(transformer_study):
    s = transformer_study.snap
    assert states(s.trials) == ["COMPLETE"] * 2
    assert s.trials[0].params == TRANSFORMER_DEFAULTS
    assert s.trials[1].params["hebb.lr"] != s.trials[0].params["hebb.lr"]
    cl = mlflow_client(s.uri)
    values = []
    for t in s.trials:
        run = transformer_study.repeats[t.number]
        assert run.info.status == "FINISHED" and run.data.params["experiment"] == "transformer_hebb_proto"
        assert run.data.params["model.family"] == "transformer" and run.data.params["transformer.hybrid"] == "hebb+proto"
        assert float(run.data.params["hebb.lr"]) == pytest.approx(t.params["hebb.lr"], rel=1e-12)
        assert float(run.data.params["proto.lr"]) == pytest.approx(t.params["proto.lr"], rel=1e-12)
        # the block's telemetry at the log step: attention entropy (≤ the uniform causal row's
        # mean, (1/S)·Σ ln t), the block's gradient norm, its memory and prototypes
        uniform = sum(math.log(k) for k in range(1, 17)) / 16
        for key in ("attn_entropy/h0", "grad_norm.h0", "h0/hebb/hebb_norm", "h0/proto/proto_perplexity"):
            assert [m.step for m in cl.get_metric_history(run.info.run_id, key)] == [5], key
        assert 0 < run.data.metrics["attn_entropy/h0"] <= uniform + 1e-6
        assert run.data.metrics["grad_norm.h0"] > 0
        assert t.value == pytest.approx(best_val_loss(cl, run.info.run_id), rel=1e-12)
        values.append(t.value)
    assert values[0] != values[1], "the rates must change the result"


def test_transformer_trial_reproduces_bit_for_bit(transformer_study):
    p = transformer_study.reproduce
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "bit-identical (same device)" in p.stdout, p.stdout
    rows = {ln.split()[0]: ln.split() for ln in p.stdout.splitlines() if ln.strip()}
    assert rows["attn_entropy/h0"][-1] == "True" and rows["grad_norm.h0"][-1] == "True", p.stdout
    new_id = re.search(r"new run ([0-9a-f]{32})", p.stdout).group(1)
    orig = transformer_study.repeats[1].info.run_id
    cl = mlflow_client(transformer_study.snap.uri)
    assert cl.get_run(new_id).data.tags["reproduces"] == orig
    for key in ("val_loss", "train_loss", "attn_entropy/h0"):
        a = [(m.step, m.value) for m in cl.get_metric_history(orig, key)]
        assert a and a == [(m.step, m.value) for m in cl.get_metric_history(new_id, key)], key


def test_compare_shows_attention_entropy_per_block(transformer_study, capsys):
    from experiments import compare
    s = transformer_study.snap
    ids = [r.info.run_id for r in transformer_study.repeats.values()]
    assert compare.main(["--tracking-uri", s.uri, "--runs", *ids]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0].split()
    assert header[-1] == "attn_entropy/h0" and "hebb.lr" in header, header
    cl = mlflow_client(s.uri)
    for rid in ids:
        row = next(ln.split() for ln in out.splitlines() if ln.startswith(rid))
        assert row[-1] == f"{cl.get_run(rid).data.metrics['attn_entropy/h0']:.4f}"


# -- j. the memory network: memnet_balance, scored on a maximised metric --------------------------------
TINY_MEMNET = {"memnet.embedding_dim": 8, "memnet.memory_dim": 8, "memnet.hidden_dim": 8, "train.seq_len": 16,
               "train.batch_size": 4, "train.steps": 6, "train.eval_every": 3, "train.log_every": 3,
               "train.eval_batches": 1, "train.patience": 0}


def test_memnet_balance_maximises_accuracy(template_db, tmp_path):
    import optuna
    """2 trials of memnet_balance scored on val_acc (--objective): the study maximises, each
    trial's value is its run's best (largest) val_acc, the trials differ in the write strength,
    and a study scored on one metric refuses another."""
    from sweeps import spaces
    space = spaces.get("memnet_balance")
    assert space.base == "memnet" and space.defaults() == {"optim.lr": 0.01, "memnet.write_strength": 0.1,
                                                             "memnet.memory_size": 512}
    uri = new_store(template_db, tmp_path)
    storage = f"sqlite:///{tmp_path}/optuna.db"
    sets = [a for k, v in TINY_MEMNET.items() for a in ("--set", f"{k}={v}")]
    ok(sweep("memnet_balance", "--trials", 2, "--repeats", 1, "--sampler-seed", 4, "--storage", storage,
             "--tracking-uri", uri, "--objective", "val_acc", *sets, cwd=tmp_path))
    study = optuna.load_study(study_name="memnet_balance", storage=storage)
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE
    assert study.user_attrs["objective_metric"] == "val_acc"
    trials = sorted(study.get_trials(), key=lambda t: t.number)
    assert states(trials) == ["COMPLETE"] * 2
    assert trials[0].params["memnet.write_strength"] != trials[1].params["memnet.write_strength"]
    cl = mlflow_client(uri)
    for t in trials:
        child = t.user_attrs["mlflow_run_id"]
        run = next(r for r in cl.search_runs([cl.get_experiment_by_name("sweep-memnet_balance").experiment_id])
                   if r.data.tags.get("mlflow.parentRunId") == child)
        accs = [m.value for m in cl.get_metric_history(run.info.run_id, "val_acc")]
        assert len(accs) == 2 and t.value == pytest.approx(max(accs), rel=1e-12)

def test_sweep_objective_errors(tmp_path, capsys):
    """An unknown --objective, and a study resumed with another objective than its own: one line, exit 2."""
    import optuna
    from sweeps import run as sweep_run
    assert sweep_run.main(["memnet_balance", "--objective", "val_accuracy", "--trials", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown objective 'val_accuracy'" in err[0] and "did you mean 'val_acc'" in err[0]
    storage = f"sqlite:///{tmp_path}/optuna.db"
    study = optuna.create_study(storage=storage, study_name="memnet_balance", direction="maximize")
    study.set_user_attr("objective_metric", "val_acc")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert sweep_run.main(["memnet_balance", "--trials", "1", "--storage", storage, "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("scores trials on 'val_acc', not 'val_loss': use --objective val_acc or another "
                            "--study-name"), err
