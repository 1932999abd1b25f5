"""Sweeps as first-class MLflow objects: one parent run per multirun, the jobs nested under it.

Hydra calls :class:`MlflowSweepCallback` in the launching process before the first job and
after the last. It creates a parent run tagged with the sweep id (Hydra's sweep folder,
which every job of the sweep sees too, whatever launcher runs it: basic, joblib or Ray),
and each job's run finds that parent by the tag and nests under it
(``mlflow.parentRunId``), so the UI shows the sweep as one expandable row.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import mlflow
from hydra.experimental.callback import Callback
from mlflow.entities import RunStatus
from omegaconf import DictConfig

from runner.config import MINIMISED
from runner.tracking import SWEEP_PARENT_ROLE, absolute_tracking_uri, experiment_id, find_sweep_parent, git_commit

log = logging.getLogger(__name__)

# Parent runs opened by this process and not yet closed (closed as FAILED/KILLED on a crash).
_open_parents: dict[str, str] = {}


def sweep_id(config: DictConfig) -> str:
    """The id shared by all jobs of a sweep: its output folder."""
    return str(config.hydra.sweep.dir)


class MlflowSweepCallback(Callback):
    """Opens the parent run of a multirun and closes it with the best job's objective."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        uri = absolute_tracking_uri(config.tracking.uri)
        client = mlflow.MlflowClient(uri)
        mlflow.set_tracking_uri(uri)
        exp = experiment_id(uri, config.tracking.experiment, config.tracking.artifact_root)
        sweep = sweep_id(config)
        params = {str(k): str(v) for k, v in (config.hydra.sweeper.get("params") or {}).items()}
        run = client.create_run(
            exp,
            run_name=f"sweep {sweep}",
            tags={
                "sweep_id": sweep,
                "sweep_role": SWEEP_PARENT_ROLE,
                "git_commit": git_commit(),
                "overrides": " ".join(config.hydra.overrides.task),
                "launcher": str(config.hydra.launcher._target_).rsplit(".", 1)[-1],
                "sweeper": str(config.hydra.sweeper._target_).rsplit(".", 1)[-1],
            },
        )
        for key, value in params.items():
            client.log_param(run.info.run_id, f"sweep.{key}", value)
        _open_parents[run.info.run_id] = uri
        log.info("sweep %s: MLflow parent run %s", sweep, run.info.run_id)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        uri = absolute_tracking_uri(config.tracking.uri)
        client = mlflow.MlflowClient(uri)
        exp = client.get_experiment_by_name(config.tracking.experiment).experiment_id
        parent = find_sweep_parent(client, exp, sweep_id(config))
        if parent is None:
            return
        objective = config.objective
        children = client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
        scores = [r.data.metrics.get(objective, math.nan) for r in children]
        finished = [s for s in scores if not math.isnan(s)]
        client.log_metric(parent, "jobs", len(children))
        if finished:
            best = (min if objective in MINIMISED else max)(finished)
            client.log_metric(parent, f"best_{objective}", best)
        close_parent(parent, RunStatus.to_string(RunStatus.FINISHED))


def close_parent(run_id: str, status: str) -> None:
    uri = _open_parents.pop(run_id, None)
    if uri is not None:
        mlflow.MlflowClient(uri).set_terminated(run_id, status)


def close_open_parents(status: str) -> None:
    """Mark parents left open by a sweep that crashed or was interrupted, so none stays RUNNING."""
    for run_id in list(_open_parents):
        close_parent(run_id, status)

