"""Ctrl-C and SIGTERM stop a run at the next safe point, not in the middle of a write.

An interruption raised at an arbitrary bytecode could land inside an MLflow write to the
sqlite store and leave that connection holding the database lock, so the run could not
even be marked KILLED. The handler only records the request (datasets.stopping, which every
long loop checks); a second signal stops at once. This module also remembers which MLflow
runs the process opened and which one a stop ended, so the last message says what is true.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable

from crack_runner.datasets import stopping

log = logging.getLogger(__name__)

_opened_runs: list[str] = []  # MLflow runs this process opened (tracking.start_run), for the final message
_killed_run: str | None = None  # the MLflow run a stop ended (marked KILLED by tracking.start_run)
_closers: list[Callable[[str], list[str]]] = []  # close what a sweep left open (runner.track.sweep registers one)


def install() -> None:
    """Route SIGINT and SIGTERM to the deferred stop (the main process of ``python -m runner`` and ``runner.inspect``)."""
    signal.signal(signal.SIGINT, _handler)
    signal.signal(signal.SIGTERM, _handler)


def _handler(signum: int, frame: object) -> None:
    if stopping.requested() is not None:
        raise KeyboardInterrupt(f"{stopping.requested()} received twice")
    stopping.request(signal.Signals(signum).name)
    log.warning("%s received: stopping at the next safe point (send it again to stop at once)", stopping.requested())


def reset() -> None:
    """Forget the runs and stop of the last command: a second command run in the same interpreter starts afresh."""
    global _killed_run
    _opened_runs.clear()
    _killed_run = None
    stopping.clear()


def opened_run(run_id: str) -> None:
    """Record that this process opened MLflow run ``run_id``, so the final message can say what was recorded."""
    _opened_runs.append(run_id)


def opened_runs() -> list[str]:
    """The MLflow runs this process opened, oldest first."""
    return list(_opened_runs)


def killed_run(run_id: str) -> None:
    """Record that a stop ended MLflow run ``run_id`` (tracking.start_run marked it KILLED)."""
    global _killed_run
    _killed_run = run_id


def stopped_run() -> str | None:
    """The MLflow run a stop ended, or None."""
    return _killed_run


def close_at_exit(closer: Callable[[str], list[str]]) -> None:
    """Have ``closer(status)`` run when the command ends, however it ends (the sweep's parent runs)."""
    if closer not in _closers:
        _closers.append(closer)


def close_all(status: str) -> list[str]:
    """Run the registered closers with the command's final status; the ids of the runs they closed."""
    return [run_id for closer in _closers for run_id in closer(status)]
