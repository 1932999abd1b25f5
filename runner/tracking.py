"""The one MLflow path of both trainers: params, tags, per-epoch metrics, artifacts, model.

Trainers never call mlflow directly; they log through the :class:`Tracker` that
:func:`start_run` yields, so a PyTorch and a Keras run hold the same things in the same
places and can be compared side by side in the MLflow UI.
"""

from __future__ import annotations

import logging
import platform
import subprocess
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.entities import RunStatus
from mlflow.models import infer_signature
from omegaconf import DictConfig, OmegaConf

from runner.errors import ConfigError
from runner.files import absolute_path

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]


class Tracker:
    """Logs to one active MLflow run and keeps the epoch history for plots and the summary."""

    def __init__(self, run_id: str, output_dir: Path) -> None:
        self.run_id = run_id
        self.output_dir = output_dir
        self.history: list[dict[str, Any]] = []
        self.model_uri: str | None = None

    def log_epoch(self, step: int, metrics: Mapping[str, float], phase: str = "train") -> None:
        """Per-epoch metrics at a step that keeps counting across training phases."""
        values = {k: float(v) for k, v in metrics.items()}
        mlflow.log_metrics(values, step=step)
        self.history.append({"step": step, "phase": phase, **values})
        log.info("epoch %d [%s] %s", step, phase, "  ".join(f"{k}={v:.4f}" for k, v in values.items()))

    def log_metrics(self, metrics: Mapping[str, float]) -> None:
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()})

    def log_params(self, params: Mapping[str, Any]) -> None:
        mlflow.log_params(dict(params))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        mlflow.log_artifact(str(path), artifact_path)

    def log_json(self, data: Any, name: str) -> None:
        mlflow.log_dict(data, name)

    def log_figure(self, figure: Any, name: str) -> None:
        mlflow.log_figure(figure, name)

    def log_model(
        self,
        flavor: str,
        model: Any,
        example: np.ndarray,
        predict: Callable[[np.ndarray], np.ndarray],
        requirements: list[str],
        **flavor_kwargs: Any,
    ) -> str:
        """Log ``model`` with ``mlflow.<flavor>`` and a signature inferred from a real prediction."""
        import importlib

        module = importlib.import_module(f"mlflow.{flavor}")
        signature = infer_signature(example, predict(example))
        info = module.log_model(
            model,
            name="model",
            signature=signature,
            input_example=example,
            pip_requirements=requirements,
            **flavor_kwargs,
        )
        self.model_uri = info.model_uri
        self.set_tags({"model_uri": info.model_uri})
        return info.model_uri


def flatten(cfg: DictConfig | Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{'optimizer': {'lr': 0.1}}`` -> ``{'optimizer.lr': 0.1}``, the form MLflow params take."""
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    flat: dict[str, Any] = {}
    for key, value in container.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def git_commit() -> str:
    """The project's commit, with '-dirty' when the tree has uncommitted changes."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


SWEEP_PARENT_ROLE = "sweep_parent"


def find_sweep_parent(client: mlflow.MlflowClient, experiment: str, sweep: str) -> str | None:
    """The run id of a sweep's parent run (made by runner.sweep in the launching process), if any."""
    runs = client.search_runs(
        [experiment],
        filter_string=f"tags.sweep_id = '{sweep}' AND tags.sweep_role = '{SWEEP_PARENT_ROLE}'",
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def absolute_tracking_uri(uri: str) -> str:
    """``sqlite:///mlflow.db`` made absolute, so every job of a sweep writes to the same store."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + absolute_path(uri[len(prefix) :]).as_posix()
    return uri


def experiment_id(uri: str, name: str, artifact_root: str) -> str:
    """Get or create the experiment; local stores keep its artifacts under ``artifact_root``."""
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    local = uri.startswith(("sqlite:", "file:")) or "://" not in uri
    location = absolute_path(artifact_root).as_uri() if local else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except mlflow.exceptions.MlflowException:  # created meanwhile by a parallel sweep job
        return client.get_experiment_by_name(name).experiment_id


@contextmanager
def start_run(
    cfg: DictConfig,
    run_name: str,
    output_dir: Path,
    tags: Mapping[str, Any],
    extra_params: Mapping[str, Any],
    overrides: list[str],
    sweep: str | None = None,
) -> Iterator[Tracker]:
    """Open an MLflow run holding the whole resolved config; close it FINISHED, FAILED or KILLED.

    Whatever was logged before an error stays in the run: the status tells how it ended.
    A sweep job nests under its sweep's parent run.
    """
    uri = absolute_tracking_uri(cfg.tracking.uri)
    mlflow.set_tracking_uri(uri)
    try:
        exp = experiment_id(uri, cfg.tracking.experiment, cfg.tracking.artifact_root)
    except mlflow.exceptions.MlflowException as err:
        raise ConfigError(
            f"tracking.uri={uri!r} cannot be used: {err}. Use a writable sqlite:///file.db, a folder, "
            "or a running MLflow server (http://host:port)."
        ) from None
    commit = git_commit()
    all_tags = {"git_commit": commit, "mlflow.source.git.commit": commit, "overrides": " ".join(overrides), **tags}
    if sweep is not None:
        parent = find_sweep_parent(mlflow.MlflowClient(uri), exp, sweep)
        all_tags.update({"sweep_id": sweep, **({"mlflow.parentRunId": parent} if parent else {})})
    active = mlflow.start_run(experiment_id=exp, run_name=run_name[:250], tags={k: str(v) for k, v in all_tags.items()})
    tracker = Tracker(active.info.run_id, output_dir)
    status = RunStatus.to_string(RunStatus.FAILED)
    try:
        tracker.log_params({**flatten(cfg), **extra_params, "python_version": platform.python_version()})
        tracker.log_json(OmegaConf.to_container(cfg, resolve=True), "config/config.yaml")
        tracker.log_json({"overrides": overrides}, "config/overrides.yaml")
        yield tracker
        status = RunStatus.to_string(RunStatus.FINISHED)
    except KeyboardInterrupt:
        status = RunStatus.to_string(RunStatus.KILLED)
        raise
    finally:
        mlflow.end_run(status)
        log.info("MLflow run %s ended %s", tracker.run_id, status)
