"""Decode a data set once per (fingerprint, image size) into a uint8 file, reused by later runs.

Later runs and every job of a sweep read the same file instead of decoding JPEGs again, so
their epochs are bound by compute, not by decoding; the operating system keeps the pixels in
its page cache, shared between parallel jobs. Row i of the file is the i-th file of the data
set, whatever the seed (an unreadable file leaves its row empty); a run asks for the rows in
the order of its split (train, val, test) and gets one array whose slices are the splits:
in memory when it fits (``dataset.in_memory_gb``), else memory-mapped from a file of those
rows in that order (made once per split order).

Nothing is trained on unchecked (datasets.integrity): the marker and the small files are
checked whole, and every row a run reads against the CRC-32 written with it when it was
decoded (a split-ordered file: all its rows, each time it is mapped). A damaged, cut-short or
incomplete cache is decoded anew with a warning that names it. A cache is built in a
``.partial`` folder renamed into place when complete and never changed after, so a run uses a
complete one without a lock (a read-only cache folder works) and locks only to build one.
The pixel file's blocks are reserved before decoding: a full disk is one clear error up front.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

import numpy as np
from filelock import FileLock

from crack_runner.datasets import integrity, stopping
from crack_runner.datasets.errors import DataError
from crack_runner.datasets.folder import ImageList, decode_images, decode_into

log = logging.getLogger(__name__)

MARKER = "complete.json"
PIXELS = "pixels.npy"
DECODED = "decoded.npy"
CHECKSUMS = "checksums.npy"
SOURCES = "sources.json"  # the image files it was decoded from (read by python -m runner.doctor, not by runs)
FORMAT = 3  # in the marker: 3: checksums; 2: row i of the file is file i of the data set; 1: decodable files only, packed
FIX_FULL = "Free space there, set dataset.cache_dir to another folder, or set dataset.decode_cache=false."
FIX_WRITE = "Set dataset.cache_dir to a writable folder, or set dataset.decode_cache=false."
GATHER_ROWS = 256  # rows copied at a time into a split-ordered file

T = TypeVar("T")
Found = TypeVar("Found")


@dataclass(frozen=True, eq=False)
class Entry:
    """A published cache. It never changes, so its folder's inode tells it from one rebuilt since."""

    folder: Path
    inode: int
    pixels: np.ndarray  # memory-mapped, one row per file of the data set
    decoded: np.ndarray  # the files that decoded (indices, ascending)
    skipped: list[str]
    checksums: np.ndarray  # of each row of pixels
    built: bool = False  # by this run

    def check(self, rows: np.ndarray, files: np.ndarray, source: Path) -> None:
        """Damaged unless ``rows``, read from ``source``, are the pixels of ``files`` as decoded."""
        bad = np.count_nonzero(integrity.row_checksums(rows) != self.checksums[files])
        if bad:
            raise integrity.Damaged(f"{source}: {bad} of {len(files)} rows differ from their checksums")

    def announce(self) -> None:
        """Say that the cache is reused, and warn about its skipped files again (a fresh decode warned as it went)."""
        if not self.built:
            log.info("decoded images: reusing %s", self.folder)
            for note in self.skipped:
                log.warning("skipped unreadable image %s", note)


def memory_budget(in_memory_gb: float | None) -> int:
    """Bytes of decoded pixels a run holds in memory (``dataset.in_memory_gb``; None: half the machine's memory)."""
    if in_memory_gb is not None:
        return int(in_memory_gb * 2**30)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def cache_folder(cache_dir: Path, key: str, size: int) -> Path:
    """Where the pixels of the data set ``key`` (its fingerprint) decoded at ``size`` are kept."""
    return Path(cache_dir) / "decoded" / f"{key}-{size}px"


def load_decoded(
    images: ImageList, size: int, cache_dir: Path, key: str, workers: int | None, progress: bool, order: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The images ``order`` (indices into ``images``; default: all, in file order) at size x size as uint8.

    Returns the pixels of those that decode (N, size, size, 3) in memory and packed in that
    order, their positions in ``order``, and one note per skipped file. The first run decodes
    straight into the returned array, writing each image to its row of the file as it goes;
    later runs read the file, checking each row read.
    """
    order = np.arange(len(images.paths)) if order is None else np.asarray(order)
    folder = cache_folder(cache_dir, key, size)
    build = partial(_decode_in_order, images=images, size=size, workers=workers, progress=progress, order=order)
    stale, problem = None, None
    for _ in range(2):  # a cache found damaged is decoded anew once
        entry = _entry(folder, len(images.paths), size, build, stale, problem)
        if not isinstance(entry, Entry):
            return entry
        ok = np.flatnonzero(np.isin(order, entry.decoded))  # the files with pixels in their row
        pixels = integrity.read_rows(entry.pixels, order[ok])
        try:
            entry.check(pixels, order[ok], folder / PIXELS)
        except integrity.Damaged as err:
            stale, problem = entry, str(err)
            continue
        entry.announce()
        return pixels, ok, entry.skipped
    raise DataError(_failing(folder, problem))


def load_mapped(
    images: ImageList,
    size: int,
    cache_dir: Path,
    key: str,
    workers: int | None,
    progress: bool,
    arrange: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
) -> tuple[np.memmap, np.ndarray, np.ndarray, list[str]]:
    """For data sets too large for memory: the decodable images in split order, memory-mapped.

    ``arrange(decodable file indices)`` gives the split order and the splits' bounds. Returns the
    pixels (see :func:`mapped_rows`), that order, the bounds and one note per skipped file. A
    first run decodes straight into the memory-mapped cache, so no more than the pages being
    written are held.
    """
    folder = cache_folder(cache_dir, key, size)
    build = partial(_decode_mapped, images=images, size=size, workers=workers, progress=progress)
    stale, problem = None, None
    for _ in range(2):  # a cache found damaged is decoded anew once
        entry = _entry(folder, len(images.paths), size, build, stale, problem)
        order, bounds = arrange(entry.decoded)
        try:
            pixels = mapped_rows(entry, order)
        except integrity.Damaged as err:
            stale, problem = entry, str(err)
            continue
        entry.announce()
        return pixels, order, bounds, entry.skipped
    raise DataError(_failing(folder, problem))


def mapped_rows(entry: Entry, rows: np.ndarray) -> np.memmap:
    """The cache's ``rows`` (file indices, in split order) as a memory-mapped array of their own.

    A file per order, made once by copying the rows a few hundred at a time, each checked (a
    sweep's jobs, which share the seed, share it), so the splits are slices of one array, as in
    memory; mapped copy-on-write, so arrays are writable (torch wants that) and the file never
    changes. All its rows are checked each time it is mapped; a damaged one is made anew.
    Raises Damaged when the cache's own pixels are.
    """
    path = entry.folder / f"rows-{hashlib.blake2b(np.asarray(rows, np.int64).tobytes(), digest_size=8).hexdigest()}.npy"
    shape = (len(rows), *entry.pixels.shape[1:])

    def look() -> tuple[np.memmap | None, str | None]:
        try:
            mapped = integrity.map_npy(path, np.uint8, shape, mode="c")
            entry.check(mapped, rows, path)
        except FileNotFoundError:
            return None, None
        except integrity.Damaged as err:
            return None, str(err)
        return mapped, None

    def build() -> np.memmap:
        partial_path = path.with_name(path.name + ".partial")  # a killed copy is never taken for the file
        try:
            out = integrity.allocate_npy(partial_path, np.uint8, shape)
            try:
                for start in range(0, len(rows), GATHER_ROWS):
                    stopping.check()
                    chunk = entry.pixels[rows[start : start + GATHER_ROWS]]
                    entry.check(chunk, rows[start : start + GATHER_ROWS], entry.folder / PIXELS)
                    out[start : start + GATHER_ROWS] = chunk
                out.flush()
            finally:
                del out
            os.replace(partial_path, path)
        finally:
            partial_path.unlink(missing_ok=True)
        return integrity.map_npy(path, np.uint8, shape, mode="c")

    return _use_or_build(Path(f"{path}.lock"), look, build, int(np.prod(shape)))


def _entry(
    folder: Path, count: int, size: int, make: Callable[[Path], T], stale: Entry | None, problem: str | None
) -> Entry | T:
    """The complete cache in ``folder``, or what ``make(tmp)`` returned after building and publishing one.

    ``stale``: a cache found damaged by ``problem`` (its rows), rebuilt unless another job already did.
    """

    def look() -> tuple[Entry | None, str | None]:
        entry, why = _look(folder, count, size)
        if entry is not None and stale is not None and entry.inode == stale.inode:
            return None, problem
        return entry, why

    return _use_or_build(Path(f"{folder}.lock"), look, lambda: _build(folder, make), count * size * size * 3)


def _use_or_build(lock: Path, look: Callable[[], tuple[Found | None, str | None]], build: Callable[[], T], needed: int) -> Found | T:
    """What ``look()`` finds complete and undamaged, else what ``build()`` makes under ``lock`` (``needed`` bytes).

    ``look`` gives the thing, or None and why it is unusable (None: absent). Only a build takes
    the lock (parallel sweep jobs build once): what is published never changes, so it is used
    without one, also on a read-only disk. A write failure (a full or read-only disk) is one
    DataError naming the folder and the space needed; the build removes its partial files.
    """
    found, problem = look()
    if found is not None:
        return found
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(lock)):
            found, problem = look()  # another job may have built it meanwhile
            if found is not None:
                return found
            if problem:
                log.warning("decode cache: %s; making it anew", problem)
            return build()
    except OSError as err:
        unusable = f"; the cache there is unusable: {problem}" if problem else ""
        fix = FIX_FULL if integrity.is_full(err) else FIX_WRITE
        raise DataError(f"{integrity.write_failure(err, lock.parent, 'the decode cache', needed)}{unusable}. {fix}") from err


def _failing(folder: Path, problem: str | None) -> str:
    return f"the decode cache {folder} was damaged again right after being rebuilt ({problem}): the disk may be failing. {FIX_FULL}"


def _look(folder: Path, count: int, size: int) -> tuple[Entry | None, str | None]:
    """The complete cache in ``folder`` with its small files checked, or None and why it is unusable (None: there is none)."""
    try:
        inode = folder.stat().st_ino
    except FileNotFoundError:
        return None, None
    try:
        meta = integrity.read_json(folder / MARKER)
        if meta.get("format") != FORMAT:
            return None, f"{folder} has an older layout"
        return Entry(
            folder,
            inode,
            integrity.map_npy(folder / PIXELS, np.uint8, (count, size, size, 3)),
            integrity.load_array(folder / DECODED, meta["decoded"]),
            meta["skipped"],
            integrity.load_array(folder / CHECKSUMS, meta["checksums"]),
        ), None
    except FileNotFoundError as err:
        return None, f"{folder} is incomplete ({Path(err.filename).name} is missing)"
    except integrity.Damaged as err:
        return None, str(err)


def _build(folder: Path, make: Callable[[Path], T]) -> T:
    """``make(tmp)`` in an empty temporary sibling of ``folder`` that it publishes (see :func:`_publish`).

    So a killed decode is never mistaken for a cache; its ``.partial`` folder, or a failed
    build's, is removed here (under the build lock: no other job is writing it).
    """
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(folder, ignore_errors=True)  # an unusable cache
    tmp.mkdir()
    try:
        return make(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _pixel_file(tmp: Path, count: int, size: int) -> np.memmap:
    """The cache's ``pixels.npy`` in ``tmp``, one row per file of the data set, its space reserved, mapped for writing."""
    return integrity.allocate_npy(tmp / PIXELS, np.uint8, (count, size, size, 3))


def _blank_checksums(count: int, size: int) -> np.ndarray:
    """One checksum per row, each that of an empty row (an unreadable file's row stays empty)."""
    return np.full(count, integrity.row_checksum(np.zeros(size * size * 3, np.uint8)), np.uint32)


def _publish(tmp: Path, images: ImageList, decoded: np.ndarray, skipped: list[str], checksums: np.ndarray) -> Entry:
    """Write the small files and the marker, then rename ``tmp`` to its cache folder: from then on it never changes."""
    decoded = np.sort(decoded)
    integrity.write_json(tmp / SOURCES, {"root": str(images.root.resolve()), "files": [p.relative_to(images.root).as_posix() for p in images.paths]})
    meta = {
        "format": FORMAT,
        "skipped": skipped,
        "decoded": integrity.save_array(tmp / DECODED, decoded),
        "checksums": integrity.save_array(tmp / CHECKSUMS, checksums),
    }
    integrity.write_json(tmp / MARKER, meta)
    folder = tmp.with_suffix("")  # <key>-<size>px.partial -> <key>-<size>px
    tmp.rename(folder)
    pixels = np.load(folder / PIXELS, mmap_mode="r")
    return Entry(folder, folder.stat().st_ino, pixels, decoded, skipped, checksums, built=True)


def _decode_mapped(tmp: Path, images: ImageList, size: int, workers: int | None, progress: bool) -> Entry:
    """Decode every file into its row of the memory-mapped file, each row's checksum taken as it is written."""
    checksums = _blank_checksums(len(images.paths), size)
    out = _pixel_file(tmp, len(images.paths), size)

    def note(index: int, row: np.ndarray) -> None:  # in the decoding threads
        checksums[index] = integrity.row_checksum(row)

    try:
        ok, skipped = decode_into(images.paths, size, out, workers, progress, sink=note)
        out.flush()
    finally:
        del out
    return _publish(tmp, images, ok, skipped, checksums)


def _decode_in_order(
    tmp: Path, images: ImageList, size: int, workers: int | None, progress: bool, order: np.ndarray
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decode in ``order`` into memory and into the file, each image to its file row as it is decoded."""
    checksums = _blank_checksums(len(images.paths), size)
    row_bytes = size * size * 3
    offset = _pixel_file(tmp, len(images.paths), size).offset  # header and space only; rows go in with plain writes, no page faults
    with open(tmp / PIXELS, "r+b") as out:

        def write(index: int, image: np.ndarray) -> None:  # in the decoding threads
            row = int(order[index])
            os.pwrite(out.fileno(), image.data, offset + row * row_bytes)
            checksums[row] = integrity.row_checksum(image)

        pixels, ok, skipped = decode_images([images.paths[i] for i in order], size, workers, progress, sink=write)
    _publish(tmp, images, order[ok], skipped, checksums)
    return pixels, ok, skipped
