"""Batches for Keras as a tf.data pipeline, of images or of stored frozen-layer output alike.

What is shuffled is the order of the rows (:func:`batch_rows`), not the images, and each
epoch's order is a function of the seed and the epoch's number alone (:func:`epoch_order`):
a phase that reads images and one that reads stored features see the images in the same order,
and a run resumed at epoch e sees the orders of a run never stopped, with no iterator state to keep.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable

import numpy as np
import tensorflow as tf


def epoch_order(count: int, seed: int, epoch: int) -> np.ndarray:
    """The order of the ``count`` training rows in epoch ``epoch`` (from 1) of a run seeded ``seed``.

    Drawn from (seed, epoch) alone, not from a shuffle's running state, so a resumed run
    needs only the epoch number to continue the sequence of orders.
    """
    return np.random.default_rng([seed, epoch]).permutation(count)


def batch_rows(count: int, batch_size: int, shuffle_seed: int | None = None, epochs: range = range(1, 2)) -> tf.data.Dataset:
    """The row indices of each batch; the same order for images and for their cached features.

    Unshuffled: the rows in order, once per pass. Shuffled: the batches of each epoch in
    ``epochs`` one after the other, each in its :func:`epoch_order`; fit it with
    ``steps_per_epoch=ceil(count / batch_size)`` so that Keras reads one pass over the epochs.
    """
    if shuffle_seed is None:
        return tf.data.Dataset.range(count).batch(batch_size)
    orders = np.stack([epoch_order(count, shuffle_seed, epoch) for epoch in epochs])
    return tf.data.Dataset.from_tensor_slices(orders).flat_map(lambda order: tf.data.Dataset.from_tensor_slices(order).batch(batch_size))


# Arrays up to an eighth of the machine's memory become one TensorFlow tensor, gathered in the
# graph; larger ones are read per batch through tf.numpy_function, which holds Python's lock and
# at times halved the training speed on 2 cores (measured: 79 s against 42 s an epoch).
IN_MEMORY = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 8


def release_pages(array: np.ndarray) -> None:
    """Drop a memory-mapped file's pages from this process once its rows are copied elsewhere.

    Mapped pages count in the process's resident memory while mapped: a stored entry made into
    one tensor would otherwise count twice. The file is read-only, so a later read maps them again.
    """
    mapped = getattr(array, "_mmap", None)  # np.load(..., mmap_mode="r"): the feature store's entries
    if mapped is not None and getattr(array, "mode", None) == "r":  # never a copy-on-write one: its changed pages would be lost
        mapped.madvise(mmap.MADV_DONTNEED)


def batch_seeds(count: int, batch_size: int, seed: int, epochs: range) -> tf.data.Dataset:
    """One random seed per batch of :func:`batch_rows` (same arguments), for what changes each batch (augmentation).

    Like the orders, each epoch's seeds are drawn from (seed, epoch) alone, so a resumed run
    changes its batches as a run never stopped would.
    """
    per_epoch = -(-count // batch_size)
    seeds = [np.random.default_rng([seed, epoch, 1]).integers(0, 2**31 - 1, per_epoch) for epoch in epochs]
    return tf.data.Dataset.from_tensor_slices(np.concatenate(seeds).astype(np.int64))


def batches(
    array: np.ndarray, labels: np.ndarray | None, rows: tf.data.Dataset,
    augment: Callable[[np.ndarray, np.int64], np.ndarray] | None = None, seeds: tf.data.Dataset | None = None, once: bool = False,
) -> tf.data.Dataset:
    """Float32 batches (with labels, if given) of the rows of ``array`` in the order of ``rows``, prefetched.

    ``augment(batch, batch_seed)``: applied to each (training) batch, with the seeds of ``seeds``
    (:func:`batch_seeds`, one per batch of ``rows``), so runs repeat.

    ``array``: uint8 images (cast per batch) or stored float32 features. What is shuffled is the
    order of the rows (:func:`batch_rows`), not the images, and datasets made from the same
    ``rows`` see the rows in the same order. Arrays up to
    ``IN_MEMORY`` bytes become one tensor; larger ones (the 40,000-image set, a frozen prefix's
    feature maps of thousands of images) are gathered batch by batch from NumPy, memory-mapped
    files included, with no copy of the whole array. ``once``: the rows are read once (predictions),
    so they are gathered per batch whatever the size: a whole copy would only add memory.
    """
    targets = None if labels is None else tf.convert_to_tensor(labels)
    if array.nbytes <= IN_MEMORY and not once:
        source = tf.convert_to_tensor(np.asarray(array))
        release_pages(array)

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

    assert seeds is not None, "augmented batches need their seeds (batch_seeds)"
    return tf.data.Dataset.zip(rows, seeds).map(take_augmented, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
