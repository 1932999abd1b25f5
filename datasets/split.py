"""The deterministic, stratified train/val/test split shared by both frameworks."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from crack_runner.datasets.errors import DataError


@dataclass(frozen=True)
class SplitIndices:
    """Indices into the decoded image list, one array per split."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def stratified_split(labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int) -> SplitIndices:
    """Split indices so every split keeps the class proportions; the same seed gives the same split.

    Too few images for the fractions is a DataError whose advice (more images per class, or
    larger fractions) was tried on these labels before it is given.
    """
    labels = np.asarray(labels)
    counts = np.unique(labels, return_counts=True)[1]
    needed = _min_per_class(val_fraction, test_fraction)
    if counts.min() < needed:
        raise DataError(
            f"the smallest class has {counts.min()} images; a stratified split with "
            f"dataset.val_fraction={val_fraction} and dataset.test_fraction={test_fraction} needs at least "
            f"{needed} per class. {_advice(counts, val_fraction, test_fraction, seed)}"
        )
    try:
        return _split(labels, val_fraction, test_fraction, seed)
    except ValueError as err:  # a split smaller than the number of classes
        raise DataError(
            f"cannot split {len(labels)} images into train/val/test with dataset.val_fraction={val_fraction} "
            f"and dataset.test_fraction={test_fraction}: {err}. {_advice(counts, val_fraction, test_fraction, seed)}"
        ) from None


def stratified_folds(labels: np.ndarray, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, val) indices of each of ``folds`` folds: the val parts are disjoint, cover every index and keep the class proportions."""
    labels = np.asarray(labels)
    smallest = int(np.unique(labels, return_counts=True)[1].min())
    if smallest < folds:
        raise DataError(
            f"dataset.folds={folds}: the smallest class of train+val has {smallest} images, fewer than the folds; "
            f"set dataset.folds to at most {smallest} (and at least 2), or add images."
        )
    from sklearn.model_selection import StratifiedKFold  # here: predict, inspect and export import the package, never split

    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return [(np.sort(train), np.sort(val)) for train, val in splitter.split(np.zeros(len(labels)), labels)]


def _split(labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int) -> SplitIndices:
    """Test first, then val from the rest (scikit-learn's stratified draw); a ValueError when a split cannot hold every class."""
    index = np.arange(len(labels))
    from sklearn.model_selection import train_test_split  # here: a second's import that predict, inspect and export skip

    rest, test = train_test_split(index, test_size=test_fraction, stratify=labels, random_state=seed)
    train, val = train_test_split(rest, test_size=val_fraction / (1.0 - test_fraction), stratify=labels[rest], random_state=seed)
    return SplitIndices(np.sort(train), np.sort(val), np.sort(test))


def _min_per_class(val_fraction: float, test_fraction: float) -> int:
    """Images a class needs so that each split can hold at least one of them (ceil(1 / smallest fraction))."""
    smallest = min(f for f in (val_fraction, test_fraction, 1.0 - val_fraction - test_fraction) if f > 0)
    return max(3, int(np.ceil(1.0 / smallest)))


def _splits(counts: np.ndarray, val_fraction: float, test_fraction: float, seed: int) -> bool:
    """Whether classes of these sizes split with these fractions (success depends on the counts alone)."""
    if val_fraction + test_fraction >= 1.0 or counts.min() < _min_per_class(val_fraction, test_fraction):
        return False
    try:
        _split(np.repeat(np.arange(len(counts)), counts), val_fraction, test_fraction, seed)
    except ValueError:
        return False
    return True


def _advice(counts: np.ndarray, val_fraction: float, test_fraction: float, seed: int) -> str:
    """What does split: the images per class these fractions need, and fractions these images allow.

    Lower fractions need more images per class, not fewer, so the fractions offered are
    raised to at least 1/(smallest class), rounded up; each suggestion is tried first.
    """
    per_class = next(n for n in itertools.count(_min_per_class(val_fraction, test_fraction))
                     if _splits(np.maximum(counts, n), val_fraction, test_fraction, seed))
    add = f"Add images until every class has at least {per_class} (and dataset.limit, if set, at least that)"
    smallest = int(counts.min())
    for share in (math.ceil(100 / smallest) / 100, math.ceil(1000 / smallest) / 1000, 1 / smallest):
        for val, test in ((max(val_fraction, share), max(test_fraction, share)), (share, share)):
            if _splits(counts, val, test, seed):
                return f"{add}, or keep these images and set dataset.val_fraction={val} dataset.test_fraction={test}."
    return f"{add}: with {smallest} images in a class no fractions give train, val and test one each."
