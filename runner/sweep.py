"""Sweeps as first-class MLflow objects: one parent run per multirun, the jobs nested under it.

Hydra calls :class:`MlflowSweepCallback` in the launching process before the first job and
after the last. Before any job starts it claims a sweep folder of its own (Hydra's
``multirun/DATE/TIME`` gets a suffix when another sweep took that name in the same second)
and creates the parent run; it hands both to every job through Hydra's
``hydra.job.env_set`` (which every launcher, basic, joblib or Ray, gives its jobs), so a job
nests under its own sweep's parent (``mlflow.parentRunId``) without searching for it, and two
sweeps never share a folder, an id or a parent.
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Any

import mlflow
from hydra.experimental.callback import Callback
from mlflow.entities import RunStatus
from omegaconf import DictConfig, open_dict, read_write

from runner import interrupt
from runner.config import MINIMISED
from runner.epochs import SELECTED
from runner.errors import USER_ERRORS, RunnerError, storage_error
from runner.store import absolute_tracking_uri, open_store, process_tags
from runner.tracking import SWEEP_PARENT_ROLE, git_commit

log = logging.getLogger(__name__)

SWEEP_ID_KEY, SWEEP_PARENT_KEY = "RUNNER_SWEEP_ID", "RUNNER_SWEEP_PARENT"  # in hydra.job.env_set

# Parent runs opened by this process and not yet closed (closed as FAILED/KILLED on a crash).
_open_parents: dict[str, str] = {}


def claim_folder(base: Path) -> Path:
    """Create and return ``base``, or ``base-2``, ``base-3``... if taken: mkdir is atomic, so one claimant wins."""
    base = base.absolute()
    base.parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 10_000):
        folder = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise RunnerError(f"hydra.sweep.dir: {base} and 9,999 numbered siblings exist already; set hydra.sweep.dir to a new folder.")


class MlflowSweepCallback(Callback):
    """Opens the parent run of a multirun and closes it with the best job's objective."""

    def __init__(self) -> None:
        self.parent: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Hydra turns a callback's exception into a warning and runs the jobs anyway, which
        # would lose the sweep's parent run: stop here instead, plainly where the cause is known.
        try:
            self._start(config)
        except Exception as err:  # noqa: BLE001
            problem = err if isinstance(err, USER_ERRORS) else storage_error(err)
            if problem is None:
                log.exception("the sweep's MLflow parent run could not be opened; no job was started")
                sys.exit(1)
            log.error("%s", problem)
            sys.exit(2)

    def _start(self, config: DictConfig) -> None:
        uri = absolute_tracking_uri(config.tracking.uri)
        exp = open_store(uri, config.tracking.experiment, config.tracking.artifact_root)
        folder = claim_folder(Path(str(config.hydra.sweep.dir)))
        sweep = str(folder)
        params = {str(k): str(v) for k, v in (config.hydra.sweeper.get("params") or {}).items()}
        client = mlflow.MlflowClient(uri)
        run = client.create_run(
            exp,
            run_name=f"sweep {folder.parent.name}/{folder.name}",
            tags={
                "sweep_id": sweep,
                "sweep_role": SWEEP_PARENT_ROLE,
                "git_commit": git_commit(),
                "overrides": " ".join(config.hydra.overrides.task),
                "launcher": str(config.hydra.launcher._target_).rsplit(".", 1)[-1],
                "sweeper": str(config.hydra.sweeper._target_).rsplit(".", 1)[-1],
                **process_tags(),
            },
        )
        for key, value in params.items():
            client.log_param(run.info.run_id, f"sweep.{key}", value)
        _open_parents[run.info.run_id] = uri
        interrupt.close_at_exit(close_open_parents)
        self.parent = run.info.run_id
        # Every job's config is composed again from hydra.overrides.hydra: what is added there reaches them all.
        with read_write(config.hydra), open_dict(config.hydra):
            config.hydra.sweep.dir = sweep
            config.hydra.job.env_set[SWEEP_ID_KEY] = sweep
            config.hydra.job.env_set[SWEEP_PARENT_KEY] = run.info.run_id
            config.hydra.overrides.hydra.extend(
                [f"hydra.sweep.dir='{sweep}'", f"+hydra.job.env_set.{SWEEP_ID_KEY}='{sweep}'",
                 f"+hydra.job.env_set.{SWEEP_PARENT_KEY}={run.info.run_id}"]
            )
        log.info("sweep %s: MLflow parent run %s", sweep, run.info.run_id)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.parent is None:
            return
        client = mlflow.MlflowClient(absolute_tracking_uri(config.tracking.uri))
        exp = client.get_run(self.parent).info.experiment_id
        objective = config.objective
        children = client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{self.parent}'")
        scores = [r.data.metrics.get(SELECTED + objective, r.data.metrics.get(objective, math.nan)) for r in children]  # the kept epoch's
        finished = [s for s in scores if not math.isnan(s)]
        client.log_metric(self.parent, "jobs", len(children))
        if finished:
            best = (min if objective in MINIMISED else max)(finished)
            client.log_metric(self.parent, f"best_{objective}", best)
        close_parent(self.parent, RunStatus.to_string(RunStatus.FINISHED))


def close_parent(run_id: str, status: str) -> None:
    uri = _open_parents.pop(run_id, None)
    if uri is not None:
        mlflow.MlflowClient(uri).set_terminated(run_id, status)


def close_open_parents(status: str) -> list[str]:
    """Mark parents left open by a sweep that crashed or was interrupted, so none stays RUNNING; return their ids."""
    parents = list(_open_parents)
    for run_id in parents:
        close_parent(run_id, status)
    return parents
