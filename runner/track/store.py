"""Open an MLflow tracking store that any number of processes share, and fail fast when it cannot be used.

Three things go wrong with a store before a single metric is logged, and each is handled here:

- A new sqlite store is created by MLflow's migrations in the first process that opens it;
  two processes doing that at once leave it half-migrated. :func:`open_store` creates and
  checks it under an inter-process lock beside the database file, and a store damaged by an
  old crash gets a message with the fix instead of a SQLAlchemy traceback.
- A store, an artifact folder or a server that cannot be written is found in seconds, before
  the data loads, with the folder and what it needs named; so is a server that refuses this
  client's credentials (MLflow's basic-auth app), with how to give them.
- A run whose process died (SIGKILL, the out-of-memory killer, a power cut) stays RUNNING
  forever. Opening the store marks RUNNING runs whose lease has expired (runner.track.lease) as
  KILLED and says how to resume them.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sqlite3
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import requests
from filelock import FileLock, Timeout
from mlflow.utils.credentials import get_default_host_creds, read_mlflow_creds
from mlflow.utils.rest_utils import http_request

from runner.errors import ConfigError, StorageError
from runner.track.files import absolute_path, check_writable
from runner.track.lease import close_dead_runs

log = logging.getLogger(__name__)

NEW_STORE_MB = 2  # what MLflow's migrations of an empty sqlite store write, rounded up
LOCK_TIMEOUT_S = 300  # creating a store takes seconds; a lock held longer means a hung process
RAY_NODE_TAG = "runner.ray_node"  # set by jobs that Ray ran (runner.app.job_context)
REFUSED = (401, 403)  # what an MLflow server with authentication answers a client it does not let in


def absolute_tracking_uri(uri: str) -> str:
    """``sqlite:///mlflow.db`` made absolute, so every job of a sweep writes to the same store."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + absolute_path(uri[len(prefix) :]).as_posix()
    return uri


def sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (absolute), or None for other stores."""
    prefix = "sqlite:///"
    return Path(absolute_tracking_uri(uri)[len(prefix) :]) if uri.startswith(prefix) else None


class _OneLine(logging.Filter):
    """MLflow logs a failed database write with two chained tracebacks before raising it; the runner
    reports the error itself (runner.errors.storage_error), so keep only the first line of MLflow's."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = record.getMessage().splitlines()[0], None
        record.exc_info = record.exc_text = None
        return True


logging.getLogger("mlflow.store.db.utils").addFilter(_OneLine())


def open_store(uri: str, experiment: str, artifact_root: str) -> str:
    """Point MLflow at ``uri`` and return the experiment id; a store that cannot be used is a clear error.

    Called before the data is loaded, so a wrong tracking.uri fails in seconds, and a server
    that does not answer fails at once instead of after MLflow's minutes of retries.
    """
    check_server(uri)
    database = sqlite_file(uri)
    if database is not None:
        _open_sqlite(database, uri)
    mlflow.set_tracking_uri(uri)
    try:
        exp_id = experiment_id(uri, experiment, artifact_root)
        artifacts = mlflow.MlflowClient(uri).get_experiment(exp_id).artifact_location
    except Exception as err:  # noqa: BLE001 - sqlalchemy/OS/MLflow errors all mean the same to the user
        if "out-of-date database schema" in str(err):  # a store made by another MLflow version
            found = re.search(r"\(found version [^)]*\)", str(err))
            raise StorageError(
                f"the tracking store {uri} has another schema than this MLflow's {found.group(0) if found else ''}. "
                f"Made by an older MLflow: keep a copy of it, then upgrade it: `mlflow db upgrade {uri}`; "
                f"by a newer one: use that MLflow version (pip show mlflow)."
            ) from None
        raise ConfigError(
            f"tracking.uri={uri} cannot be used: {type(err).__name__}: {str(err)[:300]}. "
            "Check the URI, or use a local store: tracking.uri=sqlite:///mlflow.db"
        ) from None
    if urlparse(artifacts).scheme in ("", "file"):  # a folder of this machine (not mlflow-artifacts:/1, s3://...)
        check_writable(Path(artifacts.removeprefix("file://")), "the artifact folder", "tracking.artifact_root (new experiments)")
    close_dead_runs(uri, exp_id)
    return exp_id


def check_server(uri: str) -> None:
    """An http(s) tracking server answers and lets this client in on a real API call (``/health`` needs no login).

    A server with authentication refuses a client without credentials or with wrong ones; MLflow
    would report that deep in the first logging call, so it is found here, with the fix.
    """
    if not uri.startswith(("http://", "https://")):
        return
    try:
        requests.get(f"{uri.rstrip('/')}/health", timeout=10).raise_for_status()
        answer = http_request(get_default_host_creds(uri), "/api/2.0/mlflow/experiments/search", "GET",
                              params={"max_results": 1}, max_retries=0, timeout=30)
    except (requests.RequestException, mlflow.exceptions.MlflowException) as err:
        raise ConfigError(
            f"tracking.uri={uri} does not answer ({type(err).__name__}: {err}). "
            "Start the server, or use a local store: tracking.uri=sqlite:///mlflow.db"
        ) from None
    if answer.status_code in REFUSED:
        user = read_mlflow_creds().username
        who = f"the user {user!r} with the password given" if user else "a client without credentials"
        raise ConfigError(
            f"tracking.uri={uri} refused {who} (HTTP {answer.status_code}). Set MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD (or ~/.mlflow/credentials) to an account of that server that may write runs."
        )


# What an experiment is for, as MLflow 3 records it (its UI sets it when a person picks a kind): model
# training, not GenAI apps. MLflow 3.17's UI picks its view by its own toggle instead (runner.report.summary.ui_link).
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


def experiment_id(uri: str, name: str, artifact_root: str) -> str:
    """Get or create the experiment, tagged as model development; local stores keep its artifacts under ``artifact_root``.

    An existing experiment without a kind (made by an older runner) gets the tag too; one
    whose kind a person chose keeps it.
    """
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        local = uri.startswith(("sqlite:", "file:")) or "://" not in uri
        location = absolute_path(artifact_root).as_uri() if local else None
        try:
            return client.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except mlflow.exceptions.MlflowException:  # created meanwhile by a parallel job
            experiment = client.get_experiment_by_name(name)
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return experiment.experiment_id


def _open_sqlite(database: Path, uri: str) -> None:
    """Create the sqlite store under a lock, so concurrent first opens never race its migrations; then check it.

    Only creation takes the lock: a store is moved into place complete, so one that exists can be
    checked by many processes at once (16 runs serialised on the lock while each checked the schema,
    seconds of imports on a busy machine, and one waited past LOCK_TIMEOUT_S: experiments.md).
    """
    check_writable(database.parent, "the tracking store's folder", "tracking.uri")
    if database.exists() and not os.access(database, os.R_OK | os.W_OK):
        raise StorageError(f"the tracking store {database} cannot be read and written. Fix its permissions or set tracking.uri.")
    try:
        if not _made(database):
            with FileLock(f"{database}.lock", timeout=LOCK_TIMEOUT_S):
                if not _made(database):
                    _create_sqlite(database)
    except Timeout:
        raise StorageError(
            f"the tracking store {database} stayed locked by another process for {LOCK_TIMEOUT_S} s ({database}.lock). "
            "If no other run is starting, a process hung while creating it: stop it, or delete the lock file."
        ) from None
    damage = _damage(database)
    if damage:
        raise StorageError(
            f"the tracking store {database} was left half-made by a process that crashed while creating or "
            f"upgrading it ({damage}). Keep a copy (cp {database} {database}.bak), then either delete it if it holds "
            f"no runs you need (the next run makes a new one), or drop the leftover tables and finish the upgrade: "
            f"`mlflow db upgrade {uri}`."
        )


def _made(database: Path) -> bool:
    return database.exists() and database.stat().st_size > 0


def _create_sqlite(database: Path) -> None:
    """Make a new store by MLflow's migrations in a hidden sibling, moved into place only when complete,
    so a crash or a full disk mid-way never leaves a half-made store at ``database``."""
    making = database.with_name(f".{database.name}.making")
    making.unlink(missing_ok=True)  # left by a process killed while making it
    try:
        store = mlflow.MlflowClient(f"sqlite:///{making}")._tracking_client.store
        store.engine.dispose()
        os.replace(making, database)
    except Exception as err:  # noqa: BLE001 - whatever failed, nothing half-made stays
        making.unlink(missing_ok=True)
        free = shutil.disk_usage(database.parent).free
        raise StorageError(
            f"the tracking store {database} could not be created ({type(err).__name__}: {str(err).splitlines()[0][:200]}; "
            f"{free / 2**20:.1f} MB free there, a new store needs about {NEW_STORE_MB} MB). "
            "Free space there, or set tracking.uri to another place."
        ) from None


def _damage(database: Path) -> str | None:
    """What is wrong with an existing store's schema (leftover migration tables, no version), or None.

    An old but whole schema is MLflow's own check when the store opens (its list of migrations
    takes a noticeable part of a second to read, so it is read once, there).
    """
    if not _made(database):
        return None
    try:
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as db:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            version = db.execute("SELECT version_num FROM alembic_version").fetchone() if "alembic_version" in tables else None
    except sqlite3.DatabaseError as err:
        return f"not a readable sqlite database: {err}"
    leftovers = sorted(t for t in tables if t.startswith("_alembic_tmp_"))
    if leftovers:
        return f"leftover tables {', '.join(leftovers)}"
    if tables and version is None:
        return "no schema version"
    return None  # an older version than this MLflow's: MLflow's own check, when the store opens (open_store)
