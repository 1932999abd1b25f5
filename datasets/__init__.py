"""Data for a run: find or make the image tree, decode it once, split it deterministically.

Both trainers receive the same :class:`DataSplits`, so the PyTorch and Keras streams see
exactly the same images in each split.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from filelock import FileLock

from crack_runner.datasets.decoded import load_decoded, load_mapped, memory_budget
from crack_runner.datasets.errors import DataError
from crack_runner.datasets.folder import ImageList, decode_images, fingerprint, limit_per_class, scan
from crack_runner.datasets.integrity import digest_index
from crack_runner.datasets.split import stratified_folds, stratified_split

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Split:
    """Images (N, H, W, 3) uint8 with their integer labels and source files."""

    images: np.ndarray
    labels: np.ndarray
    paths: list[Path]

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class DataSplits:
    classes: list[str]
    train: Split
    val: Split
    test: Split
    fingerprint: str
    root: Path
    skipped: list[str]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])  # type: ignore[return-value]


def resolve_root(cfg) -> Path:  # cfg: runner.config.schema.DatasetConfig (kept untyped to avoid an import cycle)
    """The class-per-folder tree of the configured data set, generated or downloaded if needed."""
    cache = Path(cfg.cache_dir).expanduser()
    if cfg.name == "synthetic_cracks":
        from crack_runner.datasets import synthetic

        root = cache / f"synthetic_cracks-n{cfg.samples_per_class}-s{cfg.source_size}-seed{cfg.seed}"  # never a folder of the user's
        root.parent.mkdir(parents=True, exist_ok=True)
        # Parallel sweep jobs generate it once; in a read-only cache_dir a complete set is used as it is.
        writable = os.access(root.parent, os.W_OK)
        try:
            with FileLock(str(root) + ".lock") if writable else contextlib.nullcontext():
                return synthetic.generate(root, cfg.samples_per_class, cfg.source_size, cfg.seed, cfg.decode_workers)
        except OSError as err:
            if writable:
                raise
            raise DataError(
                f"dataset.cache_dir {str(root.parent)!r} is read-only and holds no complete synthetic set {root.name} "
                f"({err.strerror or err}). Set dataset.cache_dir to a writable folder."
            ) from err
    if cfg.name == "concrete_cracks":
        from crack_runner.datasets import concrete_cracks

        return concrete_cracks.prepare(cfg.path, cfg.url, cache, cfg.sha256)
    return Path(cfg.path).expanduser()


def split_order(labels: np.ndarray, files: np.ndarray, cfg, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``files`` (ascending indices into the image list) in split order (train, val, test), and the splits' bounds in it."""
    idx = stratified_split(labels[files], cfg.val_fraction, cfg.test_fraction, seed)
    order = files[np.concatenate([idx.train, idx.val, idx.test])]
    return order, np.cumsum([0, len(idx.train), len(idx.val), len(idx.test)])


def load(cfg, seed: int, progress: bool = True) -> DataSplits:
    """Decode the configured data set at ``cfg.image_size`` and split it with ``seed``, in one pass.

    Find the files, fingerprint them, then decode them (or read the decode cache) in split
    order, so the splits are consecutive slices of one uint8 array: in memory when the pixels
    fit in ``dataset.in_memory_gb`` (default: half the machine's memory), else memory-mapped
    from the decode cache. That cache is keyed by the files' contents (:func:`datasets.folder.fingerprint`)
    and checked before use, so an edited image or a damaged cache is never trained on.
    """
    images = limit_per_class(scan(resolve_root(cfg)), cfg.limit, seed)
    log.info("data: %d images in %d classes %s under %s", len(images.paths), len(images.classes), images.classes, images.root)
    cache_dir = Path(cfg.cache_dir).expanduser()
    key = fingerprint(images, digest_index(cache_dir, images.root))
    fits = len(images.paths) * cfg.image_size**2 * 3 <= memory_budget(cfg.in_memory_gb)
    if cfg.decode_cache and not fits:
        arrange = partial(split_order, images.labels, cfg=cfg, seed=seed)
        pixels, order, bounds, skipped = load_mapped(images, cfg.image_size, cache_dir, key, cfg.decode_workers, progress, arrange)
        log.info("data: %.1f GB of pixels memory-mapped from %s (dataset.in_memory_gb)", pixels.nbytes / 2**30, pixels.filename)
    else:
        if not fits:
            log.warning("data: the pixels exceed dataset.in_memory_gb but dataset.decode_cache=false holds them in memory; "
                        "set dataset.decode_cache=true to memory-map them instead")
        pixels, order, bounds, skipped = _in_memory(images, cfg, seed, cache_dir, key, progress)
    if skipped:
        log.warning("skipped %d unreadable image(s) of %d", len(skipped), len(images.paths))

    def take(part: int) -> Split:
        rows = slice(bounds[part], bounds[part + 1])
        return Split(pixels[rows], images.labels[order[rows]], [images.paths[i] for i in order[rows]])

    return DataSplits(images.classes, take(0), take(1), take(2), fingerprint=key, root=images.root, skipped=skipped)


def _in_memory(
    images: ImageList, cfg, seed: int, cache_dir: Path, key: str, progress: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """The pixels in split order in one array, from the decode cache or decoded now; (pixels, order, bounds, skipped).

    Split first (assuming every file decodes) and decode in split order: the splits are then
    consecutive slices of the array, with no copy of the pixels. Files that do not decode are
    left out and the rest split again (a copy of the pixels, in this rare case).
    """
    order, bounds = split_order(images.labels, np.arange(len(images.paths)), cfg, seed)
    if cfg.decode_cache:
        pixels, ok, skipped = load_decoded(images, cfg.image_size, cache_dir, key, cfg.decode_workers, progress, order)
    else:
        pixels, ok, skipped = decode_images([images.paths[i] for i in order], cfg.image_size, cfg.decode_workers, progress)
    if len(ok) < len(order):
        decoded = order[ok]
        order, bounds = split_order(images.labels, np.sort(decoded), cfg, seed)
        position = np.empty(len(images.paths), dtype=np.int64)
        position[decoded] = np.arange(len(decoded))
        pixels = pixels[position[order]]
    return pixels, order, bounds, skipped


def folds(data: DataSplits, k: int, seed: int) -> Iterator[DataSplits]:
    """The ``k`` folds of a cross-validation: each fold's val is one stratified part of train+val, its train the rest.

    The test split is the same held-out one in every fold. The pixels of train+val are copied
    once into one array (memory-mapped splits are read into memory), and each fold's into its own.
    """
    images = np.concatenate([data.train.images, data.val.images])
    labels = np.concatenate([data.train.labels, data.val.labels])
    paths = [*data.train.paths, *data.val.paths]

    def part(rows: np.ndarray) -> Split:
        return Split(images[rows], labels[rows], [paths[i] for i in rows])

    for train, val in stratified_folds(labels, k, seed):
        yield dataclasses.replace(data, train=part(train), val=part(val))
