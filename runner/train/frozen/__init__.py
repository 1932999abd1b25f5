"""The Keras trainer's speed machinery: frozen layers run once per image, not once per epoch.

The plain path is ``model.fit`` on image batches, every layer every epoch. Frozen layers,
though, compute the same thing for an image in every epoch and in every run with the same
frozen layers, so by default (``trainer.cache_frozen_features``) a phase trains only the
classifier's trainable ``rest`` on the stored output of its frozen ``prefix``
(:mod:`~runner.train.frozen.cut`), kept across runs in a store (:mod:`~runner.train.frozen.store`):
with the whole base frozen an epoch is a small MLP fit on pooled vectors, and the next job of
a sweep skips the base entirely. The trainer keeps the plain path and asks this package, per
phase, whether it applies (:meth:`FrozenShortcut.begin_phase`) and, if so, fits through it
(:meth:`FrozenShortcut.fit`, batches from :mod:`~runner.train.frozen.tfdata`). Results equal the
plain path up to float rounding (tested).

A fine-tune run computes the layers before its second phase's cut once per image for both
phases: phase 1's pooled vectors are the rest of the (frozen) base applied to that stored
output (:func:`~runner.train.frozen.cut.tail_after`).
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

from crack_runner.datasets import DataSplits
from crack_runner.models.keras_backbones import POOL, freeze
from runner.train.frozen.cut import CutModel, cut_after_frozen, tail_after
from runner.train.frozen.store import FeatureStore
from runner.train.frozen.tfdata import batch_rows, batches
from runner.train.keras_fit import fit as fit_traced_once


class FrozenShortcut:
    """Per phase of a Keras run, the classifier's trainable rest fitted on the stored output of its frozen prefix.

    ``store``: where that output is kept across runs (runner.train.frozen.store).
    ``fine_tune_depth``: in a two-phase run, the base layers the second phase keeps frozen.
    The trainer calls :meth:`begin_phase` after each phase's freeze and compile, then
    :meth:`fit` in place of ``model.fit`` when it returned a cut; :meth:`predict_proba` after training.
    """

    def __init__(
        self, model: keras.Model, base: keras.Model, data: DataSplits, batch_size: int, seed: int,
        store: FeatureStore, fine_tune_depth: int | None = None,
    ) -> None:
        self.model, self.base, self.data, self.store = model, base, data, store
        self.batch_size, self.seed = batch_size, seed
        self.cut: CutModel | None = None  # the current phase's cut, when it trains on stored output
        self.features: tuple[np.ndarray, np.ndarray] | None = None  # that output for the train and val images
        self.later: CutModel | None = None  # the fine-tune phase's cut, known before the first phase
        self.tail: keras.Model | None = None  # with `later`, the rest of the frozen base on its output (phase 1's pooled vectors)
        self.cuts: dict[tuple[bool, ...], CutModel | None] = {}  # by which base layers train: each cut is made once
        if fine_tune_depth is not None:
            freeze(base, fine_tune_depth)
            self.later = self._cut_after_frozen()
            if self.later is not None and self.later.cut != POOL:
                self.tail = tail_after(base, self.later.cut)

    def fits(self, first_depth: int) -> bool:
        """Whether the store can hold what the phases train on and the test split's predictions read; said once when not.

        ``first_depth``: the base layers the first phase freezes (the trainer freezes them again before compiling).
        """
        if self.later is None:
            freeze(self.base, first_depth)
        cut = self.later or self._cut_after_frozen()
        if cut is None:
            return True
        splits = [("train", self.data.train.images), ("val", self.data.val.images), ("test", self.data.test.images)]
        planned: list[tuple[keras.Model, np.ndarray | int, str]] = [(cut.prefix, images, name) for name, images in splits]
        if self.tail is not None:
            planned += [(self.tail, len(images), f"{name} pooled") for name, images in splits[:2]]
        return self.store.room_for(planned)

    def begin_phase(self, first: bool) -> CutModel | None:
        """After the phase's freeze and compile: the cut it trains after, its frozen output stored; None: the plain path.

        None when nothing before the trainable layers is frozen, or when the disk cannot hold the output.
        """
        self.cut = self._cut_after_frozen()
        if self.later is not None and first and self.later.cut != POOL:  # the head on the whole frozen base
            self.features = self._pooled_via_later()
        else:
            self.features = self._stored(self.cut.prefix, self.data.train.images, self.data.val.images) if self.cut else None
        if self.features is None:
            self.cut = None
        return self.cut

    def fit(self, span: range, **fit_args: Any) -> None:
        """``model.fit(**fit_args)`` of the phase's trainable rest on the stored output, over the epochs of ``span``
        (epoch e's rows in the run's (seed, e) order, as the plain path reads them)."""
        rest = self.cut.rest
        rest.compile(optimizer=self.model.optimizer, loss=self.model.loss, metrics=["accuracy"])  # the classifier's own optimizer
        train_rows = batch_rows(len(self.data.train), self.batch_size, self.seed, span)
        val_rows = batch_rows(len(self.data.val), self.batch_size)
        train, val = self.features
        train_batches, val_batches = batches(train, self.data.train.labels, train_rows), batches(val, self.data.val.labels, val_rows)
        fit_traced_once(rest, train_batches, validation_data=val_batches, **fit_args)

    def predict_proba(self, images: np.ndarray) -> np.ndarray | None:
        """The trained classifier's probabilities by way of the last phase's stored output (computed once, kept); None without one."""
        features = self.store.features(self.cut.prefix, images, "predict") if self.cut is not None else None
        if features is None:
            return None
        return self.cut.rest.predict(batches(features, None, batch_rows(len(images), self.batch_size), once=True), verbose=0)

    def _cut_after_frozen(self) -> CutModel | None:
        """:func:`cut_after_frozen` for the base layers frozen now, made once per set of them (one phase asks twice)."""
        trains = tuple(layer.trainable for layer in self.base.layers)
        if trains not in self.cuts:
            self.cuts[trains] = cut_after_frozen(self.model, self.base)
        return self.cuts[trains]

    def _stored(self, prefix: keras.Model, train: np.ndarray, val: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """What ``prefix`` computes for the train and val inputs, from the store; None if the disk cannot hold it."""
        train_out = self.store.features(prefix, train, "train")
        val_out = self.store.features(prefix, val, "val") if train_out is not None else None
        return None if val_out is None else (train_out, val_out)

    def _pooled_via_later(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Phase 1's pooled vectors by way of the fine-tune phase's stored output: the rest of the base on it."""
        maps = self._stored(self.later.prefix, self.data.train.images, self.data.val.images)
        return None if maps is None else self._stored(self.tail, *maps)
