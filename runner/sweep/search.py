"""The Optuna search behind ``hydra/sweeper=optuna``: ask for a trial's values, launch it as a job, tell how it ended.

Without a pruner and with one worker it is the Hydra Optuna sweeper's loop: ``n_jobs`` trials
launched together, an in-memory study. With ``sweep.pruner`` or ``sweep.workers`` > 1 the study
lives in a database (:func:`runner.sweep.study.storage_url`) that the jobs reach too: each job
reports its epochs to its own trial and stops when the pruner says so (:mod:`runner.sweep.trial`),
and ``sweep.workers`` trials run at a time, the next one launched as soon as one ends. The study
is named after the sweep's parent run, so ``resume=<parent id>`` goes on with it: trials that
ended (complete or pruned) count towards ``n_trials`` and are not run again, and the sampler
keeps learning from them.
"""

from __future__ import annotations

import logging
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from runner.config.schema import SweepConfig
from runner.sweep.report import log_study
from runner.sweep.space import search_space
from runner.sweep.study import PRUNED_ATTR, check_sweep, open_storage, oriented, storage_url, study_name
from runner.track.sweep import STORAGE_KEY, STUDY_KEY, SWEEP_PARENT_KEY, TRIAL_KEY

log = logging.getLogger(__name__)

class OptunaSearch:
    """Hydra's Sweeper interface (setup, sweep) over an Optuna study; the keys are the Hydra Optuna sweeper's."""

    def __init__(self, sampler: Any, direction: str, study_name: str | None, n_trials: int, n_jobs: int, max_failure_rate: float,
                 params: DictConfig | None) -> None:
        self.sampler, self.direction, self.base_name = sampler, str(direction), study_name
        self.n_trials, self.n_jobs, self.max_failure_rate = int(n_trials), max(int(n_jobs), 1), float(max_failure_rate)
        self.params = params
        self.job_idx = 0
        self.lock = threading.Lock()
        self.left = self.told = self.lost = 0
        self.failed: list[Exception] = []

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.launcher: Launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function
        )

    def sweep(self, arguments: list[str]) -> None:
        settings = check_sweep(self.config)
        self.space, self.fixed = search_space([*(f"{k}={v}" for k, v in (self.params or {}).items()), *arguments])
        parent = self.config.hydra.job.env_set.get(SWEEP_PARENT_KEY)
        self.study = self._open_study(settings, parent)
        try:
            if settings.workers > 1:
                self._free_running(settings.workers)
            else:
                self._batches()
        finally:
            self._log_study(parent)
        self._say_best()

    def _open_study(self, settings: SweepConfig, parent: str | None) -> Any:
        """The sweep's study: in memory as the Hydra Optuna sweeper had it, or in a database its jobs reach when they report to it."""
        import optuna

        in_database = settings.pruner != "none" or settings.workers > 1 or settings.storage
        self.url = storage_url(settings, self.config.tracking.uri, Path(self.config.hydra.sweep.dir)) if in_database else None
        name = study_name(self.base_name, parent) if self.url and parent else self.base_name
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # each trial is said by its job and the sweep's table
        study = optuna.create_study(study_name=name, storage=open_storage(self.url) if self.url else None, sampler=self.sampler,
                                    direction=self.direction, load_if_exists=True)
        if self.url:
            self._tell_jobs(name, self.url)
            _close_interrupted(study)
        ended = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED))
        self.left = max(self.n_trials - len(ended), 0)
        if ended:  # a seeded sampler would draw its first points again: new ones, with the study's history to learn from
            self.sampler.reseed_rng()
        at_a_time = settings.workers if settings.workers > 1 else self.n_jobs
        log.info("Optuna study %s%s: %d trial(s) to run%s, pruner %s, %d at a time", name, f" in {_shown(self.url)}" if self.url else "",
                 self.left, f" ({len(ended)} ended before)" if ended else "", settings.pruner, at_a_time)
        return study

    def _log_study(self, parent: str | None) -> None:
        """The study's pictures on the parent run, also after a failed trial stopped the sweep; a picture that fails is a warning."""
        if parent is None:
            return
        monitor = str(self.config.trainer.monitor)
        try:
            log_study(self.study, parent, self.config.tracking.uri, monitor, oriented(monitor, self.study.direction))
        except Exception as err:  # noqa: BLE001 - pictures are extras: the sweep's runs and table stand without them
            log.warning("the study's pictures were not logged on the parent run: %s: %s", type(err).__name__, err)

    def _tell_jobs(self, name: str, url: str) -> None:
        """Every job's config is composed again from hydra.overrides.hydra: the study's name and place reach them all through it."""
        with read_write(self.config.hydra), open_dict(self.config.hydra):
            self.config.hydra.overrides.hydra.extend(
                [f"+hydra.job.env_set.{STUDY_KEY}='{name}'", f"+hydra.job.env_set.{STORAGE_KEY}='{url}'"]
            )

    def _ask(self) -> tuple[Any, list[str], int]:
        """The next trial, its job's overrides and its job number (under the lock: workers ask side by side)."""
        trial = self.study.ask(self.space)
        overrides = [*(f"{key}={_typed(value)}" for key, value in trial.params.items()), *self.fixed]
        if self.url:  # the job reports to its trial in the study's database
            overrides.append(f"+hydra.job.env_set.{TRIAL_KEY}={trial.number}")
        number, self.job_idx, self.left = self.job_idx, self.job_idx + 1, self.left - 1
        return trial, overrides, number

    def _batches(self) -> None:
        """``n_jobs`` trials launched together, the next batch when all have ended (the Hydra Optuna sweeper's way)."""
        while self.left > 0:
            asked = [self._ask() for _ in range(min(self.left, self.n_jobs))]
            try:
                returns = self.launcher.launch([overrides for _, overrides, _ in asked], initial_job_idx=asked[0][2])
            except Exception as err:  # noqa: BLE001 - the launcher lost the jobs (a worker process killed)
                self._lost([trial for trial, _, _ in asked], err)
                continue
            for (trial, _, _), ret in zip(asked, returns, strict=True):
                self._tell(trial, ret)
            self._raise_if_too_many_failures()

    def _free_running(self, workers: int) -> None:
        """``workers`` trials at a time, each worker launching the next trial as soon as its own has ended."""

        def worker() -> None:
            while True:
                with self.lock:
                    if self.left <= 0 or self._too_many_failures():
                        return
                    trial, overrides, number = self._ask()
                try:
                    (ret,) = self.launcher.launch([overrides], initial_job_idx=number)
                except Exception as err:  # noqa: BLE001 - the launcher lost the job (a worker process killed): the others go on
                    with self.lock:
                        self._lost([trial], err)
                    continue
                with self.lock:
                    self._tell(trial, ret)

        _start_ray_once(self.launcher)
        with ThreadPoolExecutor(workers, thread_name_prefix="sweep-worker") as pool:
            for done in [pool.submit(worker) for _ in range(workers)]:
                done.result()
        self._raise_if_too_many_failures()

    def _lost(self, trials: list[Any], err: Exception) -> None:
        """Trials whose job the launcher lost (its worker process was killed: with joblib, those beside it too) are FAIL, and
        as many new trials take their place; their MLflow runs are closed KILLED by the next run or ``runner.doctor``."""
        import optuna

        self.lost += len(trials)
        if self.lost > self.n_trials:  # a launcher that loses every job: no point going on
            raise err
        for trial in trials:
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
        self.left += len(trials)
        log.warning("trial(s) %s lost with their worker process (%s); %d new trial(s) in their place",
                    ", ".join(str(t.number) for t in trials), (str(err).splitlines() or [type(err).__name__])[0], len(trials))

    def _tell(self, trial: Any, ret: JobReturn) -> None:
        """Tell Optuna how the trial's job ended: its objective, pruned (the job marked it), or failed (kept for the error it raised)."""
        import optuna

        self.told += 1
        try:
            value = float(ret.return_value)  # raises the job's own error if it failed
            if math.isnan(value):
                raise ValueError("its objective is NaN")
        except Exception as err:  # noqa: BLE001 - a failed trial is told FAIL and the sweep goes on, up to max_failure_rate
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
            self.failed.append(err)
            log.warning("trial %d failed: %s", trial.number, (str(err).splitlines() or [type(err).__name__])[0])
            return
        stored = next(t for t in self.study.get_trials(deepcopy=False) if t.number == trial.number)  # what its job wrote to it
        if PRUNED_ATTR in stored.user_attrs:
            self.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            self.study.tell(trial, value)

    def _too_many_failures(self) -> bool:
        return bool(self.failed) and len(self.failed) / max(self.told, 1) > self.max_failure_rate

    def _raise_if_too_many_failures(self) -> None:
        """Stop the sweep with the first failed trial's own error once more than max_failure_rate of the trials failed."""
        if self._too_many_failures():
            log.error("%d of %d trials failed, over hydra.sweeper.max_failure_rate=%g", len(self.failed), self.told, self.max_failure_rate)
            raise self.failed[0]

    def _say_best(self) -> None:
        import optuna

        completed = [t for t in self.study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
        if not completed:
            log.warning("no trial completed: Optuna has no best value")
            return
        best = self.study.best_trial
        pruned = sum(t.state == optuna.trial.TrialState.PRUNED for t in self.study.get_trials(deepcopy=False))
        log.info("Best parameters: %s", best.params)
        log.info("Best value: %s (trial %d; %d trial(s) pruned)", best.value, best.number, pruned)
        results = {"name": "optuna", "study": self.study.study_name, "best_params": best.params, "best_value": best.value,
                   "pruned_trials": pruned}
        OmegaConf.save(OmegaConf.create(results), Path(self.config.hydra.sweep.dir) / "optimization_results.yaml")


def _typed(value: Any) -> str:
    """A sampled value as an override Hydra reads back as the same value (strings quoted)."""
    return f"'{value}'" if isinstance(value, str) else str(value)


def _start_ray_once(launcher: Launcher) -> None:
    """Hydra's Ray launchers start Ray in each launch unless it runs, a check two workers launching at once both pass: start it
    here first, with the launcher's own settings (and its default object store size), so their launches find it running."""
    ray_cfg = getattr(launcher, "ray_cfg", None)
    if ray_cfg is None:
        return
    import ray

    if not ray.is_initialized():
        with read_write(ray_cfg), open_dict(ray_cfg):
            ray_cfg.init.setdefault("object_store_memory", 78643200)  # as the launcher sets it (ray-project/ray#11966)
        ray.init(**OmegaConf.to_container(ray_cfg.init, resolve=True))


def _close_interrupted(study: Any) -> None:
    """Trials an interrupted sweep left RUNNING (a killed sweep or worker) are FAIL: they never told their end."""
    import optuna

    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)):
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
        log.warning("trial %d of study %s was left running by an interrupted sweep: FAIL", trial.number, study.study_name)


def _shown(url: str) -> str:
    from runner.config.redact import redact

    return redact(url)
