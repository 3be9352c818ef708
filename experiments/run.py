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
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # the run id is stdout's last line; no URI
import signal
import sys
import tempfile
import time

from engine.checkpoint import CheckpointError, check_out_dir
from engine.config import Config, ConfigError, apply_overrides
from engine.data import DataError
from engine.device import DeviceError
from engine.train import Trainer, TrainingError, make_progress, progress_unit

from . import liveness, presets
from .tracking import MlflowLogger, TrackingError, check_store, client, experiment_id, log_dataset, \
    display_uri, owner_tags, reap_stale_runs, resolve_tracking_uri, run_is_stale, run_tags

DEFAULT_EXPERIMENT = "hybrid-lm"
USER_ERRORS = (presets.UnknownExperiment, ConfigError, DataError, CheckpointError, DeviceError, TrackingError)
# what --resume RUN_ID --set may change: when training stops and how often it reports; nothing that
# changes the maths of the steps already taken (train.steps moves the cosine schedule's end: recorded)
RESUME_KEYS = ("train.steps", "train.eval_every", "train.log_every", "train.checkpoint_every", "train.profile")


def launch(cfg: Config, name: str, overrides: list[str], uri: str, experiment_name: str = DEFAULT_EXPERIMENT,
           out_root: str = "runs", tags: dict | None = None, parent_run_id: str | None = None,
           callbacks=(), progress: bool = True, trainer: Trainer | None = None) -> tuple[str, dict]:
    """Train `cfg` as a new MLflow run; returns (run id, summary with status). `trainer`: one
    already built for `cfg` (main builds it before touching the store, so that bad data or a
    model too large for the device are refused with no store created)."""
    if trainer is None:
        trainer = Trainer(cfg, None, list(callbacks))
        check_out_root(out_root, trainer)
    else:
        trainer.callbacks.extend(callbacks)
    cl = client(uri)
    exp_id = experiment_id(cl, experiment_name)
    reap_stale_runs(cl, [exp_id])
    # from here on a signal must not leave a RUNNING run: it asks the loop to stop
    stopper = _Stopper(trainer)
    before = {s: signal.signal(s, stopper) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        result = _launch_run(cl, exp_id, trainer, cfg, name, overrides, out_root, tags, parent_run_id, progress)
    finally:
        for s, h in before.items():
            signal.signal(s, h)
    if stopper.signals and result[1]["status"] == "finished":
        stopper.pass_on(before)
    return result


class _Stopper:
    """The signal handler while a run trains: asks the trainer to stop after the step. A signal
    that comes once the loop has ended (while the run's artifacts are written) can no longer stop
    it; it is passed on to the caller's handler (a sweep's stop request), not lost."""

    def __init__(self, trainer):
        self.trainer, self.signals = trainer, []

    def __call__(self, signum, frame=None):
        self.signals.append(signum)
        self.trainer.request_stop()

    def pass_on(self, handlers: dict):
        signum = self.signals[0]
        handler = handlers.get(signum)
        if callable(handler) and handler not in (signal.default_int_handler, _interrupt):
            handler(signum, None)


def _launch_run(cl, exp_id, trainer, cfg, name, overrides, out_root, tags, parent_run_id, progress):
    run_tags_ = {"mlflow.runName": f"{name}-s{cfg.seed}", **run_tags(trainer, name), **owner_tags(), **(tags or {})}
    if parent_run_id:
        run_tags_["mlflow.parentRunId"] = parent_run_id
    run = cl.create_run(exp_id, tags=run_tags_)
    run_id = run.info.run_id
    trainer.out_dir = os.path.abspath(os.path.join(out_root, run_id))
    try:
        _log_run_inputs(cl, run_id, trainer, name, overrides)
    except BaseException as exc:
        cl.set_terminated(run_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    return run_id, _train_tracked(cl, run_id, trainer, progress)


def resume(run_id: str, uri: str, out_root: str = "runs", callbacks=(), progress: bool = True,
           overrides: list[str] = ()) -> dict:
    """Continue a KILLED or FAILED run from its last checkpoint, in the same run; a RUNNING run
    whose process died (SIGKILL, out of memory) counts as FAILED. `overrides` may change only
    RESUME_KEYS; they are recorded in the tag `resume_overrides`."""
    cl = client(uri)
    run = get_run(cl, run_id)
    if run.info.status == "RUNNING" and run_is_stale(run):
        status = "FAILED"  # its process is gone: it will never end it
    elif run.info.status == "RUNNING" and run.data.tags.get(liveness.OWNER_TAG):
        who = liveness.describe(run.data.tags[liveness.OWNER_TAG])
        raise TrackingError(f"run {run_id} is still running ({who}); stop it first (Ctrl+C or kill -TERM)")
    else:
        status = run.info.status
    if status not in ("KILLED", "FAILED"):
        raise TrackingError(f"run {run_id} is {status}; only KILLED or FAILED runs can be resumed")
    logged = logged_config(cl, run_id)
    cfg = apply_resume_overrides(logged, overrides)
    out_dir = os.path.abspath(os.path.join(out_root, run_id))
    ckpt = intact_checkpoint(cl, run)
    trainer = Trainer(cfg, out_dir, list(callbacks), resume=ckpt)
    if cfg.train.steps < trainer.model.step:
        raise ConfigError(f"train.steps={cfg.train.steps} is below the checkpoint's step {trainer.model.step}")
    # from here on a signal asks the loop to stop (as in launch), and one that comes after the
    # loop (while the run writes its artifacts) is passed on to the caller's handler
    stopper = _Stopper(trainer)
    before = {s: signal.signal(s, stopper) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        summary = _resume_run(cl, run, run_id, trainer, overrides, progress)
    finally:
        for s, h in before.items():
            signal.signal(s, h)
    if stopper.signals and summary["status"] == "finished":
        stopper.pass_on(before)
    return summary


def _resume_run(cl, run, run_id, trainer, overrides, progress) -> dict:
    for key, value in owner_tags().items():   # claim the run before it is RUNNING again
        cl.set_tag(run_id, key, value)
    cl.update_run(run_id, status="RUNNING")
    cl.set_tag(run_id, "resumed_from_step", str(trainer.model.step))
    cl.set_tag(run_id, "checkpoint_path", trainer.checkpoint_path())  # where this process writes them now
    if overrides:
        record = json.loads(run.data.tags.get("resume_overrides", "[]"))
        record.append({"from_step": trainer.model.step, "set": list(overrides)})
        cl.set_tag(run_id, "resume_overrides", json.dumps(record))
    return _train_tracked(cl, run_id, trainer, progress)


def apply_resume_overrides(cfg: Config, overrides) -> Config:
    """The logged config with --set applied; a key outside RESUME_KEYS is refused by name."""
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key not in RESUME_KEYS:
            apply_overrides(cfg, [item])  # an unknown key or a bad value: its own message first
            raise ConfigError(f"--set {key} cannot change when resuming a run (it would change the steps "
                              f"already taken); resumable keys: {', '.join(RESUME_KEYS)}")
    return apply_overrides(cfg, list(overrides))


def intact_checkpoint(cl, run) -> str:
    """The run's local checkpoint if it loads, else the copy logged as an artifact."""
    from engine.checkpoint import load_checkpoint
    local, problem = run.data.tags.get("checkpoint_path", ""), None
    if local and os.path.exists(local):
        try:
            load_checkpoint(local)
            return local
        except CheckpointError as exc:
            problem = exc
            print(f"note: {exc}; trying the copy logged with the run", file=sys.stderr)
    try:
        logged = cl.download_artifacts(run.info.run_id, "checkpoint/checkpoint.npz", tempfile.mkdtemp(prefix="resume-"))
        load_checkpoint(logged)
        return logged
    except CheckpointError as exc:
        raise TrackingError(f"run {run.info.run_id}: no intact checkpoint to resume from (local: {problem}; "
                            f"logged: {exc})") from None
    except Exception:
        raise TrackingError(f"run {run.info.run_id} has no checkpoint to resume from"
                            + (f" ({problem})" if problem else "")) from None


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
    update, bar = (make_progress(trainer.cfg.train.steps, trainer.model.step, unit=progress_unit(trainer.task))
                   if progress else (None, None))
    outer = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    stopper = next((h for h in outer.values() if isinstance(h, _Stopper)), None) or _Stopper(trainer)
    handlers = {s: signal.signal(s, stopper) for s in (signal.SIGINT, signal.SIGTERM)}
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
        if bar is not None:
            bar.close()
        try:  # a signal now (the loop has ended) must not cut the final writes short: the stopper keeps it
            logger.finish(trainer.checkpoint_path())
        finally:
            cl.set_terminated(run_id, status)
            for s, h in handlers.items():
                signal.signal(s, h)
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.run", description=__doc__.splitlines()[0])
    ap.add_argument("name", nargs="?", help="experiment name (see --list)")
    ap.add_argument("--list", action="store_true", help="list the named experiments")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key (with --resume: only " + ", ".join(RESUME_KEYS) + ")")
    ap.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    ap.add_argument("--experiment-name", default=DEFAULT_EXPERIMENT, help="MLflow experiment to log into")
    ap.add_argument("--resume", metavar="RUN_ID", help="continue a KILLED or FAILED run (or one whose process died)")
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
    t0 = time.monotonic()
    signal.signal(signal.SIGTERM, _interrupt)  # until training starts (then: stop after the step)
    try:
        # the cheap checks first: a typo must not create or migrate a store
        if args.resume:
            check_out_root(args.out)
            check_store(uri, create=False)  # resuming needs runs: never create an empty store
            summary = resume(args.resume, uri, args.out, overrides=args.set)
            run_id = args.resume
        else:
            cfg = apply_overrides(presets.get(args.name).config(), args.set)
            check_out_root(args.out)
            trainer = Trainer(cfg, None)   # data, device and memory checked before the store is touched
            check_out_root(args.out, trainer)
            check_store(uri)
            run_id, summary = launch(cfg, args.name, args.set, uri, args.experiment_name, args.out, trainer=trainer)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted before training started; no run was started", file=sys.stderr)
        return 130
    print(run_summary(uri, run_id, summary, time.monotonic() - t0), file=sys.stderr, flush=True)
    if summary.get("error"):  # the last line of standard error, as for every other error
        print(f"error: {summary['error']}", file=sys.stderr)
    print(run_id, flush=True)
    return {"finished": 0, "killed": 130}.get(summary["status"], 1)


def _interrupt(*_):
    raise KeyboardInterrupt


def check_out_root(out_root: str, trainer: Trainer | None = None) -> None:
    """The checkpoint folder can be written (before any store is touched) and, once the
    model is known, has room for two checkpoints (the temp file and the previous one)."""
    if trainer is None:
        check_out_dir(out_root, 0)
    else:
        check_out_dir(out_root, trainer.checkpoint_nbytes, trainer.checkpoint_files)


def run_summary(uri: str, run_id: str, summary: dict, seconds: float) -> str:
    """One line: how the run ended, its figures, where its files are and how to look at it."""
    final = summary.get("final") or {}
    status = summary.get("status", "?")
    if final.get("val_loss") is not None and "val_cos" in final:   # the sentence-embedding task
        figures = (f"val_loss {final['val_loss']:.4f}, val_cos {final['val_cos']:.4f}, val_r1 {final['val_r1']:.3f} "
                   f"at step {final['step']}, ")
    elif final.get("val_loss") is not None:
        figures = f"val_loss {final['val_loss']:.4f} nats ({final['val_bpc']:.3f} bpc) at step {final['step']}, "
    else:
        figures = f"step {summary['step']}, " if summary.get("step") is not None else ""
    if summary.get("early_stop"):
        figures = f"{summary['early_stop']['message']}; " + figures
    test = summary.get("test")
    if test and "test_cos" in test:
        figures += (f"test_cos {test['test_cos']:.4f} test_mse {test['test_mse']:.5f} test_r1 {test['test_r1']:.3f} "
                    f"(step {test['step']}), ")
    elif test:
        figures += f"test_loss {test['test_loss']:.4f} test_f1 {test['test_f1']:.4f} (step {test['step']}), "
    minutes, secs = divmod(int(round(seconds)), 60)
    ckpt = summary.get("checkpoint")
    where = f"checkpoints in {os.path.dirname(ckpt)}; " if ckpt else ""
    return (f"{status}: {figures}{minutes}:{secs:02d} wall; {where}view: {ui_hint(uri, run_id)}")


def ui_hint(uri: str, run_id: str) -> str:
    """How to open the run in the MLflow UI: the command for a local store, and the run's page."""
    exp_id = "<id>"
    try:
        exp_id = client(uri).get_run(run_id).info.experiment_id
    except Exception:
        pass
    page = f"#/experiments/{exp_id}/runs/{run_id}"
    if uri.startswith(("http://", "https://")):
        return f"{display_uri(uri).rstrip('/')}/{page}"
    return f"mlflow ui --backend-store-uri {display_uri(uri)}, then http://127.0.0.1:5000/{page}"


if __name__ == "__main__":
    sys.exit(main())
