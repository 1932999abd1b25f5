"""Checksums that let a cache prove it holds what was written, and cache writes that fail cleanly.

Why: the decode cache (datasets.decoded) and the frozen-feature store (runner.frozen_features)
are reused by later runs as they are, so a byte changed on disk would otherwise be trained on
without a word. Each entry is written with checksums and checked before use; a damaged one is
rebuilt. CRC-32 (zlib) is the checksum: it finds accidental damage (not tampering) at 1.8 to
3.2 GB/s per core here, against about 1.1 for SHA-256 (with SHA-NI) and 0.4 for BLAKE2b
(benchmarks/bench_cache_verify.py); zlib releases the GIL, so threads check in parallel.

Large files are created with their blocks reserved (posix_fallocate): a sparse file mapped for
writing dies of SIGBUS when the disk fills part-way; reserved, a full disk is one ENOSPC up front.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import math
import os
import shutil
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import numpy as np
from filelock import FileLock

from crack_runner.datasets import stopping

SPAN_BYTES = 64 * 2**20  # bytes checked per task of the threads (an interruption waits for no more)
BLOCK = 8 * 2**20  # bytes per CRC of a whole file
RACY_NS = 2 * 10**9  # a file changed this close to being hashed may change again within one timestamp tick


class Damaged(Exception):
    """A cache file that is cut short or differs from its checksum: rebuild what holds it."""


def checksum(data: bytes | memoryview) -> str:
    """The CRC-32 of a buffer, as 8 hex digits."""
    return f"{zlib.crc32(data):08x}"


def row_checksum(row: np.ndarray) -> int:
    """The CRC-32 of one contiguous row, as written into a cache's checksum array."""
    return zlib.crc32(row.data)


def row_checksums(rows: np.ndarray) -> np.ndarray:
    """The CRC-32 of each row (along the first axis) of ``rows``, computed by threads in parallel."""
    flat = rows.reshape(len(rows), int(np.prod(rows.shape[1:])))
    out = np.empty(len(rows), np.uint32)

    def work(span: range) -> None:
        for i in span:
            out[i] = zlib.crc32(flat[i].data)

    _parallel(work, len(rows), rows.nbytes)
    return out


def file_checksum(path: Path) -> str:
    """The CRC-32 of each block of the file, folded into one (8 hex digits); the blocks are hashed in parallel."""
    size = path.stat().st_size
    data = np.memmap(path, np.uint8, mode="r") if size else np.empty(0, np.uint8)
    blocks = np.empty(-(-size // BLOCK), np.uint32)

    def work(span: range) -> None:
        for b in span:
            blocks[b] = zlib.crc32(data[b * BLOCK : (b + 1) * BLOCK].data)

    _parallel(work, len(blocks), size)
    return checksum(blocks.tobytes())


def _parallel(work: Callable[[range], None], count: int, nbytes: int) -> None:
    """``work`` over ``range(count)`` in spans of about SPAN_BYTES, on a thread per core when there are several.

    Ctrl-C / SIGTERM (runner.track.interrupt) stops between spans: a check of a large file on a slow disk can take a while.
    """
    per_span = max(1, count * SPAN_BYTES // max(nbytes, 1))
    spans = [range(start, min(start + per_span, count)) for start in range(0, count, per_span)]
    if len(spans) <= 1:
        for span in spans:
            work(span)
        return
    pool = ThreadPoolExecutor(min(len(spans), os.cpu_count() or 1))
    try:
        for _ in stopping.completed([pool.submit(work, span) for span in spans]):
            pass
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def map_npy(path: Path, dtype: type, shape: tuple[int, ...], mode: Literal["r", "c"] = "r") -> np.memmap:
    """The .npy file at ``path``, memory-mapped; Damaged if its header is unreadable, cut short or of another shape or type."""
    try:
        array = np.load(path, mmap_mode=mode)
    except (ValueError, EOFError) as err:
        raise Damaged(f"{path} is damaged or cut short ({err})") from err
    if array.shape != shape or array.dtype != dtype:
        raise Damaged(f"{path} holds {array.dtype}{list(array.shape)}, not {np.dtype(dtype)}{list(shape)}")
    return array


def read_rows(mapped: np.memmap, rows: np.ndarray) -> np.ndarray:
    """``mapped[rows]`` copied into memory by reading the file, not through its mapping.

    A mapped file's pages count in the process's resident memory while mapped, so gathering
    through the mapping holds the whole file twice at its peak (its pages and the copy); read
    row by row, only the copy is held. Damaged if the file ends before a row.
    """
    out = np.empty((len(rows), *mapped.shape[1:]), mapped.dtype)
    row_bytes = out.itemsize * math.prod(mapped.shape[1:])
    with open(mapped.filename, "rb") as file:
        for index, row in enumerate(np.asarray(rows, np.int64)):
            if os.preadv(file.fileno(), [memoryview(out[index]).cast("B")], mapped.offset + int(row) * row_bytes) != row_bytes:
                raise Damaged(f"{mapped.filename} is cut short: row {row} is missing")
    return out


def allocate_npy(path: Path, dtype: type, shape: tuple[int, ...]) -> np.memmap:
    """A new .npy file of ``shape``, mapped for writing, with its blocks reserved on disk before anything is written.

    Raises OSError (ENOSPC) at once on a full disk, where a sparse mapped file would die of SIGBUS part-way.
    """
    out = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    try:
        with open(path, "r+b") as file:
            os.posix_fallocate(file.fileno(), 0, out.offset + out.nbytes)
    except OSError:
        del out  # unmapped, so the caller's unlink frees the space
        raise
    return out


def save_array(path: Path, array: np.ndarray) -> str:
    """Write ``array`` as a .npy file; returns its checksum, for the entry's marker."""
    buffer = io.BytesIO()
    np.save(buffer, array)
    path.write_bytes(buffer.getvalue())
    return checksum(buffer.getbuffer())


def load_array(path: Path, expected: str) -> np.ndarray:
    """A small .npy file written by :func:`save_array`; Damaged unless its bytes have the ``expected`` checksum."""
    data = path.read_bytes()
    if checksum(data) != expected:
        raise Damaged(f"{path} differs from its checksum (damaged or cut short)")
    return np.load(io.BytesIO(data))


def write_json(path: Path, body: dict) -> None:
    """``body`` as JSON with a checksum of itself, so a damaged file is told apart from one that merely parses."""
    path.write_text(json.dumps({**body, "checksum": checksum(json.dumps(body, sort_keys=True).encode())}, sort_keys=True))


def read_json(path: Path) -> dict:
    """What :func:`write_json` wrote; Damaged if it was cut short or changed (FileNotFoundError if there is none)."""
    try:
        body = json.loads(path.read_text())
        found = body.pop("checksum")
    except KeyError:
        raise Damaged(f"{path} has no checksum (an older layout)") from None
    except (ValueError, AttributeError) as err:  # cut short, not text, not an object
        raise Damaged(f"{path} is damaged or cut short ({err})") from None
    if found != checksum(json.dumps(body, sort_keys=True).encode()):
        raise Damaged(f"{path} differs from its checksum (damaged)")
    return body


def is_full(err: OSError) -> bool:
    """Whether a write failed for want of space (disk or quota)."""
    return err.errno in (errno.ENOSPC, errno.EDQUOT)


def write_failure(err: OSError, folder: Path, what: str, needed: int) -> str:
    """What went wrong writing ``what`` (``needed`` bytes) in ``folder``: on a full disk, the space needed and free."""
    if is_full(err):
        existing = next(parent for parent in (folder, *folder.parents) if parent.exists())
        return f"no space left in {folder} for {what}: it needs {size_text(needed)}, {size_text(shutil.disk_usage(existing).free)} free"
    return f"could not write {what} in {folder} ({err.strerror or err})"


def size_text(count: int) -> str:
    return f"{count / 2**30:.2f} GiB" if count >= 2**30 else f"{count / 2**20:.1f} MiB"


def digest_index(cache_dir: Path, root: Path) -> Path:
    """Where :func:`content_digests` remembers the digests of the files under ``root``: one small file per data set."""
    name = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:16]
    return Path(cache_dir) / "file-digests" / f"{name}.json"


def content_digests(paths: list[Path], index: Path | None = None) -> list[str]:
    """The SHA-256 of each file's bytes; those of files unchanged since they were recorded in ``index`` are read from it.

    Unchanged, as git's index tells it: the same size, modification and change times (ns),
    inode and device. The change time cannot be set back (os.utime sets it to now), so an edit
    that keeps the size and restores the modification time is still seen. Files changed within
    RACY_NS of now are not recorded (timestamps are coarser than writes) and are hashed again.
    An index that is missing, damaged or cannot be written only costs reading the files.
    """
    known: dict[str, list] = {}
    if index is not None:
        with contextlib.suppress(OSError, Damaged):
            known = read_json(index)["files"]
    now = time.time_ns()
    digests, record = [], dict(known)  # files outside ``paths`` (another dataset.limit's sample) stay recorded
    for path in paths:
        stopping.check()  # tens of thousands of files on a cold disk take a while
        name, stat = os.path.abspath(path), path.stat()
        stamp = [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino, stat.st_dev]
        entry = known.get(name)
        digest = entry[-1] if entry is not None and entry[:-1] == stamp else hashlib.sha256(path.read_bytes()).hexdigest()
        digests.append(digest)
        if max(stat.st_mtime_ns, stat.st_ctime_ns) < now - RACY_NS:
            record[name] = [*stamp, digest]
        else:
            record.pop(name, None)
    if index is not None and record != known:
        with contextlib.suppress(OSError):  # a read-only or full cache folder: hashed again next time
            index.parent.mkdir(parents=True, exist_ok=True)
            partial = index.with_name(index.name + ".partial")
            with FileLock(f"{index}.lock"):  # parallel sweep jobs write it in turn
                try:
                    write_json(partial, {"files": record})
                    os.replace(partial, index)
                finally:
                    partial.unlink(missing_ok=True)
    return digests
