"""Is this run alive? A lease that only the live process can keep.

A host name and a process id do not say whether a run lives: containers on one host, or
machines cloned from one image, share a host name but not their process ids, so "host
matches, pid gone" took live runs for dead. Every run (and every sweep's parent run) holds
instead:

- a **heartbeat**: the ``runner.heartbeat`` tag, rewritten every quarter of the lease
  (``runner.lease_s`` seconds, ``$CRACK_RUNNER_LEASE_S`` or 60) by a thread of the process
  that owns the run, and set to ``ended`` when that process lets go of the run, once its end
  status is written; a run whose heartbeat is older than its lease is dead, on any host;
- a **folder lock**: an OS lock (``flock``) on ``.lease-<run id>.lock`` in the run's output
  folder, held as long as the process lives; wherever that folder can be seen (the same
  machine, or a shared disk), a held lock means alive and a free one means dead, at once.

The owner also checks, at every beat, that the record is still its own (same lease id,
still RUNNING): if another process took the run over, or a person closed it, this process
stops at its next safe point and writes nothing more into it.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shlex
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.entities import Run

from crack_runner.datasets import stopping

log = logging.getLogger(__name__)

HOST_TAG, PROCESS_TAG, STARTED_TAG = "runner.host", "runner.pid", "runner.started"
SWEEP_ROLE_TAG, SWEEP_PARENT_ROLE = "sweep_role", "sweep_parent"  # the sweep_role tag of a sweep's parent run
LEASE_TAG, LEASE_S_TAG, HEARTBEAT_TAG = "runner.lease", "runner.lease_s", "runner.heartbeat"
FOLDER_TAG = "output_dir"  # the run's output folder on its machine (runner.app.run_spec)
ENDED = "ended"  # the heartbeat of a run whose process gave its lease back
DEFAULT_LEASE_S = 60.0  # a SIGKILLed run is closable this long after its last beat


def lease_seconds() -> float:
    """How long a beat keeps a run alive: ``$CRACK_RUNNER_LEASE_S`` (tests shorten it), else 60 s."""
    return max(1.0, float(os.environ.get("CRACK_RUNNER_LEASE_S") or DEFAULT_LEASE_S))


def lock_path(folder: str | Path, run_id: str) -> Path:
    """The folder lock of run ``run_id``: named by the run, so folds and parents sharing a folder each have one."""
    return Path(folder) / f".lease-{run_id}.lock"


class Lease:
    """Held by the process that owns a run: the folder lock, and a thread that beats until :meth:`release`."""

    def __init__(self, uri: str, folder: Path | None) -> None:
        self.uri, self.folder = uri, folder
        self.run_id = ""  # known once the run is opened with :meth:`tags`
        self.id = uuid.uuid4().hex
        self.seconds = lease_seconds()
        self.lost: str | None = None  # why the record stopped being this process's own
        self._stop = threading.Event()
        self._fd: int | None = None
        self._thread: threading.Thread | None = None

    def tags(self) -> dict[str, str]:
        """The tags that claim the run for this process (with its first beat)."""
        tags = {LEASE_TAG: self.id, LEASE_S_TAG: f"{self.seconds:g}", HEARTBEAT_TAG: f"{time.time():.1f}"}
        return {**tags, **({FOLDER_TAG: str(self.folder)} if self.folder is not None else {})}

    def hold(self, run_id: str) -> None:
        """Take the folder lock of run ``run_id`` and start beating; call once its record carries :meth:`tags`."""
        self.run_id = run_id
        if self.folder is not None:
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                fd = os.open(lock_path(self.folder, self.run_id), os.O_RDWR | os.O_CREAT, 0o644)
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._fd = fd
            except OSError as err:  # a disk without locks: the heartbeat alone tells
                log.debug("no folder lock for run %s (%s); its heartbeat alone says it is alive", self.run_id, err)
        self._thread = threading.Thread(target=self._beat, name=f"lease-{self.run_id[:8]}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        client = mlflow.MlflowClient(self.uri)
        warned = False
        while not self._stop.wait(self.seconds / 4):
            try:
                run = client.get_run(self.run_id)
                if self._stop.is_set():  # release() began and may be writing the end status: that is no other owner
                    return
                owner = run.data.tags.get(LEASE_TAG)
                if owner != self.id or run.info.status != "RUNNING":
                    self.lost = (f"taken over by process {run.data.tags.get(PROCESS_TAG, '?')} on {run.data.tags.get(HOST_TAG, '?')}"
                                 if owner != self.id else f"marked {run.info.status} by another process")
                    log.error("MLflow run %s was %s: this process stops and writes nothing more into it", self.run_id, self.lost)
                    stopping.request("lease lost")
                    return
                client.set_tag(self.run_id, HEARTBEAT_TAG, f"{time.time():.1f}")
                warned = False
            except Exception as err:  # noqa: BLE001 - a store that is busy or away for a moment: beat again next time
                if not warned:
                    log.warning("heartbeat of run %s not written (%s: %s); retrying", self.run_id, type(err).__name__, str(err)[:200])
                    warned = True

    def release(self, end: Callable[[], None]) -> None:
        """Stop beating, then ``end()`` (write the run's end status) unless another process owns the record now, then give the lease back.

        In that order: a run still RUNNING keeps a live lease until its status is written, so
        another process looking for dead runs (:func:`close_dead_runs`) in between never marks a
        run that just FINISHED as KILLED over it. If ``end()`` raises (a full store), the lock
        file stays, free: it tells others at once that the run's owner is gone.
        """
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        given_back = False
        try:
            if self.lost is None:
                end()
                if self._thread is not None:
                    try:
                        mlflow.MlflowClient(self.uri).set_tag(self.run_id, HEARTBEAT_TAG, ENDED)
                        given_back = True
                    except Exception as err:  # noqa: BLE001 - a full store: the free folder lock (kept) or the lease's expiry tells
                        log.warning("run %s: its lease could not be given back (%s); it expires in %g s", self.run_id, err, self.seconds)
        finally:
            if self._fd is not None:
                if given_back:
                    lock_path(self.folder, self.run_id).unlink(missing_ok=True)  # while held: nobody takes a lock being removed
                os.close(self._fd)
                self._fd = None


@dataclass(frozen=True)
class Liveness:
    """What can be told of a run's owner: ``alive`` True/False, or None where nothing tells (a run of an older runner on another host)."""

    alive: bool | None
    why: str


def liveness(run: Run, now: float | None = None) -> Liveness:
    """Whether the process owning ``run`` lives: its folder lock where visible, else its heartbeat; older runs by host and pid."""
    tags = run.data.tags
    where = f"process {tags.get(PROCESS_TAG, '?')} on {tags.get(HOST_TAG, 'an unknown host')}"
    folder = tags.get(FOLDER_TAG)
    if folder and LEASE_TAG in tags:
        held = lock_held(lock_path(folder, run.info.run_id))
        if held is not None:
            return Liveness(held, f"{where} {'holds' if held else 'no longer holds'} its folder lock in {folder}")
    if tags.get(HEARTBEAT_TAG) == ENDED:
        return Liveness(False, f"{where} gave its lease back when it ended")
    if HEARTBEAT_TAG in tags:
        age = (now or time.time()) - float(tags[HEARTBEAT_TAG])
        lease = float(tags.get(LEASE_S_TAG, DEFAULT_LEASE_S))
        state = "alive" if age <= lease else "gone"
        return Liveness(age <= lease, f"{where} was last seen {_ago(age)} ago (lease {lease:g} s: {state})")
    alive = process_alive(tags)  # made by a runner without leases
    if alive is None:
        return Liveness(None, f"{where} cannot be checked from here (no lease)")
    return Liveness(alive, f"{where} {'is running' if alive else 'is gone'}")


def lock_held(path: Path, remove_if_free: bool = False) -> bool | None:
    """Whether a process holds the lock file ``path`` (None: no such file here, e.g. another machine's folder).

    ``remove_if_free``: delete a free one while holding it, which lock waiters (filelock) expect.
    """
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if remove_if_free:
            path.unlink(missing_ok=True)
        return False
    except BlockingIOError:
        return True
    except OSError:
        return None
    finally:
        os.close(fd)  # releases the lock


def _ago(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def refuse_if_alive(run: Run, what: str) -> None:
    """Raise ConfigError when ``run``'s owner lives (or cannot be told dead while the run is RUNNING): never two writers."""
    from runner.errors import ConfigError

    state = liveness(run)
    if state.alive:
        raise ConfigError(f"{what} (run {run.info.run_id}) is still alive: {state.why}. Let it end, or stop that process first.")
    if state.alive is None and run.info.status == "RUNNING":
        raise ConfigError(
            f"{what} (run {run.info.run_id}) is marked RUNNING and {state.why}. If that process is gone, close its runs with: "
            "python -m runner.doctor --other-hosts --fix"
        )


def _process_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, with the boot's id), or None if it is gone.

    A pid alone is reused by the system; the pair tells this process from a later one with its number.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        if not Path("/proc/self/stat").exists():  # no /proc (macOS): the pid alone
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return None
            except PermissionError:
                pass
            return "?"
        return None
    return f"{boot}:{stat.rsplit(')', 1)[1].split()[19]}"


def process_tags() -> dict[str, str]:
    """Where this process runs, recorded on every run so a run whose process died can be found."""
    return {
        HOST_TAG: socket.gethostname(),
        PROCESS_TAG: f"{os.getpid()}@{_process_start(os.getpid())}",
        STARTED_TAG: time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def process_alive(tags: dict[str, str]) -> bool | None:
    """Whether the process a run's tags name still runs: None when it ran on another host (cannot tell)."""
    if tags.get(HOST_TAG) != socket.gethostname() or PROCESS_TAG not in tags:
        return None
    pid, _, start = tags[PROCESS_TAG].partition("@")
    now = _process_start(int(pid))
    return now is not None and (now == start or "?" in (now, start))


def close_dead_runs(uri: str, exp_id: str) -> list[str]:
    """Mark RUNNING runs whose owner is known to be gone (lease expired, folder lock free) as KILLED; return their ids."""
    client = mlflow.MlflowClient(uri)
    closed = []
    for run in client.search_runs([exp_id], filter_string="attributes.status = 'RUNNING'", max_results=1000):
        state = liveness(run)
        if state.alive is False:
            close_run(client, run, f"was left RUNNING: {state.why}")
            closed.append(run.info.run_id)
    return closed


def resume_command(run: Run) -> str:
    """The shell command that continues ``run``: its overrides, quoted so that pasted it runs nothing else, and ``resume=``."""
    sweep = ["-m"] if run.data.tags.get(SWEEP_ROLE_TAG) == SWEEP_PARENT_ROLE else []
    overrides = [o for o in split_overrides(run.data.tags.get("overrides", "")) if not o.startswith("resume=")]
    return shlex.join(["python", "-m", "runner", *sweep, *overrides, f"resume={run.info.run_id}"])


def split_overrides(text: str) -> list[str]:
    """The overrides of the ``overrides`` tag: shell words as written by :func:`join_overrides` (older runs: split on spaces)."""
    try:
        return shlex.split(text)
    except ValueError:
        return text.split()


def join_overrides(overrides: list[str]) -> str:
    """The ``overrides`` tag: each override one shell word, so Hydra's quotes and spaces inside a value survive."""
    return shlex.join(overrides)


def close_run(client: mlflow.MlflowClient, run: Run, why: str) -> None:
    """Mark ``run`` KILLED, with a log line saying ``why`` and the command that continues it."""
    client.set_terminated(run.info.run_id, "KILLED")
    log.warning("run %s (%s) %s: marked KILLED. Continue it with: %s", run.info.run_id, run.info.run_name, why, resume_command(run))
