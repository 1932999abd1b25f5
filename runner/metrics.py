"""Test metrics computed the same way for every framework."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score, precision_score, recall_score, roc_auc_score

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
    """Accuracy, balanced accuracy, precision, recall, F1, ROC AUC (binary: of the positive class; else macro averages), loss."""
    preds = probs.argmax(axis=1)
    all_labels = list(range(len(classes)))
    if len(classes) == 2:
        pos = positive_index(classes)
        averaging = {"average": "binary", "pos_label": pos}
        auc_input = probs[:, pos]
        auc_labels = (labels == pos).astype(int)
        auc_kwargs: dict = {}
    else:
        averaging = {"average": "macro", "labels": all_labels}
        auc_input, auc_labels = probs, labels
        auc_kwargs = {"multi_class": "ovr", "labels": all_labels}
    metrics = {
        "accuracy": accuracy_score(labels, preds),
        "balanced_accuracy": balanced_accuracy_score(labels, preds),  # the mean of the per-class recalls: chance is 1/classes whatever the imbalance
        "precision": precision_score(labels, preds, zero_division=0, **averaging),
        "recall": recall_score(labels, preds, zero_division=0, **averaging),
        "f1": f1_score(labels, preds, zero_division=0, **averaging),
        "loss": cross_entropy(labels, probs),
    }
    try:
        metrics["roc_auc"] = roc_auc_score(auc_labels, auc_input, **auc_kwargs)
    except ValueError:  # a class absent from a tiny test split: AUC undefined
        metrics["roc_auc"] = float("nan")
    return {name: float(value) for name, value in metrics.items()}


def confusion(labels: np.ndarray, probs: np.ndarray, num_classes: int) -> np.ndarray:
    return confusion_matrix(labels, probs.argmax(axis=1), labels=list(range(num_classes)))
