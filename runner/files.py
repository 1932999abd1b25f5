"""File helpers shared by both trainers."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.utils import to_absolute_path


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
    finally:
        tmp.unlink(missing_ok=True)
