"""The deterministic, stratified train/val/test split shared by both frameworks."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import train_test_split

from runner.errors import DataError


@dataclass(frozen=True)
class SplitIndices:
    """Indices into the decoded image list, one array per split."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def stratified_split(labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int) -> SplitIndices:
    """Split indices so every split keeps the class proportions; the same seed gives the same split."""
    labels = np.asarray(labels)
    index = np.arange(len(labels))
    _, counts = np.unique(labels, return_counts=True)
    needed = _min_per_class(val_fraction, test_fraction)
    if counts.min() < needed:
        raise DataError(
            f"the smallest class has {counts.min()} images; a stratified split with "
            f"dataset.val_fraction={val_fraction} and dataset.test_fraction={test_fraction} needs at least "
            f"{needed} per class. Add images, raise dataset.limit, or lower the fractions."
        )
    try:
        rest, test = train_test_split(index, test_size=test_fraction, stratify=labels, random_state=seed)
        train, val = train_test_split(
            rest, test_size=val_fraction / (1.0 - test_fraction), stratify=labels[rest], random_state=seed
        )
    except ValueError as err:  # sklearn refuses splits smaller than the number of classes
        raise DataError(
            f"cannot split {len(labels)} images into train/val/test with dataset.val_fraction={val_fraction} "
            f"and dataset.test_fraction={test_fraction}: {err}. Add images or raise the fractions."
        ) from None
    return SplitIndices(np.sort(train), np.sort(val), np.sort(test))


def _min_per_class(val_fraction: float, test_fraction: float) -> int:
    """Images a class needs so that each split can hold at least one of them."""
    smallest = min(f for f in (val_fraction, test_fraction, 1.0 - val_fraction - test_fraction) if f > 0)
    return max(3, int(np.ceil(1.0 / smallest)))
