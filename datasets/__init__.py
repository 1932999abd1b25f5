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

from datasets.decoded import load_decoded
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


def load(cfg, seed: int, progress: bool = True) -> DataSplits:
    """Decode the configured data set at ``cfg.image_size`` and split it with ``seed``."""
    images = limit_per_class(scan(resolve_root(cfg)), cfg.limit, seed)
    log.info("data: %d images in %d classes %s under %s", len(images.paths), len(images.classes), images.classes, images.root)
    key = fingerprint(images)
    # Split first (assuming every file decodes) and decode in split order: the splits are then
    # consecutive slices of one array, with no copy of the pixels.
    idx = stratified_split(images.labels, cfg.val_fraction, cfg.test_fraction, seed)
    order = np.concatenate([idx.train, idx.val, idx.test])
    if cfg.decode_cache:
        pixels, ok, skipped = load_decoded(images, cfg.image_size, Path(cfg.cache_dir).expanduser(), key, cfg.decode_workers, progress, order)
    else:
        pixels, ok, skipped = decode_images([images.paths[i] for i in order], cfg.image_size, cfg.decode_workers, progress)
    if skipped:
        log.warning("skipped %d unreadable image(s) of %d", len(skipped), len(images.paths))
    files = order[ok]
    if len(ok) < len(order):  # split the images that decoded (a copy of the pixels, in this rare case)
        by_file = np.argsort(files)
        idx = stratified_split(images.labels[files[by_file]], cfg.val_fraction, cfg.test_fraction, seed)
        rows = by_file[np.concatenate([idx.train, idx.val, idx.test])]
        files, pixels = files[rows], pixels[rows]
    bounds = np.cumsum([0, len(idx.train), len(idx.val), len(idx.test)])

    def take(part: int) -> Split:
        rows = slice(bounds[part], bounds[part + 1])
        return Split(pixels[rows], images.labels[files[rows]], [images.paths[i] for i in files[rows]])

    return DataSplits(
        classes=images.classes,
        train=take(0),
        val=take(1),
        test=take(2),
        fingerprint=key,
        root=images.root,
        skipped=skipped,
    )
