"""Who owns a RUNNING run or trial, and whether that owner is still alive.

    python -c "from experiments.liveness import owner; print(owner())"

A process that dies without a chance to clean up (SIGKILL, out of memory,
power loss) leaves its MLflow run RUNNING and its Optuna trial RUNNING. Every
run and trial this harness starts records its owner, `host:pid:start` (start =
the process start time in clock ticks since boot, from /proc, so that a pid
reused by another process is not taken for the owner), and a heartbeat (ms
since the epoch) that the owner refreshes while it works. Another process
then decides:

- owner on this host: alive iff a process with that pid and start time exists
  (exact, no waiting);
- owner on another host: stale iff its heartbeat is older than GRACE_S.
"""
from __future__ import annotations

import os
import socket
import threading
import time

HEARTBEAT_S = 20.0   # how often a live owner refreshes its heartbeat (at most)
GRACE_S = 120.0      # an owner on another host whose heartbeat is older than this is dead
OWNER_TAG = "owner"
HEARTBEAT_TAG = "heartbeat"


def host() -> str:
    return socket.gethostname()


def process_start(pid: int) -> str:
    """The start time of process `pid` (clock ticks since boot), "" if unknown or gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
    except OSError:
        return ""
    # the command name (field 2) may hold spaces and parentheses: split after the last ')'
    fields = stat[stat.rfind(")") + 2:].split()
    return fields[19] if len(fields) > 19 else ""


def owner(pid: int | None = None) -> str:
    pid = os.getpid() if pid is None else pid
    return f"{host()}:{pid}:{process_start(pid)}"


def now_ms() -> int:
    return int(time.time() * 1000)


def owner_alive(owner_: str) -> bool | None:
    """True/False for an owner on this host; None when it cannot be told from here."""
    try:
        h, pid, start = owner_.rsplit(":", 2)
        pid_ = int(pid)
    except ValueError:
        return None
    if h != host():
        return None
    if not os.path.exists("/proc/self/stat"):  # no /proc (not Linux): ask the kernel for the pid only
        try:
            os.kill(pid_, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    current = process_start(pid_)
    if not current:
        return False
    if current != start and start:
        return False  # the pid now belongs to another process
    return not _zombie(pid_)


def _zombie(pid: int) -> bool:
    """A killed child its parent has not reaped yet is dead for our purposes."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
    except OSError:
        return True
    fields = stat[stat.rfind(")") + 2:].split()
    return bool(fields) and fields[0] in ("Z", "X")


def is_stale(owner_: str | None, heartbeat_ms: str | int | float | None, grace_s: float = GRACE_S) -> bool:
    """Whether the owner of a RUNNING record is gone. No owner recorded: not ours to judge."""
    if not owner_:
        return False
    alive = owner_alive(owner_)
    if alive is not None:
        return not alive
    try:
        beat = float(heartbeat_ms)
    except (TypeError, ValueError):
        return False
    return now_ms() - beat > grace_s * 1000


def describe(owner_: str) -> str:
    try:
        h, pid, _ = owner_.rsplit(":", 2)
        return f"pid {pid} on {h}"
    except ValueError:
        return owner_


class Heartbeat:
    """Calls every `beat` each `interval` seconds on a daemon thread while the block runs.
    A beat that fails (a store busy for a moment) is skipped: the next one may succeed,
    and a missed heartbeat must never fail the work it describes."""

    def __init__(self, *beats, interval: float | None = None):
        self.beats, self.interval = beats, HEARTBEAT_S if interval is None else interval
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def beat(self):
        for b in self.beats:
            try:
                b()
            except Exception:
                pass

    def _run(self):
        while not self._done.wait(self.interval):
            self.beat()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join(timeout=5)  # a beat stuck in a store retry ends on its own (daemon)
