"""Test metrics computed the same way for every framework.

Written in NumPy with scikit-learn's definitions (tests/test_metrics.py checks them against
it, ties included): importing scikit-learn's metrics takes about a second, a tenth of a
default run, for arithmetic this short.
"""

from __future__ import annotations

import numpy as np

POSITIVE_CLASS = "Positive"


def positive_index(classes: list[str]) -> int:
    """The class counted as positive in binary metrics: 'Positive' if present, else the second class."""
    return classes.index(POSITIVE_CLASS) if POSITIVE_CLASS in classes else 1


def cross_entropy(labels: np.ndarray, probs: np.ndarray) -> float:
    """The mean cross-entropy (natural log), as the trainers' val_loss is, so test_loss compares with it.

    Probabilities are clipped only at the smallest normal number of their own dtype (float64:
    a wrong answer costs up to 708; float32: 87), not at a fixed 1e-7 that caps every confident
    mistake at 16 and makes very different runs score alike.
    """
    tiny = np.finfo(probs.dtype if np.issubdtype(probs.dtype, np.floating) else np.float64).tiny
    true = np.asarray(probs, dtype=np.float64)[np.arange(len(labels)), labels]
    return float(-np.log(np.maximum(true, tiny)).mean())


def classification_metrics(labels: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict[str, float]:
    """Accuracy, balanced accuracy, precision, recall, F1, ROC AUC (binary: of the positive class; else macro averages), loss.

    A precision or recall with nothing to divide by is 0; ROC AUC is NaN when the test split lacks a class.
    """
    preds = probs.argmax(axis=1)
    matrix = confusion_matrix(labels, preds, len(classes))
    true_pos = np.diag(matrix).astype(float)
    predicted, actual = matrix.sum(axis=0), matrix.sum(axis=1)
    precision = np.divide(true_pos, predicted, out=np.zeros_like(true_pos), where=predicted > 0)
    recall = np.divide(true_pos, actual, out=np.zeros_like(true_pos), where=actual > 0)
    f1 = np.divide(2 * true_pos, predicted + actual, out=np.zeros_like(true_pos), where=predicted + actual > 0)
    if len(classes) == 2:
        pos = positive_index(classes)
        chosen = slice(pos, pos + 1)
        auc = roc_auc(labels == pos, probs[:, pos])
    else:
        chosen = slice(None)  # macro: every class counts alike, absent ones included
        auc = float(np.mean([roc_auc(labels == i, probs[:, i]) for i in range(len(classes))]))
    return {
        "accuracy": float(np.mean(preds == labels)),
        "balanced_accuracy": float(np.mean(recall[actual > 0])),  # the mean recall of the classes present: chance is 1/classes whatever the imbalance
        "precision": float(np.mean(precision[chosen])),
        "recall": float(np.mean(recall[chosen])),
        "f1": float(np.mean(f1[chosen])),
        "loss": cross_entropy(labels, probs),
        "roc_auc": auc,
    }


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts of (true class, predicted class): rows true, columns predicted."""
    index = np.asarray(labels, dtype=np.int64) * num_classes + np.asarray(preds, dtype=np.int64)
    return np.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def confusion(labels: np.ndarray, probs: np.ndarray, num_classes: int) -> np.ndarray:
    return confusion_matrix(labels, probs.argmax(axis=1), num_classes)


def _counts_by_threshold(truth: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False and true positives when every score at or above each distinct score (highest first) is called positive."""
    order = np.argsort(-score, kind="mergesort")
    score, truth = score[order], np.asarray(truth, dtype=float)[order]
    last = np.r_[np.flatnonzero(np.diff(score)), len(score) - 1]  # the last image of each run of equal scores
    true_pos = np.cumsum(truth)[last]
    return 1 + last - true_pos, true_pos, score[last]


def roc_curve(truth: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False and true positive rates and thresholds, from (0, 0); points on a straight segment dropped."""
    fps, tps, thresholds = _counts_by_threshold(truth, score)
    if len(fps) > 2:
        corners = np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True]
        fps, tps, thresholds = fps[corners], tps[corners], thresholds[corners]
    fps, tps, thresholds = np.r_[0, fps], np.r_[0, tps], np.r_[np.inf, thresholds]
    return fps / fps[-1], tps / tps[-1], thresholds


def roc_auc(truth: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve; NaN when ``truth`` is all one kind (no curve to draw)."""
    if truth.all() or not truth.any():
        return float("nan")
    fpr, tpr, _ = roc_curve(truth, score)
    return area_under(fpr, tpr)


def area_under(x: np.ndarray, y: np.ndarray) -> float:
    """The area under the curve through the points (x, y), x ascending: the sum of its trapezoids (ROC AUC of a ROC curve)."""
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1])) / 2)


def precision_recall_curve(truth: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision and recall by threshold (lowest threshold first), ending at recall 0 and precision 1."""
    fps, tps, thresholds = _counts_by_threshold(truth, score)
    called = tps + fps
    precision = np.divide(tps, called, out=np.zeros_like(tps), where=called != 0)
    recall = tps / tps[-1] if tps[-1] else np.ones_like(tps)
    return np.r_[precision[::-1], 1.0], np.r_[recall[::-1], 0.0], thresholds[::-1]


def average_precision(precision: np.ndarray, recall: np.ndarray) -> float:
    """Of a :func:`precision_recall_curve`: the precision at each threshold weighted by the recall it adds (no interpolation)."""
    return float(-np.sum(np.diff(recall) * precision[:-1]))


DEGENERATE_TAG = "degenerate"  # one_class: the model predicts one class for every test image


def degenerate(probs: np.ndarray, classes: list[str]) -> str | None:
    """What is wrong with a model that predicts one class for every test image, with the likely causes; None if it does not."""
    predicted = np.unique(probs.argmax(axis=1))
    if len(classes) < 2 or len(predicted) != 1:
        return None
    return (
        f"the model predicts {classes[int(predicted[0])]!r} for all {len(probs)} test images: it has learnt nothing that tells "
        "the classes apart, and its precision, recall and F1 say so. Likely causes: too few epochs or images for a model "
        "trained from random weights (model.weights=null), a learning rate too high or too low (optimizer.lr), or one class "
        "dominating training (trainer.class_weights=balanced). The run is tagged degenerate=one_class."
    )
