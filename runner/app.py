"""One run from a composed config, as a straight list of steps: validate, open the store, seed, load data, train, evaluate, log."""

from __future__ import annotations

import logging
import math

import hydra
import mlflow
import numpy as np
from omegaconf import DictConfig, OmegaConf

import datasets
from datasets import DataSplits, stopping
from runner import summary
from runner.config import RunConfig, may_differ_on_resume, to_run_config
from runner.epochs import HISTORY, Epochs
from runner.errors import USER_ERRORS, storage_error
from runner.evaluate import evaluate_and_log
from runner.job import JobContext, job_context, localise
from runner.seeding import seed_everything
from runner.store import absolute_tracking_uri, open_store
from runner.sweep import earlier_attempt, resume_target
from runner.tracking import CONFIG_HASH_TAG, RunSpec, config_hash, prepare_resume, start_run
from runner.trainer import Trainer, trainer_for

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> float:
    """Run one experiment and return its objective (``cfg.objective``) for Hydra sweepers.

    A write that fails for lack of space or permission, wherever it happens, ends as one
    StorageError naming the folder (the MLflow run, if open, is already marked FAILED).
    """
    try:
        return _run(cfg)
    except USER_ERRORS:
        raise
    except Exception as err:  # noqa: BLE001 - only storage faults are converted; the rest propagate as they are
        if (converted := storage_error(err)) is None:
            raise
        raise converted from None


def _run(cfg: DictConfig) -> float:
    job = job_context()
    run_cfg = localise(to_run_config(cfg), job)
    uri = absolute_tracking_uri(run_cfg.tracking.uri)
    experiment_id = open_store(uri, run_cfg.tracking.experiment, run_cfg.tracking.artifact_root)
    may_differ = may_differ_on_resume(run_cfg)
    key = config_hash(OmegaConf.structured(run_cfg), may_differ)
    if job.sweep_parent is not None and run_cfg.resume == job.sweep_parent:  # a sweep goes on: this job's earlier run decides
        earlier = earlier_attempt(uri, job.sweep_parent, key)
        if earlier is not None and earlier.info.status == "FINISHED":
            log.info("sweep job %d FINISHED before as MLflow run %s: not run again", job.job_num, earlier.info.run_id)
            return earlier.data.metrics.get(run_cfg.objective, math.nan)
        run_cfg.resume = resume_target(uri, earlier)
    ran = OmegaConf.structured(run_cfg)  # what is logged and compared on resume: the config that runs
    trainer = trainer_for(run_cfg.model.framework)
    seed_everything(run_cfg.seed, trainer)
    data = datasets.load(run_cfg.dataset, run_cfg.seed, progress=run_cfg.trainer.progress)
    stopping.check()  # stopped while the data loaded: no run to open
    resume_from = prepare_resume(ran, run_cfg.resume, job.output_dir / "resume", may_differ) if run_cfg.resume else None
    with start_run(ran, run_spec(run_cfg, job, experiment_id, trainer, data, key)) as tracker:
        if data.skipped:
            tracker.log_json({"skipped": data.skipped}, "data/skipped_images.json")
        epochs = Epochs(tracker, job.output_dir / "checkpoints" / trainer.CHECKPOINT, tracker.load_json(HISTORY) if resume_from else None)
        model = trainer.fit(run_cfg, data, tracker, epochs, resume_from)
        metrics = evaluate_and_log(model, data, tracker)
        tracker.model_metadata["classes"] = data.classes
        model.log_model(tracker, data.train.images[:2].astype(np.float32))  # 2: a batch axis torch.export keeps dynamic
    summary.report(metrics, tracker.run_id, run_cfg.tracking.experiment, run_cfg.tracking.uri, tracker.model_uri)
    return metrics[run_cfg.objective]


def run_spec(run_cfg: RunConfig, job: JobContext, experiment_id: str, trainer: Trainer, data: DataSplits, key: str) -> RunSpec:
    """The MLflow run this job opens: name, tags (what ran, on which data, where; ``key``: the config's hash) and params beyond the config."""
    tags = {
        CONFIG_HASH_TAG: key,
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
    }
    name = run_cfg.tracking.run_name or " ".join([run_cfg.model.name, *job.overrides])
    return RunSpec(experiment_id, name, tags, params, job.overrides, job.sweep, job.sweep_parent, run_cfg.resume)
