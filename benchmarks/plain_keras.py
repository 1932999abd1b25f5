"""The capstone's Keras ResNet50 notebook, written the plain way (the benchmark's baseline).

The notebook reads the images with ``ImageDataGenerator(preprocessing_function=preprocess_input)
.flow_from_directory(...)``, which Keras 3 no longer has; its shape is kept here: a
``keras.utils.PyDataset`` that opens, decodes and resizes each JPEG with PIL when its batch is
asked for, every epoch, and applies ``preprocess_input`` in NumPy, one-hot labels. The model is
the notebook's: ``ResNet50(include_top=False, pooling="avg")`` and ``Dense(classes, softmax)``,
Adam, categorical cross-entropy, ``model.fit`` with the validation images each epoch.

- whole base frozen (``freeze_depth=None``): ``base.trainable = False``, as in the notebook;
- ``freeze_depth=140``: the first 140 base layers frozen, the rest trained, except the
  BatchNormalization layers, which stay frozen (inference mode) as in the runner, so that
  both sides compute the same thing.

It is deliberately the notebook's shape, not the runner's: no decode cache, no frozen-feature
cache, no tracking. Weights are random (``weights=None``): no download here, and the speed is the same.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402


class ImageFiles(keras.utils.PyDataset):
    """flow_from_directory's batches: PIL decode + resize per file, preprocess_input, one-hot labels."""

    def __init__(self, files: list[Path], labels: list[int], classes: int, size: int, batch_size: int, shuffle: bool) -> None:
        super().__init__()  # one worker, in the training loop: the notebook's default
        self.files, self.labels = files, np.asarray(labels)
        self.classes, self.size, self.batch_size, self.shuffle = classes, size, batch_size, shuffle
        self.order = np.arange(len(files))
        self.rng = np.random.default_rng(0)
        if shuffle:
            self.rng.shuffle(self.order)

    def __len__(self) -> int:
        return math.ceil(len(self.files) / self.batch_size)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        rows = self.order[index * self.batch_size : (index + 1) * self.batch_size]
        images = [Image.open(self.files[i]).convert("RGB").resize((self.size, self.size), Image.NEAREST) for i in rows]
        x = keras.applications.resnet50.preprocess_input(np.stack([np.asarray(im, dtype=np.float32) for im in images]))
        return x, keras.utils.to_categorical(self.labels[rows], self.classes)

    def on_epoch_end(self) -> None:
        if self.shuffle:
            self.rng.shuffle(self.order)


def build(size: int, classes: int, freeze_depth: int | None) -> keras.Model:
    base = keras.applications.ResNet50(include_top=False, pooling="avg", weights=None, input_shape=(size, size, 3))
    if freeze_depth is None:
        base.trainable = False
    else:
        for index, layer in enumerate(base.layers):
            layer.trainable = index >= freeze_depth and not isinstance(layer, keras.layers.BatchNormalization)
    model = keras.Sequential([keras.Input((size, size, 3)), base, keras.layers.Dense(classes, activation="softmax")])
    model.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"])
    return model


class EpochTimes(keras.callbacks.Callback):
    def __init__(self) -> None:
        super().__init__()
        self.seconds: list[float] = []

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:  # after the epoch's validation
        self.seconds.append(time.perf_counter() - self.start)


def train(
    train_files: list[Path], train_labels: list[int], val_files: list[Path], val_labels: list[int],
    size: int, epochs: int, batch_size: int, freeze_depth: int | None,
) -> tuple[float, list[float]]:
    """Build and train; the seconds of the whole (model build included) and of each epoch."""
    start = time.perf_counter()
    keras.utils.set_random_seed(0)
    classes = len(set(train_labels))
    model = build(size, classes, freeze_depth)
    train_data = ImageFiles(train_files, train_labels, classes, size, batch_size, shuffle=True)
    val_data = ImageFiles(val_files, val_labels, classes, size, batch_size, shuffle=False)
    times = EpochTimes()
    model.fit(train_data, validation_data=val_data, epochs=epochs, callbacks=[times], verbose=0)
    return time.perf_counter() - start, times.seconds
