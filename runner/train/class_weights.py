"""``trainer.class_weights``: how much each class's images weigh in the training loss, the same for both trainers."""

from __future__ import annotations

import logging

import numpy as np

from crack_runner.datasets.errors import DataError
from runner.track.tracking import Tracker

log = logging.getLogger(__name__)


def class_weights(labels: np.ndarray, classes: list[str], mode: str | None, tracker: Tracker) -> np.ndarray | None:
    """None (every image weighs 1), or with ``balanced`` n / (classes x count) per class, from the training split's counts.

    Balanced weights make every class weigh the same in the loss as a whole, as scikit-learn's
    ``class_weight='balanced'`` does; the validation and test losses stay unweighted. The
    weights are logged as the param ``class_weights`` (``Negative=0.6667,Positive=2``).
    """
    if mode is None:
        return None
    num_classes = len(classes)
    counts = np.bincount(labels, minlength=num_classes)
    if (counts == 0).any():
        missing = ", ".join(str(i) for i in np.flatnonzero(counts == 0))
        raise DataError(f"trainer.class_weights=balanced: class(es) {missing} have no training images; add images or set trainer.class_weights=null.")
    weights = len(labels) / (num_classes * counts)
    log.info("class weights (balanced, from training counts %s): %s", counts.tolist(), np.round(weights, 4).tolist())
    tracker.log_params({"class_weights": ",".join(f"{name}={w:.4g}" for name, w in zip(classes, weights))})
    return weights.astype(np.float32)
