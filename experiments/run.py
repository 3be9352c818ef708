"""Run a named experiment as one tracked MLflow run.

    python -m experiments.run hybrid --set train.steps=500
    python -m experiments.run --list
    python -m experiments.run --resume RUN_ID

The last line of standard output is the MLflow run id and nothing else.
Runs go to --tracking-uri, else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
in the current directory; an unreachable store is an error before training.
Ctrl+C / SIGTERM stop after the current step: checkpoint written and logged,
run marked KILLED (exit 130). A failure marks it FAILED with the error
logged (exit 1). Checkpoints live in OUT/<run id>/ (default OUT = runs).
"""
from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # keep stderr to one line
import signal
import sys
import tempfile

from engine.checkpoint import CheckpointError
from engine.config import Config, ConfigError, apply_overrides
from engine.data import DataError
from engine.device import DeviceError
from engine.train import Trainer, TrainingError, make_progress

from . import presets
from .tracking import MlflowLogger, TrackingError, check_store, client, experiment_id, log_dataset, \
    resolve_tracking_uri, run_tags

DEFAULT_EXPERIMENT = "hybrid-lm"
USER_ERRORS = (presets.UnknownExperiment, ConfigError, DataError, CheckpointError, DeviceError, TrackingError)


def launch(cfg: Config, name: str, overrides: list[str], uri: str, experiment_name: str = DEFAULT_EXPERIMENT,
           out_root: str = "runs", tags: dict | None = None, parent_run_id: str | None = None,
           callbacks=(), progress: bool = True) -> tuple[str, dict]:
    """Train `cfg` as a new MLflow run; returns (run id, summary with status)."""
    cl = client(uri)
    exp_id = experiment_id(cl, experiment_name)
    trainer = Trainer(cfg, None, list(callbacks))
    # from here on a signal must not leave a RUNNING run: it asks the loop to stop
    before = {s: signal.signal(s, lambda *_: trainer.request_stop()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _launch_run(cl, exp_id, trainer, cfg, name, overrides, out_root, tags, parent_run_id, progress)
    finally:
        for s, h in before.items():
            signal.signal(s, h)


def _launch_run(cl, exp_id, trainer, cfg, name, overrides, out_root, tags, parent_run_id, progress):
    run_tags_ = {"mlflow.runName": f"{name}-s{cfg.seed}", **run_tags(trainer, name), **(tags or {})}
    if parent_run_id:
        run_tags_["mlflow.parentRunId"] = parent_run_id
    run = cl.create_run(exp_id, tags=run_tags_)
    run_id = run.info.run_id
    trainer.out_dir = os.path.abspath(os.path.join(out_root, run_id))
    try:
        _log_run_inputs(cl, run_id, trainer, name, overrides)
    except BaseException:
        cl.set_terminated(run_id, "FAILED")
        raise
    return run_id, _train_tracked(cl, run_id, trainer, progress)


def resume(run_id: str, uri: str, out_root: str = "runs", callbacks=(), progress: bool = True) -> dict:
    """Continue a KILLED or FAILED run from its last checkpoint, in the same run."""
    cl = client(uri)
    run = get_run(cl, run_id)
    if run.info.status not in ("KILLED", "FAILED"):
        raise TrackingError(f"run {run_id} is {run.info.status}; only KILLED or FAILED runs can be resumed")
    cfg = logged_config(cl, run_id)
    ckpt = run.data.tags.get("checkpoint_path", "")
    if not os.path.exists(ckpt):
        try:
            ckpt = cl.download_artifacts(run_id, "checkpoint/checkpoint.npz", tempfile.mkdtemp(prefix="resume-"))
        except Exception:
            raise TrackingError(f"run {run_id} has no checkpoint to resume from") from None
    out_dir = os.path.abspath(os.path.join(out_root, run_id))
    trainer = Trainer(cfg, out_dir, list(callbacks), resume=ckpt)
    cl.update_run(run_id, status="RUNNING")
    cl.set_tag(run_id, "resumed_from_step", str(trainer.model.step))
    return _train_tracked(cl, run_id, trainer, progress)


def get_run(cl, run_id: str):
    try:
        return cl.get_run(run_id)
    except Exception:
        raise TrackingError(f"unknown run id {run_id!r} in this tracking store") from None


def logged_config(cl, run_id: str) -> Config:
    """The run's config, rebuilt from its logged config.json artifact alone."""
    try:
        path = cl.download_artifacts(run_id, "config.json", tempfile.mkdtemp(prefix="cfg-"))
    except Exception:
        raise TrackingError(f"run {run_id} has no config.json artifact") from None
    with open(path) as f:
        return Config.from_json(f.read())


def _log_run_inputs(cl, run_id, trainer, name, overrides):
    from mlflow.entities import Param
    params = [Param(k, str(v)) for k, v in sorted(trainer.cfg.flat().items())]
    params += [Param("experiment", name), Param("overrides", json.dumps(list(overrides)))]
    for i in range(0, len(params), 100):
        cl.log_batch(run_id, params=params[i:i + 100])
    cl.set_tag(run_id, "checkpoint_path", os.path.join(trainer.out_dir, "checkpoint.npz"))
    log_dataset(cl, run_id, trainer)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "config.json")
        with open(path, "w") as f:
            f.write(trainer.cfg.to_json())
        cl.log_artifact(run_id, path)


def _train_tracked(cl, run_id, trainer, progress) -> dict:
    logger = MlflowLogger(cl, run_id)
    if trainer.model.step > 0:  # resumed: the tables and curves cover the whole run
        logger.restore(trainer.model.step)
    trainer.callbacks.append(logger)
    update, bar = make_progress(trainer.cfg.train.steps, trainer.model.step) if progress else (None, None)
    handlers = {s: signal.signal(s, lambda *_: trainer.request_stop()) for s in (signal.SIGINT, signal.SIGTERM)}
    status, summary = "FAILED", {"status": "failed", "run_id": run_id}
    try:
        summary = trainer.train(update)
        summary["run_id"] = run_id
        status = "FINISHED" if summary["status"] == "finished" else "KILLED"  # killed or pruned
        if summary["status"] == "pruned":
            cl.set_tag(run_id, "pruned", "true")
    except BaseException as exc:
        msg = f"{type(exc).__name__}: {exc}".splitlines()[0]
        summary = {"status": "failed", "run_id": run_id, "error": msg}
        try:
            cl.set_tag(run_id, "error", msg[:5000])
        except Exception:
            pass
        if isinstance(exc, KeyboardInterrupt):
            status, summary["status"] = "KILLED", "killed"
        if not isinstance(exc, (TrainingError, KeyboardInterrupt)):
            raise
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        if bar is not None:
            bar.close()
        try:
            logger.finish(trainer.checkpoint_path())
        finally:
            cl.set_terminated(run_id, status)
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.run", description=__doc__.splitlines()[0])
    ap.add_argument("name", nargs="?", help="experiment name (see --list)")
    ap.add_argument("--list", action="store_true", help="list the named experiments")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    ap.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    ap.add_argument("--experiment-name", default=DEFAULT_EXPERIMENT, help="MLflow experiment to log into")
    ap.add_argument("--resume", metavar="RUN_ID", help="continue a KILLED or FAILED run")
    ap.add_argument("--out", default="runs", help="directory for checkpoints (OUT/<run id>/)")
    args = ap.parse_args(argv)
    if args.list:
        width = max(map(len, presets.EXPERIMENTS))
        for e in presets.EXPERIMENTS.values():
            print(f"{e.name:<{width}}  {e.description}")
        return 0
    if not args.name and not args.resume:
        ap.error("give an experiment NAME, --list or --resume RUN_ID")
    uri = resolve_tracking_uri(args.tracking_uri)
    try:
        # the cheap checks first: a typo must not create or migrate a store
        cfg = None if args.resume else apply_overrides(presets.get(args.name).config(), args.set)
        check_store(uri)
        if args.resume:
            summary = resume(args.resume, uri, args.out)
            run_id = args.resume
        else:
            run_id, summary = launch(cfg, args.name, args.set, uri, args.experiment_name, args.out)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if summary.get("error"):
        print(f"error: {summary['error']}", file=sys.stderr)
    print(run_id, flush=True)
    return {"finished": 0, "killed": 130}.get(summary["status"], 1)


if __name__ == "__main__":
    sys.exit(main())
