"""Decode a data set once per (fingerprint, image size) into a memory-mapped uint8 file.

Later runs and every job of a sweep map the same file instead of decoding JPEGs again,
so their epochs are bound by compute, not by decoding; the operating system keeps the
pixels in its page cache, shared between parallel jobs.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
from filelock import FileLock

from datasets.folder import ImageList, decode_images

log = logging.getLogger(__name__)

MARKER = "complete.json"


def load_decoded(
    images: ImageList, size: int, cache_dir: Path, key: str, workers: int | None, progress: bool
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Pixels (N, size, size, 3) uint8 of the decodable images, their indices in ``images`` and the skip notes."""
    folder = Path(cache_dir) / "decoded" / f"{key}-{size}px"
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):  # parallel sweep jobs decode once
        if not (folder / MARKER).exists():
            _decode_into(folder, images, size, workers, progress)
        else:
            log.info("decoded images: reusing %s", folder)
    meta = json.loads((folder / MARKER).read_text())
    for note in meta["skipped"]:
        log.warning("skipped unreadable image %s", note)
    pixels = np.load(folder / "pixels.npy", mmap_mode="r")[: meta["count"]]
    return pixels, np.load(folder / "decoded.npy"), meta["skipped"]


def _decode_into(folder: Path, images: ImageList, size: int, workers: int | None, progress: bool) -> None:
    """Decode into a temporary sibling and rename it, so a killed decode is never mistaken for a cache."""
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.mkdir()
    out = np.lib.format.open_memmap(tmp / "pixels.npy", mode="w+", dtype=np.uint8, shape=(len(images.paths), size, size, 3))
    _, decoded, skipped = decode_images(images.paths, size, workers, progress, out=out)
    out.flush()
    del out
    np.save(tmp / "decoded.npy", decoded)
    (tmp / MARKER).write_text(json.dumps({"count": len(decoded), "skipped": skipped}))
    tmp.rename(folder)
