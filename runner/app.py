"""One run from a composed config: validate, seed, load data, train, evaluate, track."""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import mlflow
import numpy as np
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

import datasets
from runner import interrupt, lineage, summary
from runner.config import RunConfig, to_run_config
from runner.dispatch import trainer_for
from runner.errors import RunnerError, storage_error
from runner.evaluate import evaluate_and_log
from runner.files import absolute_path, check_writable
from runner.seeding import seed_everything
from runner.store import absolute_tracking_uri, open_store
from runner.sweep import SWEEP_ID_KEY, SWEEP_PARENT_KEY
from runner.tracking import RunSpec, prepare_resume, start_run

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobContext:
    """What Hydra tells a job about itself; neutral defaults when called from Python."""

    output_dir: Path
    overrides: list[str] = field(default_factory=list)
    sweep: str | None = None
    sweep_parent: str | None = None
    job_num: int = 0
    threads: int | None = None  # None: all cores (one job at a time)


def job_context() -> JobContext:
    if not HydraConfig.initialized():  # called from Python (tests, notebooks) without @hydra.main
        return JobContext(Path(tempfile.mkdtemp(prefix="runner-")))
    hc = HydraConfig.get()
    output_dir = own_folder(Path(hc.runtime.output_dir))
    if hc.mode != RunMode.MULTIRUN:
        return JobContext(output_dir, list(hc.overrides.task))
    return JobContext(
        output_dir,
        list(hc.overrides.task),
        sweep=hc.job.env_set.get(SWEEP_ID_KEY) or str(absolute_path(str(hc.sweep.dir))),
        sweep_parent=hc.job.env_set.get(SWEEP_PARENT_KEY),
        job_num=int(hc.job.num),
        threads=_threads_per_job(hc.launcher),
    )


def own_folder(folder: Path) -> Path:
    """``folder`` if this run is the first to claim it, else a new folder inside it.

    Hydra names a run's folder by the second it started, so two runs started in the same
    second get the same one; checkpoints written there would then mix. The claim (an
    exclusively created ``.owner`` file) gives each run a folder nobody else writes to.
    """
    check_writable(folder, "the run's output folder", "hydra.run.dir")
    try:
        with open(folder / ".owner", "x") as owner:
            owner.write(f"{os.getpid()}\n")
        return folder
    except FileExistsError:
        own = Path(tempfile.mkdtemp(prefix="run-", dir=folder))
        log.info("output folder %s is another run's (started in the same second): this run writes to %s", folder, own)
        return own


def _threads_per_job(launcher: DictConfig) -> int | None:
    """Cores one job may use when the launcher runs several at once, so they don't oversubscribe."""
    cores = os.cpu_count() or 1
    if "n_jobs" in launcher:  # joblib: n_jobs processes at once, -1 = one per core
        n_jobs = int(launcher.n_jobs or 1)
        return max(1, cores // (cores if n_jobs < 0 else n_jobs))
    if "ray" in launcher:  # Ray: each task reserves ray.remote.num_cpus cores on its node
        return int(launcher.ray.get("remote", {}).get("num_cpus") or 1)
    return None


def _localise(run: RunConfig, job: JobContext) -> RunConfig:
    """Absolute data paths, and threads shared out so parallel sweep jobs don't oversubscribe the cores."""
    run.dataset.cache_dir = str(absolute_path(run.dataset.cache_dir))
    run.trainer = dataclasses.replace(run.trainer, feature_cache_dir=str(absolute_path(run.trainer.feature_cache_dir)))
    if run.dataset.path:
        run.dataset.path = str(absolute_path(run.dataset.path))
    if run.trainer.num_threads is None:
        run.trainer = dataclasses.replace(run.trainer, num_threads=job.threads or os.cpu_count() or 1)
    return run


def run(cfg: DictConfig) -> float:
    """Run one experiment and return its objective (``cfg.objective``) for Hydra sweepers.

    A write that fails for lack of space or permission, wherever it happens, ends as one
    StorageError naming the folder (the MLflow run, if open, is already marked FAILED).
    """
    try:
        return _run(cfg)
    except RunnerError:
        raise
    except Exception as err:  # noqa: BLE001 - only storage faults are converted; the rest propagate as they are
        if (converted := storage_error(err)) is None:
            raise
        raise converted from None


def _run(cfg: DictConfig) -> float:
    job = job_context()
    run_cfg = _localise(to_run_config(cfg), job)
    experiment_id = open_store(
        absolute_tracking_uri(run_cfg.tracking.uri), run_cfg.tracking.experiment, run_cfg.tracking.artifact_root
    )
    trainer = trainer_for(run_cfg.model.framework)
    seed_everything(run_cfg.seed)
    data = datasets.load(run_cfg.dataset, run_cfg.seed, progress=run_cfg.trainer.progress)
    tags = {
        "framework": run_cfg.model.framework,
        "model": run_cfg.model.name,
        "dataset": run_cfg.dataset.name,
        "dataset_fingerprint": data.fingerprint,
        "skipped_images": len(data.skipped),
        "output_dir": str(job.output_dir),  # this run's checkpoints and logs on its machine
        **({"sweep_job": job.job_num} if job.sweep else {}),
    }
    params = {
        **trainer.versions(),
        "mlflow_version": mlflow.__version__,
        "hydra_version": hydra.__version__,
        "classes": ",".join(data.classes),
        "num_train": len(data.train),
        "num_val": len(data.val),
        "num_test": len(data.test),
        "threads": run_cfg.trainer.num_threads,
    }
    name = run_cfg.tracking.run_name or " ".join([run_cfg.model.name, *job.overrides])
    spec = RunSpec(
        experiment_id, name, tags, params, job.overrides, job.sweep, job.sweep_parent, run_cfg.resume,
        run_cfg.tracking.system_metrics_interval if run_cfg.tracking.system_metrics else None,
    )
    interrupt.check()  # stopped while the data loaded: no run to open
    resume_from = prepare_resume(cfg, run_cfg.resume, job.output_dir / "resume") if run_cfg.resume else None
    with start_run(cfg, spec, job.output_dir) as tracker:
        lineage.log_data_inputs(run_cfg.dataset, data, run_cfg.seed)
        if data.skipped:
            tracker.log_json({"skipped": data.skipped}, "data/skipped_images.json")
        model = trainer.fit(run_cfg, data, tracker, resume_from)
        metrics = evaluate_and_log(model, data, tracker)
        tracker.model_metadata["classes"] = data.classes
        model.log_model(tracker, data.train.images[:2].astype(np.float32))  # 2: a batch axis torch.export keeps dynamic
    summary.report(metrics, tracker.run_id, run_cfg.tracking.experiment, run_cfg.tracking.uri, tracker.model_uri, experiment_id)
    return metrics[run_cfg.objective]
