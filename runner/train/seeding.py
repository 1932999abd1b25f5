"""One seed for every source of randomness in the run."""

from __future__ import annotations

import os
import random

import numpy as np

from runner.train.trainer import Trainer


def seed_everything(seed: int, trainer: Trainer) -> None:
    """Seed Python, NumPy and the trainer's framework (the only one the run imports)."""
    os.environ["PYTHONHASHSEED"] = str(seed)
    random.seed(seed)
    np.random.seed(seed)
    trainer.seed(seed)
