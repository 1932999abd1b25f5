"""The end of an epoch, the same for both trainers: check, checkpoint, metrics, history, artifact.

Both trainers call :meth:`Epochs.begin` before each epoch (the rate to train it at),
:meth:`Epochs.end` after it, :meth:`Epochs.check_finite` on every training loss and
:meth:`Epochs.finish` after the last epoch, so what an epoch leaves behind (a checkpoint in
the run's own folder, the metrics at a step that keeps counting across phases,
``history.json`` and the checkpoint artifacts) and how a diverging run stops are written once.
What the :class:`EpochPolicy` decides (the best epoch by ``trainer.monitor`` and its
checkpoint, early stopping, the rate schedule) is a function of the history alone
(:class:`Standing`), so a resumed run decides as the uninterrupted one would have.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner.config.schema import TrainerConfig
from runner.errors import TrainingError
from runner.track.files import atomic_path
from runner.track.tracking import SELECTED, Tracker
from runner.train.schedules import Schedule, epoch_lr

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"  # the folder of the checkpoints among the run's artifacts
HISTORY = "history.json"  # the epochs so far, rewritten each epoch (a resumed run redraws its curves from it)
EPOCH_METRICS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy")
DIVERGED_FACTOR = 10.0  # a validation loss this many times its lowest so far is reported as divergence


def link_or_copy(source: Path, target: Path) -> None:
    """``target`` as a hard link to ``source`` (no second copy on disk), or a copy where links are not possible.

    Safe for checkpoints: each is replaced by a rename (a new file), never rewritten in place,
    so the link keeps the content it was made with.
    """
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def check_finite(what: str, value: float, where: str, lr_key: str) -> None:
    """Stop the run with one message when a loss is NaN or infinite: the rate named by ``lr_key`` is too high."""
    if not math.isfinite(value):
        raise TrainingError(
            f"the {what} became {value} {where}. The learning rate is probably too high: "
            f"lower {lr_key} (e.g. divide it by 10)."
        )


@dataclass(frozen=True)
class EpochPolicy:
    """The trainer.* keys that decide per epoch: which epoch is best and kept, when to stop, at which rate to train."""

    monitor: str = "val_loss"  # val_loss is minimised, val_accuracy maximised
    select: str = "best"  # or last
    patience: int | None = None  # early stopping: epochs of a phase without a gain; None: off
    min_delta: float = 0.0  # a gain smaller than this is no gain
    schedule: Schedule = field(default_factory=Schedule)

    @classmethod
    def of(cls, trainer: TrainerConfig) -> EpochPolicy:
        schedule = Schedule(trainer.lr_schedule, trainer.warmup_epochs, trainer.lr_decay, trainer.lr_step_epochs, trainer.lr_plateau_patience)
        return cls(trainer.monitor, trainer.select, trainer.early_stopping_patience, trainer.min_delta, schedule)

    def better(self, value: float, best: float | None) -> bool:
        """Whether ``value`` of the monitored metric beats ``best`` by more than min_delta."""
        if best is None:
            return True
        return value < best - self.min_delta if self.monitor == "val_loss" else value > best + self.min_delta


@dataclass
class Standing:
    """Where a run stands after its epochs so far: its best epoch, and the counts early stopping and plateau cuts need.

    Counts of epochs without a gain are per phase: a new phase (a fresh optimizer at a new rate)
    starts them anew, while the best epoch is the run's, in whichever phase it was.
    """

    best_step: int | None = None
    best: float | None = None
    lowest_loss: float = math.inf
    phase: str | None = None
    phase_epochs: int = 0  # epochs done in the current phase
    since_best: int = 0  # epochs of the current phase since the run's best
    cuts: int = 0  # plateau: rate cuts in the current phase
    since_cut: int = 0

    def add(self, entry: Mapping[str, Any], policy: EpochPolicy) -> bool:
        """Take one epoch of the history into account; returns whether it is the new best."""
        if entry["phase"] != self.phase:
            self.phase, self.phase_epochs, self.since_best, self.cuts, self.since_cut = entry["phase"], 0, 0, 0, 0
        self.phase_epochs += 1
        self.lowest_loss = min(self.lowest_loss, entry["val_loss"])
        improved = policy.better(entry[policy.monitor], self.best)
        if improved:
            self.best_step, self.best, self.since_best, self.since_cut = entry["step"], entry[policy.monitor], 0, 0
            return True
        self.since_best += 1
        self.since_cut += 1
        if self.since_cut >= policy.schedule.plateau_patience:
            self.cuts, self.since_cut = self.cuts + 1, 0
        return False


def replay(history: list[dict[str, Any]], policy: EpochPolicy) -> Standing:
    """The standing after ``history``, epoch by epoch as the run decided it."""
    standing = Standing()
    for entry in history:
        standing.add(entry, policy)
    return standing


class Epochs:
    """The epoch history of one run and where its checkpoints go (``checkpoint``, in the run's own folder).

    The last epoch's checkpoint is ``checkpoint`` (last.pt / last.keras); the best epoch's
    (by ``policy.monitor``) is kept beside it as best.pt / best.keras. Unless ``keep``
    (trainer.keep_checkpoints), both are deleted, from the folder and the run's artifacts, once
    the run is recorded FINISHED: they hold the optimizer's state, which only a resume needs
    (a KILLED or FAILED run keeps them), and the logged model holds the weights the run reports.
    """

    def __init__(
        self, tracker: Tracker, checkpoint: Path, history: list[dict[str, Any]] | None = None, policy: EpochPolicy | None = None,
        keep: bool = True, pruning: Callable[[int, float], bool] | None = None,
    ) -> None:
        self.tracker = tracker
        self.checkpoint = checkpoint
        self.best_checkpoint = checkpoint.with_name(f"best{checkpoint.suffix}")
        self.history: list[dict[str, Any]] = list(history or [])
        self.policy = policy or EpochPolicy()
        self.standing = replay(self.history, self.policy)
        self.rate: float | None = None  # the rate of the epoch under way, set by begin()
        self.diverged = False
        self.selected: int | None = None  # the epoch whose weights the model holds after finish()
        self.pruning = pruning  # a sweep's pruner, asked after each epoch with policy.monitor (runner.sweep.trial)
        self.pruned: int | None = None  # the epoch the pruner stopped the run at
        if not keep:
            tracker.when_finished.append(self.drop_checkpoints)

    def drop_checkpoints(self) -> None:
        """Delete the checkpoints of a FINISHED run (see the class); a file that will not go is said, the run stays FINISHED."""
        try:
            for path in (self.checkpoint, self.best_checkpoint):
                path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # not empty: something else lives there
                self.checkpoint.parent.rmdir()
        except OSError as err:
            log.warning("the checkpoints in %s could not be deleted (%s); set trainer.keep_checkpoints=true to keep them", self.checkpoint.parent, err)
        self.tracker.delete_artifacts(CHECKPOINTS)
        log.info("checkpoints deleted now that the run is FINISHED (only a resume needs them; trainer.keep_checkpoints=true keeps them)")

    def begin(self, phase: str, base_lr: float, phase_epochs: int) -> float:
        """The rate to train the next epoch of ``phase`` at (trainer.lr_schedule from ``base_lr``), logged as ``lr`` by end()."""
        same = self.standing.phase == phase
        epoch = self.standing.phase_epochs + 1 if same else 1
        self.rate = epoch_lr(self.policy.schedule, base_lr, epoch, phase_epochs, self.standing.cuts if same else 0)
        return self.rate

    def check_finite(self, what: str, value: float, where: str, lr_key: str) -> None:
        """:func:`check_finite`, tagging the run ``diverged`` before it stops."""
        try:
            check_finite(what, value, where, lr_key)
        except TrainingError:
            self.tracker.set_tags({"diverged": f"the {what} became {value} {where}"})
            raise

    def end(
        self, step: int, metrics: Mapping[str, float], save: Callable[[Path], None], phase: str = "train", lr_key: str = "optimizer.lr"
    ) -> bool:
        """Close epoch ``step``: stop if the validation loss diverged, ``save(path)`` the checkpoint atomically, log all.

        The best epoch so far is copied to the best checkpoint. Returns whether early stopping
        ends the phase here (trainer.early_stopping_patience epochs of it without a gain).
        """
        values = {name: float(metrics[name]) for name in EPOCH_METRICS}
        self.check_finite("validation loss", values["val_loss"], f"at epoch {step} ({phase})", lr_key)
        with atomic_path(self.checkpoint) as tmp:
            save(tmp)
        lowest = self.standing.lowest_loss
        entry = {"step": step, "phase": phase, **values, **({"lr": self.rate} if self.rate is not None else {})}
        improved = self.standing.add(entry, self.policy)
        if improved:
            with atomic_path(self.best_checkpoint) as tmp:
                link_or_copy(self.checkpoint, tmp)
        self.tracker.log_metrics({k: v for k, v in entry.items() if k not in ("step", "phase")}, step=step)
        self.history.append(entry)
        self.tracker.log_json(self.history, HISTORY)
        self.tracker.log_artifact(self.checkpoint, CHECKPOINTS)
        if improved:  # after last: a resumed run whose best artifact lags finds its best in last (see rewind)
            self.tracker.log_artifact(self.best_checkpoint, CHECKPOINTS)
        shown = [f"{k}={v:.4f}" for k, v in values.items()] + ([f"lr={self.rate:.4g}"] if self.rate is not None else [])
        log.info("epoch %d [%s] %s%s", step, phase, "  ".join(shown), f"  (best {self.policy.monitor})" if improved else "")
        self._check_divergence(step, values["val_loss"], lowest, lr_key)
        return self._prune(step, values[self.policy.monitor]) or self._stop(step)

    def _check_divergence(self, step: int, loss: float, lowest: float, lr_key: str) -> None:
        """Say once, in the log and the ``diverged`` tag, that the validation loss exploded (the best epoch is still kept)."""
        if self.diverged or not loss > DIVERGED_FACTOR * lowest:
            return
        self.diverged = True
        said = f"val_loss {loss:.4g} at epoch {step} is over {DIVERGED_FACTOR:g}x its lowest ({lowest:.4g})"
        self.tracker.set_tags({"diverged": said})
        log.warning("training diverged: %s; the rate is probably too high: lower %s", said, lr_key)

    @property
    def stopped(self) -> bool:
        """Whether early stopping ends the current phase after the epochs so far (trainer.early_stopping_patience of them without a gain)."""
        return self.policy.patience is not None and self.standing.since_best >= self.policy.patience

    def _prune(self, step: int, value: float) -> bool:
        """Whether the sweep's pruner ends the run at ``step`` (every phase): tagged ``pruned``, with ``pruned_epoch``; it ends FINISHED."""
        if self.pruning is None or not self.pruning(step, value):
            return False
        self.pruned = step
        self.tracker.set_tags({"pruned": "true"})
        self.tracker.log_metrics({"pruned_epoch": step}, step=step)
        log.info("pruned at epoch %d: its %s (%.4g) trails the sweep's other trials (sweep.pruner); the best epoch so far is kept and tested",
                 step, self.policy.monitor, value)
        return True

    def _stop(self, step: int) -> bool:
        if not self.stopped:
            return False
        self.tracker.log_metrics({"stopped_epoch": step}, step=step)
        log.info("early stopping at epoch %d: %d epoch(s) of this phase without a gain of %s over %.4g (epoch %d)",
                 step, self.standing.since_best, self.policy.monitor, self.standing.best, self.standing.best_step)
        return True

    def finish(self, restore: Callable[[Path], None]) -> int:
        """After the last epoch: log ``best_epoch``; with trainer.select=best, ``restore(path)`` its checkpoint into the model.

        Returns the epoch whose weights the model now holds (test metrics, plots and the logged model are its).
        """
        best, last = self.standing.best_step, self.history[-1]["step"]
        self.selected = best if self.policy.select == "best" else last
        if self.selected != last and not self.best_checkpoint.exists():  # resumed from a run that kept no best checkpoint
            log.warning("no checkpoint of epoch %d (the best) to load: the model is the last epoch's", best)
            self.selected = last
        kept = next(h for h in self.history if h["step"] == self.selected)
        # val_* hold the last epoch's values (MLflow keeps the latest step); selected_val_* the kept model's, which sweeps and compare rank
        self.tracker.log_metrics({"best_epoch": best, **{f"{SELECTED}{k}": kept[k] for k in ("val_loss", "val_accuracy")}})
        if self.selected != last:
            restore(self.best_checkpoint)
        self.tracker.set_tags({"selected_epoch": self.selected})
        log.info("the model is epoch %d's (trainer.select=%s; best %s at epoch %d)", self.selected, self.policy.select, self.policy.monitor, best)
        return self.selected

    def left(self, phase: str, planned: int) -> int:
        """Epochs of ``phase`` (``planned`` in all) still to train after the history so far.

        All of them when the phase has not begun; none when it has ended: a later phase began,
        or early stopping ended it at its last epoch, as a run never interrupted would have; none
        in any phase once the sweep's pruner stopped the run.
        """
        if self.pruned is not None:
            return 0
        if all(h["phase"] != phase for h in self.history):
            return planned
        if self.standing.phase != phase or self.stopped:
            return 0
        return max(planned - self.standing.phase_epochs, 0)

    def rewind(self, step: int, resumed: Path | None = None) -> None:
        """Forget epochs after ``step``: a resumed run repeats what its last checkpoint did not hold.

        ``resumed``: the folder of the interrupted run's checkpoints, whose best checkpoint this
        run keeps (the last one when the best is epoch ``step`` itself, logged just before it stopped).
        """
        self.history = [h for h in self.history if h["step"] <= step]
        self.standing = replay(self.history, self.policy)
        if resumed is None or self.standing.best_step is None:
            return
        source = resumed / (self.checkpoint.name if self.standing.best_step == step else self.best_checkpoint.name)
        if not source.exists():  # an interrupted run of a version that kept no best checkpoint
            return
        with atomic_path(self.best_checkpoint) as tmp:
            link_or_copy(source, tmp)
