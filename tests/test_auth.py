"""Credentials: an authenticated MLflow server, a URL that is not MLflow, PostgreSQL passwords.

    python -m pytest tests/test_auth.py -q          # ~1 min on a busy 2-core machine

One real `mlflow server --app-name basic-auth` for the module (127.0.0.1, a free port, its
own SQLite stores, artifacts folder, auth config with a non-default admin password and a
secret key, `--allowed-hosts 127.0.0.1:PORT`; job execution off: it is not needed and
starts ten processes). The runner and the sweeps run as subprocesses (cwd = a temporary
directory) and every run is read back as admin with `mlflow.MlflowClient`. The PostgreSQL
test starts a private server (tests/pg.py) whose sweep role needs a password over TCP,
which the sweep reads from a PGPASSFILE; it then searches every place a run or a study
keeps text for both passwords. Tests that train carry `pytest.mark.opencl`.
"""
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest

from pg import PostgresServer

REPO = Path(__file__).resolve().parent.parent
RUN_ID = re.compile(r"^[0-9a-f]{32}$")
ADMIN = "admin"
CRED_VARS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
# the sweep tests' tiny sizes (tests/test_sweeps.py), 10 steps, one evaluation at step 5 and 10
TINY = {"model.hidden_dim": 32, "model.embedding_dim": 16, "model.num_prototypes": 8, "train.batch_size": 8,
        "train.seq_len": 16, "train.eval_batches": 1, "train.log_every": 5, "train.steps": 10,
        "train.eval_every": 5}


# -- helpers -------------------------------------------------------------------------------------
def _env(**extra) -> dict:
    """The test's environment without any MLflow credentials or tracking URI of its own."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_TRACKING_", "MLFLOW_AUTH_", "PGPASS", "PGUSER"))}
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update({k: str(v) for k, v in extra.items()})
    return env


def cli(module: str, *args, cwd, creds: tuple | None = None, env: dict | None = None,
        timeout: float = 300) -> subprocess.CompletedProcess:
    extra = dict(env or {})
    if creds:
        extra.update(zip(CRED_VARS, creds))
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=cwd, env=_env(**extra),
                          capture_output=True, text=True, timeout=timeout)


def lines_of(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


def one_error_line(p: subprocess.CompletedProcess) -> str:
    """Asserts exit 2, nothing on stdout, exactly one line on stderr and no traceback; returns it."""
    lines = lines_of(p.stderr)
    assert p.returncode == 2, f"exit {p.returncode}\nstdout:\n{p.stdout[-2000:]}\nstderr:\n{p.stderr[-4000:]}"
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr[-4000:]
    assert p.stdout == ""
    return lines[0]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def admin_client(server):
    from mlflow import MlflowClient
    return MlflowClient(tracking_uri=server.admin_uri)


def run_ids(server) -> set[str]:
    from mlflow.entities import ViewType
    cl = admin_client(server)
    ids = [e.experiment_id for e in cl.search_experiments(view_type=ViewType.ALL)]
    return {r.info.run_id for r in cl.search_runs(ids, run_view_type=ViewType.ALL, max_results=10000)}


# -- the authenticated MLflow server -----------------------------------------------------------------
def _stop(proc: subprocess.Popen):
    """The server's whole process group (the CLI, its uvicorn worker): SIGTERM, then SIGKILL."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        except ProcessLookupError:
            pass
    try:
        os.killpg(proc.pid, 0)  # a worker that outlived the CLI
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("auth-server")
    admin_pw = "adm-" + secrets.token_hex(8)
    ini = d / "basic_auth.ini"
    ini.write_text("[mlflow]\ndefault_permission = READ\n"
                   f"database_uri = sqlite:///{d}/basic_auth.db\n"
                   f"admin_username = {ADMIN}\nadmin_password = {admin_pw}\n"
                   "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    ini.chmod(0o600)
    env = _env(MLFLOW_AUTH_CONFIG_PATH=ini, MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(16),
               MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    proc = None
    for _ in range(3):  # the free port may be taken before the server binds it
        port = free_port()
        log = open(d / "server.log", "w")
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth",
             "--backend-store-uri", f"sqlite:///{d}/mlflow.db", "--artifacts-destination", str(d / "artifacts"),
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--allowed-hosts", f"127.0.0.1:{port}"],
            cwd=d, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.25)
        else:
            _stop(proc)
            if "already in use" in (d / "server.log").read_text():
                continue
            pytest.fail(f"mlflow server did not start:\n{(d / 'server.log').read_text()[-3000:]}")
        break
    try:
        yield SimpleNamespace(dir=d, port=port, uri=f"http://127.0.0.1:{port}", admin_pw=admin_pw,
                              admin_uri=f"http://{ADMIN}:{admin_pw}@127.0.0.1:{port}")
    finally:
        _stop(proc)


# -- 1. credentials ------------------------------------------------------------------------------------
@pytest.mark.opencl
def test_right_credentials_finish_the_run(server, dev, tmp_path):
    p = cli("experiments.run", "smoke", "--tracking-uri", server.uri, cwd=tmp_path, creds=(ADMIN, server.admin_pw))
    assert p.returncode == 0, p.stderr[-4000:]
    run_id = lines_of(p.stdout)[-1]
    assert RUN_ID.match(run_id)
    cl = admin_client(server)
    run = cl.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["experiment"] == "smoke"
    val = sorted((m.step, m.value) for m in cl.get_metric_history(run_id, "val_loss"))
    assert [s for s, _ in val] == [10, 20, 30] and all(0 < v < 10 for _, v in val), val
    assert "config.json" in {a.path for a in cl.list_artifacts(run_id)}
    assert server.admin_pw not in p.stdout + p.stderr


@pytest.mark.parametrize("creds", [None, (ADMIN, "wrong-password-5c1e")], ids=["missing", "wrong_password"])
def test_refused_credentials_exit_2_in_one_line(server, tmp_path, creds):
    before = run_ids(server)
    line = one_error_line(cli("experiments.run", "smoke", "--tracking-uri", server.uri, cwd=tmp_path,
                              creds=creds, timeout=120))
    assert line.startswith(f"error: tracking server {server.uri} refused the credentials"), line
    assert "HTTP 401" in line and all(v in line for v in CRED_VARS), line
    if creds:
        assert f"user '{ADMIN}'" in line and creds[1] not in line
    else:
        assert "none given" in line
    assert run_ids(server) == before, "no run may be created"
    assert os.listdir(tmp_path) == []  # no checkpoint directory, no local store


def test_every_entry_point_refuses_before_any_work(server, tmp_path):
    """experiments.run, experiments.reproduce, experiments.compare, sweeps.run and sweeps.report:
    the same one line, exit 2, and no Optuna storage created."""
    before = run_ids(server)
    fake = "0" * 32
    storage = f"sqlite:///{tmp_path}/optuna.db"
    journal = tmp_path / "existing-journal.log"  # sweeps.report first asks for a storage that exists
    journal.touch()
    commands = {"run": ("experiments.run", "smoke"), "reproduce": ("experiments.reproduce", fake), "compare": ("experiments.compare",),
                "sweep": ("sweeps.run", "lr_balance", "--trials", 1, "--storage", storage),
                "report": ("sweeps.report", "lr_balance", "--storage", f"journal:{journal}")}
    procs = {}
    for name, (module, *args) in commands.items():
        wd = tmp_path / name
        wd.mkdir()
        procs[name] = (wd, subprocess.Popen([sys.executable, "-m", module, *map(str, args), "--tracking-uri",
                                             server.uri], cwd=wd, env=_env(), stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE, text=True))
    for name, (wd, proc) in procs.items():
        try:
            out, err = proc.communicate(timeout=120)
        finally:
            proc.kill() if proc.poll() is None else None
        line = one_error_line(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
        assert line == (f"error: tracking server {server.uri} refused the credentials (HTTP 401, none given): "
                        f"set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"), (name, line)
        assert os.listdir(wd) == [], name
    assert not (tmp_path / "optuna.db").exists() and journal.stat().st_size == 0
    assert run_ids(server) == before


def test_password_in_the_uri_is_never_shown(server, tmp_path):
    wrong = "wrong-in-url-9d2f"
    line = one_error_line(cli("experiments.run", "smoke", "--tracking-uri",
                              f"http://{ADMIN}:{wrong}@127.0.0.1:{server.port}", cwd=tmp_path, timeout=120))
    assert f"tracking server http://{ADMIN}:***@127.0.0.1:{server.port} refused the credentials of user " \
           f"'{ADMIN}' (HTTP 401)" in line, line
    assert wrong not in line


def test_permission_denied_is_one_line(server):
    """A user who may read (default_permission = READ) passes check_store; creating a run in
    the admin's experiment is refused with 403, which `auth_error` turns into one line."""
    from mlflow import MlflowClient
    from mlflow.server import get_app_client

    from experiments.tracking import TrackingError, auth_error, check_store
    get_app_client("basic-auth", tracking_uri=server.admin_uri).create_user("reader", "reader-pw-41b7")
    exp = admin_client(server).create_experiment("admin-only")
    uri = f"http://reader:reader-pw-41b7@127.0.0.1:{server.port}"
    check_store(uri)
    with pytest.raises(Exception) as caught:
        MlflowClient(tracking_uri=uri).create_run(exp)
    err = auth_error(caught.value, uri)
    assert isinstance(err, TrackingError)
    assert str(err) == (f"tracking server http://reader:***@127.0.0.1:{server.port} refused the credentials of "
                        f"user 'reader' (HTTP 403 permission denied): set MLFLOW_TRACKING_USERNAME and "
                        f"MLFLOW_TRACKING_PASSWORD to a user with access, or have an admin grant it")
    assert auth_error(ValueError("not MLflow's"), uri) is None
    from experiments.tracking import client
    with pytest.raises(TrackingError) as through_runner:   # the runner's client says it in one line too
        client(uri).create_run(exp)
    assert str(through_runner.value) == str(err)


def test_host_missing_from_allowed_hosts_is_named(server):
    """The server allows the Host header 127.0.0.1:PORT only; `localhost` is refused with 403."""
    from experiments.tracking import TrackingError, check_store
    with pytest.raises(TrackingError) as caught:
        check_store(f"http://{ADMIN}:{server.admin_pw}@localhost:{server.port}")
    assert str(caught.value) == (f"tracking server http://{ADMIN}:***@localhost:{server.port} refused the Host "
                                 f"header 'localhost:{server.port}' (HTTP 403): add it to the server's "
                                 f"--allowed-hosts")


# -- 2. a URL that answers but is not MLflow ----------------------------------------------------------
class _NotMlflow(BaseHTTPRequestHandler):
    """health_200_html_404: /health 200 "OK", everything else a 404 HTML page; html_200: every
    path 200 HTML (a single-page app); json_200: every path 200 {"status": "ok"};
    no_health: 404 everywhere (`python -m http.server` in an empty folder)."""
    mode = "health_200_html_404"

    def do_GET(self):
        mode = self.server.mode
        if mode == "no_health" or (mode == "health_200_html_404" and not self.path.startswith("/health")):
            self._send(404, "text/html; charset=utf-8", b"<html><body>404 Not Found</body></html>")
        elif mode == "json_200":
            self._send(200, "application/json", json.dumps({"status": "ok"}).encode())
        elif self.path.startswith("/health") and mode == "health_200_html_404":
            self._send(200, "text/plain", b"OK")
        else:
            self._send(200, "text/html", b"<!doctype html><html><body>app</body></html>")

    def _send(self, code, kind, body):
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def not_mlflow():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _NotMlflow)
    httpd.mode = "health_200_html_404"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


def test_http_service_that_is_not_mlflow_exits_2(not_mlflow, tmp_path):
    uri = f"http://127.0.0.1:{not_mlflow.server_port}"
    line = one_error_line(cli("experiments.run", "smoke", "--tracking-uri", uri, cwd=tmp_path, timeout=120))
    assert line == (f"error: tracking server {uri} answers but is not an MLflow tracking server "
                    f"(GET /api/2.0/mlflow/experiments/search: HTTP 404, text/html)")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("mode, detail", [("html_200", "GET /api/2.0/mlflow/experiments/search: HTTP 200, text/html"),
                                          ("json_200", "GET /api/2.0/mlflow/experiments/search: HTTP 200, "
                                                       "application/json"),
                                          ("no_health", "GET /health: HTTP 404")])
def test_other_non_mlflow_answers(not_mlflow, mode, detail):
    from experiments.tracking import TrackingError, check_store
    not_mlflow.mode = mode
    uri = f"http://127.0.0.1:{not_mlflow.server_port}"
    with pytest.raises(TrackingError) as caught:
        check_store(uri)
    assert str(caught.value) == f"tracking server {uri} answers but is not an MLflow tracking server ({detail})"


# -- 3. bare postgresql:// URLs, passwords from PGPASSFILE --------------------------------------------------
def test_bare_postgresql_url_gets_the_installed_driver(monkeypatch):
    from experiments.tracking import TrackingError, sql_driver_url
    monkeypatch.setitem(sys.modules, "psycopg", None)  # psycopg 3 missing: what the dev extra gives
    assert sql_driver_url("postgresql://u@db:5432/optuna") == "postgresql+psycopg2://u@db:5432/optuna"
    assert sql_driver_url("postgres://u@db/optuna") == "postgresql+psycopg2://u@db/optuna"
    for unchanged in ("postgresql+psycopg2://u@db/x", "sqlite:///x.db", "http://h:5000", "journal:x.log"):
        assert sql_driver_url(unchanged) == unchanged
    monkeypatch.setitem(sys.modules, "psycopg2", None)
    with pytest.raises(TrackingError) as caught:
        sql_driver_url("postgresql://u:Secret-pw@db/optuna")
    assert str(caught.value) == ("postgresql://u:***@db/optuna: no postgresql driver can be imported: "
                                 "pip install psycopg2-binary (or psycopg[binary])")


def test_no_postgresql_driver_is_one_line(server, monkeypatch, capsys):
    from sweeps import run as sweep_run
    monkeypatch.setitem(sys.modules, "psycopg", None)
    monkeypatch.setitem(sys.modules, "psycopg2", None)
    rc = sweep_run.main(["lr_balance", "--storage", "postgresql://u:Secret-pw@127.0.0.1:9/x",
                         "--tracking-uri", server.admin_uri])
    err = capsys.readouterr().err
    assert rc == 2 and lines_of(err) == ["error: storage postgresql://u:***@127.0.0.1:9/x: no postgresql driver "
                                         "can be imported: pip install psycopg2-binary (or psycopg[binary])"], err


def _texts_of_runs(server, exp_name: str) -> dict[str, str]:
    """Every tag, param and metric key of the experiment's runs; their artifacts are read as
    files from the server's artifact store (`_files_under`)."""
    cl = admin_client(server)
    exp = cl.get_experiment_by_name(exp_name)
    texts = {}
    for r in cl.search_runs([exp.experiment_id], max_results=1000):
        texts[f"{r.info.run_id}/tags"] = json.dumps(r.data.tags)
        texts[f"{r.info.run_id}/params"] = json.dumps(r.data.params)
        texts[f"{r.info.run_id}/metrics"] = json.dumps(sorted(r.data.metrics))
    return texts


def _files_under(*dirs: Path) -> dict[str, str]:
    return {str(f): f.read_bytes().decode("latin-1") for d in dirs for f in d.rglob("*") if f.is_file()}


@pytest.mark.opencl
def test_sweep_on_bare_postgresql_url_with_pgpassfile_leaks_no_password(server, dev, tmp_path):
    """The README's form `--storage postgresql://USER@HOST:PORT/DB`, the password in a PGPASSFILE,
    the tracking server's credentials in its URI (http://admin:PW@…, which MLflow supports):
    the sweep finishes, and neither password is in a tag, param, artifact, message, file, the
    server's stores or an Optuna attribute."""
    import optuna
    pg_pw = "pg-" + secrets.token_hex(8)
    secret_dir = tmp_path / "secret"
    secret_dir.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    srv = PostgresServer()
    try:
        srv.start()
        url = srv.add_password_user("sweeper", pg_pw)
        assert url == f"postgresql://sweeper@127.0.0.1:{srv.port}/optuna"
        passfile = secret_dir / "pgpass"
        passfile.write_text(f"127.0.0.1:{srv.port}:optuna:sweeper:{pg_pw}\n")
        passfile.chmod(0o600)  # libpq ignores a password file that others can read
        sets = [a for k, v in TINY.items() for a in ("--set", f"{k}={v}")]
        p = cli("sweeps.run", "lr_balance", "--trials", 1, "--repeats", 1, "--pruner", "none", "--sampler-seed", 0,
                "--storage", url, "--tracking-uri", server.admin_uri, "--experiment-name", "pg-auth", *sets,
                cwd=work, env={"PGPASSFILE": passfile})
        assert p.returncode == 0, f"exit {p.returncode}\n{p.stderr[-6000:]}"
        parent = lines_of(p.stdout)[-1]
        assert RUN_ID.match(parent)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage = optuna.storages.RDBStorage(f"postgresql+psycopg2://sweeper:{pg_pw}@127.0.0.1:{srv.port}/optuna")
        study = optuna.load_study(study_name="lr_balance", storage=storage)
        trials = study.get_trials()
        assert [t.state.name for t in trials] == ["COMPLETE"] and 0 < trials[0].value < 10
        optuna_texts = {"study.user_attrs": json.dumps(study.user_attrs),
                        "study.system_attrs": json.dumps(storage.get_study_system_attrs(study._study_id),
                                                         default=str)}
        for t in trials:
            optuna_texts[f"trial{t.number}"] = json.dumps([t.user_attrs, t.system_attrs, t.params], default=str)
        storage.engine.dispose()
    finally:
        srv.stop()
    cl = admin_client(server)
    tags = cl.get_run(parent).data.tags
    assert tags["optuna_storage"] == url and cl.get_run(parent).info.status == "FINISHED"
    runs = _texts_of_runs(server, "pg-auth")
    assert len([k for k in runs if k.endswith("/tags")]) == 3  # study, trial, repeat
    exp_id = cl.get_experiment_by_name("pg-auth").experiment_id
    artifacts = _files_under(server.dir / "artifacts" / exp_id)
    names = {Path(k).name for k in artifacts}
    assert {"trials.csv", "config.json", "kernel_timings.csv"} <= names, names
    # ... and the server's backend store (every tag, param and metric: its SQLite files)
    places = {"stdout": p.stdout, "stderr": p.stderr, **optuna_texts, **runs, **artifacts, **_files_under(work),
              **{f.name: f.read_bytes().decode("latin-1") for f in server.dir.glob("mlflow.db*")}}
    for pw in (pg_pw, server.admin_pw):
        leaks = [where for where, text in places.items() if pw in text]
        assert leaks == [], f"password found in {leaks}"
