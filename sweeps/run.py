"""Optuna search over a space of config keys; every trial is a tracked MLflow run.

    python -m sweeps.run lr_balance --trials 40
    python -m sweeps.run lr_balance --trials 40 --workers 2 --set train.steps=500
    python -m sweeps.run lr_balance --storage postgresql://user:pw@host/db --tracking-uri http://host:5000

Storage: --storage, else sqlite:///optuna.db (one worker) or
journal:optuna-journal.log (--workers K > 1: K processes share the study
through Optuna's journal file). PostgreSQL/MySQL storages get heartbeats: a
trial whose worker died is retried and its MLflow runs are marked FAILED.
Re-running the same command resumes the study: finished (complete or
pruned) trials count towards --trials. With --sampler-seed and one worker
the suggestions repeat exactly. The base experiment's defaults are the
first trial of every new study.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

import optuna

from experiments.run import DEFAULT_EXPERIMENT
from experiments.tracking import TrackingError, check_store, client, experiment_id, resolve_tracking_uri

from . import spaces
from .study import (USER_ERRORS, Objective, SweepError, base_config, default_storage, describe, finished_count,
                    make_pruner, make_sampler, make_storage, parent_run, redact)

MAX_FAILED_FACTOR = 1  # stop once failed trials reach this many times --trials (a hopeless space)


def build_parser():
    ap = argparse.ArgumentParser(prog="python -m sweeps.run", description=__doc__.splitlines()[0])
    ap.add_argument("space", nargs="?")
    ap.add_argument("--list", action="store_true", help="list the search spaces")
    ap.add_argument("--trials", type=int, default=20, help="finished trials the study should have")
    ap.add_argument("--workers", type=int, default=1, help="worker processes on this machine")
    ap.add_argument("--storage", help="Optuna storage URL (sqlite:///…, journal:PATH, postgresql://…)")
    ap.add_argument("--study-name", help="default: the space name")
    ap.add_argument("--pruner", default="median", choices=("median", "hyperband", "none"))
    ap.add_argument("--sampler-seed", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=2, help="seeds per trial (objective = mean best val loss)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="fix a config key in every trial")
    ap.add_argument("--tracking-uri")
    ap.add_argument("--experiment-name", default=None, help="MLflow experiment (default: sweep-<study>)")
    ap.add_argument("--out", default="runs", help="checkpoint directory root")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # a process started by --workers
    return ap


def open_study(args, uri):
    space = spaces.get(args.space)  # before any storage file is created
    storage_url = args.storage or default_storage(args.workers)
    storage = make_storage(storage_url, uri)
    name = args.study_name or space.name
    seed = args.sampler_seed
    if seed is not None and args.worker:  # workers must not all suggest the same values
        seed += int(os.environ.get("OPTUNA_WORKER", "0"))
    sampler = make_sampler(seed)
    tc = base_config(space, args.set).train
    pruner = make_pruner(args.pruner, tc.steps, tc.eval_every, args.repeats)
    try:
        study = optuna.create_study(storage=storage, study_name=name, sampler=sampler, pruner=pruner,
                                    direction="minimize", load_if_exists=True)
    except Exception as exc:
        raise SweepError(f"cannot open study {name!r} in {redact(storage_url)} ({exc})") from None
    existing = len(study.get_trials(deepcopy=False))
    if not existing:
        study.enqueue_trial(space.defaults(), user_attrs={"defaults": True})
    elif seed is not None:  # a resumed seeded study: a fresh TPE would replay its start-up points
        sampler = study.sampler = make_sampler(seed + existing)
    return space, study, storage_url, sampler, pruner


def optimize(study, objective, n_trials: int):
    """Run trials until the study has n_trials finished ones (complete or pruned)."""
    if finished_count(study) >= n_trials:
        return

    def stop_when_done(st, trial):
        value = f" value {trial.value:.4f}" if trial.value is not None else ""
        print(f"trial {trial.number} {trial.state.name}{value} ({finished_count(st)}/{n_trials} finished)",
              file=sys.stderr, flush=True)
        failed = len(st.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,)))
        if finished_count(st) >= n_trials or failed >= MAX_FAILED_FACTOR * n_trials:
            st.stop()
    study.optimize(objective, n_trials=None, callbacks=[stop_when_done], catch=(Exception,), gc_after_trial=True)


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
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    uri = resolve_tracking_uri(args.tracking_uri)
    try:
        check_store(uri)
        space, study, storage_url, sampler, pruner = open_study(args, uri)
        exp_name = args.experiment_name or f"sweep-{study.study_name}"
        objective = Objective(space, args.set, args.repeats, uri, exp_name, None, args.out)  # validates --set
        cl = client(uri)
        experiment_id(cl, exp_name)  # created once, before any worker starts
        if args.worker:
            parent = study.user_attrs["mlflow_parent_run_id"]
        else:
            parent = parent_run(cl, exp_name, study, {
                "sweep_study": study.study_name, "sweep_space": space.name,
                "optuna_storage": redact(storage_url), "optuna_sampler": describe(sampler),
                "optuna_pruner": describe(pruner), "optuna_version": optuna.__version__,
                "optuna_sampler_seed": str(args.sampler_seed), "workers": str(args.workers),
                "repeats": str(args.repeats), "fixed": " ".join(args.set)})
        objective.parent_id = parent
    except (*USER_ERRORS, spaces.UnknownSpace) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.worker:
        optimize(study, objective, args.trials)
        return 0
    status = "FINISHED"
    try:
        if args.workers > 1:
            status = _run_workers(args, storage_url)
        else:
            optimize(study, objective, args.trials)
    except KeyboardInterrupt:
        status = "KILLED"
    finally:
        from .report import report
        try:
            report(study, cl, parent)
        finally:
            cl.set_terminated(parent, status)
    best = study.best_trial if any(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials) else None
    if best is not None:
        print(f"best value {best.value:.4f} (trial {best.number}): {best.params}", file=sys.stderr)
    print(parent)
    return 0 if status == "FINISHED" else 130


def _run_workers(args, storage_url) -> str:
    """K worker processes on one study; returns the parent run's final status."""
    argv = [sys.executable, "-m", "sweeps.run", args.space, "--worker", "--storage", storage_url,
            "--trials", str(args.trials), "--pruner", args.pruner, "--repeats", str(args.repeats),
            "--out", args.out, "--workers", str(args.workers)]
    for flag, value in (("--study-name", args.study_name), ("--tracking-uri", args.tracking_uri),
                        ("--experiment-name", args.experiment_name), ("--sampler-seed", args.sampler_seed)):
        if value is not None:
            argv += [flag, str(value)]
    for s in args.set:
        argv += ["--set", s]
    procs = [subprocess.Popen(argv, env={**os.environ, "OPTUNA_WORKER": str(i)}) for i in range(args.workers)]
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()
        return "KILLED"
    return "FINISHED" if all(c == 0 for c in codes) else "FAILED"


if __name__ == "__main__":
    sys.exit(main())
