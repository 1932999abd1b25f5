"""Random changes to training batches (the ``augment`` group), one NumPy function for both trainers.

Only training batches pass through :func:`augment`; validation and test images are never
changed. Each batch's changes are drawn from a seed that the trainer takes from its seeded
stream (torch: the run's shuffling generator; Keras: a seeded ``tf.data`` random stream), so a
run with the same seed sees the same augmented batches, and a switch that is off changes
nothing else: every parameter is drawn whether or not its transform is on.
"""

from __future__ import annotations

import numpy as np

from runner.config.schema import AugmentConfig


def augment(images: np.ndarray, seed: int, cfg: AugmentConfig) -> np.ndarray:
    """A float32 copy of a batch of pixels (N, H, W, C), values 0..255, changed at random as ``cfg`` switches on.

    Flips (each axis, half the images), a rotation by a multiple of 90 degrees (square
    images), contrast (the deviation from each image's mean scaled by 1 +- up to
    ``cfg.contrast``), brightness (up to +- ``cfg.brightness`` of the pixel range added), then
    clipped to 0..255: the same value range the model sees unchanged.
    """
    rng = np.random.default_rng(int(seed) % 2**64)  # tf.data's random stream gives negative seeds too
    n = len(images)
    hflip, vflip, turns = rng.random(n) < 0.5, rng.random(n) < 0.5, rng.integers(0, 4, n)
    contrast = 1.0 + rng.uniform(-cfg.contrast, cfg.contrast, n)
    brightness = 255.0 * rng.uniform(-cfg.brightness, cfg.brightness, n)
    out = images.astype(np.float32)
    if cfg.hflip:
        out[hflip] = out[hflip, :, ::-1]
    if cfg.vflip:
        out[vflip] = out[vflip, ::-1]
    if cfg.rot90:
        for k in (1, 2, 3):
            out[turns == k] = np.rot90(out[turns == k], k, axes=(1, 2))
    if cfg.contrast:
        mean = out.mean(axis=(1, 2, 3), keepdims=True)
        out = (out - mean) * contrast[:, None, None, None].astype(np.float32) + mean
    if cfg.brightness:
        out += brightness[:, None, None, None].astype(np.float32)
    return np.clip(out, 0.0, 255.0, out=out)
