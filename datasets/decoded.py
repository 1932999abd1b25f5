"""Decode a data set once per (fingerprint, image size) into a uint8 file, reused by later runs.

Later runs and every job of a sweep read the same file instead of decoding JPEGs again, so
their epochs are bound by compute, not by decoding; the operating system keeps the pixels in
its page cache, shared between parallel jobs. Row i of the file is the i-th file of the data
set, whatever the seed (an unreadable file leaves its row empty); a run asks for the rows in
the order of its split (train, val, test) and gets one array whose slices are the splits:
in memory when it fits (``dataset.in_memory_gb``), else memory-mapped from a file of those
rows in that order (made once per split order).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
from filelock import FileLock

from datasets.folder import ImageList, decode_images, decode_into

log = logging.getLogger(__name__)

MARKER = "complete.json"
FORMAT = 2  # in the marker: row i of the file is file i of the data set (1: decodable files only, packed)


def memory_budget(in_memory_gb: float | None) -> int:
    """Bytes of decoded pixels a run holds in memory (``dataset.in_memory_gb``; None: half the machine's memory)."""
    if in_memory_gb is not None:
        return int(in_memory_gb * 2**30)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def cache_folder(cache_dir: Path, key: str, size: int) -> Path:
    """Where the pixels of the data set ``key`` (its fingerprint) decoded at ``size`` are kept."""
    folder = Path(cache_dir) / "decoded" / f"{key}-{size}px"
    folder.parent.mkdir(parents=True, exist_ok=True)
    return folder


def load_decoded(
    images: ImageList, size: int, cache_dir: Path, key: str, workers: int | None, progress: bool, order: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The images ``order`` (indices into ``images``; default: all, in file order) at size x size as uint8.

    Returns the pixels of those that decode (N, size, size, 3) in memory and packed in that
    order, their positions in ``order``, and one note per skipped file. The first run decodes
    straight into the returned array, writing each image to its row of the file as it goes;
    later runs read the file.
    """
    order = np.arange(len(images.paths)) if order is None else np.asarray(order)
    folder = cache_folder(cache_dir, key, size)
    with FileLock(str(folder) + ".lock"):  # parallel sweep jobs decode once
        meta = _marker(folder)
        if meta is None:
            return _decode_in_order(folder, images, size, workers, progress, order)
    decoded, skipped = _reuse(folder, meta)
    ok = np.flatnonzero(np.isin(order, decoded))  # the files with pixels in their row
    if not len(ok):  # nothing decodable: no pixels to map
        return np.empty((0, size, size, 3), np.uint8), ok, skipped
    return np.take(np.load(folder / "pixels.npy", mmap_mode="r"), order[ok], axis=0), ok, skipped


def ensure_decoded(
    images: ImageList, size: int, cache_dir: Path, key: str, workers: int | None, progress: bool
) -> tuple[Path, np.ndarray, list[str]]:
    """The cache's folder, the indices of the files that decoded and one note per skipped file.

    For data sets too large for memory: a first run decodes straight into the memory-mapped
    file, so no more than the pages being written are held; see :func:`mapped_rows`.
    """
    folder = cache_folder(cache_dir, key, size)
    with FileLock(str(folder) + ".lock"):
        meta = _marker(folder)
        if meta is None:
            tmp = _fresh(folder)
            out = _pixel_file(tmp, len(images.paths), size)
            ok, skipped = decode_into(images.paths, size, out, workers, progress)
            out.flush()
            del out
            _publish(tmp, folder, ok, skipped)
            return folder, ok, skipped
    return folder, *_reuse(folder, meta)


GATHER_ROWS = 256  # rows copied at a time into a split-ordered file


def mapped_rows(folder: Path, rows: np.ndarray) -> np.ndarray:
    """The cache's ``rows`` (file indices, in split order) as a memory-mapped array of their own.

    A file per order, made once by copying the rows a few hundred at a time (a sweep's jobs,
    which share the seed, share it), so the splits are slices of one array, as in memory;
    mapped copy-on-write, so arrays are writable (torch wants that) and the file never changes.
    """
    path = folder / f"rows-{hashlib.blake2b(np.asarray(rows, np.int64).tobytes(), digest_size=8).hexdigest()}.npy"
    with FileLock(str(path) + ".lock"):
        if not path.exists():
            source = np.load(folder / "pixels.npy", mmap_mode="r")
            partial = path.with_name(path.name + ".partial")
            out = np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8, shape=(len(rows), *source.shape[1:]))
            for start in range(0, len(rows), GATHER_ROWS):
                out[start : start + GATHER_ROWS] = source[rows[start : start + GATHER_ROWS]]
            out.flush()
            del out
            os.replace(partial, path)
    return np.load(path, mmap_mode="c")


def _reuse(folder: Path, meta: dict) -> tuple[np.ndarray, list[str]]:
    """A complete cache's decodable files (indices) and skipped-file notes, warned about again."""
    log.info("decoded images: reusing %s", folder)
    for note in meta["skipped"]:
        log.warning("skipped unreadable image %s", note)
    return np.load(folder / "decoded.npy"), meta["skipped"]


def _marker(folder: Path) -> dict | None:
    """What a complete cache notes (its skipped files), or None: no cache, or one of an older layout."""
    try:
        meta = json.loads((folder / MARKER).read_text())
    except FileNotFoundError:
        return None
    if meta.get("format") != FORMAT:
        log.info("decoded images: %s has an older layout, decoding anew", folder)
        return None
    return meta


def _fresh(folder: Path) -> Path:
    """An empty temporary sibling of ``folder`` to build the cache in (renamed by :func:`_publish`),
    so a killed decode is never mistaken for a cache."""
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.mkdir()
    return tmp


def _pixel_file(tmp: Path, count: int, size: int) -> np.memmap:
    """The cache's ``pixels.npy`` in ``tmp``, one row per file of the data set, mapped for writing (nothing written yet)."""
    return np.lib.format.open_memmap(tmp / "pixels.npy", mode="w+", dtype=np.uint8, shape=(count, size, size, 3))


def _publish(tmp: Path, folder: Path, decoded: np.ndarray, skipped: list[str]) -> None:
    np.save(tmp / "decoded.npy", np.sort(decoded))
    (tmp / MARKER).write_text(json.dumps({"format": FORMAT, "skipped": skipped}))
    tmp.rename(folder)


def _decode_in_order(
    folder: Path, images: ImageList, size: int, workers: int | None, progress: bool, order: np.ndarray
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decode in ``order`` into memory and into the file, each image to its file row as it is decoded."""
    tmp = _fresh(folder)
    row_bytes = size * size * 3
    offset = _pixel_file(tmp, len(images.paths), size).offset  # header and size only; rows go in with plain writes, no page faults
    with open(tmp / "pixels.npy", "r+b") as out:

        def write(index: int, image: np.ndarray) -> None:  # in the decoding threads
            os.pwrite(out.fileno(), image.data, offset + int(order[index]) * row_bytes)

        pixels, ok, skipped = decode_images([images.paths[i] for i in order], size, workers, progress, sink=write)
    _publish(tmp, folder, order[ok], skipped)
    return pixels, ok, skipped
