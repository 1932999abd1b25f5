"""Credentials kept out of everything the runner writes or prints.

A tracking URI may carry a password (``http://user:secret@host``) or a token in its query
(``?token=...``). MLflow still connects with it as given; but the config and the command line
also go to MLflow (params, tags, the run name), to Hydra's output folder (``.hydra/*.yaml``,
the job's log file) and to the terminal. :func:`redact` puts ``***`` in place of the secret in a
text; :class:`RedactSecrets` does that to every line Hydra's log handlers print or write, and
:class:`RedactHydraFiles` to the files Hydra saves in a job's folder (both in conf/config.yaml).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from hydra.types import RunMode
from hydra.utils import to_absolute_path
from omegaconf import DictConfig

MASK = "***"

# scheme://user:password@host: the password, up to the last "@" before the host's path, query or fragment; also
# as Hydra writes an override in a sweep (http\://user\:password@host), each ":" escaped.
_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*\\?://[^\s:/?#@'\"]*:)[^\s/?#'\"]+(?=@)")
# ?token=..., &password=..., &X-Amz-Signature=..., &sig=... (an Azure SAS): the value of a query parameter named for a secret.
_QUERY_SECRET = re.compile(
    r"(?P<head>[?&;][\w.-]*?(?:token|password|passwd|pwd|secret|api[_-]?key|signature|sig|credential)\\?=)[^&#\s'\"]+",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@host`` and every secret query value as ``***``."""
    if "@" not in text and "=" not in text:  # most log lines: nothing to look for
        return text
    text = _PASSWORD.sub(rf"\g<head>{MASK}", text)
    return _QUERY_SECRET.sub(rf"\g<head>{MASK}", text)


def redact_all(value: Any) -> Any:
    """``value`` with every string in it redacted, through dicts, lists and tuples (e.g. a config as a container)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {key: redact_all(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_all(item) for item in value)
    return value


class RedactSecrets(logging.Filter):
    """Redacts each record's message, traceback and stack, so no handler it is on prints or writes a secret.

    A handler's filter (conf/config.yaml), not a logger's: it sees the records of every logger
    that propagates to the handler, MLflow's and Hydra's included.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed logging call: left for the handler's own error report
            return True
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)  # formatters use this text as given
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


class RedactHydraFiles(Callback):
    """Redacts what Hydra keeps of a job's command line: the config files it saved before the job starts
    (``.hydra/config.yaml``, ``overrides.yaml``, ``hydra.yaml``; a sweep's ``multirun.yaml``), and the
    overrides it prints when the job fails ("Error executing job with overrides: ...")."""

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        files: list[Path] = []
        if config.hydra.output_subdir is not None:
            files += sorted(Path(config.hydra.runtime.output_dir, config.hydra.output_subdir).glob("*.yaml"))
        if config.hydra.mode == RunMode.MULTIRUN:  # written by the sweeper, in the folder of the whole sweep
            files.append(Path(to_absolute_path(str(config.hydra.sweep.dir)), "multirun.yaml"))
        for path in files:
            if path.is_file():
                _rewrite_redacted(path)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if job_return.overrides:
            job_return.overrides = [redact(str(override)) for override in job_return.overrides]


def _rewrite_redacted(path: Path) -> None:
    """Replace ``path`` by its redacted text, atomically (parallel sweep jobs may rewrite one multirun.yaml), if that differs."""
    text = path.read_text()
    clean = redact(text)
    if clean == text:
        return
    handle, staged = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(handle, "w") as out:
            out.write(clean)
        os.chmod(staged, path.stat().st_mode)
        os.replace(staged, path)
    finally:
        Path(staged).unlink(missing_ok=True)


def command_logging(level: int, fmt: str) -> None:
    """``logging.basicConfig`` for the commands that Hydra does not configure (compare, doctor, predict), secrets redacted."""
    logging.basicConfig(level=level, format=fmt, stream=sys.stderr)
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactSecrets())
