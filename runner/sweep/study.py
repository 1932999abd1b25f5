"""What the sweeper and its trials agree on: where the study lives, its name, the pruner, and which way is better."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf

from runner.config.redact import redact
from runner.config.schema import MINIMISED, SweepConfig
from runner.errors import ConfigError
from runner.track.store import absolute_tracking_uri

if TYPE_CHECKING:
    import optuna

PRUNED_ATTR = "pruned_epoch"  # the trial's user attribute a pruned run sets: the epoch it stopped at
STUDY_FILE = "optuna.db"


SWEEPER = "hydra_plugins.crack_runner_optuna.optuna_sweeper.OptunaSweeper"  # hydra/sweeper=optuna
IN_PROCESS_LAUNCHER = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"  # jobs one at a time, in the sweep's process


def check_sweep(config: DictConfig) -> SweepConfig:
    """A multirun's sweep.* keys, checked against its sweeper and launcher before any run opens."""
    try:
        settings = SweepConfig(**OmegaConf.to_container(config.sweep, resolve=True))  # type: ignore[arg-type]
    except TypeError as err:  # a key the schema lacks: composition has refused it already in a real run
        raise ConfigError(f"sweep: {err}") from None
    optuna_sweep = str(config.hydra.sweeper.get("_target_")) == SWEEPER
    if not optuna_sweep and (settings.pruner != "none" or settings.workers > 1):
        key = f"sweep.pruner={settings.pruner}" if settings.pruner != "none" else f"sweep.workers={settings.workers}"
        raise ConfigError(f"{key} applies to Optuna searches: add hydra/sweeper=optuna and its search space "
                          "(e.g. +experiment=optuna_linear), or leave the key out.")
    if optuna_sweep:
        _check_search(config.hydra.sweeper, settings)
        _check_min_epochs(config, settings)
    if settings.workers > 1 and str(config.hydra.launcher.get("_target_")) == IN_PROCESS_LAUNCHER:
        raise ConfigError(f"sweep.workers={settings.workers} runs trials side by side, in processes: add hydra/launcher=joblib "
                          "(this machine) or hydra/launcher=ray_cluster (several), or set sweep.workers=1.")
    return settings


def _check_search(sweeper: DictConfig, settings: SweepConfig) -> None:
    """The Optuna sweeper's own keys, and a sweep.storage that must open, before the sweep's parent run is made."""
    raw = sweeper.get("n_trials")
    try:
        trials = int(str(raw))  # Hydra may hand it over as text (an env interpolation)
    except ValueError:
        trials = 0
    if isinstance(raw, bool) or trials < 1:
        raise ConfigError(f"hydra.sweeper.n_trials: must be a whole number of at least 1 (the trials of the whole search), "
                          f"got {raw!r}. Set e.g. hydra.sweeper.n_trials=16")
    if str(sweeper.get("direction")).lower() not in ("minimize", "maximize"):  # Optuna takes either case
        raise ConfigError(f"hydra.sweeper.direction: must be minimize or maximize (what the jobs' objective should do), "
                          f"got {sweeper.get('direction')!r}. Set e.g. hydra.sweeper.direction=maximize")
    if settings.storage:
        open_storage(settings.storage).engine.dispose()  # only to know it opens: the sweep opens its own


EPOCH_KEYS = ("trainer.epochs", "trainer.fine_tune_epochs", "fine_tune_lr")  # what decides a trial's last epoch


def _check_min_epochs(config: DictConfig, settings: SweepConfig) -> None:
    """A sweep.min_epochs past every trial's last epoch would prune nothing, silently: refused (unless the epochs are swept,
    whose values the sweep's own config does not hold)."""
    from runner.track.sweep import swept_keys  # (that module's callback imports this one when a sweep starts)

    if set(swept_keys(config)) & set(EPOCH_KEYS):
        return
    epochs = int(config.trainer.epochs) + (int(config.trainer.fine_tune_epochs) if config.get("fine_tune_lr") is not None else 0)
    if settings.pruner != "none" and settings.min_epochs > epochs:
        raise ConfigError(f"sweep.min_epochs={settings.min_epochs} is past the trials' last epoch ({epochs}), so sweep.pruner="
                          f"{settings.pruner} could stop none: set sweep.min_epochs to at most {epochs}, or sweep.pruner=none.")


def storage_url(sweep: SweepConfig, tracking_uri: str, sweep_dir: Path) -> str:
    """``sweep.storage``, else ``optuna.db`` beside a sqlite tracking store, else in the sweep's folder (one machine only)."""
    if sweep.storage:
        return sweep.storage
    uri = absolute_tracking_uri(tracking_uri)
    if uri.startswith("sqlite:///"):
        return f"sqlite:///{Path(uri.removeprefix('sqlite:///')).parent / STUDY_FILE}"
    return f"sqlite:///{sweep_dir.absolute() / STUDY_FILE}"


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """The study's database (a sqlite file's folder made first); one that cannot be opened is a ConfigError naming sweep.storage."""
    import optuna
    import sqlalchemy.exc

    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    try:  # sqlite: wait for a lock instead of failing at once (workers write side by side)
        return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {})
    except (sqlalchemy.exc.SQLAlchemyError, OSError, ValueError, ImportError, RuntimeError) as err:  # RuntimeError: another Optuna's schema
        raise ConfigError(f"sweep.storage: the Optuna study's database {redact(url)} cannot be opened ({type(err).__name__}: "
                          f"{str(err).splitlines()[0]}). Set sweep.storage to a database URL this machine reaches, e.g. "
                          "sqlite:///optuna.db or postgresql://user@host/db.") from None


def study_name(base: str | None, parent_run_id: str) -> str:
    """One study per sweep: its name carries the sweep's parent run, so two sweeps never share one and a resumed sweep finds its own."""
    return f"{base or 'sweep'}-{parent_run_id}"


def make_pruner(sweep: SweepConfig, max_epochs: int) -> optuna.pruners.BasePruner:
    """Optuna's pruner for ``sweep.pruner``; no trial is asked before ``sweep.min_epochs`` (runner.sweep.trial), whichever it is."""
    import optuna

    if sweep.pruner == "median":  # below the median of earlier trials at the same epoch
        return optuna.pruners.MedianPruner(n_startup_trials=sweep.startup_trials)
    if sweep.pruner == "asha":  # successive halving: a third of the trials go on at each rung (min_epochs, 3x, 9x...)
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=sweep.min_epochs, reduction_factor=3)
    if sweep.pruner == "hyperband":  # several successive-halving brackets, from eager to patient
        return optuna.pruners.HyperbandPruner(min_resource=sweep.min_epochs, max_resource=max(max_epochs, sweep.min_epochs),
                                              reduction_factor=3)
    return optuna.pruners.NopPruner()


def oriented(monitor: str, direction: optuna.study.StudyDirection) -> float:
    """The sign that makes ``monitor`` better in the study's direction (Optuna compares intermediate values that way)."""
    import optuna

    minimised = monitor in MINIMISED
    return 1.0 if minimised == (direction == optuna.study.StudyDirection.MINIMIZE) else -1.0
