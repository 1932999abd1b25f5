"""The contract every trainer keeps: what ``runner.app`` calls, and what a fit hands back.

A trainer is a module (runner.train.torch_trainer, runner.train.keras_trainer) picked by the model's
framework (:func:`trainer_for`), so a linear run never imports TensorFlow and a Keras run
never imports torch. Each one trains in its own framework's idiom; what is the same for
both (the end of an epoch, metrics, tracking, seeding of Python and NumPy, the optimizer and
precision tables) lives in shared modules they call.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np

from crack_runner.datasets import DataSplits
from runner.config.schema import RunConfig
from runner.errors import ConfigError
from runner.report.console import INSTALL_ALL
from runner.track.tracking import Tracker
from runner.train.epochs import Epochs


class TrainedModel(Protocol):
    """What ``fit`` returns: a model that predicts, logs itself to MLflow, and the epochs that made it."""

    history: list[dict[str, Any]]

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        """Class probabilities of raw pixels (N, H, W, 3), values 0..255."""
        ...

    def log_model(self, tracker: Tracker, example: np.ndarray) -> str:
        """Log the model in MLflow's format for its framework; returns its model URI."""
        ...


class Trainer(Protocol):
    """A trainer module: its framework's versions, seeding and training."""

    CHECKPOINT: str  # the file name of its checkpoints (in the run's folder and the run's artifacts)

    def versions(self) -> dict[str, str]:
        """The framework and library versions, logged as run params."""
        ...

    def seed(self, seed: int) -> None:
        """Seed the framework's own random generators."""
        ...

    def check(self, run: RunConfig) -> None:
        """Find what would stop ``run`` before any MLflow run opens (e.g. weights that cannot be had); raise its error."""
        ...

    def fit(self, run: RunConfig, data: DataSplits, tracker: Tracker, epochs: Epochs, resume_from: Path | None = None) -> TrainedModel:
        """Train on ``data.train`` (validating on ``data.val``), closing every epoch through ``epochs``.

        ``resume_from``: a folder with the CHECKPOINT of an interrupted run to continue.
        """
        ...

    def read_checkpoint(self, path: Path) -> Any:
        """Read one of its checkpoints without running code from it (a resume reads those of its store before the run reopens).

        One that is truncated, damaged or holds more than weights is a runner.track.safe_load.UnreadableCheckpoint.
        """
        ...


TRAINERS = {"torch": "runner.train.torch_trainer", "keras": "runner.train.keras_trainer"}
# What each framework needs installed, and the pyproject extra that brings it.
FRAMEWORK_MODULES = {"torch": ({"torch"}, "torch"), "keras": ({"keras", "tensorflow"}, "keras")}


def trainer_for(framework: str) -> Trainer:
    """The trainer for ``framework`` (``model.framework``), importing only that framework.

    A framework that is not installed is a ConfigError naming the extra that brings it.
    """
    try:
        return cast(Trainer, importlib.import_module(TRAINERS[framework]))
    except ModuleNotFoundError as err:
        modules, extra = FRAMEWORK_MODULES[framework]
        if (err.name or "").split(".")[0] not in modules:
            raise
        raise ConfigError(
            f"model.framework={framework}: {err.name} is not installed. Install it with pip install -e '.[{extra}]', or {INSTALL_ALL}."
        ) from None
