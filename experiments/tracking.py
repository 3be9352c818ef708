"""MLflow plumbing for the runner: where runs go, what each run is tagged
with, and the engine callback that logs telemetry in batches.

The only package that talks to MLflow is `experiments` (engine/ reports
through `engine.train.Callback`). Metrics are sent with `log_batch` at
logging points only; histograms, samples and figures are artifacts.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from engine.train import Callback

from . import liveness

DEFAULT_URI = "sqlite:///mlflow.db"
REPO = Path(__file__).resolve().parent.parent
# Metrics whose values depend on the machine's load, not on the maths:
# reproduce and resume comparisons leave them out.
TIMING_PREFIXES = ("tokens_per_s", "kernel_ms/", "step_ms", "train_time_s")


class TrackingError(RuntimeError):
    """The tracking store cannot be used; the message is one line."""


def resolve_tracking_uri(flag: str | None) -> str:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db; a bare postgresql://
    gets the driver that is installed (`sql_driver_url`)."""
    uri = flag or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    return sql_driver_url(uri) if uri.startswith(("postgresql://", "postgres://")) else uri


def display_uri(uri: str) -> str:
    """The URI as it may be shown and logged: no password; a relative SQLite path made absolute."""
    from urllib.parse import urlsplit, urlunsplit
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + os.path.abspath(uri[len("sqlite:///"):])
    parts = urlsplit(uri)
    if parts.password is not None:
        host = parts.hostname or ""
        host = f"{host}:{parts.port}" if parts.port else host
        return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))
    return uri


def check_store(uri: str, timeout: float = 5.0, create: bool = True) -> None:
    """Fail fast, before any training, if the store cannot be reached. A local SQLite
    store that does not exist yet is created (atomically, see `prepare_sqlite_store`)
    only when `create`; commands that only read runs pass create=False."""
    if uri.startswith(("http://", "https://")):
        check_tracking_server(uri, timeout)
        return
    if uri.startswith("sqlite:///"):
        prepare_sqlite_store(uri, create)
    try:
        client(uri).search_experiments(max_results=1)
    except Exception as exc:  # MLflow raises many types; the user needs one line
        raise TrackingError(f"tracking store {display_uri(uri)} cannot be used ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''})") from None


# -- http(s) tracking servers: reachable, MLflow, credentials accepted ----------------------------------
SEARCH_ENDPOINT = "/api/2.0/mlflow/experiments/search"
CREDENTIAL_VARS = "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"


def check_tracking_server(uri: str, timeout: float = 5.0) -> None:
    """An http(s) tracking server answers, is an MLflow server, and accepts this client's
    credentials; else a one-line TrackingError. /health answers 200 without credentials on a
    basic-auth server (`mlflow server --app-name basic-auth`), so one authenticated API call
    follows (search one experiment) with the credentials MLflow itself sends:
    MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, ~/.mlflow/credentials,
    MLFLOW_TRACKING_TOKEN, or user:password@ in the URI. Messages never show the password."""
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request
    # MLflow prints "View run … at: <tracking URI>" to stdout at every set_terminated on an
    # http(s) store: the password too when it is in the URI, and stdout's last line must stay the run id
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    shown = display_uri(uri)
    try:
        with urllib.request.urlopen(_without_userinfo(uri).rstrip("/") + "/health", timeout=timeout) as r:
            if r.status != 200:
                raise TrackingError(f"tracking server {shown} answered /health with HTTP {r.status}")
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            raise TrackingError(f"tracking server {shown} answers but is not an MLflow tracking server "
                                f"(GET /health: HTTP 404)") from None
        if exc.code not in (401, 403):  # a proxy that asks for credentials: the API call says which
            raise TrackingError(f"tracking server {shown} answered /health with HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TrackingError(f"tracking server {shown} is unreachable ({reason})") from None
    try:
        resp = http_request(get_default_host_creds(uri), SEARCH_ENDPOINT, "GET", max_retries=0, backoff_factor=0,
                            timeout=timeout, raise_on_status=False, params={"max_results": 1})
    except Exception as exc:  # requests' connection errors and MLflow's wrappers of them
        raise TrackingError(f"tracking server {shown} is unreachable ({_first_line(exc)})") from None
    code = resp.status_code
    if code in (401, 403):
        raise TrackingError(credentials_message(uri, code, resp.text))
    try:
        body = resp.json()
    except ValueError:
        body = None
    if code == 200 and isinstance(body, dict) and set(body) <= {"experiments", "next_page_token"}:
        return
    if isinstance(body, dict) and "error_code" in body:  # MLflow's own error document
        raise TrackingError(f"tracking server {shown} cannot be used (HTTP {code} {body['error_code']}: "
                            f"{_first_line(body.get('message', ''))})")
    kind = resp.headers.get("Content-Type", "no content type").split(";")[0]
    raise TrackingError(f"tracking server {shown} answers but is not an MLflow tracking server "
                        f"(GET {SEARCH_ENDPOINT}: HTTP {code}, {kind})")


def credentials_message(uri: str, code: int, detail: str = "") -> str:
    """One line for a request the server refused: 401 (no or wrong credentials), 403 (the user
    lacks the permission, or the server's --allowed-hosts does not list the host)."""
    from urllib.parse import urlsplit

    from mlflow.utils.credentials import read_mlflow_creds
    shown = display_uri(uri)
    user = read_mlflow_creds().username or urlsplit(uri).username
    if code == 403 and "Invalid Host header" in detail:
        host = urlsplit(uri).netloc.rpartition("@")[2]
        return (f"tracking server {shown} refused the Host header {host!r} (HTTP 403): add it to the "
                f"server's --allowed-hosts")
    if code == 403:
        return (f"tracking server {shown} refused the credentials of user {user!r} (HTTP 403 permission "
                f"denied): set {CREDENTIAL_VARS} to a user with access, or have an admin grant it")
    if not user:
        return f"tracking server {shown} refused the credentials (HTTP 401, none given): set {CREDENTIAL_VARS}"
    return (f"tracking server {shown} refused the credentials of user {user!r} (HTTP 401): "
            f"set {CREDENTIAL_VARS} to a valid user and password")


def auth_error(exc: BaseException, uri: str) -> TrackingError | None:
    """The one-line TrackingError for an MLflow call the server refused (HTTP 401 or 403),
    else None: e.g. a user who may read an experiment but not create runs in it passes
    `check_store` and is refused at `create_run`."""
    from mlflow.exceptions import MlflowException
    if not isinstance(exc, MlflowException):
        return None
    code = exc.get_http_status_code()
    return TrackingError(credentials_message(uri, code, str(exc))) if code in (401, 403) else None


def _without_userinfo(uri: str) -> str:
    """http://user:pw@host/… → http://host/… (urllib does not take credentials in the URL)."""
    from urllib.parse import urlsplit, urlunsplit
    parts = urlsplit(uri)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def _first_line(exc) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


# SQLAlchemy 2.1 reads a bare postgresql:// as postgresql+psycopg:// (psycopg 3) and mysql:// as
# mysql+mysqldb://: per dialect, the drivers to try in order (import name, SQLAlchemy driver name)
SQL_DRIVERS = {"postgresql": (("psycopg", "psycopg"), ("psycopg2", "psycopg2")),
               "mysql": (("MySQLdb", "mysqldb"), ("pymysql", "pymysql"))}
SQL_DRIVER_PACKAGES = {"postgresql": "psycopg2-binary (or psycopg[binary])", "mysql": "pymysql (or mysqlclient)"}


def sql_driver_url(url: str) -> str:
    """A database URL (Optuna storage or MLflow tracking store) with an importable driver
    named: postgresql://… becomes postgresql+psycopg2://… when psycopg 3 is missing and
    psycopg2 is there (the dev extra installs psycopg2-binary); postgres:// (an alias
    SQLAlchemy refuses) is read as postgresql://. URLs that name a driver, and other
    schemes, come back unchanged. No driver importable: a one-line TrackingError naming
    the package to install."""
    import importlib
    scheme, sep, rest = url.partition("://")
    dialect = "postgresql" if scheme == "postgres" else scheme
    if not sep or dialect not in SQL_DRIVERS:
        return url
    for module, driver in SQL_DRIVERS[dialect]:
        try:
            importlib.import_module(module)
        except ImportError:
            continue
        return f"{dialect}+{driver}://{rest}"
    raise TrackingError(f"{display_uri(url)}: no {dialect} driver can be imported: "
                        f"pip install {SQL_DRIVER_PACKAGES[dialect]}")


def sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def prepare_sqlite_store(uri: str, create: bool = True) -> None:
    """Make a local SQLite store safe to open from several processes at once.

    MLflow creates and migrates the tables of a new database in place on first
    use, with no lock (`SqlAlchemyStore.__init__`): two processes starting at once
    in a fresh folder both migrate and both fail (`table _alembic_tmp_tags already
    exists`), and a Ctrl+C in those seconds leaves a half-migrated file that breaks
    every later command. Here a new store is built in a temporary file beside the
    target, under an exclusive lock, and renamed into place only once complete: the
    target is either absent or whole. A store left half-built by an older version
    (tables missing, no runs in it) is moved aside and rebuilt; one that holds runs
    is never touched, only reported."""
    path = sqlite_path(uri)
    if str(path) in ("", ":memory:"):
        return
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise TrackingError(f"tracking store {uri}: directory {parent} does not exist")
    if path.exists() and not path.is_file():
        raise TrackingError(f"tracking store {uri}: {path} is not a file")
    if not path.exists() and not create:
        raise TrackingError(f"tracking store {uri}: {path} does not exist (no run was ever logged there)")
    if path.exists() and _store_state(path) == "ready":
        return
    if not create:
        raise TrackingError(f"tracking store {uri}: {path} is not a complete MLflow database")
    _probe_writable(uri, parent)
    with _init_lock(path):
        state = _store_state(path) if path.exists() else "absent"
        if state == "ready":
            return
        if state == "has-runs":
            raise TrackingError(f"tracking store {uri}: {path} holds runs but its schema is incomplete or "
                                f"out of date; back it up, then run 'mlflow db upgrade {uri}'")
        if state in ("broken", "empty"):
            aside = path.with_name(f"{path.name}.broken-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
            os.replace(path, aside)
            print(f"note: {path} was an incomplete MLflow database with no runs; moved to {aside.name} "
                  "and created anew", file=sys.stderr)
        _build_sqlite(path)


def _probe_writable(uri: str, parent: Path) -> None:
    """Create and remove a file in `parent` (os.access says yes to root on a read-only mount)."""
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=".mlflow-probe-")
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        raise TrackingError(f"tracking store {uri}: cannot create files in {parent} "
                            f"({exc.strerror or exc})") from None


def _store_state(path: Path) -> str:
    """ready | empty (no MLflow tables) | broken (some missing, no runs) | has-runs (outdated, with runs)."""
    import sqlite3
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    except sqlite3.Error:
        return "broken"
    try:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not tables - {"alembic_version"} - {t for t in tables if t.startswith("_alembic_tmp")}:
            return "empty"
        head = _schema_head()
        version = None
        if "alembic_version" in tables:
            row = con.execute("SELECT version_num FROM alembic_version").fetchone()
            version = row[0] if row else None
        required = _required_tables()
        if required <= tables and version == head and not any(t.startswith("_alembic_tmp") for t in tables):
            return "ready"
        if "runs" in tables and con.execute("SELECT COUNT(*) FROM runs").fetchone()[0]:
            return "has-runs"
        return "broken"
    except sqlite3.DatabaseError:
        return "broken"
    finally:
        con.close()


def _schema_head() -> str:
    from mlflow.store.db.utils import _get_latest_schema_revision
    return _get_latest_schema_revision()


def _required_tables() -> set:
    from mlflow.store.db.base_sql_model import Base
    import mlflow.store.tracking.dbmodels.models  # noqa: F401  (registers the ORM tables)
    return set(Base.metadata.tables)


class _init_lock:
    """An exclusive lock (flock) per store path, in the temp dir: no file beside the store."""

    def __init__(self, path: Path):
        import hashlib
        digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
        self.lock = Path(tempfile.gettempdir()) / f"hybrid-mlflow-init-{digest}.lock"

    def __enter__(self):
        import fcntl
        self.fd = os.open(self.lock, os.O_RDWR | os.O_CREAT, 0o666)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        os.close(self.fd)  # releases the lock


def _build_sqlite(path: Path) -> None:
    """Create every MLflow table in a temp file beside `path`, then rename it into place."""
    from mlflow.store.db.utils import _initialize_tables, create_sqlalchemy_engine
    fd, tmp = tempfile.mkstemp(dir=path.parent if str(path.parent) else ".", prefix=f".{path.name}.init-",
                               suffix=".tmp")
    os.close(fd)
    import logging
    quiet = [logging.getLogger(n) for n in ("mlflow.store.db.utils", "alembic")]
    levels = [q.level for q in quiet]
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as a plain open() would have made it, not mkstemp's 0600
        for q in quiet:
            q.setLevel(logging.WARNING)
        engine = create_sqlalchemy_engine(f"sqlite:///{os.path.abspath(tmp)}")
        try:
            _initialize_tables(engine)
        finally:
            engine.dispose()
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)


def client(uri: str):
    """An MlflowClient whose calls retry briefly when SQLite reports a lock
    (several sweep workers may share one local store)."""
    from mlflow import MlflowClient
    return _RetryOnLock(MlflowClient(tracking_uri=uri), uri)


class _RetryOnLock:
    TRIES = 24  # waits of 0.05 s doubling to 2 s, jittered: ~40 s in all, for many processes on one file

    def __init__(self, inner, uri: str = ""):
        self._inner, self._uri = inner, uri

    def __getattr__(self, name):
        attr = getattr(self._inner, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            for i in range(self.TRIES):
                try:
                    return attr(*args, **kwargs)
                except Exception as exc:
                    refused = auth_error(exc, self._uri) if self._uri.startswith(("http://", "https://")) else None
                    if refused is not None:  # e.g. READ permission only: refused at create_run
                        raise refused from None
                    if "locked" not in str(exc).lower() or i == self.TRIES - 1:
                        raise
                    time.sleep(min(0.05 * 2 ** i, 2.0) * (0.5 + random.random()))
        return call


def experiment_id(cl, name: str) -> str:
    exp = cl.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage != "active":
            raise TrackingError(f"MLflow experiment {name!r} is deleted; restore it or pick another name")
        return exp.experiment_id
    try:
        return cl.create_experiment(name)
    except Exception:  # created meanwhile by another process
        exp = cl.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


# -- runs whose process died -------------------------------------------------------------------
def owner_tags() -> dict:
    """Tags that let any later process tell whether this run's process is still alive."""
    return {liveness.OWNER_TAG: liveness.owner(), liveness.HEARTBEAT_TAG: str(liveness.now_ms())}


def run_is_stale(run) -> bool:
    tags = run.data.tags
    return run.info.status == "RUNNING" and liveness.is_stale(tags.get(liveness.OWNER_TAG),
                                                               tags.get(liveness.HEARTBEAT_TAG))


def mark_dead(cl, run_id: str) -> bool:
    """Mark a RUNNING run whose owner died FAILED (re-read first: it may have been resumed meanwhile)."""
    run = cl.get_run(run_id)
    if not run_is_stale(run):
        return False
    who = liveness.describe(run.data.tags.get(liveness.OWNER_TAG, ""))
    cl.set_tag(run_id, "error", f"the process that ran it ({who}) died without ending it "
                                "(SIGKILL, out of memory or power loss); resume it with --resume")
    cl.set_terminated(run_id, "FAILED")
    return True


def reap_stale_runs(cl, experiment_ids: list[str]) -> list[str]:
    """Every RUNNING run of these experiments whose owner is gone becomes FAILED; returns their ids."""
    try:
        running = cl.search_runs(experiment_ids, "attributes.status = 'RUNNING'", max_results=5000)
    except Exception:
        return []
    return [r.info.run_id for r in running if run_is_stale(r) and mark_dead(cl, r.info.run_id)]


# -- what a run is tagged with -----------------------------------------------------------------
def git_state() -> tuple[str, bool]:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return "unknown", False
    return commit or "unknown", dirty


_CODE_VERSION: list[str] = []


def code_version() -> str:
    """16 hex digits of sha256 over the code that decides a run's numbers: engine/**/*.py (the
    layers, model families and reference packages with it) and kernels/*.cl (paths and bytes,
    in path order). Documentation and harness changes keep it."""
    if not _CODE_VERSION:
        import hashlib
        h = hashlib.sha256()
        for path in sorted([*(REPO / "engine").rglob("*.py"), *(REPO / "kernels").glob("*.cl")]):
            h.update(path.relative_to(REPO).as_posix().encode())
            h.update(path.read_bytes())
        _CODE_VERSION.append(h.hexdigest()[:16])
    return _CODE_VERSION[0]


def run_tags(trainer, experiment: str) -> dict:
    import mlflow
    import pyopencl

    from engine.device import kernel_source_hash
    cfg, dev = trainer.cfg, trainer.dev
    commit, dirty = git_state()
    return {"experiment": experiment, "git_commit": commit, "git_dirty": str(dirty).lower(),
            "mlflow.source.git.commit": commit,
            "version.pyopencl": pyopencl.VERSION_TEXT, "version.numpy": np.__version__,
            "version.mlflow": mlflow.__version__, "version.python": sys.version.split()[0],
            "opencl.platform": dev.platform_name, "opencl.driver": dev.driver_version,
            "opencl.device": dev.name, "opencl.device_type": dev.kind,
            "opencl.tuning": json.dumps(getattr(dev, "tuning", {}), sort_keys=True),   # engine.tune; {} = defaults
            # data parallel (engine/parallel.py): every device of the run, the first one above
            "opencl.devices": json.dumps([f"{d.name} [{d.platform_name}]" for d in
                                          (trainer.replicas.devs if trainer.replicas else [dev])]),
            "kernel_hash": kernel_source_hash(), "code_version": code_version(), "data_sha256": trainer.data_sha256,
            "data_source": cfg.data.path or "embedded:pydoc_data.topics", "seed": str(cfg.seed)}


def log_dataset(cl, run_id: str, trainer) -> None:
    from mlflow.entities import Dataset, DatasetInput, InputTag
    cfg = trainer.cfg
    source = os.path.abspath(cfg.data.path) if cfg.data.path else "python:pydoc_data.topics.topics"
    task_profile = getattr(getattr(trainer, "data", None), "profile", None)   # the embedding task's sentence counts
    profile = json.dumps(task_profile() if task_profile else
                         {"characters": trainer.n_chars, "vocab_size": trainer.vocab.size,
                          "train_chars": int(trainer.train_ids.size), "val_chars": int(trainer.val_ids.size)})
    ds = Dataset(name=os.path.basename(cfg.data.path) if cfg.data.path else "pydoc_topics",
                 digest=trainer.data_sha256[:20], source_type="local" if cfg.data.path else "code",
                 source=source, profile=profile)
    inputs = [DatasetInput(ds, tags=[InputTag("mlflow.data.context", "training")])]
    for attempt in range(5):
        try:
            cl.log_inputs(run_id, datasets=inputs)
            return
        except Exception as exc:
            # two processes logging the same new dataset at once: both insert it, one insert
            # fails on the unique (experiment, name, digest) key; the retry finds the other's row
            if "unique" not in str(exc).lower() or attempt == 4:
                raise
            time.sleep(0.05 * (attempt + 1))


# -- figures without matplotlib -------------------------------------------------------------------
def bar_png(counts, height: int = 120, bar: int = 0) -> bytes:
    """A bar chart of `counts` as an RGB PNG (no axes or text): one column of `bar` pixels
    per value (default: fits ~600 px), heights scaled to the largest, a grey baseline."""
    import struct
    import zlib
    c = np.asarray(counts, np.float64)
    bar = bar or max(2, 600 // max(len(c), 1))
    h = np.rint((height - 4) * c / max(c.max(), 1.0)).astype(int) if len(c) else np.zeros(0, int)
    img = np.full((height, max(len(c), 1) * bar, 3), 255, np.uint8)
    rows = np.arange(height)[:, None]
    filled = rows >= (height - 1 - np.repeat(h, bar))[None, :]                  # bar pixels, bottom-up
    if bar >= 4:
        filled[:, bar - 1::bar] = False                                            # a gap between bars
    img[filled] = (74, 122, 181)
    img[height - 1] = (128, 128, 128)
    raw = b"".join(b"\x00" + row.tobytes() for row in img)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", img.shape[1], height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")


# -- the callback -------------------------------------------------------------------------------
class _Background:
    """One worker thread at the lowest CPU priority for store writes and
    figures: on a 2-core machine the device's threads come first, and the
    tracking work fills the moments they wait. The first error is re-raised
    by `join`, so nothing fails silently."""

    SWITCH_S = 0.0005  # the GIL hand-over interval while this thread lives (Python's default: 5 ms)

    def __init__(self, idle_job=None, idle_s: float = liveness.HEARTBEAT_S):
        """`idle_job` runs whenever no job came for `idle_s` (the run's heartbeat: a long
        evaluation or slow steps must not make a live run look dead; its errors are ignored)."""
        import queue
        import sys
        import threading
        self._idle_job, self._idle_s = idle_job, idle_s
        # the training thread must not wait 5 ms for the GIL before each kernel launch
        self._switch = sys.getswitchinterval()
        sys.setswitchinterval(min(self._switch, self.SWITCH_S))
        self._jobs: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="mlflow-logger", daemon=True)
        self._thread.start()

    def _work(self):
        import threading
        try:  # Linux: a thread's nice value is its own
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except (AttributeError, OSError):
            pass
        import queue
        while True:
            try:
                job = self._jobs.get(timeout=self._idle_s if self._idle_job else None)
            except queue.Empty:
                try:
                    self._idle_job()
                except Exception:
                    pass
                continue
            if job is None:
                self._jobs.task_done()
                return
            if self._error is None:
                try:
                    job()
                except BaseException as exc:  # re-raised in join()
                    self._error = exc
            self._jobs.task_done()

    def submit(self, job):
        self._jobs.put(job)

    def drain(self):
        """Wait until every job submitted so far is done."""
        self._jobs.join()

    def join(self):
        import sys
        self._jobs.put(None)
        self._thread.join()
        sys.setswitchinterval(self._switch)
        if self._error is not None:
            raise self._error


class MlflowLogger(Callback):
    """Logs engine telemetry to one MLflow run: metrics queued and written in
    batches, histograms, samples and figures as artifacts, all writes on a
    low-priority background thread (`_Background`)."""

    def __init__(self, cl, run_id: str, sample_chars: int = 200):
        self.cl, self.run_id, self.sample_chars = cl, run_id, sample_chars
        self.kernel_totals: dict[str, list] = {}
        self.curves: dict[str, list] = {"train": [], "val": []}
        self.histograms: list = []   # (step, prototype counts) of every evaluation
        self.trainer = None
        self._tmp = tempfile.TemporaryDirectory(prefix="mlflow-art-")
        self._generator = None
        self._queue: list = []
        self._logged: dict[str, int] = {}   # key -> last step already in the store (resumed runs)
        self._flushed = self._beat = time.monotonic()
        self._bg = _Background(self._heartbeat)

    def on_start(self, trainer):
        self.trainer = trainer
        self._last_step = trainer.model.step
        if not hasattr(trainer.data, "generator"):   # a task without text to sample (sentence embeddings)
            self.sample_chars = 0
        baselines = getattr(trainer.data, "baselines", None)   # closed-form baselines on the run's split
        if baselines and trainer.model.step == 0:
            self._send(0, baselines)
        self._window = {"steps": 0, "ms": {}}   # kernel time since the last evaluation

    def restore(self, step: int):
        """A resumed run: curves and kernel totals from what the run logged up to `step`.
        A run whose process died (SIGKILL) may have logged past its last checkpoint: the
        resumed run recomputes those steps bit for bit and does not log them twice."""
        self._logged = {m.key: m.step for m in self.cl.get_run(self.run_id).data._metric_objs}
        for key, curve in (("train_loss", "train"), ("val_loss", "val")):
            hist = sorted(self.cl.get_metric_history(self.run_id, key), key=lambda m: (m.step, m.timestamp))
            self.curves[curve] = [(m.step, m.value) for m in hist if m.step <= step]
        try:
            hist_dir = Path(self.cl.download_artifacts(self.run_id, "proto_hist", self._tmp.name))
            for f in sorted(hist_dir.glob("step_*.json")):
                h = json.loads(f.read_text())
                if h["step"] <= step:
                    self.histograms.append((h["step"], h["counts"]))
        except Exception:
            pass  # no evaluation logged yet
        try:
            path = self.cl.download_artifacts(self.run_id, "kernel_timings.csv", self._tmp.name)
        except Exception:
            return  # killed before any table was written
        with open(path) as f:
            for line in f.read().splitlines()[1:]:
                name, calls, total_ms = line.split(",")[:3]
                self.kernel_totals[name] = [int(calls), float(total_ms)]

    FLUSH_AT = 900  # metrics per log_batch (MLflow caps a batch at 1000 entries)
    FLUSH_EVERY_S = 10.0  # ... and at least this often, so a live run shows its curves

    def _send(self, step: int, values: dict, flush: bool = False):
        """Queue metrics at `step`; written per ~900 values, every 10 s, at evaluations and
        at the end: on 2 cores every store write competes with the device for the CPU."""
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        self._queue += [Metric(k, float(v), now, step) for k, v in values.items()
                        if v is not None and np.isfinite(v) and step > self._logged.get(k, -1)]
        if flush or len(self._queue) >= self.FLUSH_AT or time.monotonic() - self._flushed > self.FLUSH_EVERY_S:
            self._flush()

    def _flush(self):
        self._flushed = time.monotonic()
        if self._flushed - self._beat > liveness.HEARTBEAT_S:  # this run's process is alive (liveness.py)
            self._beat = self._flushed
            self._bg.submit(self._heartbeat)
        while self._queue:
            batch, self._queue = self._queue[:self.FLUSH_AT], self._queue[self.FLUSH_AT:]
            self._bg.submit(lambda batch=batch: self.cl.log_batch(self.run_id, metrics=batch))

    def _heartbeat(self):
        self.cl.set_tag(self.run_id, liveness.HEARTBEAT_TAG, str(liveness.now_ms()))

    def before_checkpoint(self, step: int):
        """Everything logged up to a checkpoint is in the store before the checkpoint exists: a
        run killed later (SIGKILL) and resumed from it has every step's metrics exactly once."""
        self._flush()
        self._bg.drain()

    @staticmethod
    def _scalars(rec) -> dict:
        """Every number of a record (not the step, not lists or tables): what the trainer, the
        model's telemetry and the task put there is logged under its own name, none listed here.
        grad_norm/<param> becomes grad_norm.<param> (MLflow shows '/' as a folder)."""
        return {k.replace("grad_norm/", "grad_norm.", 1): float(v) for k, v in rec.items()
                if k != "step" and isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool)}

    def on_log(self, rec):
        step = rec["step"]
        vals = self._scalars(rec)
        self._sent = (step, set(vals))
        win = self._window
        win["steps"] += step - self._last_step
        self._last_step = step
        for name, ms in rec.get("kernel_ms", {}).items():
            tot = self.kernel_totals.setdefault(name, [0, 0.0])
            tot[0] += rec["kernel_calls"][name]
            tot[1] += ms
            win["ms"][name] = win["ms"].get(name, 0.0) + ms
        self._send(step, vals)
        self.curves["train"].append((step, rec["train_loss"]))

    def _kernel_metrics(self) -> dict:
        """kernel_ms/<kernel> and step_ms: device ms per training step over the steps since the
        last evaluation (per evaluation, not per log point: ~30 kernels × every log point was
        most of the rows written to the store)."""
        win, self._window = self._window, {"steps": 0, "ms": {}}
        if not win["steps"] or not win["ms"]:
            return {}
        out = {f"kernel_ms/{k}": ms / win["steps"] for k, ms in win["ms"].items()}
        out["step_ms"] = sum(win["ms"].values()) / win["steps"]
        return out

    def on_eval(self, rec):
        step = rec["step"]
        if self.sample_chars and self.trainer is not None:
            self._sample(step)   # first: while the store writes below run, its 200 launches waited for the GIL
        sent_step, sent = getattr(self, "_sent", (None, set()))
        vals = {k: v for k, v in self._scalars(rec).items() if not (step == sent_step and k in sent)}  # once a step
        self._send(step, {**vals, **self._kernel_metrics()}, flush=True)
        self.curves["val"].append((step, rec["val_loss"]))
        if "val_f1" in rec:
            self.curves.setdefault("val_f1", []).append((step, rec["val_f1"]))
        if "proto_counts" in rec:
            self._histogram(step, rec["proto_counts"])
        for key in (k for k in rec if k.endswith("mem_usage_counts")):   # the memory's slot usage (memnet)
            self._bg.submit(lambda c=list(rec[key]): self._write_histogram(step, c, "mem_hist", "slots"))

    def on_end(self, summary):
        """The end of training. With early stopping (train.patience): best_<objective> at the
        best evaluation's step, best_step and, if it stopped early, stop_step at the last step,
        tag early_stopped. With a test split: test_loss, test_acc, test_bpc, test_f1 at the step
        of the parameters evaluated (the best evaluation's with early stopping)."""
        step, best, test = summary["step"], summary.get("best"), summary.get("test")
        if best is not None and best["step"] is not None:
            metric = next(k for k in best if k not in ("step", "checkpoint"))
            self._send(best["step"], {f"best_{metric}": best[metric]})
            ends = {"best_step": best["step"]}
            if summary.get("early_stop"):
                ends["stop_step"] = summary["early_stop"]["step"]
            self._send(step, ends)
        if best is not None and summary["status"] == "finished":
            stopped = "true" if summary.get("early_stop") else "false"
            self._bg.submit(lambda: self.cl.set_tag(self.run_id, "early_stopped", stopped))
        if test is not None:
            self._send(test["step"], {k: v for k, v in test.items() if k != "step"})
            self._test = dict(test)
        self._flush()

    def _artifact(self, rel: str, data: bytes | str, artifact_path: str):
        self._bg.submit(lambda: self._write_artifact(rel, data, artifact_path))

    def _write_artifact(self, rel: str, data: bytes | str, artifact_path: str):
        path = Path(self._tmp.name) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
        self.cl.log_artifact(self.run_id, str(path), artifact_path)

    def _histogram(self, step: int, counts: list):
        self.histograms.append((step, list(counts)))
        self._bg.submit(lambda: self._write_histogram(step, list(counts)))

    def _write_histogram(self, step: int, counts: list, folder: str = "proto_hist", local: str = "proto"):
        """Per evaluation: the counts (JSON) and a bar-chart thumbnail written as PNG pixels
        directly (~2 ms; a matplotlib figure was 55-150 ms of CPU per evaluation that the
        device's threads did not get). The labelled figure of every evaluation is
        proto_hist/usage.png, drawn once at the end (`_usage_figure`). folder mem_hist: the
        memory network's cumulative slot usage."""
        rel = f"step_{step:07d}"
        self._write_artifact(f"{local}/{rel}.json", json.dumps({"step": step, "counts": counts,
                                                               "assigned": int(sum(counts))}), folder)
        self._write_artifact(f"{local}/{rel}.png", bar_png(counts), folder)

    def _usage_figure(self):
        from matplotlib.figure import Figure  # the object API: no pyplot state
        steps = [s for s, _ in self.histograms]
        usage = np.array([c for _, c in self.histograms], np.float64).T          # (T, evaluations)
        usage /= np.maximum(usage.sum(axis=0, keepdims=True), 1.0)
        fig = Figure(figsize=(7, 3.6))
        ax = fig.add_axes((0.09, 0.15, 0.78, 0.75))
        im = ax.imshow(usage, aspect="auto", origin="lower", cmap="viridis", interpolation="nearest",
                       extent=(-0.5, len(steps) - 0.5, -0.5, usage.shape[0] - 0.5))
        ticks = np.unique(np.linspace(0, len(steps) - 1, min(len(steps), 8)).round().astype(int))
        ax.set_xticks(ticks, [str(steps[i]) for i in ticks])
        ax.set_xlabel("evaluation step")
        ax.set_ylabel("prototype")
        ax.set_title("share of positions assigned to each prototype")
        fig.colorbar(im, cax=fig.add_axes((0.89, 0.15, 0.025, 0.75)))
        png = Path(self._tmp.name) / "proto" / "usage.png"
        png.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(png, dpi=80)
        self.cl.log_artifact(self.run_id, str(png), "proto_hist")

    def _sample(self, step: int):
        from engine.generate import GenerateError, Generator, make_generator
        if self._generator is None:   # the transformer's key-value cache; the others' carried state or window
            try:
                self._generator = make_generator(self.trainer.model, self.trainer.vocab)
            except GenerateError as exc:   # the cache failed its check against the forward: the window path
                print(f"warning: {exc}; samples use the window path", file=sys.stderr)
                self._generator = Generator(self.trainer.model, self.trainer.vocab)
        text = self._generator.sample("The ", self.sample_chars, temperature=0.8, top_k=0,
                                      seed=self.trainer.cfg.seed)
        self._artifact(f"samples/step_{step:07d}.txt", "The " + text + "\n", "samples")

    def finish(self, checkpoint: str | None = None):
        """Write queued metrics and artifacts and wait for them; then the kernel
        timing table, loss curves and checkpoint (and early stopping's best.npz beside it)."""
        if self.trainer is not None:
            self._send(self._last_step, self._kernel_metrics())   # steps after the last evaluation
        self._flush()
        self._bg.join()
        if self.kernel_totals:
            self._write_artifact("kernel_timings.csv", self.timing_table(), "")
        if self.curves["train"]:
            self._loss_figure()
        if getattr(self, "_test", None) is not None and "test_f1" in self._test and self.curves["val"]:
            self._design_figure()   # the character tasks' (the memory network design's figure)
        if self.histograms:
            self._usage_figure()
        task_artifacts = getattr(self.trainer.data, "artifacts", None) if self.trainer is not None else None
        if task_artifacts is not None:   # the embedding task's decoding check and lattice figures
            for rel, data in task_artifacts(self.trainer.history).items():
                folder, _, _ = rel.rpartition("/")
                self._write_artifact(rel, data, folder)
        if checkpoint and os.path.exists(checkpoint):
            self.cl.log_artifact(self.run_id, checkpoint, "checkpoint")
        best = self.trainer.best_path() if self.trainer is not None else None
        if best and os.path.exists(best):
            self.cl.log_artifact(self.run_id, best, "checkpoint")

    def timing_table(self) -> str:
        total = sum(t[1] for t in self.kernel_totals.values()) or 1.0
        lines = ["kernel,calls,total_ms,mean_us,share_of_step_time"]
        for name, (calls, ms) in sorted(self.kernel_totals.items(), key=lambda kv: -kv[1][1]):
            lines.append(f"{name},{calls},{ms:.3f},{1000 * ms / max(calls, 1):.2f},{ms / total:.4f}")
        return "\n".join(lines) + "\n"

    def _design_figure(self):
        """The memory network design's training figure (training_figure.png): train and
        validation loss per evaluation, validation F1 per evaluation, test accuracy and F1."""
        from matplotlib.figure import Figure
        fig = Figure(figsize=(9, 3.5))
        ax = fig.add_axes((0.07, 0.14, 0.40, 0.76))
        train = dict(self.curves["train"])
        steps = [s for s, _ in self.curves["val"]]
        ax.plot(steps, [train.get(s, np.nan) for s in steps], "o-", label="train loss")
        ax.plot(steps, [v for _, v in self.curves["val"]], "o-", label="validation loss")
        ax.set_xlabel("step")
        ax.set_ylabel("nats / character")
        ax.legend()
        bx = fig.add_axes((0.57, 0.14, 0.40, 0.76))
        if self.curves.get("val_f1"):
            s, v = zip(*self.curves["val_f1"])
            bx.plot(s, v, "o-", label="validation F1 (macro)")
        t = self._test
        bx.axhline(t.get("test_acc", np.nan), color="C2", ls="--", label=f"test accuracy {t.get('test_acc', 0):.3f}")
        bx.axhline(t.get("test_f1", np.nan), color="C3", ls=":", label=f"test F1 {t.get('test_f1', 0):.3f}")
        bx.set_xlabel("step")
        bx.set_ylim(0, 1)
        bx.legend(fontsize=8)
        png = Path(self._tmp.name) / "training_figure.png"
        fig.savefig(png, dpi=90)
        self.cl.log_artifact(self.run_id, str(png), "")

    def _loss_figure(self):
        from matplotlib.figure import Figure
        fig = Figure(figsize=(6, 3.5))
        ax = fig.add_axes((0.12, 0.14, 0.85, 0.78))   # fixed: a tight layout costs more than the plot
        for key, style in (("train", "-"), ("val", "o-")):
            if self.curves[key]:
                s, v = zip(*self.curves[key])
                ax.plot(s, v, style, label=f"{key} loss")
        ax.set_xlabel("step")
        ax.set_ylabel("nats / character" if self.trainer is None or self.trainer.task.name == "char_lm"
                      else "loss (MSE + 0.5·(1 − cos) by default)")
        ax.legend()
        png = Path(self._tmp.name) / "loss_curves.png"
        fig.savefig(png, dpi=90)
        self.cl.log_artifact(self.run_id, str(png), "")
