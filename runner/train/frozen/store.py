"""A store of what frozen layers compute, so they run once per image across runs, not per epoch.

Frozen layers compute the same thing for an image in every epoch, and in every run that has
the same frozen layers; runner.train.keras_trainer trains the rest of the model on their stored
output. An entry is keyed by exactly what determines it: the frozen layers (each layer's
configuration and every weight) and the pixels. So another job of a learning-rate sweep, a
rerun with more epochs or the test split's predictions read an entry instead of running the
layers again, and a change of weights, cut, image size, data or split makes a new entry,
never a stale read.

Layout: ``<trainer.feature_cache_dir>/<layers key>/<pixels key>-<dtype>-<checksum>.npy``,
memory-mapped when read. ``trainer.feature_cache_dtype``: float32 by default, as the layers
compute it, so training on an entry equals training through the layers; float16 halves the disk
and reads (ten bits of mantissa: bfloat16 has three fewer, and values past float16's range,
65504, are caught while writing and that entry kept in float32), but its rounding moves what a
run learns where training is on a knife's edge (experiments.md: the real set's size).
Before an entry is written, the least recently used entries of other runs are deleted to keep
the folder under ``trainer.feature_cache_gb``; a run whose own entries would not fit under it, or
in the free disk, is told so at its start (:meth:`FeatureStore.room_for`) and trains through the layers.

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


class OutOfRange(Exception):
    """A value the layers computed is beyond what the entry's dtype holds (float16: 65504)."""


def compute(step: tf.types.experimental.PolymorphicFunction, images: np.ndarray, out: np.ndarray, batch_size: int, desc: str, progress: bool) -> None:
    """``step`` (see :func:`inference_step`) over ``images`` (uint8 or float, 0..255) into ``out``, batch by batch.

    Raises OutOfRange when ``out`` is narrower than float32 and a value overflows it.
    """
    for start in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", leave=False, disable=not progress):
        stopping.check()  # Ctrl-C / SIGTERM: stop between batches (this pass can take minutes)
        values = step(images[start : start + batch_size].astype(np.float32)).numpy()
        out[start : start + batch_size] = values
        if out.dtype != values.dtype and not np.isfinite(out[start : start + batch_size]).all():
            raise OutOfRange(f"a value of {np.abs(values).max():.4g} is beyond {out.dtype}")


class FeatureStore:
    """Frozen-layer outputs on disk under ``root``, at most ``max_gb`` gigabytes of them kept between runs."""

    def __init__(self, root: Path, max_gb: float, batch_size: int, progress: bool, dtype: str = "float32") -> None:
        self.root, self.max_bytes = Path(root), int(max_gb * 1e9)
        self.batch_size, self.progress = batch_size, progress
        self.dtype = np.dtype(dtype)
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
        folder, stem, step = self._entry(frozen, images)
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

    def room_for(self, planned: list[tuple[keras.Model, np.ndarray | int, str]]) -> bool:
        """Whether the entries a run will use fit under trainer.feature_cache_gb and in the free disk; if not, it says so once.

        ``planned``: (frozen layers, their input, what it is) for each entry; an input known
        only by its count (computed during the run) is counted as to be written.
        """
        total = new = 0
        names = []
        for frozen, images, name in planned:
            size = (images if isinstance(images, int) else len(images)) * math.prod(frozen.outputs[0].shape[1:]) * self.dtype.itemsize
            total += size
            names.append(name)
            if isinstance(images, int):
                new += size
                continue
            folder, stem, _ = self._entry(frozen, images)
            if not any(folder.glob(f"{stem}-*.npy")):
                new += size
        where = self.root if self.root.exists() else next(p for p in self.root.parents if p.exists())
        free = shutil.disk_usage(where).free - DISK_RESERVE
        if total <= self.max_bytes and new <= free:
            return True
        needed = f"this run's frozen features ({', '.join(dict.fromkeys(names))}, {self.dtype.name}) need {total / 1e9:.2f} GB"
        if total > self.max_bytes:
            log.warning("frozen features: %s, over trainer.feature_cache_gb=%g: training through the frozen layers every epoch "
                        "instead (slower; set trainer.feature_cache_gb=%d or more to store them)", needed, self.max_bytes / 1e9, math.ceil(total / 1e9))
        else:
            log.warning("frozen features: %s to write and %s has %.2f GB free (keeping 1 GB): training through the frozen layers every "
                        "epoch instead (slower; free space, or set trainer.feature_cache_dir to a folder on a larger disk)",
                        needed, where, max(free, 0) / 1e9)
        return False

    def _entry(self, frozen: keras.Model, images: np.ndarray) -> tuple[Path, str, tf.types.experimental.PolymorphicFunction]:
        """The folder and file stem of what ``frozen`` computes for ``images``, and ``frozen`` as one traced step."""
        if id(frozen) not in self.keys:  # once per model: hashing the weights takes a moment, tracing too
            self.keys[id(frozen)] = frozen, layers_key(frozen), inference_step(frozen)
        _, key, step = self.keys[id(frozen)]
        if id(images) not in self.pixel_keys:
            self.pixel_keys[id(images)] = images, pixels_key(images)
        return self.root / key, f"{self.pixel_keys[id(images)][1]}-{self.dtype.name}", step

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
        size = math.prod(shape) * self.dtype.itemsize
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
            try:
                self._compute_into(partial, self.dtype, step, images, shape, name)
            except OutOfRange as err:
                log.warning("frozen features: %s (%s images): %s; this entry is stored in float32", name, len(images), err)
                self._compute_into(partial, np.dtype(np.float32), step, images, shape, name)
            path = folder / f"{stem}-{integrity.file_checksum(partial)}.npy"
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
        self.intact[(path, path.stat().st_ino)] = True
        log.info(
            "frozen features: %s, %d images through the frozen layers in %.1f s (%s values each, %.2f GB in %s)",
            name, len(images), time.perf_counter() - start, "x".join(map(str, shape[1:])), path.stat().st_size / 1e9, path,
        )
        return path

    def _compute_into(
        self, partial: Path, dtype: np.dtype, step: tf.types.experimental.PolymorphicFunction, images: np.ndarray, shape: tuple[int, ...], name: str
    ) -> None:
        out = integrity.allocate_npy(partial, dtype, shape)  # a disk filled meanwhile fails here, not with SIGBUS part-way
        try:
            compute(step, images, out, self.batch_size, f"frozen layers: {name}", self.progress)
            out.flush()
        finally:
            del out

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
