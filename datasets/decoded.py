"""Decode a data set once per (fingerprint, image size) into a uint8 file, reused by later runs.

Later runs and every job of a sweep read the same file instead of decoding JPEGs again, so
their epochs are bound by compute, not by decoding; the operating system keeps the pixels in
its page cache, shared between parallel jobs. The file holds the decodable images in file
order, whatever the seed; a run asks for them in the order of its split (train, val, test)
and gets one array whose slices are the splits, with no further copy.
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


def load_decoded(
    images: ImageList, size: int, cache_dir: Path, key: str, workers: int | None, progress: bool, order: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The images ``order`` (indices into ``images``; default: all, in file order) at size x size as uint8.

    Returns the pixels of those that decode (N, size, size, 3) in memory and packed in that
    order, their positions in ``order``, and one note per skipped file. The first run decodes
    straight into the returned array and writes the file from it; later runs read the file.
    """
    order = np.arange(len(images.paths)) if order is None else np.asarray(order)
    folder = Path(cache_dir) / "decoded" / f"{key}-{size}px"
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):  # parallel sweep jobs decode once
        if not (folder / MARKER).exists():
            return _decode_into(folder, images, size, workers, progress, order)
        log.info("decoded images: reusing %s", folder)
    meta = json.loads((folder / MARKER).read_text())
    for note in meta["skipped"]:
        log.warning("skipped unreadable image %s", note)
    decoded = np.load(folder / "decoded.npy")  # the file's rows: these images, in file order
    if not len(decoded):  # nothing decodable: no pixels to map
        return np.empty((0, size, size, 3), np.uint8), np.empty(0, np.int64), meta["skipped"]
    row = np.searchsorted(decoded, order).clip(max=len(decoded) - 1)
    ok = np.flatnonzero(decoded[row] == order)
    return np.take(np.load(folder / "pixels.npy", mmap_mode="r"), row[ok], axis=0), ok, meta["skipped"]


def _decode_into(
    folder: Path, images: ImageList, size: int, workers: int | None, progress: bool, order: np.ndarray
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decode in ``order`` into memory, then write the file; in a temporary sibling renamed at the end,
    so a killed decode is never mistaken for a cache."""
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.mkdir()
    pixels, ok, skipped = decode_images([images.paths[i] for i in order], size, workers, progress)
    files = order[ok]
    decoded = np.sort(files)
    row_bytes = size * size * 3
    with open(tmp / "pixels.npy", "wb") as out:  # the .npy header, then each row in its place: plain writes, no page faults
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False, "shape": (len(decoded), size, size, 3)}
        np.lib.format.write_array_header_1_0(out, header)
        out.flush()
        offset = out.tell()
        out.truncate(offset + len(decoded) * row_bytes)
        for image, row in zip(pixels, np.searchsorted(decoded, files)):
            os.pwrite(out.fileno(), image.data, offset + int(row) * row_bytes)
    np.save(tmp / "decoded.npy", decoded)
    (tmp / MARKER).write_text(json.dumps({"skipped": skipped}))
    tmp.rename(folder)
    return pixels, ok, skipped
