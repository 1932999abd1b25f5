"""Inside a trial's job: report each epoch's ``trainer.monitor`` to its Optuna trial and say when the pruner stops it."""

from __future__ import annotations

import logging
from collections.abc import Callable

from runner.config.redact import redact
from runner.config.schema import RunConfig
from runner.errors import ConfigError
from runner.sweep.study import PRUNED_ATTR, make_pruner, open_storage, oriented
from runner.track.job import JobContext

log = logging.getLogger(__name__)

Pruning = Callable[[int, float], bool]  # (epoch, monitored value) -> whether the run stops here


def trial_pruning(run: RunConfig, job: JobContext) -> Pruning | None:
    """The epoch end's report to the job's Optuna trial, and its pruning check; None outside a sweep whose study is in a database."""
    if job.trial is None and run.sweep.pruner == "none":
        return None
    if job.trial is None or not job.study or not job.study_storage:
        raise ConfigError(
            f"sweep.pruner={run.sweep.pruner} stops the trials of an Optuna sweep: run it with -m and hydra/sweeper=optuna "
            "(e.g. python -m runner -m +experiment=optuna_linear sweep.pruner=median), or set sweep.pruner=none."
        )
    if run.dataset.folds:
        raise ConfigError("sweep.pruner with dataset.folds: a cross-validated trial has one curve per fold, no single one to prune by. "
                          "Set sweep.pruner=none or dataset.folds=null.")
    import optuna

    storage = open_storage(job.study_storage)
    epochs = run.trainer.epochs + (run.trainer.fine_tune_epochs if run.fine_tune_lr is not None else 0)
    try:
        study = optuna.load_study(study_name=job.study, storage=storage, pruner=make_pruner(run.sweep, epochs))
    except KeyError:  # Optuna's "record does not exist": another machine's sqlite file, or another database
        raise ConfigError(f"the sweep's Optuna study {job.study} is not in {redact(job.study_storage)} as this machine sees it: "
                          "on several machines set sweep.storage to a database they all reach (e.g. the PostgreSQL server's).") from None
    trial_id = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(job.study), job.trial)
    trial = optuna.trial.Trial(study, trial_id)
    sign = oriented(run.trainer.monitor, study.direction)

    def prune(epoch: int, value: float) -> bool:
        trial.report(sign * value, epoch)
        if epoch < run.sweep.min_epochs or not trial.should_prune():
            return False
        storage.set_trial_user_attr(trial_id, PRUNED_ATTR, epoch)  # the sweeper tells Optuna PRUNED when the job has ended
        return True

    pruner = run.sweep.pruner
    pruned_by = f"pruned by sweep.pruner={pruner} from epoch {run.sweep.min_epochs}" if pruner != "none" else "no pruner"
    log.info("Optuna trial %d of study %s: %s reported each epoch, %s", job.trial, job.study, run.trainer.monitor, pruned_by)
    return prune
