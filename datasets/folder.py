"""Class-per-folder image trees: list the files, decode them once, skip the unreadable ones."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from runner.errors import DataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})


@dataclass(frozen=True)
class ImageList:
    """The image files of a tree, their integer labels and the class names (sorted folder names)."""

    root: Path
    classes: list[str]
    paths: list[Path]
    labels: np.ndarray


def scan(root: Path) -> ImageList:
    """List ``root/<class>/<image>`` files in a stable order; every class folder must hold images."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"dataset path {str(root)!r} does not exist or is not a folder. Set dataset.path to a folder of class sub-folders.")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(class_dirs) < 2:
        raise DataError(
            f"dataset path {str(root)!r} has {len(class_dirs)} class folder(s) "
            f"({', '.join(p.name for p in class_dirs) or 'none'}); a classifier needs at least 2, "
            "laid out as <path>/<class name>/<image files> (e.g. Positive/ and Negative/)."
        )
    paths: list[Path] = []
    labels: list[int] = []
    for label, class_dir in enumerate(class_dirs):
        files = sorted(p for p in class_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise DataError(
                f"class folder {str(class_dir)!r} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))}). "
                "Add images to it or remove the folder."
            )
        paths += files
        labels += [label] * len(files)
    return ImageList(root, [p.name for p in class_dirs], paths, np.asarray(labels, dtype=np.int64))


def limit_per_class(images: ImageList, limit: int | None, seed: int) -> ImageList:
    """Keep at most ``limit`` images per class, a seeded random sample so quick runs stay representative."""
    if limit is None:
        return images
    rng = np.random.default_rng(seed)
    keep: list[int] = []
    for label in range(len(images.classes)):
        members = np.flatnonzero(images.labels == label)
        if len(members) > limit:
            members = np.sort(rng.choice(members, size=limit, replace=False))
        keep += members.tolist()
    return ImageList(images.root, images.classes, [images.paths[i] for i in keep], images.labels[keep])


def fingerprint(images: ImageList) -> str:
    """A short hash of the file names, sizes and labels: equal data sets give equal fingerprints."""
    digest = hashlib.sha256()
    for path, label in zip(images.paths, images.labels):
        digest.update(f"{path.relative_to(images.root).as_posix()}\0{path.stat().st_size}\0{label}\n".encode())
    return digest.hexdigest()[:16]


def decode_image(path: Path, size: int) -> np.ndarray | str:
    """One RGB image at size x size as uint8, or the reason it could not be read."""
    try:
        with Image.open(path) as img:
            img.draft("RGB", (size, size))  # JPEG: let the decoder downscale, much faster
            rgb = img.convert("RGB")
            if rgb.size != (size, size):
                rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(rgb, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as err:
        return f"{type(err).__name__}: {err}"


CHUNK = 16  # images per task of the decoding threads


def decode_into(
    paths: list[Path],
    size: int,
    out: np.ndarray,
    workers: int | None = None,
    progress: bool = True,
    sink: Callable[[int, np.ndarray], None] | None = None,
) -> tuple[np.ndarray, list[str]]:
    """Decode ``paths[i]`` into ``out[i]`` in parallel threads (PIL releases the GIL while decoding).

    ``out``: (len(paths), size, size, 3) uint8, in memory or a memory-mapped file; the row of
    a file that cannot be read is left as it was. ``sink(index, row)``, if given, is called in
    the decoding thread with each decoded row (the decode cache writes it to its file there).
    Returns the indices of ``paths`` that decoded and one warning line per skipped file, each
    naming it.
    """
    errors: dict[int, str] = {}

    def decode_chunk(start: int) -> int:
        stop = min(start + CHUNK, len(paths))
        for i in range(start, stop):
            result = decode_image(paths[i], size)
            if isinstance(result, str):
                errors[i] = result
                continue
            out[i] = result
            if sink is not None:
                sink(i, out[i])
        return stop - start

    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool, tqdm(
        total=len(paths), desc="decode", unit="img", disable=not progress
    ) as bar:
        for done in pool.map(decode_chunk, range(0, len(paths), CHUNK)):
            bar.update(done)
    skipped = []
    for i in sorted(errors):
        skipped.append(f"{paths[i]} ({errors[i]})")
        log.warning("skipped unreadable image %s: %s", paths[i], errors[i])
    return np.setdiff1d(np.arange(len(paths)), sorted(errors)), skipped


def decode_images(
    paths: list[Path],
    size: int,
    workers: int | None = None,
    progress: bool = True,
    sink: Callable[[int, np.ndarray], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """:func:`decode_into` a new array, packed: returns the images of the files that decoded
    (N, size, size, 3) uint8 in the order of ``paths`` (a copy, only when files were skipped),
    their indices in ``paths`` and the skipped files' warning lines."""
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    ok, skipped = decode_into(paths, size, out, workers, progress, sink)
    return (out if len(ok) == len(paths) else out[ok]), ok, skipped
