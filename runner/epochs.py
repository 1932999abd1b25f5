"""The end of an epoch, the same for both trainers: check, checkpoint, metrics, history, artifact.

Both trainers call :meth:`Epochs.end` once per epoch and :func:`check_finite` on every
training loss, so what an epoch leaves behind (a checkpoint in the run's own folder, the
four metrics at a step that keeps counting across phases, ``history.json`` and the
checkpoint artifact) and how a diverging run stops are written once. Per-epoch behaviour
(best epoch, early stopping, schedules, resume) belongs here.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from runner.errors import TrainingError
from runner.files import atomic_path
from runner.tracking import Tracker

log = logging.getLogger(__name__)

HISTORY = "history.json"  # the epochs so far, rewritten each epoch (a resumed run redraws its curves from it)
EPOCH_METRICS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy")


def check_finite(what: str, value: float, where: str, lr_key: str) -> None:
    """Stop the run with one message when a loss is NaN or infinite: the rate named by ``lr_key`` is too high."""
    if not math.isfinite(value):
        raise TrainingError(
            f"the {what} became {value} {where}. The learning rate is probably too high: "
            f"lower {lr_key} (e.g. divide it by 10)."
        )


class Epochs:
    """The epoch history of one run and where its checkpoint goes (``checkpoint``, in the run's own folder)."""

    def __init__(self, tracker: Tracker, checkpoint: Path, history: list[dict[str, Any]] | None = None) -> None:
        self.tracker = tracker
        self.checkpoint = checkpoint
        self.history: list[dict[str, Any]] = list(history or [])

    def end(
        self, step: int, metrics: Mapping[str, float], save: Callable[[Path], None], phase: str = "train", lr_key: str = "optimizer.lr"
    ) -> None:
        """Close epoch ``step``: stop if the validation loss diverged, ``save(path)`` the checkpoint atomically, log all."""
        values = {name: float(metrics[name]) for name in EPOCH_METRICS}
        check_finite("validation loss", values["val_loss"], f"at epoch {step} ({phase})", lr_key)
        with atomic_path(self.checkpoint) as tmp:
            save(tmp)
        self.tracker.log_metrics(values, step=step)
        self.history.append({"step": step, "phase": phase, **values})
        self.tracker.log_json(self.history, HISTORY)
        self.tracker.log_artifact(self.checkpoint, "checkpoints")
        log.info("epoch %d [%s] %s", step, phase, "  ".join(f"{k}={v:.4f}" for k, v in values.items()))

    def rewind(self, step: int) -> None:
        """Forget epochs after ``step``: a resumed run repeats what its last checkpoint did not hold."""
        self.history = [h for h in self.history if h["step"] <= step]
