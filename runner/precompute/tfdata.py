"""Batches for Keras as a tf.data pipeline, of images or of stored frozen-layer output alike.

What is shuffled is the order of the rows (:func:`batch_rows`), so the shuffle buffer holds
indices, not images, and datasets made from the same rows share one sequence of epoch orders:
a phase that reads images and one that reads stored features see the images in the same order.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import tensorflow as tf


def batch_rows(count: int, batch_size: int, shuffle_seed: int | None = None) -> tf.data.Dataset:
    """The row indices of each batch; the same order for images and for their cached features."""
    rows = tf.data.Dataset.range(count)
    if shuffle_seed is not None:
        rows = rows.shuffle(count, seed=shuffle_seed, reshuffle_each_iteration=True)
    return rows.batch(batch_size)


# Arrays up to an eighth of the machine's memory become one TensorFlow tensor, gathered in the
# graph; larger ones are read per batch through tf.numpy_function, which holds Python's lock and
# at times halved the training speed on 2 cores (measured: 79 s against 42 s an epoch).
IN_MEMORY = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 8


def batches(
    array: np.ndarray, labels: np.ndarray | None, rows: tf.data.Dataset,
    augment: Callable[[np.ndarray, np.int64], np.ndarray] | None = None, seed: int = 0,
) -> tf.data.Dataset:
    """Float32 batches (with labels, if given) of the rows of ``array`` in the order of ``rows``, prefetched.

    ``augment(batch, batch_seed)``: applied to each (training) batch, the batch seeds drawn from a
    ``tf.data`` random stream seeded by ``seed`` that draws anew each epoch, so runs repeat.

    ``array``: uint8 images (cast per batch) or stored float32 features. What is shuffled is the
    order of the rows (:func:`batch_rows`), so the shuffle buffer holds indices, not images, and
    datasets made from the same ``rows`` share one sequence of epoch orders. Arrays up to
    ``IN_MEMORY`` bytes become one tensor; larger ones (the 40,000-image set, a frozen prefix's
    feature maps of thousands of images) are gathered batch by batch from NumPy, memory-mapped
    files included, with no copy of the whole array.
    """
    targets = None if labels is None else tf.convert_to_tensor(labels)
    if array.nbytes <= IN_MEMORY:
        source = tf.convert_to_tensor(np.asarray(array))

        def gather(rows: tf.Tensor) -> tf.Tensor:
            return tf.gather(source, rows)

    else:
        shape = (None, *array.shape[1:])

        def read(rows: np.ndarray) -> np.ndarray:
            return array[rows]

        def gather(rows: tf.Tensor) -> tf.Tensor:
            x = tf.numpy_function(read, [rows], tf.as_dtype(array.dtype), stateful=False)
            x.set_shape(shape)
            return x

    @tf.autograph.experimental.do_not_convert  # plain tensor code; AutoGraph only warns about the closures
    def take(rows: tf.Tensor) -> tf.Tensor | tuple[tf.Tensor, tf.Tensor]:
        x = tf.cast(gather(rows), tf.float32)
        return x if targets is None else (x, tf.gather(targets, rows))

    if augment is None:
        return rows.map(take, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)

    @tf.autograph.experimental.do_not_convert
    def take_augmented(rows: tf.Tensor, batch_seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        x = tf.numpy_function(augment, [gather(rows), batch_seed], tf.float32, stateful=False)
        x.set_shape((None, *array.shape[1:]))
        return x, tf.gather(targets, rows)

    seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
    return tf.data.Dataset.zip(rows, seeds).map(take_augmented, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
