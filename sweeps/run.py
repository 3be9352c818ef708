"""Optuna search over a space of config keys; every trial is a tracked MLflow run.

    python -m sweeps.run lr_balance --trials 40
    python -m sweeps.run lr_balance --trials 40 --workers 2 --set train.steps=500
    python -m sweeps.run lr_balance --storage postgresql://user@host/db --tracking-uri http://host:5000  # password: ~/.pgpass

Storage: --storage, else sqlite:///optuna.db (one worker) or
journal:optuna-journal.log (--workers K > 1: K processes share the study
through Optuna's journal file). Re-running the same command resumes the
study: finished (complete or pruned) trials count towards --trials. With
--sampler-seed and one worker the suggestions repeat exactly. The base
experiment's defaults are the first trial of every new study.

Nothing is created before the space, --set, the pruner and the storage URL
are checked. A trial whose worker died (SIGKILL, out of memory) is marked
FAIL with the reason, its MLflow runs FAILED, and it is retried with the
same parameters: by the next worker or restart of the command (sweeps/recovery.py;
PostgreSQL/MySQL storages use Optuna's heartbeat instead), and at once by the
parent of --workers, which also starts a replacement worker. Ctrl+C or
SIGTERM stops after the current training step: the trial is FAIL (reason
"interrupted ..."), its runs KILLED, exit 130. One line per trial on stderr,
then a summary (best trial against the defaults, counts, where the report
is); the last line of standard output is the parent run id.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

import optuna
from optuna.trial import TrialState

from engine.tasks import task_of
from experiments import liveness, presets
from experiments.run import ui_hint
from experiments.tracking import TrackingError, check_store, client, experiment_id, resolve_tracking_uri

from . import spaces
from .recovery import ERROR_ATTR, INTERRUPTED, RETRY_ATTR, STOP, Heartbeat, reap_stale_trials, retry
from .study import (MAX_RETRY, USER_ERRORS, Objective, SweepError, check_fixed, check_storage_url, default_storage,
                    describe, finished_count, make_pruner, make_sampler, make_storage, objective_metric, parent_run,
                    redact)

MAX_FAILED_FACTOR = 1  # stop once failed trials reach this many times --trials (a hopeless space)
MAX_RESTARTS = 2       # --workers: replacement workers per worker slot, for children killed by a signal
TERM_WAIT_S = 120      # --workers: after a stop request, how long children get to end their step


def build_parser():
    ap = argparse.ArgumentParser(prog="python -m sweeps.run", description=__doc__.splitlines()[0])
    ap.add_argument("space", nargs="?")
    ap.add_argument("--list", action="store_true", help="list the search spaces")
    ap.add_argument("--trials", type=int, default=20, help="finished trials the study should have")
    ap.add_argument("--workers", type=int, default=1, help="worker processes on this machine")
    ap.add_argument("--storage", help="Optuna storage URL (sqlite:///…, journal:PATH, postgresql://…), "
                                      "or env:NAME to read it from $NAME (keeps a password off the command line)")
    ap.add_argument("--study-name", help="default: the space name")
    ap.add_argument("--pruner", default="median", choices=("median", "hyperband", "none"))
    ap.add_argument("--sampler-seed", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=2, help="seeds per trial (objective = the mean of their best "
                                                           "values of the objective metric)")
    ap.add_argument("--objective", default=None, help="the evaluation metric trials are scored on, minimised or "
                                                      "maximised by its direction (val_loss, val_acc, val_bpc, "
                                                      "val_f1; default: the space's, else the task's val_loss)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="fix a config key in every trial")
    ap.add_argument("--tracking-uri")
    ap.add_argument("--experiment-name", default=None, help="MLflow experiment (default: sweep-<study>)")
    ap.add_argument("--out", default="runs", help="checkpoint directory root")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # a process started by --workers
    return ap


def direction_of(space, metric: str) -> str:
    """Optuna's direction for `metric` of the space's task: maximize for accuracy and F1."""
    task = task_of(presets.get(space.base).config())
    return "minimize" if task.metric(metric).direction == "min" else "maximize"


def validate(args):
    """Everything that can be checked without touching a store: a refused command leaves no file."""
    space = spaces.get(args.space)
    base = check_fixed(space, args.set)  # a searched key, an unknown key, a bad value
    args.objective = objective_metric(space, base, args.objective)
    pruner = make_pruner(args.pruner, base.train.steps, base.train.eval_every, args.repeats)
    storage_url = args.storage or default_storage(args.workers)
    check_storage_url(storage_url)
    return space, pruner, storage_url


def check_experiment(cl, name: str):
    """A deleted MLflow experiment is refused before the Optuna storage is created."""
    exp = cl.get_experiment_by_name(name)
    if exp is not None and exp.lifecycle_stage != "active":
        raise TrackingError(f"MLflow experiment {name!r} is deleted; restore it or pick another name")


def open_study(args, space, pruner, storage_url: str, uri: str):
    storage = make_storage(storage_url, uri)
    name = args.study_name or space.name
    seed = args.sampler_seed
    if seed is not None and args.worker:  # workers must not all suggest the same values
        seed += int(os.environ.get("OPTUNA_WORKER", "0"))
    sampler = make_sampler(seed)
    try:
        study = optuna.create_study(storage=storage, study_name=name, sampler=sampler, pruner=pruner,
                                    direction=direction_of(space, args.objective), load_if_exists=True)
    except Exception as exc:
        raise SweepError(f"cannot open study {name!r} in {redact(storage_url)} ({exc})") from None
    scored = study.user_attrs.get("objective_metric")
    if scored is None:
        study.set_user_attr("objective_metric", args.objective)
    elif scored != args.objective:
        raise SweepError(f"study {name!r} scores trials on {scored!r}, not {args.objective!r}: "
                         f"use --objective {scored} or another --study-name")
    existing = len(study.get_trials(deepcopy=False))
    if not existing:
        study.enqueue_trial(space.defaults(), user_attrs={"defaults": True})
    elif seed is not None:  # a resumed seeded study: a fresh TPE would replay its start-up points
        sampler = study.sampler = make_sampler(seed + existing)
    return study, sampler


def reap(study, uri: str):
    """Fail and retry the trials of dead workers (sweeps/recovery.py); one line each."""
    for number, again_as in reap_stale_trials(study, uri):
        t = study.get_trials(deepcopy=False)[number]
        again = f"retried as trial {again_as}" if again_as is not None else "not retried (retried too often)"
        print(f"trial {number} FAIL: {t.user_attrs.get(ERROR_ATTR, 'worker died')}; {again}",
              file=sys.stderr, flush=True)


def _interrupted(trial) -> bool:
    return str(trial.user_attrs.get(ERROR_ATTR, "")).startswith(INTERRUPTED)


def optimize(study, objective, n_trials: int):
    """Run trials until the study has n_trials finished ones (complete or pruned). Trials of
    dead workers are failed and retried first, and again after every trial."""
    reap(study, objective.uri)
    if finished_count(study) >= n_trials or STOP.requested:
        return

    def after_trial(st, trial):
        if not _interrupted(trial):
            value = f" value {trial.value:.4f}" if trial.value is not None else ""
            why = f": {trial.user_attrs[ERROR_ATTR]}" if trial.state == TrialState.FAIL and \
                trial.user_attrs.get(ERROR_ATTR) else ""
            print(f"trial {trial.number} {trial.state.name}{value}{why} ({finished_count(st)}/{n_trials} finished)",
                  file=sys.stderr, flush=True)
        if _interrupted(trial):  # resuming the sweep evaluates this point first
            retry(st, trial, MAX_RETRY)
        if STOP.requested:
            st.stop()
            return
        reap(st, objective.uri)
        failed = len(st.get_trials(deepcopy=False, states=(TrialState.FAIL,)))
        if finished_count(st) >= n_trials or failed >= MAX_FAILED_FACTOR * n_trials:
            st.stop()
    verbosity = optuna.logging.get_verbosity()
    try:
        study.optimize(objective, n_trials=None, callbacks=[after_trial], catch=(Exception,), gc_after_trial=True)
    finally:
        optuna.logging.set_verbosity(verbosity)  # the objective quiets Optuna when interrupted


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.list:
        for s in spaces.SPACES.values():
            print(f"{s.name}  {s.description}")
            for p in s.params:
                print(f"    {p.key:<10} log-uniform [{p.low:g}, {p.high:g}]  {p.why}")
        return 0
    if not args.space:
        build_parser().error("give a SPACE or --list")
    if args.trials < 1 or args.workers < 1 or args.repeats < 1:
        print("error: --trials, --workers and --repeats must be >= 1", file=sys.stderr)
        return 2
    previous = STOP.install()  # from here on Ctrl+C / SIGTERM is a request, read between steps and trials
    try:
        return _sweep(args)
    finally:
        STOP.restore(previous)


def _sweep(args) -> int:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if args.storage and args.storage.startswith("env:"):
        name = args.storage[len("env:"):]
        if not os.environ.get(name):
            print(f"error: --storage env:{name}: ${name} is not set", file=sys.stderr)
            return 2
        args.storage = os.environ[name]
    uri = resolve_tracking_uri(args.tracking_uri)
    try:
        study, objective, cl, storage_url = _start(args, uri)
    except (*USER_ERRORS, spaces.UnknownSpace) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.worker:
        optimize(study, objective, args.trials)
        return 130 if STOP.requested else 0  # the parent says what happened
    parent = objective.parent_id
    ended_before = {t.number for t in study.get_trials(deepcopy=False) if t.state.is_finished()}
    status = "FAILED"
    try:
        with Heartbeat(lambda: cl.set_tag(parent, liveness.HEARTBEAT_TAG, str(liveness.now_ms()))):
            if args.workers > 1:
                status = _run_workers(args, storage_url, study, uri)
            else:
                optimize(study, objective, args.trials)
                status = "FINISHED"
    finally:
        status = "KILLED" if STOP.requested else status
        from .report import report
        try:
            report(study, cl, parent)
        except Exception as exc:  # the trials are safe in the study; `python -m sweeps.report` retries
            print(f"note: report not written ({str(exc).splitlines()[0][:300] if str(exc) else exc!r})",
                  file=sys.stderr)
        cl.set_terminated(parent, status)
    if status == "KILLED":
        print(_stopped(study, ended_before), file=sys.stderr)
    print(summary(study, cl, uri, parent), file=sys.stderr, flush=True)
    print(parent, flush=True)
    return {"FINISHED": 0, "KILLED": 130}.get(status, 1)


def _start(args, uri: str):
    """Checks, then the stores, the study (defaults enqueued) and the parent run, in that order."""
    space, pruner, storage_url = validate(args)
    exp_name = args.experiment_name or f"sweep-{args.study_name or space.name}"
    check_store(uri)
    cl = client(uri)
    check_experiment(cl, exp_name)
    study, sampler = open_study(args, space, pruner, storage_url, uri)
    objective = Objective(space, args.set, args.repeats, uri, exp_name, None, args.out, metric=args.objective)
    experiment_id(cl, exp_name)  # created once, before any worker starts
    if args.worker:
        objective.parent_id = study.user_attrs.get("mlflow_parent_run_id")
        if not objective.parent_id:
            raise SweepError(f"study {study.study_name!r} has no MLflow parent run (start it without --worker)")
    else:
        objective.parent_id = parent_run(cl, exp_name, study, {
            "sweep_study": study.study_name, "sweep_space": space.name,
            "optuna_storage": redact(storage_url), "optuna_sampler": describe(sampler),
            "optuna_pruner": describe(pruner), "optuna_version": optuna.__version__,
            "optuna_sampler_seed": str(args.sampler_seed), "workers": str(args.workers),
            "repeats": str(args.repeats), "fixed": " ".join(args.set), "objective_metric": args.objective})
    return study, objective, cl, storage_url


def _stopped(study, ended_before: set) -> str:
    """The one line a Ctrl+C / SIGTERM leaves: which trials stopped, what runs next."""
    trials = study.get_trials(deepcopy=False)
    stopped = [t.number for t in trials if t.number not in ended_before and _interrupted(t)]
    again = [t.number for t in trials if t.state == TrialState.WAITING and t.user_attrs.get(RETRY_ATTR) in stopped]
    which = (f"trial {stopped[0]} stopped" if len(stopped) == 1 else
             f"trials {', '.join(map(str, stopped))} stopped" if stopped else "stopped between trials")
    then = f", queued again as {', '.join(map(str, again))}" if again else ""
    return f"interrupted: {which} (KILLED){then}; resume with the same command"


def summary(study, cl, uri: str, parent: str) -> str:
    """One line: the best trial against the defaults, the counts, where the report is."""
    trials = study.get_trials(deepcopy=False)
    by_state = {s: [t for t in trials if t.state == s] for s in (TrialState.COMPLETE, TrialState.PRUNED,
                                                               TrialState.FAIL)}
    complete = by_state[TrialState.COMPLETE]
    parts = []
    if complete:
        best = min(complete, key=lambda t: t.value)
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best.params.items())
        parts.append(f"best trial {best.number}: {best.value:.4f} ({params})")
        base = next((t for t in complete if t.user_attrs.get("defaults")), None)
        if base is None:
            parts.append("the defaults trial has not completed")
        elif base.number == best.number:
            parts.append(f"no improvement on the defaults (trial {base.number})")
        else:
            gain = base.value - best.value
            parts.append(f"{gain:.4f} better than the defaults (trial {base.number}: {base.value:.4f}, "
                         f"{100 * gain / abs(base.value):.1f} %)" if base.value else
                         f"{gain:.4f} better than the defaults (trial {base.number})")
    else:
        parts.append("no trial completed")
    n_done = len(complete) + len(by_state[TrialState.PRUNED])
    parts.append(f"{n_done} finished ({len(complete)} complete, {len(by_state[TrialState.PRUNED])} pruned), "
                 f"{len(by_state[TrialState.FAIL])} failed")
    parts.append(f"report: parent run {parent}, {ui_address(cl, uri, parent)}")
    return "sweep: " + "; ".join(parts)


def ui_address(cl, uri: str, run_id: str) -> str:
    """Where the run's page is: the server's address, or how to start `mlflow ui` on a local store."""
    return ui_hint(uri, run_id)


WORKER_STORAGE_VAR = "SWEEP_WORKER_STORAGE"


def _worker_argv(args, storage_url: str) -> list[str]:
    """A worker's command line. The storage URL and the tracking URI (either may hold a
    password) travel in its environment (`_worker_env`), never in argv, which `ps` shows."""
    argv = [sys.executable, "-m", "sweeps.run", args.space, "--worker", "--storage", f"env:{WORKER_STORAGE_VAR}",
            "--trials", str(args.trials), "--pruner", args.pruner, "--repeats", str(args.repeats),
            "--out", args.out, "--workers", str(args.workers)]
    for flag, value in (("--study-name", args.study_name), ("--experiment-name", args.experiment_name),
                        ("--sampler-seed", args.sampler_seed), ("--objective", args.objective)):
        if value is not None:
            argv += [flag, str(value)]
    for s in args.set:
        argv += ["--set", s]
    return argv


def _worker_env(index: int, storage_url: str, uri: str) -> dict:
    return {**os.environ, "OPTUNA_WORKER": str(index), WORKER_STORAGE_VAR: storage_url, "MLFLOW_TRACKING_URI": uri}


def _run_workers(args, storage_url: str, study, uri: str) -> str:
    """K worker processes on one study, supervised: a child killed by a signal (not by this
    process) has its trial failed and retried at once and is replaced, at most
    MAX_RESTARTS times per worker. Returns the parent run's final status."""
    argv = _worker_argv(args, storage_url)
    reap(study, uri)

    def start(index: int):
        return subprocess.Popen(argv, env=_worker_env(index, storage_url, uri))
    live = {start(i): i for i in range(args.workers)}
    next_index, restarts, failed, stopping = args.workers, 0, False, None
    while live:
        if STOP.requested and stopping is None:
            stopping = time.monotonic()
            for p in live:  # a terminal's Ctrl+C reached them already; `kill PARENT` did not
                p.send_signal(signal.SIGTERM)
        if stopping is not None and time.monotonic() - stopping > TERM_WAIT_S:
            for p in live:
                p.kill()
        for p in [p for p in live if p.poll() is not None]:
            index = live.pop(p)
            reap(study, uri)
            rc = p.returncode
            if stopping is not None or rc in (0, 130):
                continue
            if rc > 0:
                failed = True
                continue
            line = f"worker {index} (pid {p.pid}) was killed by {signal.Signals(-rc).name}"
            if finished_count(study) >= args.trials:
                line += "; the study is complete"
            elif restarts < MAX_RESTARTS * args.workers:
                restarts += 1
                live[start(next_index)] = next_index
                next_index += 1
                line += f"; worker {next_index - 1} takes its place"
            else:
                failed = True
                line += "; no restarts left"
            print(line, file=sys.stderr, flush=True)
        time.sleep(0.2)
    return "KILLED" if STOP.requested else "FAILED" if failed else "FINISHED"


if __name__ == "__main__":
    sys.exit(main())
