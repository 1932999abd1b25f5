"""Real services for the tests and the load benchmark: PostgreSQL, an MLflow server (with or without
basic auth) and a Ray cluster of separate node processes, each started the way the README tells a person to.

Secrets never appear on a command line (``ps`` shows every user those): the database password
reaches libpq through a pgpass file (``PGPASSFILE``), MLflow's admin password through the
environment at the auth app's first start, and clients' credentials through
``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``. Every process is started in its own
session and stopped by its process group, so nothing of other users' (their Ray clusters,
their databases) is touched.
"""

from __future__ import annotations

import contextlib
import gc
import glob
import io
import logging
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import requests

import forked

RUNNER_USER = "runner"  # the account that jobs log in as
# The system's temporary folder: short, and open to other users (the tests' own temporary files
# go under pytest's folder, which only root may enter: conftest.temp_under_pytest).
SYSTEM_TMP = os.environ.get("TMPDIR") or "/tmp"


class Unavailable(Exception):
    """A service cannot start on this machine (not installed, no permission): tests skip with this reason."""


def free_port() -> int:
    """A port nobody listens on now: fixed ports would clash with other users' servers and clusters."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def runner_env(tracking_uri: str, data: Path | str | None = None) -> dict[str, str]:
    """This environment for a command of the runner, with its MLflow store (and the data cache of CRACK_RUNNER_DATA) set."""
    return {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, **({"CRACK_RUNNER_DATA": str(data)} if data is not None else {})}


def wait_until(ready: Callable[[], bool], process: subprocess.Popen | forked.Forked, what: str, log: Path, timeout: float) -> None:
    """Poll ``ready`` until it holds; fail with the log's tail if ``process`` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with status {process.returncode}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not come up within {timeout:.0f} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.3)


def stop(process: subprocess.Popen | forked.Forked, grace: float = 5) -> None:
    """SIGTERM the process group of ``process`` (started with start_new_session, or forked), SIGKILL it if it lingers ``grace`` seconds
    (0: SIGKILL at once)."""
    try:
        if grace > 0:
            os.killpg(process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=grace)
                return
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:  # the group has ended
        return
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=5)


def answers(url: str) -> bool:
    """Whether an MLflow server at ``url`` is up (loopback: never through a proxy)."""
    try:
        return requests.get(f"{url}/health", timeout=2, proxies={"http": "", "https": ""}).status_code == 200
    except requests.RequestException:
        return False


def start_mlflow_server(log: Path, *store_args: str, env: dict[str, str] | None = None, timeout: float = 90) -> tuple[forked.Forked, str]:
    """``mlflow server`` on 127.0.0.1 at a free port with ``store_args``, in a session of its own; returns the process and its URL.

    Forked with MLflow already imported (tests/forked.py); the server's own worker is a fresh interpreter that MLflow starts.
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = ["server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1", *store_args]
    # MLflow's job execution (a pool of huey consumer processes for its GenAI jobs) is off: no run of this project uses it.
    full_env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
                **(env or {})}
    server = forked.start("mlflow", args, Path.cwd(), full_env, stdout=log, stderr=log)
    try:
        wait_until(lambda: answers(url), server, "mlflow server", log, timeout)
    except RuntimeError:
        stop(server)
        raise
    return server, url


def write_secret(path: Path, text: str, owner: str | None = None) -> Path:
    """A file only its owner can read (mode 600): where passwords live instead of command lines."""
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text(text)
    if owner is not None:
        shutil.chown(path, owner, owner)
    return path


def postgres_bindir() -> Path:
    """Where initdb and pg_ctl are: on PATH, or Debian's /usr/lib/postgresql/VERSION/bin (newest)."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    debian = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if not debian:
        raise Unavailable("PostgreSQL is not installed (apt-get install postgresql)")
    return Path(debian[-1]).parent


@dataclass
class Postgres:
    """A throwaway PostgreSQL cluster on 127.0.0.1 with a role ``mlflow`` owning databases ``mlflow``, ``mlflow_auth`` and ``optuna``.

    The role's password is in ``pgpass`` (mode 600) only; clients set ``PGPASSFILE`` to it.
    """

    folder: Path
    port: int
    pgpass: Path
    as_owner: list[str] = field(default_factory=list)  # runuser prefix when running as root

    def uri(self, database: str) -> str:
        return f"postgresql+psycopg://mlflow@127.0.0.1:{self.port}/{database}"

    def stop(self) -> None:
        subprocess.run([*self.as_owner, str(postgres_bindir() / "pg_ctl"), "-D", str(self.folder / "data"), "-m", "fast", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(self.folder, ignore_errors=True)


def start_postgres(pgpass_dir: Path) -> Postgres:
    """initdb and start a cluster in a new /tmp folder (as the ``postgres`` user when root: initdb refuses root).

    Local socket connections use peer authentication (only the cluster's owner is its superuser);
    TCP connections need a password (scram-sha-256). ``pgpass_dir`` receives the client's pgpass file.
    """
    bindir = postgres_bindir()
    owner = None
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres").pw_name
        except KeyError:
            raise Unavailable("running as root and there is no `postgres` user to own the cluster") from None
    as_owner = ["runuser", "-u", owner, "--"] if owner else []
    folder = Path(tempfile.mkdtemp(prefix="pg-", dir=SYSTEM_TMP))  # short, and outside pytest's root-only folders
    if owner:
        shutil.chown(folder, owner, owner)
    port, password = free_port(), secrets.token_urlsafe(24)

    def run(*command: str, stdin: str | None = None) -> None:
        done = subprocess.run([*as_owner, *command], input=stdin, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            shutil.rmtree(folder, ignore_errors=True)
            raise Unavailable(f"PostgreSQL could not start: {' '.join(command[:2])}: {(done.stderr or done.stdout)[-1500:]}")

    run(str(bindir / "initdb"), "-D", str(folder / "data"), "--auth-local=peer", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync")
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
    run(str(bindir / "pg_ctl"), "-D", str(folder / "data"), "-l", str(folder / "server.log"), "-o", options, "-w", "start")
    # The role's password goes in through stdin, never argv.
    sql = (f"CREATE ROLE mlflow LOGIN PASSWORD '{password}';\n"
           "CREATE DATABASE mlflow OWNER mlflow;\nCREATE DATABASE mlflow_auth OWNER mlflow;\nCREATE DATABASE optuna OWNER mlflow;\n")
    run(str(bindir / "psql"), "-h", str(folder), "-p", str(port), "-d", "postgres", "-v", "ON_ERROR_STOP=1", "-q", "-f", "-", stdin=sql)
    pgpass = write_secret(pgpass_dir / "pgpass", f"127.0.0.1:{port}:*:mlflow:{password}\n")
    return Postgres(folder, port, pgpass, as_owner)


@dataclass
class AuthServer:
    """An MLflow server with the basic-auth app on PostgreSQL, artifacts proxied; a user for the jobs."""

    process: forked.Forked
    url: str
    db: Postgres
    admin_password: str
    runner_password: str

    def credentials(self, password: str | None = None) -> dict[str, str]:
        """Environment for a client logging in as the jobs' user (with ``password`` to try a wrong one)."""
        return {"MLFLOW_TRACKING_USERNAME": RUNNER_USER, "MLFLOW_TRACKING_PASSWORD": password or self.runner_password}

    def stop(self) -> None:
        stop(self.process)
        self.db.stop()


def start_auth_server(db: Postgres, folder: Path, timeout: float = 120) -> AuthServer:
    """``mlflow server --app-name basic-auth`` on ``db``: tracking and auth databases, artifacts under ``folder``.

    The admin's password is a fresh secret given at the first start (MLflow has no default one);
    the jobs' user is then created by the admin through the REST API. No secret is in argv or in a
    config file other than the pgpass file.
    """
    config = folder / "basic_auth.ini"
    config.write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = {db.uri('mlflow_auth')}\n"
        "admin_username = admin\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        "auth_cache_ttl_seconds = 60\n"  # a password is checked (scrypt, ~0.1 s of CPU) once a minute, not per request
    )
    admin_password, runner_password = secrets.token_urlsafe(18), secrets.token_urlsafe(18)
    env = {
        "PGPASSFILE": str(db.pgpass),
        "MLFLOW_AUTH_CONFIG_PATH": str(config),
        "MLFLOW_AUTH_ADMIN_PASSWORD": admin_password,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
    }
    try:
        process, url = start_mlflow_server(
            folder / "mlflow-server.log", "--app-name", "basic-auth", "--backend-store-uri", db.uri("mlflow"),
            "--artifacts-destination", str(folder / "artifacts"), env=env, timeout=timeout,
        )
    except RuntimeError:
        db.stop()
        raise
    server = AuthServer(process, url, db, admin_password, runner_password)
    created = requests.post(f"{url}/api/2.0/mlflow/users/create", json={"username": RUNNER_USER, "password": runner_password},
                            auth=("admin", admin_password), timeout=30, proxies={"http": "", "https": ""})
    if created.status_code != 200:
        server.stop()
        raise RuntimeError(f"creating the user {RUNNER_USER} failed: {created.status_code} {created.text[:500]}")
    return server


@dataclass
class RayCluster:
    """A Ray head and worker nodes, each a separate ``ray start --block`` with its own temp folder and ports."""

    address: str
    nodes: list[subprocess.Popen]
    folders: list[Path]
    env: dict[str, str]  # what a driver needs to join: the cluster's auth token

    def stop(self) -> None:
        for node in reversed(self.nodes):
            stop(node, grace=0)  # a node drains for seconds on SIGTERM; nothing here needs draining
        for folder in self.folders:
            shutil.rmtree(folder, ignore_errors=True)


def start_ray_cluster(node_envs: list[dict[str, str]], timeout: float = 120) -> RayCluster:
    """A head (``node_envs[0]``) and one worker per further entry, one CPU each, joined by a fresh auth token.

    Every port is chosen free, so clusters of other users on this machine are neither joined nor disturbed.
    """
    if shutil.which("ray") is None:
        raise Unavailable("Ray is not installed (pip install -e '.[sweep]')")
    token_dir = Path(tempfile.mkdtemp(prefix="ray-token-", dir=SYSTEM_TMP))
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(write_secret(token_dir / "token", secrets.token_hex(32)))}
    port = free_port()
    address = f"127.0.0.1:{port}"
    nodes: list[subprocess.Popen] = []
    folders = [token_dir]
    cluster = RayCluster(address, nodes, folders, auth)
    for index, node_env in enumerate(node_envs):
        folder = Path(tempfile.mkdtemp(prefix="ray-", dir=SYSTEM_TMP))  # short: Ray's socket paths must fit in 107 bytes
        folders.append(folder)
        role = ["--head", "--port", str(port), "--include-dashboard", "false", "--dashboard-port", str(free_port()),
                "--ray-client-server-port", str(free_port())] if index == 0 else ["--address", address]
        command = ["ray", "start", *role, "--block", "--temp-dir", str(folder), "--num-cpus", "1",
                   "--object-store-memory", str(80 * 2**20), "--disable-usage-stats", "--node-ip-address", "127.0.0.1",
                   "--dashboard-agent-listen-port", str(free_port()), "--metrics-export-port", str(free_port()),
                   "--runtime-env-agent-port", str(free_port())]
        log = folder / "ray-start.log"
        with open(log, "w") as out:
            nodes.append(subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **auth, **node_env},
                                          start_new_session=True))
        try:
            wait_until(lambda log=log: "Ray runtime started" in log.read_text(), nodes[-1], f"ray node {index}", log, timeout)
        except RuntimeError as err:
            cluster.stop()
            raise Unavailable(f"a Ray node could not start: {str(err)[-1500:]}") from None
    return cluster


def run_in_process(args: list[str], cwd: Path, env: dict[str, str], module: str = "runner") -> subprocess.CompletedProcess:
    """``python -m <module> *args`` in this interpreter: its exit status, stdout and stderr, as a subprocess gives them.

    The same entry point (``runner.__main__.cli``, or the ``main(argv)`` of ``runner.compare``,
    ``runner.doctor``, ``runner.predict``) with the same argv, environment and working folder,
    minus the seconds a fresh interpreter spends importing torch and MLflow. What the
    command changes in the process (environment, folder, logging, signal handlers, Hydra's
    and the runner's globals) is put back afterwards. An exception that escapes prints its
    traceback and exits 1, as the interpreter would. Tests of what only a process shows
    (imports, native libraries' output, signals, exit codes of a killed run) use a subprocess.
    """
    import importlib
    import signal as signals

    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from runner.track import interrupt

    entry = importlib.import_module("runner.__main__" if module == "runner" else module)

    forget_sqlite_engines()  # the command opens its stores afresh, as a new process would
    saved_env, saved_cwd, saved_argv = dict(os.environ), os.getcwd(), sys.argv
    root = logging.getLogger()
    saved_logging = {name: (lg.handlers[:], lg.level, lg.propagate, lg.filters[:]) for name, lg in logging.Logger.manager.loggerDict.items()
                     if isinstance(lg, logging.Logger)}
    saved_root = (root.handlers[:], root.level, root.filters[:])
    saved_handler_list = logging._handlerList[:]  # type: ignore[attr-defined]
    saved_signals = {sig: signals.getsignal(sig) for sig in (signals.SIGINT, signals.SIGTERM)}
    out, err = io.StringIO(), io.StringIO()
    code: int = 0
    try:
        os.environ.clear()
        os.environ.update(env)
        os.chdir(cwd)
        sys.argv = [module, *args]
        root.handlers[:] = []  # as in a fresh interpreter: what is logged before Hydra's logging goes to stderr
        logging._handlerList[:] = []  # type: ignore[attr-defined]  # Hydra's dictConfig closes every handler in it: not pytest's
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = entry.main(args) if module != "runner" else entry.cli() or 0
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
            except Exception:  # noqa: BLE001 - what the interpreter does with an uncaught exception
                traceback.print_exc()
                code = 1
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        os.chdir(saved_cwd)
        sys.argv = saved_argv
        for name, (handlers, level, propagate, filters) in saved_logging.items():
            lg = logging.getLogger(name)
            lg.handlers[:], lg.level, lg.propagate, lg.filters[:] = handlers, level, propagate, filters
        root.handlers[:], root.level, root.filters[:] = saved_root
        logging._handlerList[:] = saved_handler_list  # type: ignore[attr-defined]
        for sig, handler in saved_signals.items():
            signals.signal(sig, handler)
        GlobalHydra.instance().clear()
        HydraConfig.instance().cfg = None  # type: ignore[assignment]  # no job of the command's is running any more
        interrupt.reset()
        forget_sqlite_engines()  # and lets go of them, as its exit would
        stop_joblib_workers()  # a sweep's worker processes keep the environment they started with: not the next command's
        gc.unfreeze()
    return subprocess.CompletedProcess(["python", "-m", module, *args], code, out.getvalue(), err.getvalue())


def forget_sqlite_engines() -> None:
    """Close the stores and database engines MLflow keeps per store URI for the life of a process."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
    from mlflow.tracking._model_registry.registry import ModelRegistryStoreRegistry
    from mlflow.tracking._tracking_service.registry import TrackingStoreRegistry

    TrackingStoreRegistry._get_store_with_resolved_uri.cache_clear()
    ModelRegistryStoreRegistry._get_store_with_resolved_uri.cache_clear()

    with SqlAlchemyStore._engine_map_lock:
        for engine in SqlAlchemyStore._engine_map.values():
            engine.dispose()
        SqlAlchemyStore._engine_map.clear()


def stop_joblib_workers() -> None:
    """Stop the worker processes joblib keeps for reuse (a process's exit would)."""
    if "joblib.externals.loky" in sys.modules:
        from joblib.externals.loky import get_reusable_executor

        get_reusable_executor().shutdown(wait=True, kill_workers=True)


def disk_bytes(*folders: Path) -> int:
    """Bytes on disk under ``folders``, a file linked several times counted once (as ``du`` does)."""
    seen: dict[int, int] = {}
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file():
                seen[path.stat().st_ino] = path.stat().st_size
    return sum(seen.values())
