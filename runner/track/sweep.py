"""Sweeps as first-class MLflow objects: one parent run per multirun, the jobs nested under it.

Hydra calls :class:`MlflowSweepCallback` in the launching process before the first job and
after the last. Before any job starts it claims a sweep folder of its own (Hydra's
``multirun/DATE/TIME`` gets a suffix when another sweep took that name in the same second)
and creates the parent run; it hands both to every job through Hydra's
``hydra.job.env_set`` (which every launcher, basic, joblib or Ray, gives its jobs), so a job
nests under its own sweep's parent (``mlflow.parentRunId``) without searching for it, and two
sweeps never share a folder, an id or a parent.

``resume=<parent run id>`` with ``-m`` continues a sweep: the callback reopens that parent run
and hands its id and sweep id to the jobs as above, and each job decides from its own earlier
attempt, found by its configuration's hash (:func:`earlier_attempt`, :func:`resume_target`):
FINISHED, it is not run again; interrupted with a checkpoint, it resumes; else it runs. So it
holds for every launcher, which only runs the jobs.
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Any

import mlflow
from hydra.experimental.callback import Callback
from mlflow.entities import Run, RunStatus
from omegaconf import DictConfig, open_dict, read_write

from runner.config.redact import redact
from runner.config.schema import MINIMISED
from runner.errors import USER_ERRORS, ConfigError, RunnerError, storage_error
from runner.report.runs import report_sweep
from runner.track import interrupt
from runner.track.lease import SWEEP_PARENT_ROLE, Lease, join_overrides, process_tags, refuse_if_alive
from runner.track.store import absolute_tracking_uri, open_store
from runner.track.tracking import CONFIG_HASH_TAG, SELECTED, git_commit

log = logging.getLogger(__name__)

SWEEP_ID_KEY, SWEEP_PARENT_KEY = "RUNNER_SWEEP_ID", "RUNNER_SWEEP_PARENT"  # in hydra.job.env_set
SWEPT_KEY = "RUNNER_SWEPT"  # in hydra.job.env_set: the keys the sweep varies, comma-separated (jobs name their runs by them first)
# In hydra.job.env_set of an Optuna sweep with a database (runner.sweep): the study, where it lives, and each job's trial number.
STUDY_KEY, STORAGE_KEY, TRIAL_KEY = "RUNNER_STUDY", "RUNNER_STUDY_STORAGE", "RUNNER_TRIAL"


def swept_keys(config: DictConfig) -> list[str]:
    """The keys a multirun varies: comma lists and sweep functions on the command line, and the sweeper's search space."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    keys = [o.key_or_group for o in overrides if o.is_sweep_override()]
    return list(dict.fromkeys([*keys, *(str(k) for k in (config.hydra.sweeper.get("params") or {}))]))

# Parent runs opened by this process and not yet closed (closed as FAILED/KILLED on a crash), with their store and lease.
_open_parents: dict[str, tuple[str, Lease]] = {}


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
        from runner.sweep.study import check_sweep  # (runner.sweep's loop imports this module)

        check_sweep(config)
        uri = absolute_tracking_uri(config.tracking.uri)
        exp = open_store(uri, config.tracking.experiment, config.tracking.artifact_root)
        folder = claim_folder(Path(str(config.hydra.sweep.dir)))  # a resumed sweep's jobs write to new folders too
        client = mlflow.MlflowClient(uri)
        lease = Lease(uri, folder)
        if config.get("resume"):
            parent = reopen_parent(client, str(config.resume), join_overrides(list(config.hydra.overrides.task)), lease)
            run_id, sweep = parent.info.run_id, parent.data.tags["sweep_id"]
        else:
            run_id, sweep = self._create_parent(client, exp, config, str(folder), lease), str(folder)
        lease.hold(run_id)
        _open_parents[run_id] = (uri, lease)
        interrupt.close_at_exit(close_open_parents)
        self.parent = run_id
        # Every job's config is composed again from hydra.overrides.hydra: what is added there reaches them all.
        with read_write(config.hydra), open_dict(config.hydra):
            config.hydra.sweep.dir = str(folder)
            config.hydra.job.env_set[SWEEP_ID_KEY] = sweep
            config.hydra.job.env_set[SWEEP_PARENT_KEY] = run_id
            config.hydra.job.env_set[SWEPT_KEY] = swept = ",".join(swept_keys(config))
            config.hydra.overrides.hydra.extend(
                [f"hydra.sweep.dir='{folder}'", f"+hydra.job.env_set.{SWEEP_ID_KEY}='{sweep}'",
                 f"+hydra.job.env_set.{SWEEP_PARENT_KEY}={run_id}", f"+hydra.job.env_set.{SWEPT_KEY}='{swept}'"]
            )
        log.info("sweep %s: MLflow parent run %s%s", sweep, run_id, f" (continued; jobs write to {folder})" if config.get("resume") else "")

    @staticmethod
    def _create_parent(client: mlflow.MlflowClient, exp: str, config: DictConfig, sweep: str, lease: Lease) -> str:
        """A new parent run for the sweep ``sweep`` (its folder); its id."""
        folder = Path(sweep)
        run = client.create_run(
            exp,
            run_name=f"sweep {folder.parent.name}/{folder.name}",
            tags={
                "sweep_id": sweep,
                "sweep_role": SWEEP_PARENT_ROLE,
                "git_commit": git_commit(),
                "overrides": redact(join_overrides(list(config.hydra.overrides.task))),
                "launcher": str(config.hydra.launcher._target_).rsplit(".", 1)[-1],
                "sweeper": str(config.hydra.sweeper._target_).rsplit(".", 1)[-1],
                **process_tags(),
                **lease.tags(),
            },
        )
        for key, value in {str(k): str(v) for k, v in (config.hydra.sweeper.get("params") or {}).items()}.items():
            client.log_param(run.info.run_id, f"sweep.{key}", redact(value))
        return run.info.run_id

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.parent is None:
            return
        client = mlflow.MlflowClient(absolute_tracking_uri(config.tracking.uri))
        exp = client.get_run(self.parent).info.experiment_id
        objective = config.objective
        children = client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{self.parent}'")
        scores = [r.data.metrics.get(SELECTED + objective, r.data.metrics.get(objective, math.nan)) for r in children]  # the kept epoch's
        finished = [s for s in scores if not math.isnan(s)]
        # A job run again after it failed has two runs with one configuration: it counts once.
        client.log_metric(self.parent, "jobs", len({r.data.tags.get(CONFIG_HASH_TAG, r.info.run_id) for r in children}))
        if finished:
            best = (min if objective in MINIMISED else max)(finished)
            client.log_metric(self.parent, f"best_{objective}", best)
            try:
                report_sweep(str(client.tracking_uri), config.tracking.experiment, client.get_run(self.parent).data.tags["sweep_id"],
                             self.parent, objective)
            except Exception as err:  # noqa: BLE001 - the jobs are recorded: a summary that cannot be made only loses itself
                log.warning("the sweep's summary could not be made (%s: %s); python -m runner.compare shows its jobs", type(err).__name__, err)
        close_parent(self.parent, RunStatus.to_string(RunStatus.FINISHED))


def close_parent(run_id: str, status: str) -> None:
    opened = _open_parents.pop(run_id, None)
    if opened is not None:
        uri, lease = opened
        lease.release(lambda: mlflow.MlflowClient(uri).set_terminated(run_id, status))  # not if another process owns the record now


def close_open_parents(status: str) -> list[str]:
    """Mark parents left open by a sweep that crashed or was interrupted, so none stays RUNNING; return their ids."""
    parents = list(_open_parents)
    for run_id in parents:
        close_parent(run_id, status)
    return parents


def reopen_parent(client: mlflow.MlflowClient, run_id: str, overrides: str, lease: Lease) -> Run:
    """The parent run of the sweep that ``resume=<run_id>`` with ``-m`` continues, marked RUNNING in this process again."""
    try:
        parent = client.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        raise ConfigError(f"resume={run_id}: no such run in {client.tracking_uri}. With -m, pass the sweep's parent run id.") from None
    if parent.data.tags.get("sweep_role") != SWEEP_PARENT_ROLE:
        raise ConfigError(
            f"resume={run_id}: that run is not a sweep's parent run. With -m, resume= takes the parent run id the "
            "interrupted sweep printed; to continue a single run, drop -m."
        )
    refuse_if_alive(parent, f"resume={run_id}: the sweep")
    client.update_run(run_id, status="RUNNING")
    for key, value in {**process_tags(), **lease.tags(), "resumed_with": redact(overrides)}.items():
        client.set_tag(run_id, key, value)
    return parent


def earlier_attempt(uri: str, parent: str, config_hash: str) -> Run | None:
    """The latest run of sweep ``parent`` with the configuration ``config_hash`` (a job of it), or None if it never started."""
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs(
        [client.get_run(parent).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent}' and tags.{CONFIG_HASH_TAG} = '{config_hash}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def resume_target(uri: str, earlier: Run | None) -> str | None:
    """The run a job of a continued sweep resumes: its earlier attempt if interrupted after a checkpoint, else None (run anew).

    A FAILED attempt runs anew (in a new run), as does one stopped before its first checkpoint.
    """
    if earlier is None:
        return None
    refuse_if_alive(earlier, f"this job's earlier run (sweep job {earlier.data.tags.get('sweep_job', '?')})")
    if earlier.info.status not in ("KILLED", "RUNNING"):  # RUNNING here: its process is gone
        return None
    return earlier.info.run_id if mlflow.MlflowClient(uri).list_artifacts(earlier.info.run_id, "checkpoints") else None
