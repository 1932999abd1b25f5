"""Evaluation after training, the same for every framework: test metrics, pictures, JSON."""

from __future__ import annotations

import logging

import numpy as np

from crack_runner.datasets import DataSplits
from runner.report import plots
from runner.report.explain import explanation_figures
from runner.track.tracking import Tracker
from runner.train.metrics import DEGENERATE_TAG, classification_metrics, confusion, degenerate
from runner.train.trainer import TrainedModel

log = logging.getLogger(__name__)

CURVES = "curves.json"  # the points of the ROC, precision-recall and reliability plots (runner.compare --curves)


def evaluate_and_log(model: TrainedModel, data: DataSplits, tracker: Tracker, selected: int | None = None,
                     pictures: bool = True) -> dict[str, float]:
    """Score the held-out test split and log metrics (``test_*``), plots, metrics.json and test_predictions.json.

    ``selected``: the epoch whose weights the model holds (trainer.select), whose train and
    val metrics are returned and written beside the test metrics; None: the last epoch.
    ``pictures``: draw the plots (tracking.pictures); the numbers behind them (curves.json) are logged either way.
    """
    probs = model.predict_proba(data.test.images)
    labels = data.test.labels
    test = {f"test_{k}": v for k, v in classification_metrics(labels, probs, data.classes).items()}
    tracker.log_metrics(test)
    if (note := degenerate(probs, data.classes)) is not None:
        tracker.set_tags({DEGENERATE_TAG: "one_class"})
        tracker.notes.append(note)
        log.warning("%s", note)
    files = [path.relative_to(data.root).as_posix() for path in data.test.paths]
    curves = plots.test_curves(labels, probs, data.classes)
    tracker.log_json(curves, CURVES)
    if pictures:
        log_pictures(model, data, tracker, selected, curves, files, probs)
    kept = next((h for h in model.history if h["step"] == selected), model.history[-1]) if model.history else {}
    final_epoch = {k: v for k, v in kept.items() if k not in ("step", "phase", "lr")}
    tracker.log_json({**final_epoch, **test, "classes": data.classes}, "metrics.json")
    tracker.log_json(prediction_records(files, labels, probs, data.classes), "test_predictions.json")
    return {**final_epoch, **test}


def log_pictures(model: TrainedModel, data: DataSplits, tracker: Tracker, selected: int | None, curves: dict, files: list[str],
                 probs: np.ndarray) -> None:
    """The run's plots/*.png (docs/logging.md), each drawn, logged and closed in turn."""
    labels = data.test.labels
    for name, fig in (
        ("plots/learning_curves.png", plots.learning_curves(model.history, selected)),
        ("plots/confusion_matrix.png", plots.confusion_matrix_figure(confusion(labels, probs, len(data.classes)), data.classes)),
        ("plots/roc_curve.png", plots.roc_figure(curves)),
        ("plots/pr_curve.png", plots.pr_figure(curves)),
        ("plots/calibration.png", plots.calibration_figure(curves)),
        ("plots/misclassified.png", plots.misclassified_grid(data.test.images, labels, probs, data.classes, files)),
        *explanation_figures(model, data, probs, files),
    ):
        tracker.log_figure(fig, name)
        plots.close(fig)


def prediction_records(files: list[str], labels: np.ndarray, probs: np.ndarray, classes: list[str]) -> list[dict]:
    """One record per test image (file under the data root, true and predicted class, its probability).

    Which images a run gets wrong, and the reference that ``runner.predict`` is checked against.
    """
    preds = probs.argmax(axis=1)
    return [
        {"file": file, "true": classes[label], "predicted": classes[pred], "probability": float(p[pred])}
        for file, label, pred, p in zip(files, labels, preds, probs)
    ]
