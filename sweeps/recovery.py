"""What a sweep does when a process stops in the middle of a trial.

    python -m sweeps.run lr_balance --trials 20      # run again after a crash: it recovers first

Killed outright (SIGKILL, out of memory, power loss), a worker cannot end its
trial: the trial stays RUNNING in Optuna and its MLflow runs stay RUNNING.
Optuna's own heartbeat exists only for RDB storages on a server (PostgreSQL,
MySQL; `study.StaleTrialHandler`); SQLite and the journal file have none in
Optuna 5 (optuna/optuna#6615). So every trial records its owner
(`experiments.liveness.owner()`, user attr `owner`) and a heartbeat (user
attr `heartbeat`, refreshed by a `Heartbeat` thread every BEAT_S),
and `reap_stale_trials`, run at the start of a sweep, before each trial and
by the parent of --workers when a child dies, marks the RUNNING trials of a
dead owner FAIL (user attr `error` says why), their MLflow runs FAILED, and
enqueues the same parameters again, at most study.MAX_RETRY times, with
Optuna's retry attributes (system attrs `failed_trial`, `retry_history`,
as `RetryHeartbeatStaleTrialCallback` writes them) and user attr `retry_of`.

Ctrl+C and SIGTERM are a `STOP` request: a flag read between trials and
repeats (and by the trainer's callback), never an exception raised at an
arbitrary point, which could leave a trial RUNNING. The stopped trial is FAIL
("interrupted ...") and enqueued again, so that resuming evaluates it.
"""
from __future__ import annotations

import signal
import sys

import optuna
from optuna.trial import TrialState

from experiments import liveness
from experiments.tracking import owner_tags

OWNER_ATTR = liveness.OWNER_TAG          # trial user attr: host:pid:start of the worker running it
HEARTBEAT_ATTR = liveness.HEARTBEAT_TAG  # trial user attr: ms since the epoch, refreshed while it runs
ERROR_ATTR = "error"                     # trial user attr: why the trial failed, one line
RETRY_ATTR = "retry_of"                  # trial user attr: the number of the trial it repeats
INTERRUPTED = "interrupted"              # how ERROR_ATTR starts for a trial stopped by Ctrl+C / SIGTERM
_NOT_COPIED = (OWNER_ATTR, HEARTBEAT_ATTR, ERROR_ATTR, RETRY_ATTR, "mlflow_run_id")
BEAT_S = liveness.HEARTBEAT_S / 2        # a live worker refreshes its heartbeats this often


def one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:1000]


# -- Ctrl+C / SIGTERM ----------------------------------------------------------------------------
class Interrupted(Exception):
    """The trial stopped because the sweep was asked to stop (an Exception, so that Optuna
    records the trial FAIL and returns from optimize instead of re-raising)."""


class StopRequest:
    """SIGINT/SIGTERM set a flag; the sweep stops at its next check."""

    def __init__(self):
        self.signum: int | None = None
        self.killed = False    # a repeat reported status "killed" (the trainer's own handler got the signal)

    def __call__(self, signum, frame=None):
        self.signum = signum

    def install(self) -> dict:
        """Clears the flag and takes over both signals; returns the handlers to restore."""
        self.clear()
        return {s: signal.signal(s, self) for s in (signal.SIGINT, signal.SIGTERM)}

    @staticmethod
    def restore(previous: dict):
        for s, handler in previous.items():
            signal.signal(s, handler)

    @property
    def requested(self) -> bool:
        return self.signum is not None or self.killed

    def reason(self) -> str:
        name = signal.Signals(self.signum).name if self.signum is not None else "SIGINT/SIGTERM"
        return f"{INTERRUPTED} by {name}"

    def check(self):
        if self.requested:
            raise Interrupted(self.reason())

    def clear(self):
        self.signum, self.killed = None, False


STOP = StopRequest()


# -- the owner's heartbeat -----------------------------------------------------------------------
def stamp() -> dict:
    """The owner and heartbeat user attrs a trial gets as soon as its worker starts it."""
    return {OWNER_ATTR: liveness.owner(), HEARTBEAT_ATTR: liveness.now_ms()}


def run_stamp() -> dict:
    """The same as MLflow tags, for the trial and parent runs a sweep creates itself."""
    return owner_tags()


class Heartbeat(liveness.Heartbeat):
    """liveness.Heartbeat at the sweep's interval (BEAT_S) unless told otherwise."""

    def __init__(self, *beats, interval: float | None = None):
        super().__init__(*beats, interval=BEAT_S if interval is None else interval)


# -- trials whose worker died ------------------------------------------------------------------------
def _optuna_has_heartbeat(study) -> bool:
    # RDB storages on a server run Optuna's heartbeat (study.StaleTrialHandler retries their trials)
    get = getattr(study._storage, "get_heartbeat_interval", None)
    return bool(get and get())


def reap_stale_trials(study, tracking_uri: str | None, max_retry: int | None = None) -> list[tuple[int, int | None]]:
    """Every RUNNING trial whose owner is gone (liveness.is_stale) becomes FAIL, its MLflow
    trial run and repeat runs FAILED, and it is enqueued again (same parameters) unless it
    has been retried max_retry times. Returns (failed trial, its retry's number or None)."""
    from .study import MAX_RETRY
    max_retry = MAX_RETRY if max_retry is None else max_retry
    if _optuna_has_heartbeat(study):
        return []
    storage = study._storage  # another worker's trial: Study/Trial have no public setter for it
    done = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = t.user_attrs.get(OWNER_ATTR)
        if not liveness.is_stale(owner, t.user_attrs.get(HEARTBEAT_ATTR)):
            continue
        reason = (f"worker died: {liveness.describe(owner)} ended without finishing the trial "
                  "(killed, out of memory or power loss)")
        try:
            storage.set_trial_user_attr(t._trial_id, ERROR_ATTR, reason)
            if not storage.set_trial_state_values(t._trial_id, TrialState.FAIL):
                continue
        except (optuna.exceptions.UpdateFinishedTrialError, KeyError, RuntimeError):
            continue  # another worker reaped it first
        if tracking_uri:
            _fail_runs(study, tracking_uri, t, reason)
        done.append((t.number, retry(study, t, max_retry)))
    return done


def _fail_runs(study, tracking_uri: str, t, reason: str):
    from experiments.tracking import client

    from .study import fail_orphans
    try:
        cl = client(tracking_uri)
        rid = t.user_attrs.get("mlflow_run_id")
        ids = [rid] if rid else []
        parent = study.user_attrs.get("mlflow_parent_run_id")
        if not rid and parent:  # killed between creating its run and recording the run id
            exp = cl.get_run(parent).info.experiment_id
            ids = [r.info.run_id for r in cl.search_runs(
                [exp], f"tags.mlflow.parentRunId = '{parent}' and tags.trial_number = '{t.number}'")]
        for run_id in ids:
            fail_orphans(cl, run_id, reason)
    except Exception as exc:  # the Optuna side is settled; the runs' owner tags let a later reaper finish
        print(f"note: trial {t.number}: its MLflow runs could not be marked FAILED ({one_line(exc)})",
              file=sys.stderr)


def retry(study, t, max_retry: int) -> int | None:
    """Enqueue trial `t`'s parameters again (WAITING: the next trial any worker asks for);
    returns the new trial's number, None once `t`'s line was retried max_retry times."""
    history = [*t.system_attrs.get("retry_history", []), t.number]
    if len(history) > max_retry:
        return None
    user_attrs = {k: v for k, v in t.user_attrs.items() if k not in _NOT_COPIED}
    user_attrs[RETRY_ATTR] = t.number
    system_attrs = {k: v for k, v in t.system_attrs.items() if k not in ("failed_trial", "retry_history")}
    system_attrs.update(failed_trial=t.system_attrs.get("failed_trial", t.number), retry_history=history)
    study.add_trial(optuna.trial.create_trial(state=TrialState.WAITING, params=t.params,
                                              distributions=t.distributions, user_attrs=user_attrs,
                                              system_attrs=system_attrs))
    for other in reversed(study.get_trials(deepcopy=False)):
        if other.system_attrs.get("retry_history") == history:
            return other.number
    return None
