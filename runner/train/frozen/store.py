"""A store of what frozen layers compute, so they run once per image across runs, not per epoch.

Frozen layers compute the same thing for an image in every epoch, and in every run that has
the same frozen layers; runner.train.keras_trainer trains the rest of the model on their stored
output. An entry is keyed by exactly what determines it: the frozen layers (each layer's
configuration and every weight) and the pixels. So another job of a learning-rate sweep, a
rerun with more epochs or the test split's predictions read an entry instead of running the
layers again, and a change of weights, cut, image size, data or split makes a new entry,
never a stale read.

Layout: ``<trainer.feature_cache_dir>/<layers key>/<pixels key>-<checksum>.npy``, float32 as the
layers compute it, memory-mapped when read. Before an entry is written, the least recently used
entries of other runs are deleted to keep the folder under ``trainer.feature_cache_gb``.

An entry is trained on only if its bytes match the checksum in its name (datasets.integrity,
checked once per run: about 0.6 s per 1.5 GB here), so a damaged or cut-short one is
computed anew with a warning, never read. Entries are written under a ``.partial`` name with
their space reserved and renamed into place when complete, then never changed: a complete one
is read without a lock (a read-only store works), and a full or read-only disk while writing
means training through the layers, as when the disk is known up front to be too small.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from filelock import FileLock
from tqdm import tqdm

from crack_runner.datasets import integrity, stopping

log = logging.getLogger(__name__)

FORMAT = 1  # part of every key: bump it when what an entry holds changes (e.g. how BatchNormalization is folded)
MADE_BY = "made_by.json"  # in each layers folder: the format and versions in its key (python -m runner.doctor reads it)
DISK_RESERVE = 2**30  # bytes left free on the disk when an entry is written


def leaf_layers(model: keras.Model) -> list[keras.Layer]:
    """The layers of ``model`` with nested models opened up, in order."""
    return [leaf for layer in model.layers for leaf in (leaf_layers(layer) if isinstance(layer, keras.Model) else [layer])]


def layers_key(frozen: keras.Model) -> str:
    """A digest of the layers' settings and weights, the input and output shapes and the library versions.

    Names are left out: Keras numbers them per process, so the same layers built twice differ only there.
    """
    digest = hashlib.blake2b(digest_size=12)
    digest.update("{format} keras {keras} tensorflow {tensorflow}".format(**made_by()).encode())
    digest.update(f"{frozen.inputs[0].shape} -> {frozen.outputs[0].shape}".encode())
    for layer in leaf_layers(frozen):
        config = {k: v for k, v in layer.get_config().items() if k != "name"}
        digest.update(type(layer).__name__.encode() + json.dumps(config, sort_keys=True, default=str).encode())
    for weight in frozen.weights:
        digest.update(np.ascontiguousarray(keras.ops.convert_to_numpy(weight)).data)
    return digest.hexdigest()


def made_by() -> dict[str, object]:
    """The store format and library versions that :func:`layers_key` mixes in: entries made by others are never read."""
    return {"format": FORMAT, "keras": keras.__version__, "tensorflow": tf.__version__}


def pixels_key(images: np.ndarray) -> str:
    """A digest of the images' shape, type and every pixel (about 0.3 s for 2,000 images at 227 px)."""
    digest = hashlib.blake2b(digest_size=12)
    digest.update(f"{images.shape} {images.dtype}".encode())
    digest.update(np.ascontiguousarray(images).data)
    return digest.hexdigest()


def inference_step(frozen: keras.Model) -> tf.types.experimental.PolymorphicFunction:
    """``frozen`` in inference mode as one traced function for float32 batches of any size."""
    return tf.function(lambda x: frozen(x, training=False), input_signature=[tf.TensorSpec(frozen.inputs[0].shape, tf.float32)])


def compute(step: tf.types.experimental.PolymorphicFunction, images: np.ndarray, out: np.ndarray, batch_size: int, desc: str, progress: bool) -> None:
    """``step`` (see :func:`inference_step`) over ``images`` (uint8 or float, 0..255) into ``out``, batch by batch."""
    for start in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", leave=False, disable=not progress):
        stopping.check()  # Ctrl-C / SIGTERM: stop between batches (this pass can take minutes)
        out[start : start + batch_size] = step(images[start : start + batch_size].astype(np.float32)).numpy()


class FeatureStore:
    """Frozen-layer outputs on disk under ``root``, at most ``max_gb`` gigabytes of them kept between runs."""

    def __init__(self, root: Path, max_gb: float, batch_size: int, progress: bool) -> None:
        self.root, self.max_bytes = Path(root), int(max_gb * 1e9)
        self.batch_size, self.progress = batch_size, progress
        self.in_use: set[Path] = set()  # entries this run reads: never evicted by it
        # id(frozen model) -> (the model, its layers key, its traced step); holding the model keeps its id unique
        self.keys: dict[int, tuple[keras.Model, str, tf.types.experimental.PolymorphicFunction]] = {}
        # id(images) -> (the array, its pixels key): a fine-tune run's second phase asks for the same splits
        self.pixel_keys: dict[int, tuple[np.ndarray, str]] = {}
        self.intact: dict[tuple[Path, int], bool] = {}  # (entry, inode) -> whether its bytes match its checksum

    def features(self, frozen: keras.Model, images: np.ndarray, name: str) -> np.ndarray | None:
        """What ``frozen`` computes for each image, read from the store or computed and stored now.

        None when the disk cannot hold it or take the write: the caller then runs the layers as part of the model.
        """
        if id(frozen) not in self.keys:  # once per model: hashing the weights takes a moment, tracing too
            self.keys[id(frozen)] = frozen, layers_key(frozen), inference_step(frozen)
        _, key, step = self.keys[id(frozen)]
        if id(images) not in self.pixel_keys:
            self.pixel_keys[id(images)] = images, pixels_key(images)
        folder, stem = self.root / key, self.pixel_keys[id(images)][1]
        shape = (len(images), *frozen.outputs[0].shape[1:])
        path = self._find(folder, stem, name, len(images))
        if path is None:
            try:
                folder.mkdir(parents=True, exist_ok=True)
                with FileLock(str(folder / f"{stem}.lock")):  # parallel sweep jobs compute an entry once
                    path = self._find(folder, stem, name, len(images)) or self._write(step, images, folder, stem, shape, name)
            except OSError as err:  # a disk that filled up, or a read-only store
                log.warning(
                    "frozen features: could not store the %s images' output in %s (%s); training through the frozen layers "
                    "every epoch instead (free space, or set trainer.feature_cache_dir to a writable folder)",
                    name, folder, err.strerror or err,
                )
                return None
            if path is None:
                return None
        self.in_use.add(path)
        return np.load(path, mmap_mode="r")

    def _find(self, folder: Path, stem: str, name: str, count: int) -> Path | None:
        """The entry of these pixels whose bytes match its checksum, marked recently used (evicted last), or None."""
        for path in sorted(folder.glob(f"{stem}-*.npy")):
            with contextlib.suppress(FileNotFoundError):  # evicted by another job meanwhile
                if self._intact(path):
                    with contextlib.suppress(OSError):  # a read-only store: used all the same
                        os.utime(path)
                    log.info("frozen features: %s (%d images) read from %s", name, count, path)
                    return path
        return None

    def _intact(self, path: Path) -> bool:
        """Whether the entry's bytes match the checksum in its name: checked once per run (again if the file is replaced)."""
        identity = (path, path.stat().st_ino)
        if identity not in self.intact:
            self.intact[identity] = integrity.file_checksum(path) == path.stem.rpartition("-")[2]
            if not self.intact[identity]:
                log.warning("frozen features: %s is damaged (its bytes differ from the checksum in its name); computing it anew", path)
        return self.intact[identity]

    def _write(
        self, step: tf.types.experimental.PolymorphicFunction, images: np.ndarray, folder: Path, stem: str, shape: tuple[int, ...], name: str
    ) -> Path | None:
        """Compute and publish the entry (under its lock); None, with a warning, when the disk has no room for it."""
        for damaged in folder.glob(f"{stem}-*.npy"):  # under the lock none is intact (see features): never read again
            damaged.unlink()
        if not (folder / MADE_BY).exists():
            integrity.write_json(folder / MADE_BY, made_by())
        size = math.prod(shape) * 4
        self._make_room(size)
        free = shutil.disk_usage(self.root).free
        if size > free - DISK_RESERVE:
            log.warning(
                "frozen features: %.1f GB for the %s images would not fit in the %.1f GB free on %s; "
                "training through the frozen layers every epoch instead (or free space, or set trainer.feature_cache_dir)",
                size / 1e9, name, free / 1e9, self.root,
            )
            return None
        start = time.perf_counter()
        partial = folder / f"{stem}.partial.npy"  # a killed run leaves no entry that looks whole
        try:
            out = integrity.allocate_npy(partial, np.float32, shape)  # a disk filled meanwhile fails here, not with SIGBUS part-way
            try:
                compute(step, images, out, self.batch_size, f"frozen layers: {name}", self.progress)
                out.flush()
            finally:
                del out
            path = folder / f"{stem}-{integrity.file_checksum(partial)}.npy"
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
        self.intact[(path, path.stat().st_ino)] = True
        log.info(
            "frozen features: %s, %d images through the frozen layers in %.1f s (%s floats each, %.2f GB in %s)",
            name, len(images), time.perf_counter() - start, "x".join(map(str, shape[1:])), size / 1e9, path,
        )
        return path

    def _make_room(self, size: int) -> None:
        """Delete the least recently used entries not in use here until ``size`` more bytes fit under the limit."""
        entries = {}  # path -> (last use, bytes); a parallel job may delete one while we look
        for entry in self.root.glob("*/*.npy"):
            with contextlib.suppress(FileNotFoundError):
                stat = entry.stat()
                entries[entry] = (stat.st_mtime, stat.st_size)
        total = sum(size for _, size in entries.values())
        removed = 0
        for entry, (_, bytes_) in sorted(entries.items(), key=lambda item: item[1][0]):
            if total + size <= self.max_bytes:
                break
            if entry in self.in_use or entry.name.endswith(".partial.npy"):
                continue
            entry.unlink(missing_ok=True)  # a run still reading it keeps its memory mapping
            total, removed = total - bytes_, removed + bytes_
        if removed:
            log.info("frozen features: removed %.2f GB of least recently used entries (trainer.feature_cache_gb=%g)", removed / 1e9, self.max_bytes / 1e9)
        if total + size > self.max_bytes:
            log.info(
                "frozen features: this run's entries take %.2f GB, over trainer.feature_cache_gb=%g until a later run evicts them",
                (total + size) / 1e9, self.max_bytes / 1e9,
            )
