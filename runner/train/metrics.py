"""Test metrics computed the same way for every framework: scikit-learn's.

One library's definitions, the ones the field reports (ties, averages, nothing to divide by),
rather than a copy of them that has to be kept in step. scikit-learn is imported by every run
anyway (datasets/split.py), so importing its metrics here costs nothing.

Two things stay our own: the loss, which is the trainers' val_loss (scikit-learn's log_loss
clips probabilities at the dtype's epsilon, 1.2e-7 in float32, capping a confident mistake at
16), and average precision from a curve already drawn (scikit-learn's formula; its function
takes the scores and would draw the curve again).
"""

from __future__ import annotations

import numpy as np
from sklearn import metrics as sk

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
    if len(classes) == 2:
        pos = positive_index(classes)
        average: dict = {"average": "binary", "pos_label": pos}
        auc = roc_auc(labels == pos, probs[:, pos])
    else:  # macro: every class counts alike, absent ones included
        average = {"average": "macro", "labels": list(range(len(classes)))}
        auc = float(np.mean([roc_auc(labels == i, probs[:, i]) for i in range(len(classes))]))
    precision, recall, f1, _ = sk.precision_recall_fscore_support(labels, preds, zero_division=0, **average)
    # balanced_accuracy_score's definition, the mean recall of the classes present (chance is 1/classes whatever the
    # imbalance), without its warnings when a predicted class is absent or a single class is all there is
    balanced = sk.recall_score(labels, preds, labels=np.unique(labels), average="macro", zero_division=0)
    return {
        "accuracy": float(sk.accuracy_score(labels, preds)),
        "balanced_accuracy": float(balanced),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "loss": cross_entropy(labels, probs),
        "roc_auc": auc,
    }


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts of (true class, predicted class): rows true, columns predicted."""
    return sk.confusion_matrix(labels, preds, labels=np.arange(num_classes))


def confusion(labels: np.ndarray, probs: np.ndarray, num_classes: int) -> np.ndarray:
    """The confusion matrix of the most probable class."""
    return confusion_matrix(labels, probs.argmax(axis=1), num_classes)


def roc_curve(truth: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False and true positive rates and thresholds, from (0, 0); points on a straight segment dropped."""
    return sk.roc_curve(truth, score)


def roc_auc(truth: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve; NaN when ``truth`` is all one kind (no curve to draw)."""
    if truth.all() or not truth.any():
        return float("nan")  # what scikit-learn returns too, without its warning
    return float(sk.roc_auc_score(truth, score))


def area_under(x: np.ndarray, y: np.ndarray) -> float:
    """The area under the curve through the points (x, y), x ascending: the sum of its trapezoids (ROC AUC of a ROC curve)."""
    return float(sk.auc(x, y))


def precision_recall_curve(truth: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision and recall by threshold (lowest threshold first), ending at recall 0 and precision 1."""
    return sk.precision_recall_curve(truth, score)


def average_precision(precision: np.ndarray, recall: np.ndarray) -> float:
    """Of a :func:`precision_recall_curve`: the precision at each threshold weighted by the recall it adds (no interpolation).

    scikit-learn's average_precision_score, from the curve rather than the scores.
    """
    return float(max(0.0, -np.sum(np.diff(recall) * precision[:-1])))


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
