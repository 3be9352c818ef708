"""Optuna pieces of a sweep: storage, sampler, pruner, the MLflow parent run,
and the objective that trains one trial (R seeds) through the runner.

MLflow layout: one parent run per study; under it one child run per trial
(tags trial_number, trial_state; metric `objective`); under each trial one
grandchild run per repeat (a complete tracked training run, tag `repeat`).
"""
from __future__ import annotations

import os
import statistics
import sys
import time

import optuna
from optuna.trial import TrialState

from engine.config import ConfigError, apply_overrides, with_overrides
from engine.tasks import task_of
from experiments import liveness, presets
from experiments import run as runner
from experiments.tracking import TrackingError, client, experiment_id, sql_driver_url
from engine.train import Callback

from .recovery import ERROR_ATTR, HEARTBEAT_ATTR, STOP, Heartbeat, Interrupted, one_line, run_stamp, stamp

HEARTBEAT_S = 10      # PostgreSQL/MySQL: a live worker's trial heartbeat
GRACE_S = 30          # ... a trial without a heartbeat for this long belongs to a dead worker
MAX_RETRY = 2         # times a dead worker's trial is retried
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)
STORE_RETRIES = 2     # a repeat that hit a tracking-store race (unique key, lock) is started again this often


class SweepError(RuntimeError):
    """The sweep cannot start or go on; the message is one line."""


# -- storage, sampler, pruner ------------------------------------------------------------------
def default_storage(workers: int) -> str:
    return "sqlite:///optuna.db" if workers <= 1 else "journal:optuna-journal.log"


def make_storage(url: str, tracking_uri: str):
    """An Optuna storage for `url`: sqlite:/// (one worker), journal:PATH (several
    workers on one machine), postgresql:// or mysql:// (several machines; heartbeats).
    A bare postgresql:// gets the installed driver (`experiments.tracking.sql_driver_url`);
    its password belongs in PGPASSFILE / ~/.pgpass or PGPASSWORD, which libpq reads."""
    if url.startswith("journal:") or url.endswith(".log"):
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend
        path = url[len("journal:"):] if url.startswith("journal:") else url
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise SweepError(f"journal storage {url}: directory {parent} does not exist")
        return JournalStorage(JournalFileBackend(path))
    import warnings
    from optuna.storages import RDBStorage
    try:
        url = sql_driver_url(url)
    except TrackingError as exc:
        raise SweepError(f"storage {exc}") from None
    kwargs = {}
    if not url.startswith("sqlite"):
        kwargs = dict(heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                      heartbeat_stale_trial_callback=StaleTrialHandler(tracking_uri))
    try:
        with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna 5: say it once, in the README
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(url, engine_kwargs={"pool_pre_ping": True}, **kwargs)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SweepError(f"storage {redact(url)} cannot be used ({hide_password(first[:300], url)})") from None


def redact(url: str) -> str:
    """The URL without its password (it goes into tags and messages): user:***@host, and
    password=*** in the query (libpq reads one there too)."""
    import re
    if "://" in url and "@" in url:
        scheme, rest = url.split("://", 1)
        cred, host = rest.rsplit("@", 1)
        if ":" in cred:
            url = f"{scheme}://{cred.split(':', 1)[0]}:***@{host}"
    return re.sub(r"([?&]password=)[^&]*", r"\1***", url)


def url_password(url: str) -> str | None:
    """The password written in `url` (user:PASSWORD@ or ?password=), else None."""
    import re
    from urllib.parse import unquote
    if "://" in url and "@" in url:
        cred = url.split("://", 1)[1].rsplit("@", 1)[0]
        if ":" in cred:
            return unquote(cred.split(":", 1)[1]) or None
    m = re.search(r"[?&]password=([^&]*)", url)
    return (unquote(m.group(1)) or None) if m else None


def hide_password(text: str, url: str) -> str:
    """`text` (e.g. a driver's error, which may quote the URL) with the URL's password masked."""
    pw = url_password(url)
    if not pw:
        return text
    from urllib.parse import quote
    for form in {pw, quote(pw, safe="")}:
        text = text.replace(form, "***")
    return text


def make_sampler(seed: int | None):
    return optuna.samplers.TPESampler(seed=seed)


def make_pruner(name: str, steps: int, eval_every: int, repeats: int):
    if name == "median":  # no pruning in the first quarter of a run: early losses rank poorly
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=max(eval_every, steps // 4))
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=eval_every, max_resource=steps * repeats)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise SweepError(f"unknown pruner {name!r}: median, hyperband or none")


def describe(obj) -> str:
    keys = ("_seed", "_n_startup_trials", "_n_warmup_steps", "_min_resource", "_max_resource",
            "_reduction_factor", "_multivariate", "_constant_liar")
    attrs = {k.strip("_"): getattr(obj, k) for k in keys if hasattr(obj, k)}
    return f"{type(obj).__name__}({', '.join(f'{k}={v}' for k, v in attrs.items())})"


def finished_count(study) -> int:
    return len(study.get_trials(deepcopy=False, states=COUNTED))


# -- checks made before anything is created --------------------------------------------------------
STORAGE_FORMS = "sqlite:///PATH, journal:PATH, postgresql://… or mysql://…"


def _journal_path(url: str) -> str | None:
    if url.startswith("journal:"):
        return url[len("journal:"):]
    return url if url.endswith(".log") else None


def _sqlite_path(url: str) -> str | None:
    """The database file of a sqlite URL ("" for in-memory), None for other URLs."""
    from sqlalchemy.engine import make_url
    try:
        u = make_url(url)
    except Exception:
        raise SweepError(f"storage {redact(url)} is not a storage URL ({STORAGE_FORMS})") from None
    if u.get_backend_name() != "sqlite":
        return None
    return "" if u.database in (None, "", ":memory:") else u.database


def check_storage_url(url: str) -> None:
    """The storage URL's shape and, for a file, its folder: a typo must not leave a file behind."""
    path = _journal_path(url)
    if path is None:
        path = _sqlite_path(url)
    elif not path:
        raise SweepError(f"journal storage {url}: no file named ({STORAGE_FORMS})")
    if path:
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise SweepError(f"storage {url}: directory {folder} does not exist")
        if os.path.isdir(path):
            raise SweepError(f"storage {url}: {path} is a directory")


def storage_exists(url: str) -> bool:
    """False when the URL names a local file (sqlite, journal) that is not there; True otherwise
    (a server's database is only known once connected)."""
    path = _journal_path(url)
    if path is None:
        path = _sqlite_path(url)
    return not path or os.path.isfile(path)


def check_fixed(space, fixed: list[str]):
    """--set: no key the space searches, known keys, valid values. Returns the base config."""
    searched = {p.key for p in space.params}
    clash = [o.split("=", 1)[0].strip() for o in fixed if o.split("=", 1)[0].strip() in searched]
    if clash:
        raise SweepError(f"--set {clash[0]} fixes a key the space '{space.name}' searches")
    return base_config(space, fixed)


# -- MLflow runs of a study ----------------------------------------------------------------------
def parent_run(cl, exp_name: str, study, tags: dict) -> str:
    """The study's parent MLflow run: reused when the study comes back, else created."""
    rid = study.user_attrs.get("mlflow_parent_run_id")
    if rid:
        try:
            cl.get_run(rid)
        except Exception:
            rid = None  # another tracking store: make a new parent there
    if rid:
        for key, value in run_stamp().items():  # this process owns it now (before it is RUNNING again)
            cl.set_tag(rid, key, value)
        cl.update_run(rid, status="RUNNING")
        return rid
    run = cl.create_run(experiment_id(cl, exp_name),
                        tags={"mlflow.runName": f"study-{study.study_name}", **tags, **run_stamp()})
    study.set_user_attr("mlflow_parent_run_id", run.info.run_id)
    return run.info.run_id


def fail_orphans(cl, run_id: str, reason: str):
    """Mark a trial's run and any of its repeat runs still RUNNING as FAILED (a run another
    process's reaper ended meanwhile keeps its reason); the trial run's trial_state becomes FAIL."""
    try:
        run = cl.get_run(run_id)
    except Exception:
        return
    kids = cl.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
    for r in [run, *kids]:
        if r.info.status == "RUNNING":
            cl.set_tag(r.info.run_id, "error", reason)
            cl.set_terminated(r.info.run_id, "FAILED")
    if run.data.tags.get("trial_state", "RUNNING") == "RUNNING":
        cl.set_tag(run_id, "trial_state", "FAIL")


class StaleTrialHandler:
    """Heartbeat callback: a trial whose worker died is retried (Optuna's
    RetryFailedTrialCallback) and its orphaned MLflow runs are marked FAILED."""

    def __init__(self, tracking_uri: str):
        self.tracking_uri = tracking_uri
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self.retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)

    def __call__(self, study, trial):
        self.retry(study, trial)
        rid = trial.user_attrs.get("mlflow_run_id")
        if rid:
            fail_orphans(client(self.tracking_uri), rid, f"worker died: no heartbeat for {GRACE_S} s")


# -- the objective -------------------------------------------------------------------------------------
class _Report(Callback):
    """Hands every evaluation's objective (the task's: validation loss for character LMs) to
    the trial; asks the trainer to stop when the pruner says so."""

    def __init__(self, trial, offset: int, metric: str | None = None):
        self.trial, self.offset, self.trainer, self.metric = trial, offset, None, metric

    def on_start(self, trainer):
        self.trainer = trainer
        if STOP.requested:  # the signal came before the trainer's own handler was installed
            trainer.request_stop()

    def on_log(self, rec):
        if STOP.requested:
            self.trainer.request_stop()

    def on_eval(self, rec):
        self.trial.report(rec[self.metric or self.trainer.task.objective], step=self.offset + rec["step"])
        if self.trial.should_prune():
            self.trainer.request_stop("pruned")


def objective_metric(space, cfg, metric: str | None = None) -> str:
    """The evaluation metric a sweep scores trials on (maximised or minimised by its direction,
    engine.tasks): `metric`, else the space's objective, else the task's. One-line error if the
    task has no such metric."""
    task = task_of(cfg)
    name = metric or getattr(space, "objective", "") or task.objective
    names = [m.name for m in task.metrics]
    if name not in names:
        raise SweepError(f"unknown objective {name!r} for task {task.name!r}{presets.did_you_mean(name, names)}; "
                         f"one of {', '.join(names)}")
    return name


def base_config(space, fixed: list[str]):
    """The base experiment's config with the sweep's fixed --set overrides."""
    return apply_overrides(presets.get(space.base).config(), fixed)


class Objective:
    """Trains one trial: `repeats` seeds of the base experiment with the
    suggested values; the value is the mean of their best validation losses.
    A failed trial's reason is its user attr `error` (Optuna itself records only FAIL)."""

    def __init__(self, space, fixed: list[str], repeats: int, tracking_uri: str, exp_name: str,
                 parent_id: str, out_root: str = "runs", metric: str | None = None):
        self.space, self.fixed, self.repeats = space, list(fixed), repeats
        self.uri, self.exp_name, self.parent_id, self.out_root = tracking_uri, exp_name, parent_id, out_root
        self.base_cfg = check_fixed(space, self.fixed)  # validates --set now
        # the metric the trials are scored on: --objective, else the space's, else the task's
        self.metric = objective_metric(space, self.base_cfg, metric)

    def config(self, params: dict, repeat: int):
        cfg = with_overrides(self.base_cfg, params)
        return with_overrides(cfg, {"seed": self.base_cfg.seed + repeat})

    def __call__(self, trial) -> float:
        for key, value in stamp().items():  # first: from here on a dead worker's trial can be told
            trial.set_user_attr(key, value)
        try:
            STOP.check()
            return self._tracked(trial, self.space.suggest(trial))
        except optuna.TrialPruned:
            raise
        except BaseException as exc:
            try:
                trial.set_user_attr(ERROR_ATTR, reason(exc))
            except Exception:
                pass
            if isinstance(exc, Interrupted):  # the sweep stops: Optuna's "Trial N failed" traceback is no news
                optuna.logging.set_verbosity(optuna.logging.ERROR)
            raise

    def _tracked(self, trial, params: dict) -> float:
        cl = client(self.uri)
        child = cl.create_run(experiment_id(cl, self.exp_name), tags={
            "mlflow.parentRunId": self.parent_id, "mlflow.runName": f"trial-{trial.number}",
            "trial_number": str(trial.number), "optuna_study": trial.study.study_name,
            "trial_state": "RUNNING", **run_stamp()}).info.run_id
        trial.set_user_attr("mlflow_run_id", child)
        from mlflow.entities import Param
        cl.log_batch(child, params=[Param(k, repr(v)) for k, v in params.items()] +
                     [Param("repeats", str(self.repeats)), Param("fixed", " ".join(self.fixed))])
        beats = (lambda: trial.set_user_attr(HEARTBEAT_ATTR, liveness.now_ms()),
                 lambda: cl.set_tag(child, liveness.HEARTBEAT_TAG, str(liveness.now_ms())))
        try:
            with Heartbeat(*beats):
                value = self._train(trial, params, cl, child)
        except optuna.TrialPruned:
            _end_run(cl, child, "PRUNED", "KILLED")
            raise
        except (Interrupted, KeyboardInterrupt):  # Ctrl+C / SIGTERM: the sweep stops
            _end_run(cl, child, "KILLED", "KILLED")
            raise
        except BaseException as exc:
            _end_run(cl, child, "FAIL", "FAILED", error=reason(exc))
            raise
        _end_run(cl, child, "COMPLETE", "FINISHED", objective=value)
        return value

    def _train(self, trial, params, cl, child) -> float:
        bests = []
        for r in range(self.repeats):
            STOP.check()
            summary = self._repeat(trial, params, r, child)
            if summary["status"] == "pruned":
                raise optuna.TrialPruned(f"pruned in repeat {r}")
            if summary["status"] == "killed":  # a signal stopped the repeat: stop the sweep, not just the trial
                STOP.killed = True
                raise Interrupted(STOP.reason())
            if summary["status"] != "finished":
                raise RepeatFailed(f"{summary.get('error') or 'ended ' + summary['status']} "
                                   f"(repeat {r}, run {summary.get('run_id')})")
            task, m = task_of(self.base_cfg), self.metric
            best = task.metric(m).best(h[m] for h in summary["history"])
            bests.append(best)
            cl.log_metric(child, f"best_{m}", best, step=r)
        return statistics.fmean(bests)

    def _repeat(self, trial, params, r: int, child) -> dict:
        """One repeat as its own tracked run; started again when the tracking store lost a race."""
        cfg = self.config(params, r)
        overrides = [f"{k}={v}" for k, v in params.items()] + self.fixed + [f"seed={cfg.seed}"]
        for attempt in range(STORE_RETRIES + 1):
            report = _Report(trial, offset=r * cfg.train.steps, metric=self.metric)
            try:
                _, summary = runner.launch(cfg, self.space.base, overrides, self.uri, self.exp_name, self.out_root,
                                           tags={"trial_number": str(trial.number), "repeat": str(r)},
                                           parent_run_id=child, callbacks=[report], progress=False)
                return summary
            except Exception as exc:
                if not store_race(exc) or attempt == STORE_RETRIES or STOP.requested:
                    raise
                print(f"note: trial {trial.number} repeat {r}: the tracking store lost a race "
                      f"({one_line(exc)[:200]}); starting the repeat again", file=sys.stderr, flush=True)
                time.sleep(0.5 * (attempt + 1))


class RepeatFailed(RuntimeError):
    """A repeat's training run ended FAILED; the message is that run's error line."""


def reason(exc: BaseException) -> str:
    """Why a trial failed, one line: our own exceptions' messages say it already."""
    return str(exc) if isinstance(exc, (Interrupted, RepeatFailed)) else one_line(exc)


def store_race(exc: BaseException) -> bool:
    """A concurrent-write conflict of the store (several workers at once), not a fault of the trial."""
    marks = ("unique constraint", "integrityerror", "database is locked", "deadlock", "could not serialize")
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if any(m in f"{type(exc).__name__}: {exc}".lower() for m in marks):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _end_run(cl, run_id: str, trial_state: str, status: str, error: str | None = None,
             objective: float | None = None):
    """The trial run's last writes; a store failure here is reported, never the trial's failure."""
    try:
        if objective is not None:
            cl.log_metric(run_id, "objective", objective)
        if error:
            cl.set_tag(run_id, "error", error[:5000])
        cl.set_tag(run_id, "trial_state", trial_state)
        cl.set_terminated(run_id, status)
    except Exception as exc:
        print(f"note: MLflow run {run_id} could not be ended {status} ({one_line(exc)[:300]})",
              file=sys.stderr, flush=True)


USER_ERRORS = (SweepError, ConfigError, TrackingError, presets.UnknownExperiment)
