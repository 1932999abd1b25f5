"""Errors meant for the person at the keyboard.

A user error (:data:`USER_ERRORS`) carries a message that names the key or file at fault and how to fix it;
the entry point prints it without a traceback and exits with status 2.
"""

from __future__ import annotations

import errno
import os

from crack_runner.datasets.errors import DataError
from crack_runner.models.errors import ModelError


class RunnerError(Exception):
    """A problem with the user's input, reported without a traceback."""


class ConfigError(RunnerError):
    """A configuration value is invalid."""


class TrainingError(RunnerError):
    """Training cannot go on (for example the loss became NaN)."""


class StorageError(RunnerError):
    """A folder or store cannot be written: full, read-only or locked."""


# Everything reported as one message, exit status 2: the runner's own errors and those the
# lower layers (datasets, models) define for the same purpose without importing the runner.
USER_ERRORS = (RunnerError, DataError, ModelError)


# errno values that mean "the storage cannot take this write", whatever library wrote it.
FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
STORAGE_ERRNOS = FULL | {errno.EROFS, errno.EACCES, errno.EPERM}


# What SQLite says (through SQLAlchemy and MLflow) when its disk is full or its file read-only.
SQLITE_STORAGE_MESSAGES = ("database or disk is full", "attempt to write a readonly database", "unable to open database file")


def storage_error(err: BaseException) -> StorageError | None:
    """A StorageError naming the folder of a failed write, or None if ``err`` is not a storage fault."""
    if not isinstance(err, OSError):
        said = next((m for m in SQLITE_STORAGE_MESSAGES if m in str(err)), None)
        if said is None:
            return None
        return StorageError(
            f"the tracking store could not be written ({said}). Free space where tracking.uri points "
            "(or make it writable), or set tracking.uri to another store."
        )
    if err.errno not in STORAGE_ERRNOS:
        return None
    name = os.fspath(err.filename) if err.filename else None
    what = "cannot write in a folder this run writes to" if name is None else (
        f"cannot write in {name}" if os.path.isdir(name) else f"cannot write {name} (in {os.path.dirname(name)})")
    fix = "Free space there" if err.errno in FULL else "Make it writable (it, or its disk, is read-only or not yours)"
    return StorageError(
        f"{what}: {err.strerror}. {fix}, or point the run elsewhere: {WRITERS}."
    )


WRITERS = "dataset.cache_dir, trainer.feature_cache_dir, tracking.uri, tracking.artifact_root, hydra.run.dir, hydra.sweep.dir"
