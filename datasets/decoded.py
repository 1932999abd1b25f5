"""Decode a data set once per (fingerprint, image size) into a uint8 file, reused by later runs.

Later runs and every job of a sweep read the same file instead of decoding JPEGs again, so
their epochs are bound by compute, not by decoding; the operating system keeps the pixels in
its page cache, shared between parallel jobs. Row i of the file is the i-th file of the data
set, whatever the seed (an unreadable file leaves its row empty); a run asks for the rows in
the order of its split (train, val, test) and gets one array whose slices are the splits.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
from filelock import FileLock

from datasets.folder import ImageList, decode_images

log = logging.getLogger(__name__)

MARKER = "complete.json"
FORMAT = 2  # in the marker: row i of the file is file i of the data set (1: decodable files only, packed)


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
    folder = Path(cache_dir) / "decoded" / f"{key}-{size}px"
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):  # parallel sweep jobs decode once
        meta = _marker(folder)
        if meta is None:
            return _decode_into(folder, images, size, workers, progress, order)
        log.info("decoded images: reusing %s", folder)
    for note in meta["skipped"]:
        log.warning("skipped unreadable image %s", note)
    ok = np.flatnonzero(np.isin(order, np.load(folder / "decoded.npy")))  # the files with pixels in their row
    if not len(ok):  # nothing decodable: no pixels to map
        return np.empty((0, size, size, 3), np.uint8), ok, meta["skipped"]
    return np.take(np.load(folder / "pixels.npy", mmap_mode="r"), order[ok], axis=0), ok, meta["skipped"]


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


def _decode_into(
    folder: Path, images: ImageList, size: int, workers: int | None, progress: bool, order: np.ndarray
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decode in ``order`` into memory and into the file; in a temporary sibling renamed at the end,
    so a killed decode is never mistaken for a cache."""
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.mkdir()
    row_bytes = size * size * 3
    with open(tmp / "pixels.npy", "wb") as out:  # the .npy header, then each row in its place: plain writes, no page faults
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False, "shape": (len(images.paths), size, size, 3)}
        np.lib.format.write_array_header_1_0(out, header)
        out.flush()
        offset = out.tell()
        out.truncate(offset + len(images.paths) * row_bytes)

        def write(index: int, image: np.ndarray) -> None:  # in the decoding threads
            os.pwrite(out.fileno(), image.data, offset + int(order[index]) * row_bytes)

        pixels, ok, skipped = decode_images([images.paths[i] for i in order], size, workers, progress, sink=write)
    decoded = np.sort(order[ok])
    np.save(tmp / "decoded.npy", decoded)
    (tmp / MARKER).write_text(json.dumps({"format": FORMAT, "skipped": skipped}))
    tmp.rename(folder)
    return pixels, ok, skipped
