"""The learning rate of each epoch (``trainer.lr_schedule``), one function for both trainers.

A schedule runs within a phase, from that phase's base rate (``optimizer.lr``; in a Keras
fine-tune phase ``fine_tune_lr``): a new phase starts a fresh optimizer, and the low rate it
was given is the one to warm up to and decay from. The trainers only set the rate this returns
at the start of each epoch (torch: the optimizer's param groups; Keras: its ``learning_rate``
variable); :class:`runner.train.epochs.Epochs` counts the epochs and the plateau's cuts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    """``trainer.lr_schedule`` and its settings (see conf/config.yaml)."""

    kind: str = "none"  # none | cosine | step | plateau
    warmup_epochs: int = 0
    decay: float = 0.1  # step and plateau: the factor of each cut
    step_epochs: int = 3  # step: epochs between cuts
    plateau_patience: int = 2  # plateau: epochs without a gain before a cut


def epoch_lr(schedule: Schedule, base: float, epoch: int, epochs: int, cuts: int = 0) -> float:
    """The rate of ``epoch`` (1-based, within a phase of ``epochs``) from the phase's ``base`` rate.

    Warm-up: epoch e <= warmup_epochs trains at base * e / (warmup_epochs + 1), so the rate
    rises in equal steps to ``base`` at the first epoch after it; the schedule counts from there.
    cosine: half a cosine from ``base`` over the remaining epochs (its last epoch still learns);
    step: ``decay`` times less every ``step_epochs``; plateau: ``decay`` to the power of ``cuts``,
    the cuts made so far in this phase (counted by the caller from the monitored metric).
    """
    warmup = schedule.warmup_epochs
    if epoch <= warmup:
        return base * epoch / (warmup + 1)
    k, n = epoch - warmup - 1, max(1, epochs - warmup)  # k: epochs since the warm-up ended
    if schedule.kind == "cosine":
        return base * 0.5 * (1.0 + math.cos(math.pi * k / n))
    if schedule.kind == "step":
        return base * schedule.decay ** (k // schedule.step_epochs)
    if schedule.kind == "plateau":
        return base * schedule.decay**cuts
    return base
