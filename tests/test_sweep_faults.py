"""sweeps/ when things go wrong: refused commands, dead workers, Ctrl+C, store races, reports.

    python -m pytest tests/test_sweep_faults.py -q        # ~3 min on a busy 2-core machine

Refusals and reports call `main()` in-process (no store may be created by a refused
command); the trial-level faults drive `sweeps.study.Objective` in-process; kills and
signals run `python -m sweeps.run` as a subprocess in its own session (so that a
signal can go to its process group, as a terminal sends Ctrl+C), wait by polling the
stores (never a fixed sleep) until a trial is mid-training, then SIGKILL a worker or
SIGINT/SIGTERM the sweep. Tiny models (tests/test_sweeps.py's `tiny`); the killed
trials train 400 steps, evaluated every 20, so that they are caught inside a repeat.
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_sweeps import (HYBRID_DEFAULTS, _env, all_runs, assert_none_running, children, lines_of,  # noqa: F401
                         load_trials, mlflow_client, new_store, ok, states, sweep, template_db, tiny)

LONG = dict(steps=400, eval_every=20)  # a trial lasts a few seconds: long enough to be caught inside
# the stop tests signal once a repeat's metrics are in the store, which lags the training on a
# loaded machine (the store writes run at the lowest priority): a trial of ~10 s is still mid-way
STOP_LONG = dict(steps=3000, eval_every=20)


# -- helpers -------------------------------------------------------------------------------------
def popen_session(*args, cwd: Path, tag: str) -> subprocess.Popen:
    """A sweep in its own session and process group (its workers join that group)."""
    with open(cwd / f"{tag}.out", "w") as fo, open(cwd / f"{tag}.err", "w") as fe:
        return subprocess.Popen([sys.executable, "-m", "sweeps.run", *map(str, args)], cwd=cwd, env=_env(),
                                stdout=fo, stderr=fe, text=True, start_new_session=True)


def journal(path: Path):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    return JournalStorage(JournalFileBackend(str(path)))


def wait_for(what: str, probe, proc: subprocess.Popen, cwd: Path, tag: str, timeout: float = 240):
    """Poll `probe()` until it returns something true; fail if the sweep exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"sweep exited {proc.returncode} before {what}:\n{(cwd / f'{tag}.err').read_text()[-4000:]}")
        try:
            found = probe()
        except Exception:  # a store being created or written at this instant
            found = None
        if found:
            return found
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"not within {timeout} s: {what}")


def training_repeats(uri: str, exp_name: str) -> list:
    """RUNNING repeat runs that have logged metrics: their trial is mid-training."""
    cl = mlflow_client(uri)
    exp = cl.get_experiment_by_name(exp_name)
    if exp is None:
        return []
    runs = cl.search_runs([exp.experiment_id], "tags.repeat = '0' and attributes.status = 'RUNNING'")
    return [r for r in runs if r.data.metrics]


def finish(proc: subprocess.Popen, timeout: float = 420) -> int:
    try:
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def progress_line(ln: str) -> bool:
    return ln.startswith("trial ") and "finished)" in ln


# -- a refused command creates no storage --------------------------------------------------------------
REFUSED = {  # case: (command line after the space, what the one error line says)
    "searched key": (["--set", "optim.lr=0.1"], "fixes a key the space 'lr_balance' searches"),
    "unknown key": (["--set", "optim.lrr=0.1"], "did you mean 'optim.lr'"),
    "bad value": (["--set", "train.steps=-1"], "train.steps"),
    "storage is not a URL": (["--storage", "optuna.db"], "not a storage URL"),
    "storage folder missing": (["--storage", "sqlite:///nowhere/optuna.db"], "does not exist"),
    "journal folder missing": (["--workers", "2", "--storage", "journal:nowhere/j.log"], "does not exist"),
    "workers, searched key": (["--workers", "2", "--set", "optim.lr=0.1"], "searches"),
    "workers, unknown key": (["--workers", "2", "--set", "hebb.lrr=1"], "did you mean 'hebb.lr'"),
    "tracking unreachable": (["--tracking-uri", "http://127.0.0.1:9"], "unreachable"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_command_creates_no_storage(case, tmp_path, monkeypatch, capsys):
    from sweeps.run import main
    monkeypatch.chdir(tmp_path)
    extra, message = REFUSED[case]
    if "--tracking-uri" not in extra:
        extra = [*extra, "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"]
    assert main(["lr_balance", *tiny(), *extra]) == 2  # extra last: its --set wins
    err = lines_of(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [], f"a refused command left {left}"


@pytest.mark.opencl
def test_deleted_experiment_is_refused_before_the_storage_exists(template_db, tmp_path, monkeypatch, capsys):
    from sweeps.run import main
    monkeypatch.chdir(tmp_path)
    uri = new_store(template_db, tmp_path)
    cl = mlflow_client(uri)
    cl.delete_experiment(cl.create_experiment("sweep-lr_balance"))
    assert main(["lr_balance", "--tracking-uri", uri, *tiny()]) == 2
    err = lines_of(capsys.readouterr().err)
    assert len(err) == 1 and "'sweep-lr_balance' is deleted" in err[0], err
    assert not (tmp_path / "optuna.db").exists()


# -- sweeps.report reads; it creates nothing ------------------------------------------------------------
@pytest.mark.opencl
def test_report_refusals_are_one_line_and_create_no_store(template_db, tmp_path, monkeypatch, capsys):
    import optuna

    from sweeps.report import main
    monkeypatch.chdir(tmp_path)
    uri = new_store(template_db, tmp_path / "store")

    def refused(*argv) -> str:
        assert main(list(argv)) == 2
        err = lines_of(capsys.readouterr().err)
        assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
        return err[0]

    # no storage here: neither optuna.db nor the tracking store appears
    assert "no Optuna storage at sqlite:///optuna.db" in refused("lr_balance", "--tracking-uri",
                                                                 f"sqlite:///{tmp_path}/mlflow.db")
    assert "no Optuna storage at journal:none.log" in refused("lr_balance", "--storage", "journal:none.log",
                                                              "--tracking-uri", uri)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage="sqlite:///optuna.db", study_name="other")
    study.set_user_attr("mlflow_parent_run_id", "0" * 32)
    line = refused("lr_balance", "--tracking-uri", uri)
    assert "no study named 'lr_balance'" in line and "studies there: other" in line
    line = refused("other", "--tracking-uri", uri)  # the parent run is in another store
    assert f"the parent run {'0' * 32} of study 'other' is not in the tracking store {uri}" in line
    line = refused("other", "--tracking-uri", f"sqlite:///{tmp_path}/elsewhere.db")
    assert "does not exist" in line and not (tmp_path / "elsewhere.db").exists()


# -- the reason of a failed trial; a store race is not one ----------------------------------------------
def _in_process_study(template_db, tmp_path, name: str):
    import optuna

    from sweeps import spaces
    from sweeps.study import Objective, make_sampler, parent_run
    uri = new_store(template_db, tmp_path)
    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/optuna.db", study_name=name,
                                sampler=make_sampler(0), pruner=optuna.pruners.NopPruner(), direction="minimize")
    space = spaces.get("lr_balance")
    study.enqueue_trial(space.defaults())
    cl = mlflow_client(uri)
    parent = parent_run(cl, name, study, {"sweep_study": name})
    objective = Objective(space, tiny(steps=20, eval_every=10)[1::2], 1, uri, name, parent, str(tmp_path / "runs"))
    return study, objective, cl


@pytest.mark.opencl
def test_store_race_in_a_repeat_does_not_fail_the_trial(template_db, tmp_path, monkeypatch, capsys):
    from mlflow.exceptions import MlflowException

    from sweeps import study as study_mod
    from sweeps.run import optimize
    monkeypatch.chdir(tmp_path)
    study, objective, cl = _in_process_study(template_db, tmp_path, "race")
    real, calls = study_mod.runner.launch, []

    def racing_launch(*args, **kwargs):  # what a second worker inserting the same dataset row does
        calls.append(kwargs["tags"]["trial_number"])
        if len(calls) == 1:
            raise MlflowException("(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id, "
                                  "datasets.name, datasets.digest")
        return real(*args, **kwargs)
    monkeypatch.setattr(study_mod.runner, "launch", racing_launch)
    optimize(study, objective, 1)
    trials = study.get_trials()
    assert states(trials) == ["COMPLETE"] and calls == ["0", "0"]
    assert "error" not in trials[0].user_attrs
    assert "tracking store lost a race" in capsys.readouterr().err
    run = cl.get_run(trials[0].user_attrs["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.metrics["objective"] == pytest.approx(trials[0].value)
    cl.set_terminated(objective.parent_id, "FINISHED")
    assert_none_running(objective.uri)


@pytest.mark.opencl
def test_trial_heartbeat_is_refreshed_while_it_trains(template_db, tmp_path, monkeypatch):
    import optuna

    from experiments import liveness
    from sweeps import recovery
    from sweeps.run import optimize
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(recovery, "BEAT_S", 0.05)
    study, objective, cl = _in_process_study(template_db, tmp_path, "beat")
    beats, real = [], optuna.trial.Trial.set_user_attr

    def spy(trial, key, value):
        if key == recovery.HEARTBEAT_ATTR:
            beats.append(value)
        return real(trial, key, value)
    monkeypatch.setattr(optuna.trial.Trial, "set_user_attr", spy)
    optimize(study, objective, 1)
    (t,) = study.get_trials()
    assert t.state.name == "COMPLETE" and t.user_attrs[recovery.OWNER_ATTR] == liveness.owner()
    assert len(beats) >= 3 and beats == sorted(beats) and beats[-1] > beats[0], beats
    assert t.user_attrs[recovery.HEARTBEAT_ATTR] == beats[-1]
    run = cl.get_run(t.user_attrs["mlflow_run_id"])
    assert run.data.tags[liveness.OWNER_TAG] == liveness.owner()
    assert int(run.data.tags[liveness.HEARTBEAT_TAG]) >= beats[0]
    cl.set_terminated(objective.parent_id, "FINISHED")


# -- reaping, in memory ------------------------------------------------------------------------------------
def test_heartbeat_thread_beats_until_the_block_ends():
    from sweeps.recovery import Heartbeat
    calls = []

    def failing():
        raise RuntimeError("store busy")
    with Heartbeat(failing, lambda: calls.append(time.monotonic()), interval=0.01):
        deadline = time.monotonic() + 30
        while len(calls) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert len(calls) >= 3, "a failing beat must not stop the others"
    n = len(calls)
    time.sleep(0.05)
    assert len(calls) == n, "no beat after the block"


def dead_owner():
    """(the ended process, its liveness owner string): a worker that is gone, on this host."""
    from experiments import liveness
    gone = subprocess.Popen(["sleep", "60"])
    owner = liveness.owner(gone.pid)
    gone.kill()
    gone.wait()
    return gone, owner


def test_reap_fails_and_retries_only_dead_owners_trials():
    import optuna

    from experiments import liveness
    from sweeps.recovery import reap_stale_trials
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    gone, dead_local = dead_owner()
    old = liveness.now_ms() - int(liveness.GRACE_S * 1000) - 60_000
    owners = {"dead here": (dead_local, liveness.now_ms()), "alive here": (liveness.owner(), old),
              "silent elsewhere": ("elsewhere:12:34", old), "beating elsewhere": ("elsewhere:12:34", liveness.now_ms()),
              "no owner": (None, None)}
    study = optuna.create_study(direction="minimize")
    numbers = {}
    for name, (owner, beat) in owners.items():
        t = study.ask()
        t.suggest_float("x", 0.0, 1.0)
        if owner:
            t.set_user_attr("owner", owner)
            t.set_user_attr("heartbeat", beat)
        t.set_user_attr("mlflow_run_id", "not-looked-up")
        numbers[name] = t.number
    reaped = dict(reap_stale_trials(study, None))
    assert sorted(reaped) == [numbers["dead here"], numbers["silent elsewhere"]]
    trials = study.get_trials()
    for name in ("alive here", "beating elsewhere", "no owner"):
        assert trials[numbers[name]].state.name == "RUNNING", name
    first = trials[numbers["dead here"]]
    assert first.state.name == "FAIL" and first.user_attrs["error"].startswith("worker died: pid ")
    assert str(gone.pid) in first.user_attrs["error"]
    retry = trials[reaped[first.number]]
    assert retry.state.name == "WAITING" and retry.params == first.params
    assert retry.user_attrs == {"retry_of": first.number}
    assert optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(retry) == first.number
    assert trials[reaped[numbers["silent elsewhere"]]].params == trials[numbers["silent elsewhere"]].params


def test_a_point_is_retried_at_most_max_retry_times():
    import optuna

    from sweeps.recovery import reap_stale_trials
    from sweeps.study import MAX_RETRY
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    gone, dead = dead_owner()
    study = optuna.create_study(direction="minimize")
    t = study.ask()
    x = t.suggest_float("x", 0.0, 1.0)
    results = []
    for _ in range(MAX_RETRY + 1):  # every worker that takes the point up dies with it
        t.set_user_attr("owner", dead)
        results += reap_stale_trials(study, None)
        if results[-1][1] is None:
            break
        t = study.ask()
        assert t.number == results[-1][1] and t.params == {"x": x}, "the queued retry is the next trial asked for"
    assert [again is None for _, again in results] == [False] * MAX_RETRY + [True]
    assert states(study.get_trials()) == ["FAIL"] * (MAX_RETRY + 1)
    assert study.get_trials()[-1].system_attrs["retry_history"] == [n for n, _ in results][:-1]


# -- a. one worker, SQLite: SIGKILLed mid-trial, then the same command again -----------------------------
@pytest.mark.opencl
def test_sigkilled_sweep_is_recovered_by_the_same_command(template_db, tmp_path):
    import optuna
    uri = new_store(template_db, tmp_path)
    storage = f"sqlite:///{tmp_path}/optuna.db"
    cmd = ("lr_balance", "--trials", 2, "--repeats", 1, "--pruner", "none", "--storage", storage,
           "--tracking-uri", uri, *tiny(**LONG))
    a = popen_session(*cmd, cwd=tmp_path, tag="A")
    try:
        rep = wait_for("a repeat logged metrics", lambda: training_repeats(uri, "sweep-lr_balance"), a, tmp_path, "A")[0]
        os.kill(a.pid, signal.SIGKILL)
        assert finish(a, 60) == -signal.SIGKILL
    finally:
        if a.poll() is None:
            os.killpg(a.pid, signal.SIGKILL)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    (killed,) = load_trials(storage, "lr_balance")
    trial_run = killed.user_attrs["mlflow_run_id"]
    cl = mlflow_client(uri)
    assert killed.state.name == "RUNNING" and rep.data.tags["mlflow.parentRunId"] == trial_run
    assert cl.get_run(trial_run).info.status == "RUNNING", "the kill left the runs RUNNING"

    b = sweep(*cmd, cwd=tmp_path)
    parent = ok(b)
    trials = load_trials(storage, "lr_balance")
    assert states(trials) == ["FAIL", "COMPLETE", "COMPLETE"], states(trials)
    assert trials[0].user_attrs["error"].startswith(f"worker died: pid {a.pid} ")
    retry = trials[1]
    assert retry.params == killed.params == HYBRID_DEFAULTS
    assert retry.user_attrs["retry_of"] == 0 and retry.system_attrs["failed_trial"] == 0
    assert retry.user_attrs["mlflow_run_id"] != trial_run
    assert f"trial 0 FAIL: worker died: pid {a.pid} " in b.stderr and "retried as trial 1" in b.stderr
    runs = {r.info.run_id: r for r in all_runs(uri)}
    for rid in (trial_run, rep.info.run_id):
        assert runs[rid].info.status == "FAILED" and "worker died" in runs[rid].data.tags["error"]
    assert runs[trial_run].data.tags["trial_state"] == "FAIL"
    assert runs[parent].info.status == "FINISHED" and runs[trial_run].data.tags["mlflow.parentRunId"] == parent
    assert_none_running(uri)


# -- b. --workers 2, journal: one worker child SIGKILLed mid-trial --------------------------------------------
@pytest.mark.opencl
def test_sigkilled_worker_is_replaced_and_its_trial_retried(template_db, tmp_path):
    uri = new_store(template_db, tmp_path)
    log = tmp_path / "optuna-journal.log"
    cmd = ("lr_balance", "--workers", 2, "--trials", 3, "--repeats", 1, "--pruner", "none", "--sampler-seed", 5,
           "--tracking-uri", uri, *tiny(**LONG))
    p = popen_session(*cmd, cwd=tmp_path, tag="W")

    def training_trial():  # one of the first two trials, caught mid-training (both workers start one)
        if not log.exists() or not training_repeats(uri, "sweep-lr_balance"):
            return None
        first = load_trials(journal(log), "lr_balance")[:2]
        if all(t.state.is_finished() for t in first):
            pytest.fail("both first trials ended before one was caught mid-training")
        return next((t for t in first if t.state.name == "RUNNING" and t.intermediate_values
                     and "owner" in t.user_attrs), None)
    try:
        victim = wait_for("a worker's trial evaluated", training_trial, p, tmp_path, "W")
        pid = int(victim.user_attrs["owner"].rsplit(":", 2)[1])
        with open(f"/proc/{pid}/stat") as f:
            assert int(f.read().rsplit(")", 1)[1].split()[1]) == p.pid, "the owner is a worker of this sweep"
        os.kill(pid, signal.SIGKILL)
        rc = finish(p)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    err = (tmp_path / "W.err").read_text()
    assert rc == 0, err[-4000:]
    assert "was killed by SIGKILL; worker 2 takes its place" in err and f"(pid {pid})" in err
    trials = load_trials(journal(log), "lr_balance")
    st = states(trials)
    assert "RUNNING" not in st and "WAITING" not in st, st
    assert 3 <= st.count("COMPLETE") + st.count("PRUNED") <= 4 and st.count("FAIL") == 1, st
    killed = trials[victim.number]
    assert killed.state.name == "FAIL" and killed.user_attrs["error"].startswith(f"worker died: pid {pid} ")
    (retry,) = [t for t in trials if t.user_attrs.get("retry_of") == victim.number]
    assert retry.state.name == "COMPLETE" and retry.params == killed.params
    runs = {r.info.run_id: r for r in all_runs(uri)}
    dead = runs[killed.user_attrs["mlflow_run_id"]]
    assert dead.info.status == "FAILED" and dead.data.tags["trial_state"] == "FAIL"
    assert [r.info.status for r in children(mlflow_client(uri), dead)] == ["FAILED"]
    assert_none_running(uri)


# -- Ctrl+C / SIGTERM: a couple of lines, no traceback, exit 130, nothing RUNNING ---------------------------
def _assert_quiet_stop(err: str, rc: int, stopped: list[int]):
    assert rc == 130, err[-4000:]
    assert "Traceback" not in err, err[-4000:]
    other = [ln for ln in lines_of(err) if not progress_line(ln)]
    assert len(other) == 2, other
    listed = ", ".join(map(str, stopped))
    if stopped:
        assert other[0].startswith(f"interrupted: trial{'s' if len(stopped) > 1 else ''} {listed} stopped (KILLED), "
                                   "queued again as "), other[0]
    else:  # the signal came while the last trials wrote their results: they completed
        assert other[0].startswith("interrupted: stopped between trials (KILLED)"), other[0]
    assert other[0].endswith("; resume with the same command") and other[1].startswith("sweep: ")


@pytest.mark.opencl
def test_ctrl_c_one_worker_stops_quietly_and_resumes(template_db, tmp_path):
    uri = new_store(template_db, tmp_path)
    storage = f"sqlite:///{tmp_path}/optuna.db"
    cmd = ("lr_balance", "--trials", 1, "--repeats", 1, "--pruner", "none", "--storage", storage,
           "--tracking-uri", uri, *tiny(**STOP_LONG))
    p = popen_session(*cmd, cwd=tmp_path, tag="C")
    try:
        wait_for("a repeat logged metrics", lambda: training_repeats(uri, "sweep-lr_balance"), p, tmp_path, "C")
        os.killpg(p.pid, signal.SIGINT)
        rc = finish(p, 120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    _assert_quiet_stop((tmp_path / "C.err").read_text(), rc, [0])
    trials = load_trials(storage, "lr_balance")
    assert states(trials) == ["FAIL", "WAITING"] and trials[0].user_attrs["error"].startswith("interrupted by ")
    runs = all_runs(uri)
    by_name = {r.info.run_name: r for r in runs}
    assert by_name["trial-0"].info.status == "KILLED" and by_name["trial-0"].data.tags["trial_state"] == "KILLED"
    assert by_name["study-lr_balance"].info.status == "KILLED"
    assert [r.info.status for r in children(mlflow_client(uri), by_name["trial-0"])] == ["KILLED"]
    assert_none_running(uri)
    # the same command resumes: the stopped point (the defaults) is evaluated first
    ok(sweep(*cmd, cwd=tmp_path))
    trials = load_trials(storage, "lr_balance")
    assert states(trials) == ["FAIL", "COMPLETE"] and trials[1].params == HYBRID_DEFAULTS
    assert trials[1].user_attrs["retry_of"] == 0
    assert_none_running(uri)


@pytest.mark.opencl
@pytest.mark.parametrize("how", ["ctrl-c to the group", "sigterm to the parent"])
def test_two_workers_stop_quietly(how, template_db, tmp_path):
    uri = new_store(template_db, tmp_path)
    cmd = ("lr_balance", "--workers", 2, "--trials", 4, "--repeats", 1, "--pruner", "none", "--sampler-seed", 2,
           "--tracking-uri", uri, *tiny(**STOP_LONG))
    p = popen_session(*cmd, cwd=tmp_path, tag="S")
    try:
        wait_for("both workers training", lambda: len(training_repeats(uri, "sweep-lr_balance")) >= 2, p, tmp_path,
                 "S")
        if how == "ctrl-c to the group":
            os.killpg(p.pid, signal.SIGINT)
        else:
            os.kill(p.pid, signal.SIGTERM)
        rc = finish(p, 180)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    trials = load_trials(journal(tmp_path / "optuna-journal.log"), "lr_balance")
    stopped = [t.number for t in trials if t.state.name == "FAIL"]
    done = [t.number for t in trials if t.state.name == "COMPLETE"]
    _assert_quiet_stop((tmp_path / "S.err").read_text(), rc, stopped)
    # both workers were mid-trial: each trial is stopped (FAIL "interrupted", queued again) or, when the
    # signal came while it wrote its last results, COMPLETE; the sweep starts no trial after the signal
    assert len(stopped) >= 1 and len(stopped) + len(done) == 2, states(trials)
    assert all(trials[n].user_attrs["error"].startswith("interrupted by ") for n in stopped)
    assert sorted(t.user_attrs["retry_of"] for t in trials if t.state.name == "WAITING") == stopped
    assert "RUNNING" not in states(trials)
    runs = all_runs(uri)
    assert next(r for r in runs if r.info.run_name == "study-lr_balance").info.status == "KILLED"
    trial_runs = {int(r.data.tags["trial_number"]): r for r in runs if r.info.run_name.startswith("trial-")}
    assert all(trial_runs[n].data.tags["trial_state"] == "KILLED" for n in stopped)
    assert all(trial_runs[n].data.tags["trial_state"] == "COMPLETE" for n in done)
    assert_none_running(uri)


def test_worker_command_lines_carry_no_password(tmp_path):
    """`ps` shows every user a process's argv: a --workers child gets the storage URL and the
    tracking URI (either may hold a password) in its environment instead."""
    from sweeps.run import WORKER_STORAGE_VAR, _worker_argv, _worker_env, build_parser
    storage = "postgresql+psycopg2://sweeper:s3cret-db@db/optuna"
    uri = "http://admin:s3cret-ml@track:5000"
    args = build_parser().parse_args(["lr_balance", "--workers", "2", "--storage", storage, "--tracking-uri", uri])
    argv = _worker_argv(args, storage)
    assert not any("s3cret" in a for a in argv)
    assert argv[argv.index("--storage") + 1] == f"env:{WORKER_STORAGE_VAR}"
    env = _worker_env(1, storage, uri)
    assert env[WORKER_STORAGE_VAR] == storage and env["MLFLOW_TRACKING_URI"] == uri


def test_storage_from_an_unset_variable_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "sweeps.run", "lr_balance", "--storage", "env:NO_SUCH_VAR_9"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env={k: v for k, v in os.environ.items() if k != "NO_SUCH_VAR_9"})
    assert r.returncode == 2
    assert r.stderr.strip() == "error: --storage env:NO_SUCH_VAR_9: $NO_SUCH_VAR_9 is not set"
    assert os.listdir(tmp_path) == []
