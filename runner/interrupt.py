"""Ctrl-C and SIGTERM stop a run at the next safe point, not in the middle of a write.

An interruption raised at an arbitrary bytecode could land inside an MLflow write to the
sqlite store and leave that connection holding the database lock, so the run could not
even be marked KILLED. The handler only records the request; the training loops call
:func:`check` between batches, which raises KeyboardInterrupt there. A second signal
stops at once.
"""

from __future__ import annotations

import logging
import signal

log = logging.getLogger(__name__)

_requested: str | None = None


def install() -> None:
    """Route SIGINT and SIGTERM to the deferred stop (main process of ``python -m runner`` only)."""
    signal.signal(signal.SIGINT, _handler)
    signal.signal(signal.SIGTERM, _handler)


def _handler(signum: int, frame: object) -> None:
    global _requested
    if _requested is not None:
        raise KeyboardInterrupt(f"{_requested} received twice")
    _requested = signal.Signals(signum).name
    log.warning("%s received: stopping after the current batch (send it again to stop at once)", _requested)


def check() -> None:
    """Raise KeyboardInterrupt if a stop was requested: call where stopping leaves nothing half-done."""
    if _requested is not None:
        raise KeyboardInterrupt(_requested)
