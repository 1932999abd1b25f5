"""The one MLflow path of both trainers: params, tags, per-epoch metrics, artifacts, model.

Trainers never call mlflow directly; they log through the :class:`Tracker` that
:func:`start_run` yields, so a PyTorch and a Keras run hold the same things in the same
places and can be compared side by side in the MLflow UI.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.entities import RunStatus
from mlflow.models import infer_signature
from omegaconf import DictConfig, OmegaConf

from runner.config.redact import redact, redact_all
from runner.errors import ConfigError, StorageError
from runner.track import interrupt, system_metrics
from runner.track.lease import SWEEP_PARENT_ROLE, Lease, join_overrides, process_tags, refuse_if_alive
from runner.track.limits import RUN_NAME_LENGTH
from runner.track.store import absolute_tracking_uri

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # the checkout (runner/track/tracking.py)


@contextmanager
def requirements_known(requirements: list[str]) -> Iterator[None]:
    """Let MLflow check ``requirements`` (the running versions) without scanning every installed distribution.

    Before it logs a model, MLflow checks its requirements against the environment, and to
    map packages to modules it first reads the file list of every installed distribution
    (seconds with TensorFlow, torch and Ray installed). The packages here are named as their
    modules are, so the map is given for them alone; MLflow's own map (if it built one) is
    left as it was afterwards.
    """
    from mlflow.utils import requirements_utils

    saved = getattr(requirements_utils, "_MODULES_TO_PACKAGES", None)
    if saved is not None or not hasattr(requirements_utils, "_MODULES_TO_PACKAGES"):
        yield  # already built (or MLflow changed): nothing to save
        return
    names = [re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0] for requirement in requirements]
    requirements_utils._MODULES_TO_PACKAGES = {name: [name] for name in names if name}
    try:
        yield
    finally:
        requirements_utils._MODULES_TO_PACKAGES = None


class Tracker:
    """Logs to one active MLflow run, and nothing else: params, tags, metrics, artifacts, the model."""

    def __init__(self, run_id: str, artifact_uri: str = "", logged_params: Mapping[str, str] | None = None) -> None:
        self.run_id = run_id
        self.artifact_uri = artifact_uri
        self.logged_params = dict(logged_params or {})  # a resumed run's params: MLflow refuses to change them
        self.model_uri: str | None = None
        self.model_metadata: dict[str, Any] = {}  # saved in the MLmodel file, e.g. class names
        self.notes: list[str] = []  # what the end-of-run summary must say besides the metrics (e.g. a degenerate model)
        self.when_finished: list[Callable[[], None]] = []  # run once the run is recorded FINISHED (e.g. dropping what only a resume needs)

    @contextmanager
    def writing_artifacts(self) -> Iterator[None]:
        """Name the run's artifact folder in a failed write: MLflow's copies raise OSErrors without a file name."""
        try:
            yield
        except OSError as err:
            if err.filename is None and self.artifact_uri.startswith("file:"):
                raise OSError(err.errno, err.strerror, self.artifact_uri.removeprefix("file://")) from err
            raise

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params, credentials redacted; in a resumed run, one that now has another value (e.g. its device) goes to a ``resumed.<key>`` tag."""
        params = {k: redact(str(v)) for k, v in params.items()}
        changed = {f"resumed.{k}": v for k, v in params.items() if k in self.logged_params and v != self.logged_params[k]}
        new = {k: v for k, v in params.items() if k not in self.logged_params}
        if new:
            mlflow.log_params(new)
        if changed:
            self.set_tags(changed)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        mlflow.set_tags({k: redact(str(v)) for k, v in tags.items()})

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Log the file ``path``; in a local artifact store on the same disk, as a hard link, not a second copy.

        Checkpoints are written in the run's folder (for a resume) and logged each epoch: linked,
        they take their space once. The run's folder replaces its file atomically (a new inode),
        so the logged artifact keeps the content it was logged with.
        """
        with self.writing_artifacts():
            if not self._link(Path(path), artifact_path):
                mlflow.log_artifact(str(path), artifact_path)

    def _link(self, path: Path, artifact_path: str | None) -> bool:
        if not self.artifact_uri.startswith("file://"):
            return False
        target = Path(self.artifact_uri.removeprefix("file://"), artifact_path or "", path.name)
        target.parent.mkdir(parents=True, exist_ok=True)
        staged = target.with_name(f".{target.name}.link")
        try:
            staged.unlink(missing_ok=True)
            os.link(path, staged)
        except OSError as err:
            if err.errno in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):  # another disk, or no links here
                return False
            raise
        os.replace(staged, target)
        return True

    def delete_artifacts(self, artifact_path: str) -> None:
        """Delete the run's artifacts under ``artifact_path``: in a local store the files, elsewhere through MLflow's repository.

        A store that cannot delete (some remote ones) keeps them, with a warning.
        """
        if self.artifact_uri.startswith("file://"):
            shutil.rmtree(Path(self.artifact_uri.removeprefix("file://"), artifact_path), ignore_errors=True)
            return
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        try:
            get_artifact_repository(self.artifact_uri).delete_artifacts(artifact_path)
        except (NotImplementedError, mlflow.exceptions.MlflowException, OSError) as err:
            log.warning("run %s: its artifacts %s/ could not be deleted from %s (%s); they stay", self.run_id, artifact_path, self.artifact_uri, err)

    def log_json(self, data: Any, name: str) -> None:
        with self.writing_artifacts():
            mlflow.log_dict(data, name)

    def load_json(self, name: str) -> Any:
        """An artifact written by :meth:`log_json` (e.g. the history of a run being resumed)."""
        return mlflow.artifacts.load_dict(f"{self.artifact_uri}/{name}")

    def log_figure(self, figure: Any, name: str) -> None:
        """A matplotlib figure as a PNG of 256 colours: plots have few colours and image grids look
        the same, at a fifth of the size of a full-colour PNG (photographs compress poorly).

        Drawn straight into pixels and quantised, not written as a full-colour PNG and read back.
        """
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from PIL import Image

        canvas = FigureCanvasAgg(figure)
        canvas.draw()
        picture = Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3]).quantize(256, method=Image.Quantize.FASTOCTREE)
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder, Path(name).name)
            picture.save(path, format="png")
            self.log_artifact(path, str(Path(name).parent) if "/" in name else None)

    def log_model(
        self,
        flavor: str,
        model: Any,
        example: np.ndarray,
        predict: Callable[[np.ndarray], np.ndarray],
        requirements: list[str],
        **flavor_kwargs: Any,
    ) -> str:
        """Log ``model`` with ``mlflow.<flavor>`` and a signature inferred from a real prediction.

        No input example unless the flavor needs one (``flavor_kwargs``): for images MLflow
        writes it as JSON, parses it back and predicts on it, seconds of the run (7 of 14 s
        for the linear model at 227 px); `runner.predict --serving-input` writes a serving
        body from image files instead.
        """
        import importlib

        module = importlib.import_module(f"mlflow.{flavor}")
        signature = infer_signature(example, predict(example))
        with self.writing_artifacts(), requirements_known(requirements):
            info = module.log_model(
                model,
                name="model",
                signature=signature,
                metadata=self.model_metadata or None,
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


SELECTED = "selected_"  # prefix of the kept epoch's val metrics (trainer.select), which sweeps and runner.compare rank by
CONFIG_HASH_TAG = "config_hash"  # what a run computes: how a continued sweep finds each job's earlier run


def config_hash(cfg: DictConfig, may_differ: set[str]) -> str:
    """A digest of the flattened config without the keys that may differ on resume: equal for the same job of a sweep."""
    computed = {key: value for key, value in sorted(flatten(cfg).items()) if key not in may_differ}
    return hashlib.sha256(json.dumps(computed, default=str).encode()).hexdigest()[:16]


def prepare_resume(cfg: DictConfig, run_id: str, into: Path, may_differ: set[str]) -> Path:
    """Check that run ``run_id`` can be continued with ``cfg`` (keys in ``may_differ`` aside) and download its checkpoints into ``into``."""
    uri = absolute_tracking_uri(cfg.tracking.uri)
    client = mlflow.MlflowClient(uri)
    try:
        previous = client.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        raise ConfigError(f"resume={run_id}: no such run in {uri}. Pass the run id printed by the interrupted run.") from None
    if previous.data.tags.get("sweep_role") == SWEEP_PARENT_ROLE:
        raise ConfigError(f"resume={run_id}: that is a sweep's parent run; continue the sweep with -m and its overrides.")
    if previous.info.status == "FINISHED":
        raise ConfigError(f"resume={run_id}: that run already FINISHED; there is nothing to continue.")
    refuse_if_alive(previous, f"resume={run_id}: that run")  # never two processes training into one record
    logged = previous.data.params
    now = {key: redact(str(value)) for key, value in flatten(cfg).items()}  # as they were logged
    differing = sorted(key for key, value in now.items() if key not in may_differ and key in logged and value != logged[key])
    if differing:
        changes = ", ".join(f"{k}={logged[k]} (now {now[k]})" for k in differing)
        raise ConfigError(
            f"resume={run_id}: the configuration differs from the interrupted run's: {changes}. "
            "Resume with the same overrides as the original command."
        )
    try:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="checkpoints", dst_path=str(into), tracking_uri=uri)
    except (mlflow.exceptions.MlflowException, OSError):
        raise ConfigError(f"resume={run_id}: the run has no checkpoint yet (it stopped before its first epoch ended); start it anew.") from None
    return Path(local)


@dataclass(frozen=True)
class RunSpec:
    """What one job opens in MLflow: its experiment (from :func:`open_store`), name, tags and params."""

    experiment_id: str
    name: str
    tags: Mapping[str, Any]
    params: Mapping[str, Any]
    overrides: list[str]
    sweep: str | None = None  # the sweep this job belongs to (its id, tagged on the run)
    sweep_parent: str | None = None  # the run this one nests under: its sweep's parent, or its cross-validation's
    resume: str | None = None  # reopen this interrupted run instead of starting one
    system_metrics_interval: float | None = None  # seconds between MLflow system metrics samples; None: none


@contextmanager
def start_run(cfg: DictConfig, spec: RunSpec) -> Iterator[Tracker]:
    """Open an MLflow run holding the whole config that runs (``cfg``); close it FINISHED, FAILED or KILLED.

    Whatever was logged before an error stays in the run: the status tells how it ended.
    """
    commit = git_commit()
    tags = {"git_commit": commit, "mlflow.source.git.commit": commit, "overrides": join_overrides(spec.overrides), **spec.tags}
    if spec.sweep is not None:
        tags["sweep_id"] = spec.sweep
    if spec.sweep_parent is not None:
        tags["mlflow.parentRunId"] = spec.sweep_parent
    lease = Lease(mlflow.get_tracking_uri(), Path(spec.tags["output_dir"]) if "output_dir" in spec.tags else None)
    # System metrics: the runner's monitor (runner.track.system_metrics), never a second one from MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING.
    if spec.resume is None:
        active = mlflow.start_run(
            experiment_id=spec.experiment_id, run_name=redact(spec.name)[:RUN_NAME_LENGTH], tags={k: redact(str(v)) for k, v in {**tags, **process_tags(), **lease.tags()}.items()},
            nested=mlflow.active_run() is not None, log_system_metrics=False,  # nested: a cross-validation fold inside its parent run
        )
    else:
        # prepare_resume checked this before the data loaded; another process may have taken the run since
        refuse_if_alive(mlflow.MlflowClient().get_run(spec.resume), f"resume={spec.resume}: that run")
        active = mlflow.start_run(run_id=spec.resume, log_system_metrics=False)
        mlflow.set_tags({**process_tags(), **lease.tags()})  # the run now lives in this process
    lease.hold(active.info.run_id)
    tracker = Tracker(active.info.run_id, active.info.artifact_uri, active.data.params if spec.resume else None)
    interrupt.opened_run(tracker.run_id)  # so a stop's message can say which run it ended
    monitor = None
    if spec.system_metrics_interval is not None:
        monitor = system_metrics.start(tracker.run_id, mlflow.get_tracking_uri(), spec.system_metrics_interval, spec.resume is not None)
    status = RunStatus.to_string(RunStatus.FAILED)
    try:
        if spec.resume is None:
            tracker.log_params({**flatten(cfg), **spec.params, "python_version": platform.python_version()})
            tracker.log_json(redact_all(OmegaConf.to_container(cfg, resolve=True)), "config/config.yaml")
            tracker.log_json({"overrides": redact_all(spec.overrides)}, "config/overrides.yaml")
        else:
            tracker.set_tags({"resumed_with": join_overrides(spec.overrides), "resumed_commit": commit})
        yield tracker
        status = RunStatus.to_string(RunStatus.FINISHED)
    except KeyboardInterrupt:
        status = RunStatus.to_string(RunStatus.KILLED)
        interrupt.killed_run(tracker.run_id)
        raise
    finally:
        system_metrics.stop(monitor)
        lease.release(functools.partial(_end_run, tracker.run_id, status))
        if lease.lost is not None:
            _leave_run(tracker.run_id, lease.lost)
        elif status == RunStatus.to_string(RunStatus.FINISHED):
            for step in tracker.when_finished:
                step()


def _leave_run(run_id: str, why: str) -> None:
    """Forget the active run without writing its end: another process owns the record now (``why``)."""
    from mlflow.tracking import fluent

    stack = fluent._active_run_stack.get()  # MLflow has no public way to let go of a run without closing it
    if stack and stack[-1].info.run_id == run_id:
        stack.pop()
    os.environ.pop("MLFLOW_RUN_ID", None)
    log.error("MLflow run %s was %s: its end was not written by this process", run_id, why)


def _end_run(run_id: str, status: str) -> None:
    """Close the active run with ``status``; if the store cannot take even that (a full disk), say so.

    Raised only when the run itself succeeded: after a failure the first error is the one to
    report. A run left RUNNING this way is marked KILLED by the next run that opens the store
    and finds its folder lock free (runner.track.lease), or its lease expired.
    """
    try:
        mlflow.end_run(status)
    except Exception as err:  # noqa: BLE001 - any store error: the run could not be closed
        log.error("MLflow run %s could not be marked %s (%s: %s); the next run on this host marks it KILLED",
                  run_id, status, type(err).__name__, str(err)[:300])
        if status == RunStatus.to_string(RunStatus.FINISHED):
            raise StorageError(f"the tracking store could not record the end of run {run_id}: {str(err)[:300]}. "
                               "Free space where tracking.uri points, then check the run in the UI.") from None
        return
    log.info("MLflow run %s ended %s", run_id, status)
