"""File helpers shared by the runner: paths from the command line, atomic writes, writable folders."""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.utils import to_absolute_path
from omegaconf import DictConfig

from runner.errors import FULL, StorageError

log = logging.getLogger(__name__)

PROBE_BYTES = 64 * 1024  # written by check_writable: an empty file can still be made on a full disk


def absolute_path(path: str) -> Path:
    """``path`` relative to the folder the command was started in, also inside sweep and Ray jobs."""
    expanded = str(Path(path).expanduser())
    return Path(to_absolute_path(expanded)) if HydraConfig.initialized() else Path(expanded).resolve()


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` and move it into place only if the block succeeds.

    A reader (or a resumed run) therefore sees the previous complete file or the new
    complete file, never a half-written one, even if the process is killed mid-write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.partial{path.suffix}")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:  # a full or read-only disk: name the file, which writers through file objects do not
        if err.filename is None:
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise
    finally:
        tmp.unlink(missing_ok=True)


def check_writable(folder: Path, what: str, key: str) -> None:
    """Raise a StorageError naming ``folder`` unless PROBE_BYTES can be written in it (made if missing).

    A real write, not ``os.access``: root passes permission checks but not a read-only mount,
    and only a write with bytes finds a full disk.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-") as probe:
            probe.write(bytes(PROBE_BYTES))
            probe.flush()
    except OSError as err:
        fix = "Free space there" if err.errno in FULL else "Make it writable"
        raise StorageError(f"{what} {folder} cannot be written ({err.strerror or err}). {fix}, or set {key} to another place.") from None


class OutputFolderCheck(Callback):
    """Checks Hydra's run folder before Hydra writes its config and log there, which would end
    in Hydra's traceback on a read-only or full disk; a sweep's folder is claimed by runner.track.sweep."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            check_writable(absolute_path(str(config.hydra.run.dir)), "the run's output folder", "hydra.run.dir")
        except StorageError as err:  # Hydra turns a callback's exception into a warning: stop here
            log.error("%s", err)
            sys.exit(2)
