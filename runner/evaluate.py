"""Evaluation after training, the same for every framework: test metrics, pictures, JSON."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from datasets import DataSplits
from runner import plots
from runner.metrics import classification_metrics, confusion
from runner.tracking import Tracker


class TrainedModel(Protocol):
    """What a trainer's ``fit`` returns."""

    def predict_proba(self, images: np.ndarray) -> np.ndarray: ...

    def log_model(self, tracker: Tracker, example: np.ndarray) -> str: ...


def evaluate_and_log(model: TrainedModel, data: DataSplits, tracker: Tracker) -> dict[str, float]:
    """Score the held-out test split and log metrics (``test_*``), plots and metrics.json."""
    probs = model.predict_proba(data.test.images)
    test = {f"test_{k}": v for k, v in classification_metrics(data.test.labels, probs, data.classes).items()}
    tracker.log_metrics(test)
    for name, fig in (
        ("plots/learning_curves.png", plots.learning_curves(tracker.history)),
        ("plots/confusion_matrix.png", plots.confusion_matrix_figure(confusion(data.test.labels, probs, len(data.classes)), data.classes)),
    ):
        tracker.log_figure(fig, name)
        plots.close(fig)
    final_epoch = {k: v for k, v in tracker.history[-1].items() if k not in ("step", "phase")} if tracker.history else {}
    tracker.log_json({**final_epoch, **test, "classes": data.classes}, "metrics.json")
    return {**final_epoch, **test}
