"""The Keras trainer's speed machinery: frozen layers run once per image, not once per epoch.

The plain path is ``model.fit`` on image batches, every layer every epoch. Frozen layers,
though, compute the same thing for an image in every epoch and in every run with the same
frozen layers, so by default (``trainer.cache_frozen_features``) a phase trains only the
classifier's trainable ``rest`` on the stored output of its frozen ``prefix``
(:mod:`~runner.train.frozen.cut`), kept across runs in a store (:mod:`~runner.train.frozen.store`):
with the whole base frozen an epoch is a small MLP fit on pooled vectors, and the next job of
a sweep skips the base entirely. The trainer asks one thing of this package,
:meth:`PhaseInputs.for_phase`: what to fit in this phase, and on which batches
(:mod:`~runner.train.frozen.tfdata`). Results equal the plain path up to float rounding (tested).

A fine-tune run computes the layers before its second phase's cut once per image for both
phases: phase 1's pooled vectors are the rest of the (frozen) base applied to that stored
output (:func:`~runner.train.frozen.cut.tail_after`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from crack_runner.datasets import DataSplits
from crack_runner.models.keras_backbones import POOL, freeze
from runner.train.frozen.cut import CutModel, cut_after_frozen, tail_after
from runner.train.frozen.store import FeatureStore
from runner.train.frozen.tfdata import batch_rows, batch_seeds, batches


class PhaseInputs:
    """Per phase of a Keras run: the model to fit (the whole classifier, or its trainable rest) and its batches.

    ``store``: the feature store, or None to train through every layer every epoch.
    ``fine_tune_depth``: in a two-phase run, the base layers the second phase keeps frozen.
    ``augment(batch, seed)``: changes the training images at random (runner.train.augment); the
    stored output of frozen layers cannot hold changed images, so it needs ``store`` None.
    """

    def __init__(
        self, model: keras.Model, base: keras.Model, data: DataSplits, batch_size: int, seed: int,
        store: FeatureStore | None, fine_tune_depth: int | None = None, augment: Callable[[np.ndarray, np.int64], np.ndarray] | None = None,
    ) -> None:
        assert augment is None or store is None, "augmented images have no stored frozen output"
        self.model, self.base, self.data, self.store, self.augment = model, base, data, store, augment
        self.batch_size, self.seed = batch_size, seed
        self.val_rows = batch_rows(len(data.val), batch_size)
        self.cut: CutModel | None = None  # the current phase's cut, when it trains on stored output
        self.later: CutModel | None = None  # the fine-tune phase's cut, known before the first phase
        if store is not None and fine_tune_depth is not None:
            freeze(base, fine_tune_depth)
            self.later = cut_after_frozen(model, base)

    def for_phase(self, first: bool, last: bool, epochs: range) -> tuple[keras.Model, tf.data.Dataset, tf.data.Dataset]:
        """After the phase's freeze and compile: (the model to fit, train batches of ``epochs``, val batches).

        Epoch e's order is the run's (seed, e) order whether the phase reads images or stored
        features, and whether the run started at epoch 1 or was resumed.
        """
        self.cut, features = None, None
        train_rows = batch_rows(len(self.data.train), self.batch_size, self.seed, epochs)
        if self.store is not None:
            self.cut = self.later if (self.later is not None and last) else cut_after_frozen(self.model, self.base)
            if self.later is not None and first and self.later.cut != POOL:  # the head on the whole frozen base
                features = self._pooled_via_later()
            elif self.cut is not None:
                features = self._stored(self.cut.prefix, self.data.train.images, self.data.val.images)
        if features is None:  # through the whole model, every epoch
            self.cut = None
            return (
                self.model,
                batches(
                    self.data.train.images, self.data.train.labels, train_rows,
                    self.augment, batch_seeds(len(self.data.train), self.batch_size, self.seed, epochs) if self.augment else None,
                ),
                batches(self.data.val.images, self.data.val.labels, self.val_rows),
            )
        rest = self.cut.rest
        rest.compile(optimizer=self.model.optimizer, loss=self.model.loss, metrics=["accuracy"])  # the classifier's own optimizer
        return rest, batches(features[0], self.data.train.labels, train_rows), batches(features[1], self.data.val.labels, self.val_rows)

    def _stored(self, prefix: keras.Model, train: np.ndarray, val: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """What ``prefix`` computes for the train and val inputs, from the store; None if the disk cannot hold it."""
        train_out = self.store.features(prefix, train, "train")
        val_out = self.store.features(prefix, val, "val") if train_out is not None else None
        return None if val_out is None else (train_out, val_out)

    def _pooled_via_later(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Phase 1's pooled vectors by way of the fine-tune phase's stored output: the rest of the base on it."""
        maps = self._stored(self.later.prefix, self.data.train.images, self.data.val.images)
        return None if maps is None else self._stored(tail_after(self.base, self.later.cut), *maps)


def feature_store(enabled: bool, folder: str, max_gb: float, batch_size: int, progress: bool) -> FeatureStore | None:
    """The store of ``trainer.feature_cache_dir`` when ``trainer.cache_frozen_features`` is on, else None."""
    return FeatureStore(Path(folder), max_gb, batch_size, progress) if enabled else None
