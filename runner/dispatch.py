"""Pick the trainer of a model's framework, importing only that framework."""

from __future__ import annotations

import importlib
from types import ModuleType

TRAINERS = {"torch": "runner.torch_trainer", "keras": "runner.keras_trainer"}


def trainer_for(framework: str) -> ModuleType:
    """The trainer module for ``framework``; a linear run never imports TensorFlow and vice versa."""
    return importlib.import_module(TRAINERS[framework])
