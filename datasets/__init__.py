"""Data for a run: find or make the image tree, decode it once, split it deterministically.

Both trainers receive the same :class:`DataSplits`, so the PyTorch and Keras streams see
exactly the same images in each split.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from filelock import FileLock

from datasets.decoded import ensure_decoded, load_decoded, mapped_rows, memory_budget
from datasets.folder import decode_images, fingerprint, limit_per_class, scan
from datasets.split import stratified_split

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


def resolve_root(cfg) -> Path:  # cfg: runner.config.DatasetConfig (kept untyped to avoid an import cycle)
    """The class-per-folder tree of the configured data set, generated or downloaded if needed."""
    cache = Path(cfg.cache_dir).expanduser()
    if cfg.name == "synthetic_cracks":
        from datasets import synthetic

        root = Path(cfg.path).expanduser() if cfg.path else cache / (
            f"synthetic_cracks-n{cfg.samples_per_class}-s{cfg.source_size}-seed{cfg.seed}"
        )
        root.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(root) + ".lock"):  # parallel sweep jobs generate it once
            return synthetic.generate(root, cfg.samples_per_class, cfg.source_size, cfg.seed, cfg.decode_workers)
    if cfg.name == "concrete_cracks":
        from datasets import concrete_cracks

        return concrete_cracks.prepare(cfg.path, cfg.url, cache, cfg.sha256)
    return Path(cfg.path).expanduser()


def split_order(labels: np.ndarray, files: np.ndarray, cfg, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``files`` (ascending indices into the image list) in split order (train, val, test), and the splits' bounds in it."""
    idx = stratified_split(labels[files], cfg.val_fraction, cfg.test_fraction, seed)
    order = files[np.concatenate([idx.train, idx.val, idx.test])]
    return order, np.cumsum([0, len(idx.train), len(idx.val), len(idx.test)])


def load(cfg, seed: int, progress: bool = True) -> DataSplits:
    """Decode the configured data set at ``cfg.image_size`` and split it with ``seed``.

    The splits are consecutive slices of one uint8 array, in memory when the pixels fit in
    ``dataset.in_memory_gb`` (default: half the machine's memory), else memory-mapped from the
    decode cache.
    """
    images = limit_per_class(scan(resolve_root(cfg)), cfg.limit, seed)
    log.info("data: %d images in %d classes %s under %s", len(images.paths), len(images.classes), images.classes, images.root)
    key = fingerprint(images)
    cache_dir = Path(cfg.cache_dir).expanduser()
    size = cfg.image_size
    fits = len(images.paths) * size * size * 3 <= memory_budget(cfg.in_memory_gb)
    if cfg.decode_cache and not fits:
        folder, decodable, skipped = ensure_decoded(images, size, cache_dir, key, cfg.decode_workers, progress)
        order, bounds = split_order(images.labels, decodable, cfg, seed)
        pixels = mapped_rows(folder, order)
        log.info("data: %.1f GB of pixels memory-mapped from %s (dataset.in_memory_gb)", pixels.nbytes / 2**30, folder)
    else:
        if not fits:
            log.warning("data: the pixels exceed dataset.in_memory_gb but dataset.decode_cache=false holds them in memory; "
                        "set dataset.decode_cache=true to memory-map them instead")
        # Split first (assuming every file decodes) and decode in split order: the splits are then
        # consecutive slices of one array, with no copy of the pixels.
        order, bounds = split_order(images.labels, np.arange(len(images.paths)), cfg, seed)
        if cfg.decode_cache:
            pixels, ok, skipped = load_decoded(images, size, cache_dir, key, cfg.decode_workers, progress, order)
        else:
            pixels, ok, skipped = decode_images([images.paths[i] for i in order], size, cfg.decode_workers, progress)
        if len(ok) < len(order):  # split the images that decoded (a copy of the pixels, in this rare case)
            decoded = order[ok]
            order, bounds = split_order(images.labels, np.sort(decoded), cfg, seed)
            position = np.empty(len(images.paths), dtype=np.int64)
            position[decoded] = np.arange(len(decoded))
            pixels = pixels[position[order]]
    if skipped:
        log.warning("skipped %d unreadable image(s) of %d", len(skipped), len(images.paths))

    def take(part: int) -> Split:
        rows = slice(bounds[part], bounds[part + 1])
        return Split(pixels[rows], images.labels[order[rows]], [images.paths[i] for i in order[rows]])

    return DataSplits(
        classes=images.classes,
        train=take(0),
        val=take(1),
        test=take(2),
        fingerprint=key,
        root=images.root,
        skipped=skipped,
    )
