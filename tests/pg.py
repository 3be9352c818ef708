"""A throwaway PostgreSQL server for tests (sweeps on a PostgreSQL Optuna storage).

    with PostgresServer() as url:       # postgresql+psycopg2://postgres@127.0.0.1:PORT/optuna
        ...

initdb's a cluster in a new temporary directory (trust authentication, fsync
off: nothing here must survive), starts it on a free localhost port with its
Unix socket inside that directory, creates one database and hands out its
URL; on exit `pg_ctl stop -m fast` and the directory is removed.

PostgreSQL refuses to run as root: when the tests run as root (containers,
CI), initdb and pg_ctl run as the `postgres` OS user (`runuser -u postgres`)
and the directory is chowned to it. The server binaries are looked up in
$PG_BINDIR, /usr/lib/postgresql/*/bin (Debian, newest major first), then
PATH. No binaries (or no psycopg2): pytest.skip on a workstation,
pytest.fail when $CI is set (the PostgreSQL tests must never silently
disappear in CI).
"""
from __future__ import annotations

import glob
import os
import pathlib
import re
import shutil
import socket
import subprocess
import tempfile
import time

import pytest

SUPERUSER = "postgres"


def _unavailable(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (PostgreSQL tests must never be skipped in CI)", pytrace=False)
    pytest.skip(reason)


def find_bindir() -> str | None:
    """The directory holding initdb and pg_ctl, or None."""
    candidates = []
    if os.environ.get("PG_BINDIR"):
        candidates.append(os.environ["PG_BINDIR"])

    def major(path: str) -> float:
        m = re.search(r"/postgresql/(\d+(?:\.\d+)?)/bin$", path)
        return float(m.group(1)) if m else 0.0
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=major, reverse=True)
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(os.path.dirname(os.path.realpath(on_path)))
    for d in candidates:
        if all(os.access(os.path.join(d, b), os.X_OK) for b in ("initdb", "pg_ctl")):
            return d
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _base_dir() -> str | None:
    """Where the cluster's directory goes: the default temp dir, unless the postgres user
    (when root) could not reach it or the socket path would be too long (107 bytes)."""
    base = tempfile.gettempdir()
    reachable = os.geteuid() != 0 or all(
        os.stat(p).st_mode & 0o001 for p in [base, *map(str, pathlib.Path(base).parents)])
    if reachable and len(base) < 60:
        return None
    return "/tmp"


class PostgresServer:
    """Context manager: a private PostgreSQL cluster; `with` gives the database URL."""

    def __init__(self, dbname: str = "optuna", timeout: float = 60.0):
        self.dbname, self.timeout = dbname, timeout
        self.bindir = self.dir = self.port = self.url = None
        self._as_user: list[str] = []
        self._started = False

    # -- paths ----------------------------------------------------------------------------------
    @property
    def data(self) -> str:
        return os.path.join(self.dir, "data")

    @property
    def sockdir(self) -> str:
        return os.path.join(self.dir, "sock")

    @property
    def logfile(self) -> str:
        return os.path.join(self.dir, "server.log")

    def _bin(self, name: str) -> str:
        return os.path.join(self.bindir, name)

    def _run(self, *argv, check: bool = True, timeout: float | None = None) -> subprocess.CompletedProcess:
        env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
        env.pop("PGDATA", None)
        p = subprocess.run([*self._as_user, *map(str, argv)], capture_output=True, text=True,
                           timeout=timeout or self.timeout, env=env, cwd=self.dir)
        if check and p.returncode != 0:
            raise RuntimeError(f"{os.path.basename(str(argv[0]))} exited {p.returncode}: "
                               f"{(p.stderr or p.stdout).strip()[-2000:]}{self._log_tail()}")
        return p

    def _log_tail(self) -> str:
        try:
            with open(self.logfile) as f:
                return "\nserver log:\n" + f.read()[-2000:]
        except OSError:
            return ""

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> str:
        self.bindir = find_bindir()
        if self.bindir is None:
            _unavailable("PostgreSQL server binaries (initdb, pg_ctl) not found in /usr/lib/postgresql/*/bin "
                         "or PATH")
        try:
            import psycopg2  # noqa: F401  (the URL names this driver)
        except ImportError:
            _unavailable("psycopg2 is not installed (pip install psycopg2-binary)")
        self.dir = tempfile.mkdtemp(prefix="pgtest-", dir=_base_dir())
        try:
            self._prepare_user()
            os.makedirs(self.sockdir)
            if self._as_user:
                import pwd
                pw = pwd.getpwnam(SUPERUSER)
                for path in (self.dir, self.sockdir):
                    os.chown(path, pw.pw_uid, pw.pw_gid)
            self._run(self._bin("initdb"), "-D", self.data, "-U", SUPERUSER, "-A", "trust", "-E", "UTF8",
                      "--locale=C", "--no-sync")
            self._start_server()
            self._create_database()
        except BaseException:
            self.stop()
            raise
        self.url = f"postgresql+psycopg2://{SUPERUSER}@127.0.0.1:{self.port}/{self.dbname}"
        return self.url

    def _prepare_user(self):
        if os.geteuid() != 0:
            return
        import pwd
        try:
            pwd.getpwnam(SUPERUSER)
        except KeyError:
            _unavailable(f"running as root and there is no {SUPERUSER!r} OS user to run PostgreSQL as")
        runuser = shutil.which("runuser")
        if runuser:
            self._as_user = [runuser, "-u", SUPERUSER, "--"]
        else:
            self._as_user = ["su", SUPERUSER, "-s", "/bin/sh", "-c", 'exec "$0" "$@"']

    def _start_server(self):
        last = None
        for _ in range(3):  # the free port may be taken between free_port() and the bind
            self.port = free_port()
            opts = (f"-p {self.port} -k {self.sockdir} -c listen_addresses=127.0.0.1 -c fsync=off "
                    f"-c synchronous_commit=off -c full_page_writes=off -c max_connections=100")
            p = self._run(self._bin("pg_ctl"), "-D", self.data, "-l", self.logfile, "-w", "-t",
                          str(int(self.timeout)), "-o", opts, "start", check=False, timeout=self.timeout + 10)
            if p.returncode == 0:
                self._started = True
                return
            last = f"pg_ctl start exited {p.returncode}: {(p.stderr or p.stdout).strip()[-1000:]}{self._log_tail()}"
            if "already in use" not in last:
                break
        raise RuntimeError(last)

    def _create_database(self):
        import psycopg2
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                conn = psycopg2.connect(host="127.0.0.1", port=self.port, user=SUPERUSER, dbname="postgres",
                                        connect_timeout=5)
                break
            except psycopg2.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{self.dbname}"')
        finally:
            conn.close()

    def add_password_user(self, user: str, password: str) -> str:
        """A login role that owns the database and must give `password` over TCP
        (scram-sha-256; the superuser keeps trust); returns its URL, without the password.
        Waits (bounded) until the reloaded pg_hba.conf refuses the role without it."""
        import psycopg2
        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user=SUPERUSER, dbname="postgres",
                                connect_timeout=5)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f'CREATE ROLE "{user}" LOGIN PASSWORD %s', (password,))
                cur.execute(f'ALTER DATABASE "{self.dbname}" OWNER TO "{user}"')
        finally:
            conn.close()
        hba = os.path.join(self.data, "pg_hba.conf")
        with open(hba) as f:
            rules = f.read()
        with open(hba, "w") as f:  # first match wins: this line before initdb's trust lines
            f.write(f"host all {user} 127.0.0.1/32 scram-sha-256\n{rules}")
        self._run(self._bin("pg_ctl"), "-D", self.data, "reload")
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                psycopg2.connect(host="127.0.0.1", port=self.port, user=user, dbname=self.dbname,
                                 passfile=os.path.join(self.dir, "no-pgpass"), connect_timeout=5).close()
            except psycopg2.OperationalError:
                break  # the password is required now
            if time.monotonic() > deadline:
                raise RuntimeError(f"pg_hba.conf reload: {user} still connects without a password")
            time.sleep(0.1)
        return f"postgresql://{user}@127.0.0.1:{self.port}/{self.dbname}"

    def stop(self):
        try:
            if self._started:
                self._run(self._bin("pg_ctl"), "-D", self.data, "-m", "fast", "-w", "-t", "60", "stop",
                          check=False, timeout=90)
                self._started = False
        finally:
            if self.dir:
                shutil.rmtree(self.dir, ignore_errors=True)
                self.dir = None

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False
