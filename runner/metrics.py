"""Test metrics computed the same way for every framework."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, log_loss, precision_score, recall_score, roc_auc_score

POSITIVE_CLASS = "Positive"


def positive_index(classes: list[str]) -> int:
    """The class counted as positive in binary metrics: 'Positive' if present, else the second class."""
    return classes.index(POSITIVE_CLASS) if POSITIVE_CLASS in classes else 1


def classification_metrics(labels: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 and ROC AUC (binary: of the positive class; else macro averages)."""
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
        "precision": precision_score(labels, preds, zero_division=0, **averaging),
        "recall": recall_score(labels, preds, zero_division=0, **averaging),
        "f1": f1_score(labels, preds, zero_division=0, **averaging),
        "loss": log_loss(labels, np.clip(probs, 1e-7, 1.0), labels=all_labels),
    }
    try:
        metrics["roc_auc"] = roc_auc_score(auc_labels, auc_input, **auc_kwargs)
    except ValueError:  # a class absent from a tiny test split: AUC undefined
        metrics["roc_auc"] = float("nan")
    return {name: float(value) for name, value in metrics.items()}


def confusion(labels: np.ndarray, probs: np.ndarray, num_classes: int) -> np.ndarray:
    return confusion_matrix(labels, probs.argmax(axis=1), labels=list(range(num_classes)))
