"""``python -m runner.doctor``: what interrupted runs leave behind, reported, and cleaned on request.

A run killed outright (SIGKILL, the out-of-memory killer, a power cut) leaves its MLflow run
RUNNING and may leave half-written files, lock files and cache entries that no run will read
again. A run opening the store closes the dead runs of its own host
(:func:`runner.track.lease.close_dead_runs`); this command finds, across all experiments and caches:

- stale runs: RUNNING runs whose lease has expired (runner.track.lease: no heartbeat for the lease's
  length, or a free folder lock), on any host, and silent for ``--older-than`` when given; a
  run whose lease is live is never touched. Runs of older runners (no lease): this host's
  whose process is gone and, with ``--other-hosts``, those this host cannot check that showed
  no sign of life (start, epoch, a sweep job's epoch) for ``--older-than`` (default 1 day);
- partial files (``*.partial*``, ``.*.making`` stores) that no process has open or mapped and
  that were not written in the last PARTIAL_QUIET_S seconds (a write may be between steps);
- lock files that no process holds (removed while holding them, which filelock's waiters expect);
- cache entries no run can use: decode-cache folders of an older format, incomplete, or whose
  image files no longer exist; frozen-feature entries that are damaged, or made by another
  store format or library version than the installed ones.

It only reports (``--dry-run``, the default), on stdout; ``--fix`` closes the stale runs
(KILLED, with a log line giving the command that resumes each) and removes the leftovers that
no process is using.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.entities import Run

from crack_runner.datasets import integrity
from crack_runner.datasets.decoded import FORMAT as DECODE_FORMAT
from crack_runner.datasets.decoded import MARKER, SOURCES
from runner.config.redact import command_logging, redact
from runner.track.lease import HEARTBEAT_TAG, HOST_TAG, SWEEP_PARENT_ROLE, close_run, liveness, lock_held, resume_command
from runner.track.store import absolute_tracking_uri, sqlite_file

log = logging.getLogger("runner.doctor")

PARTIAL_QUIET_S = 300  # a partial file written more recently may belong to a write in progress
AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True)
class Leftover:
    """A file or folder to remove: what it is, its path and size, and why no run needs it."""

    kind: str  # partial | lock | unusable
    path: Path
    size: int
    why: str


def parse_age(text: str) -> float:
    """``90s``, ``30m``, ``2h``, ``1d`` (a bare number: seconds) as seconds, for ``--older-than``."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not an age: write e.g. 90s, 30m, 2h or 1d")
    return float(match[1]) * AGE_UNITS[match[2] or "s"]


def human(seconds: float) -> str:
    """A duration as the report shows it."""
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def size_text(count: int) -> str:
    """A byte count as the report shows it."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} B"


# ---- stale runs


def last_activity(client: mlflow.MlflowClient, run: Run) -> float:
    """When ``run`` last showed life (seconds since the epoch): its start, heartbeat, last epoch, or its sweep jobs'."""
    times = [run.info.start_time / 1000, float(run.data.tags.get(HEARTBEAT_TAG, 0))]
    times += [m.timestamp / 1000 for m in client.get_metric_history(run.info.run_id, "val_loss")[-1:]]
    if run.data.tags.get("sweep_role") == SWEEP_PARENT_ROLE:
        jobs = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'")
        times += [last_activity(client, job) for job in jobs]
    return max(times)


LEGACY_OLDER_THAN_S = 86400  # runs without a lease on other hosts: silent this long before --other-hosts closes them


def stale_runs(client: mlflow.MlflowClient, other_hosts: bool, older_than: float | None) -> Iterator[tuple[Run, str]]:
    """RUNNING runs whose owner is gone (lease expired; older runs: process gone, or silent on other hosts), and why."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    for run in client.search_runs(experiments, "attributes.status = 'RUNNING'", max_results=10_000) if experiments else []:
        state = liveness(run)
        idle = time.time() - last_activity(client, run)
        if state.alive is False and (older_than is None or idle > older_than):
            yield run, f"was left RUNNING: {state.why}"
        elif state.alive is None and other_hosts and idle > (older_than or LEGACY_OLDER_THAN_S):
            host = run.data.tags.get(HOST_TAG, "an unknown host")
            yield run, f"is RUNNING on {host} with no sign of life for {human(idle)} (--older-than {human(older_than or LEGACY_OLDER_THAN_S)})"


# ---- leftover files


def open_files() -> set[str]:
    """Every file some process has open or memory-mapped (Linux /proc; empty elsewhere)."""
    paths: set[str] = set()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            for fd in (proc / "fd").iterdir():
                try:
                    paths.add(os.readlink(fd))
                except OSError:
                    pass  # closed meanwhile
            for line in (proc / "maps").read_text().splitlines():
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].startswith("/"):
                    paths.add(fields[5])
        except OSError:  # the process ended meanwhile
            continue
    return paths


def in_use(path: Path, opened: set[str]) -> bool:
    """Whether a process has ``path``, or a file under it, open or mapped."""
    text = str(path)
    return text in opened or any(p.startswith(text + "/") for p in opened)


def files_under(path: Path) -> list[Path]:
    """``path`` itself if a file, else the files in the folder ``path`` and below."""
    return [path] if not path.is_dir() else [Path(d) / f for d, _, names in os.walk(path) for f in names]


def size_of(path: Path) -> int:
    """Bytes of the file or folder ``path`` (what removing it frees)."""
    return sum(f.stat().st_size for f in files_under(path) if f.exists())


def is_partial(path: Path) -> bool:
    """A half-written file or folder by this project's naming: ``*.partial*``, or a store being made (``.*.making``)."""
    return ".partial" in path.name or (path.name.startswith(".") and path.name.endswith(".making"))


def walk(roots: list[Path]) -> tuple[list[Path], list[Path]]:
    """(partial files and folders, lock files) under ``roots``; partial folders are not entered."""
    partials, locks = [], []
    for root in roots:
        for folder, dirs, names in os.walk(root):
            for name in list(dirs):
                if is_partial(Path(folder) / name):
                    partials.append(Path(folder) / name)
                    dirs.remove(name)
            for name in names:
                path = Path(folder) / name
                if is_partial(path):
                    partials.append(path)
                elif name.endswith(".lock"):
                    locks.append(path)
    return partials, locks


def lock_is_free(path: Path, remove: bool = False) -> bool:
    """Whether no process holds the lock file ``path``; ``remove``: delete it while holding it, if free."""
    return lock_held(path, remove_if_free=remove) is False


def decode_cache_problem(folder: Path) -> str | None:
    """Why no run can use the decode-cache folder ``folder`` (datasets.decoded), or None if one can."""
    try:
        meta = integrity.read_json(folder / MARKER)
    except FileNotFoundError:
        return f"incomplete: it has no {MARKER}"
    except integrity.Damaged as err:
        return f"its marker cannot be used ({err})"
    if meta.get("format") != DECODE_FORMAT:
        return f"an older layout (format {meta.get('format')}; runs read format {DECODE_FORMAT})"
    try:
        sources = integrity.read_json(folder / SOURCES)
    except (FileNotFoundError, integrity.Damaged):
        return None  # made before the sources were recorded: its data set cannot be checked
    root = Path(sources["root"])
    missing = sum(not (root / name).exists() for name in sources["files"])
    return f"{missing} of its {len(sources['files'])} image files are gone from {root}" if missing else None


def unusable_features(feature_dir: Path) -> Iterator[tuple[Path, str]]:
    """Frozen-feature folders made by another format or library version, and damaged entries (runner.train.frozen.store).

    Judged against the installed libraries, so only where TensorFlow is installed (imported only when there are entries).
    """
    folders = sorted(p for p in feature_dir.glob("*") if p.is_dir()) if feature_dir.is_dir() else []
    if not folders:
        return
    try:
        from runner.train.frozen.store import MADE_BY, made_by
    except ImportError:  # no TensorFlow on this machine: no run here reads them either way
        return
    current = made_by()
    for folder in folders:
        try:
            made = integrity.read_json(folder / MADE_BY)
        except (FileNotFoundError, integrity.Damaged):
            made = None  # made before this was recorded, or being written
        if made is not None and made != current:
            yield folder, f"frozen features made by {made}; runs now key them by {current}"
            continue
        for entry in sorted(folder.glob("*.npy")):
            if not is_partial(entry) and integrity.file_checksum(entry) != entry.stem.rpartition("-")[2]:
                yield entry, "damaged frozen features: its bytes differ from the checksum in its name"


def leftovers(cache_dir: Path, feature_dir: Path, outputs: list[Path], database: Path | None) -> list[Leftover]:
    """Partial files, free lock files and unusable cache entries, none of them open in any process."""
    roots = [r for r in dict.fromkeys([cache_dir, feature_dir, *outputs]) if r.is_dir()]
    roots = [r for r in roots if not any(r != other and other in r.parents for other in roots)]  # nested: walked once
    partials, locks = walk(roots)
    if database is not None:
        partials += [p for p in [database.with_name(f".{database.name}.making")] if p.exists()]
        locks += [p for p in [Path(f"{database}.lock")] if p.exists()]
    opened = open_files()
    now = time.time()
    found = []
    for path in partials:
        quiet = now - max((f.stat().st_mtime for f in files_under(path) if f.exists()), default=path.stat().st_mtime)
        if not in_use(path, opened) and quiet > PARTIAL_QUIET_S:
            found.append(Leftover("partial", path, size_of(path), f"a write that never finished ({human(quiet)} ago), open in no process"))
    found += [Leftover("lock", path, size_of(path), "a lock file no process holds") for path in locks if lock_is_free(path)]
    decoded = [p for p in sorted((cache_dir / "decoded").glob("*")) if p.is_dir() and not is_partial(p)]
    unusable = [(p, why) for p in decoded if (why := decode_cache_problem(p))]
    unusable += list(unusable_features(feature_dir))
    found += [Leftover("unusable", path, size_of(path), why) for path, why in unusable if not in_use(path, opened)]
    return found


def remove(leftover: Leftover) -> bool:
    """Delete ``leftover``; a lock only while holding it (False if a process took it meanwhile)."""
    if leftover.kind == "lock":
        return lock_is_free(leftover.path, remove=True)
    if leftover.path.is_dir():
        shutil.rmtree(leftover.path, ignore_errors=True)
    else:
        leftover.path.unlink(missing_ok=True)
    return True


# ---- the command


def arguments(argv: list[str] | None) -> argparse.Namespace:
    """The command line; a bad one is argparse's message and exit status 2."""
    parser = argparse.ArgumentParser(
        prog="python -m runner.doctor",
        description="Report (and with --fix, close and remove) stale RUNNING runs, partial files, free lock files "
        "and cache entries no run can use.",
    )
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"), help="tracking.uri (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    parser.add_argument("--cache-dir", type=Path, default=Path(os.environ.get("CRACK_RUNNER_DATA", "data")), help="dataset.cache_dir (default: $CRACK_RUNNER_DATA or data)")
    parser.add_argument("--feature-cache-dir", type=Path, help="trainer.feature_cache_dir (default: <cache-dir>/features)")
    parser.add_argument("--outputs", type=Path, nargs="*", default=[Path("outputs"), Path("multirun")], help="Hydra's run and sweep folders (checkpoints being written)")
    parser.add_argument("--other-hosts", action="store_true", help="also close RUNNING runs without a lease (older runners) that this host cannot check and that are silent for --older-than (default 1d)")
    parser.add_argument("--older-than", type=parse_age, default=None, help="close only runs silent this long, e.g. 2h (default: as soon as the lease expired)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="only report (the default)")
    mode.add_argument("--fix", action="store_true", help="close the stale runs (KILLED) and remove the leftovers")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Report what interrupted runs left, and with ``--fix`` clean it up; the report goes to stdout."""
    args = arguments(argv)
    command_logging(logging.INFO, "[%(levelname)s] %(message)s")
    uri = absolute_tracking_uri(args.tracking_uri)
    database = sqlite_file(uri)
    act = "closed KILLED" if args.fix else "would close"
    stale = 0
    if database is not None and not database.exists():
        print(f"no tracking store at {database}")
    else:
        client = mlflow.MlflowClient(uri)
        print(f"stale runs in {redact(uri)}:")
        for run, why in stale_runs(client, args.other_hosts, args.older_than):
            stale += 1
            print(f"  {run.info.run_id}  {run.info.run_name}: {why}; {act}. Resume: {resume_command(run)}")
            if args.fix:
                close_run(client, run, why)
    cache_dir = args.cache_dir.expanduser().resolve()
    feature_dir = (args.feature_cache_dir or cache_dir / "features").expanduser().resolve()
    found = leftovers(cache_dir, feature_dir, [p.expanduser().resolve() for p in args.outputs], database)
    print(f"leftovers in {cache_dir}, {feature_dir} and the run folders {' '.join(map(str, args.outputs))}:")
    for leftover in found:
        done = remove(leftover) if args.fix else None
        state = {None: "would remove", True: "removed", False: "kept: taken meanwhile"}[done]
        print(f"  {leftover.kind:<8} {size_text(leftover.size):>10}  {leftover.path}: {leftover.why}; {state}")
    total = sum(leftover.size for leftover in found)
    summary = f"{stale} stale run(s), {len(found)} leftover(s) taking {size_text(total)}"
    print(f"{summary}: {'cleaned' if args.fix else 'nothing changed (dry run); --fix closes and removes them'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
