"""Stop requests that long work honours within a fraction of a second, and worker processes that die with us.

Why here: data loading (decode, generation, download, checksums), the Keras feature pass and
the training loops all take long and must stop on Ctrl-C; this module is in the lowest layer
so that all of them can ask it without ``datasets`` or ``models`` importing the runner. The
runner's signal handler (runner.track.interrupt) only calls :func:`request`; long loops call
:func:`check` where stopping leaves nothing half-done, which raises KeyboardInterrupt there.

A wait that blocks (a pool's result, a sleep) would not notice the request, so long stages
wait through :func:`completed`, :func:`imap` and :func:`sleep`, which look at it every
:data:`POLL_S`. Worker processes come from :func:`process_pool`: they leave the signals to
this process and die with it, even when it is killed with SIGKILL.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import multiprocessing.pool
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, wait
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

POLL_S = 0.2  # how often a blocked wait looks for a stop request
STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>

_requested: str | None = None


def request(reason: str) -> None:
    """Ask every long loop of this process to stop at its next :func:`check` (a signal handler calls this)."""
    global _requested
    _requested = reason


def clear() -> None:
    """Forget a stop request: a second command run in the same interpreter starts unstopped."""
    global _requested
    _requested = None


def requested() -> str | None:
    """Why a stop was requested (e.g. ``SIGINT``), or None."""
    return _requested


def check() -> None:
    """Raise KeyboardInterrupt if a stop was requested: call where stopping leaves nothing half-done."""
    if _requested is not None:
        raise KeyboardInterrupt(_requested)


def completed(futures: Iterable[Future[T]]) -> Iterator[T]:
    """The futures' results in order, raising KeyboardInterrupt within POLL_S of a stop request."""
    for future in futures:
        check()
        while wait([future], timeout=POLL_S).not_done:
            check()
        yield future.result()


def sleep(seconds: float) -> None:
    """``time.sleep`` that ends with KeyboardInterrupt within POLL_S of a stop request (retry back-offs)."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        check()
        time.sleep(min(left, POLL_S))
    check()


# --------------------------------------------------------------------- worker processes


def process_pool(processes: int) -> multiprocessing.pool.Pool:
    """A process pool whose workers die with this process and ignore Ctrl-C; use it in a ``with``.

    Leaving the ``with`` terminates the workers at once (SIGTERM, default action in them),
    also on an interruption; if this process is killed, the kernel kills them (Linux).
    SIGINT and SIGTERM stay blocked from the fork until a worker has reset the handlers it
    inherited, so none can reach a worker's copy of :func:`_handler`, which would ignore it.
    """
    # fork (Linux) or spawn, never forkserver: the workers' parent must be this process, not a server.
    context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        return context.Pool(processes, initializer=_init_worker, initargs=(os.getpid(),))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def imap(pool: multiprocessing.pool.Pool, func: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
    """``pool.imap_unordered`` of one task per item (batch small items yourself: a chunksize > 1 gives
    an iterator without a timeout), raising KeyboardInterrupt within POLL_S of a stop request."""
    results = pool.imap_unordered(func, items)
    while True:
        check()
        try:
            yield results.next(timeout=POLL_S)
        except multiprocessing.TimeoutError:
            continue
        except StopIteration:
            return


def _init_worker(parent: int) -> None:
    """Pool initializer: default SIGTERM (terminate() must kill), SIGINT ignored (the parent decides), die with the parent."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_PDEATHSIG) failed (%s): this worker may outlive a killed runner", os.strerror(ctypes.get_errno()))
    if os.getppid() != parent:  # the parent died before prctl took effect: no signal will come
        os._exit(1)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
