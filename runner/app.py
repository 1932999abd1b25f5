"""One run from a composed config, as a straight list of steps: validate, open the store, seed, load data, train, evaluate, log.

With ``dataset.folds=K`` the train-evaluate-log steps run once per fold of train+val, each in
its own MLflow run nested under one parent run that holds the mean and spread of each metric.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import hydra
import mlflow
import numpy as np
from omegaconf import DictConfig, OmegaConf

from crack_runner import datasets
from crack_runner.datasets import DataSplits, stopping
from runner.config.keys import check_composed, check_ignored
from runner.config.schema import RunConfig, may_differ_on_resume, to_run_config
from runner.deploy.onnx_export import ExportSettings, export_after_run
from runner.deploy.onnx_export import available as onnx_available
from runner.errors import USER_ERRORS, storage_error
from runner.report import summary
from runner.report.evaluate import evaluate_and_log
from runner.sweep.trial import Pruning, trial_pruning
from runner.track import lineage
from runner.track.job import JobContext, job_context, localise
from runner.track.limits import check_limits
from runner.track.safe_load import check_resume
from runner.track.store import RAY_NODE_TAG, absolute_tracking_uri, open_store
from runner.track.sweep import earlier_attempt, resume_target
from runner.track.tracking import CONFIG_HASH_TAG, SELECTED, RunSpec, Tracker, config_hash, flatten, prepare_resume, start_run
from runner.train.epochs import HISTORY, EpochPolicy, Epochs
from runner.train.seeding import seed_everything
from runner.train.trainer import Trainer, trainer_for

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
    check_composed(cfg)
    run_cfg = localise(to_run_config(cfg), job)
    check_limits(flatten(OmegaConf.structured(run_cfg)), job.overrides)  # before a store or run opens: MLflow would cut or refuse them
    check_ignored(run_cfg, job.overrides, sweep_job=job.sweep is not None)
    uri = absolute_tracking_uri(run_cfg.tracking.uri)
    experiment_id = open_store(uri, run_cfg.tracking.experiment, run_cfg.tracking.artifact_root)
    may_differ = may_differ_on_resume(run_cfg)
    key = config_hash(OmegaConf.structured(run_cfg), may_differ)
    if job.sweep_parent is not None and run_cfg.resume == job.sweep_parent and job.trial is not None:
        run_cfg.resume = None  # a new trial of a sweep's Optuna study: the study's history decides what is not run again
    elif job.sweep_parent is not None and run_cfg.resume == job.sweep_parent:  # a sweep goes on: this job's earlier run decides
        earlier = earlier_attempt(uri, job.sweep_parent, key)
        if earlier is not None and earlier.info.status == "FINISHED":
            log.info("sweep job %d FINISHED before as MLflow run %s: not run again", job.job_num, earlier.info.run_id)
            return earlier.data.metrics.get(SELECTED + run_cfg.objective, earlier.data.metrics.get(run_cfg.objective, math.nan))
        run_cfg.resume = resume_target(uri, earlier)
    ran = OmegaConf.structured(run_cfg)  # what is logged and compared on resume: the config that runs
    trainer = trainer_for(run_cfg.model.framework)
    trainer.check(run_cfg)  # before the data loads and any run opens
    pruning = trial_pruning(run_cfg, job)
    resume_from = prepare_resume(ran, run_cfg.resume, job.output_dir / "resume", may_differ) if run_cfg.resume else None
    if resume_from is not None:
        check_resume(resume_from, run_cfg.resume, trainer)  # a bad checkpoint stops us before the run reopens: it stays KILLED
    seed_everything(run_cfg.seed, trainer)
    data = datasets.load(run_cfg.dataset, run_cfg.seed, progress=run_cfg.trainer.progress)
    stopping.check()  # stopped while the data loaded: no run to open
    spec = run_spec(run_cfg, job, experiment_id, trainer, data, key)
    if run_cfg.dataset.folds:
        return cross_validate(ran, run_cfg, spec, job.output_dir, trainer, data)[run_cfg.objective]
    with start_run(ran, spec) as tracker:
        metrics = train_and_evaluate(run_cfg, data, tracker, trainer, job.output_dir, resume_from, pruning)
    summary.report(metrics, tracker.run_id, run_cfg.tracking.experiment, run_cfg.tracking.uri, tracker.model_uri, experiment_id, tracker.notes)
    if run_cfg.export.wanted(run_cfg.model.framework) and (run_cfg.export.onnx or onnx_available()):  # asked for: a missing extra is said
        export = run_cfg.export
        export_after_run(tracker.run_id, run_cfg.model.framework, data,
                         ExportSettings(export.int8, export.max_accuracy_drop, export.calibration_images, run_cfg.seed))
    return metrics[run_cfg.objective]


def train_and_evaluate(
    run_cfg: RunConfig, data: DataSplits, tracker: Tracker, trainer: Trainer, folder: Path, resume_from: Path | None = None,
    pruning: Pruning | None = None,
) -> dict[str, float]:
    """Train, score the test split and log the model, in the open run; returns the kept epoch's and the test metrics.

    ``pruning``: asked at each epoch's end in a pruned sweep; a pruned run is tested and logged all the same.
    """
    lineage.log_data_inputs(run_cfg.dataset, data, run_cfg.seed)
    if data.skipped:
        tracker.log_json({"skipped": data.skipped}, "data/skipped_images.json")
    history = tracker.load_json(HISTORY) if resume_from else None
    epochs = Epochs(tracker, folder / "checkpoints" / trainer.CHECKPOINT, history, EpochPolicy.of(run_cfg.trainer), run_cfg.trainer.keep_checkpoints,
                    pruning)
    model = trainer.fit(run_cfg, data, tracker, epochs, resume_from)
    metrics = evaluate_and_log(model, data, tracker, epochs.selected, run_cfg.tracking.pictures)
    tracker.model_metadata["classes"] = data.classes
    model.log_model(tracker, data.train.images[:2].astype(np.float32))  # 2: a batch axis torch.export keeps dynamic
    return metrics


def cross_validate(ran: DictConfig, run_cfg: RunConfig, spec: RunSpec, folder: Path, trainer: Trainer, data: DataSplits) -> dict[str, float]:
    """``dataset.folds`` folds of train+val, the test split held out: one nested run per fold under a parent run.

    Each fold starts from the same seed. The parent run gets the mean of each metric under its
    own name (so sweeps and ``runner.compare`` rank it like any run) and the standard deviation
    over the folds as ``<metric>_std``; returns those.
    """
    k = run_cfg.dataset.folds
    parent_spec = dataclasses.replace(spec, tags={**spec.tags, CV_ROLE: "parent", "cv_folds": k})
    results: list[dict[str, float]] = []
    with start_run(ran, parent_spec) as parent:
        for number, fold in enumerate(datasets.folds(data, k, run_cfg.seed), start=1):
            log.info("cross-validation fold %d/%d: %d train, %d val, %d test images", number, k, len(fold.train), len(fold.val), len(fold.test))
            seed_everything(run_cfg.seed, trainer)
            fold_spec = dataclasses.replace(
                spec,
                name=f"{spec.name} fold {number}/{k}",
                tags={**spec.tags, CV_ROLE: "fold", "cv_fold": number},
                params={**spec.params, "num_train": len(fold.train), "num_val": len(fold.val)},
                sweep_parent=parent.run_id,
            )
            with start_run(ran, fold_spec) as tracker:
                results.append(train_and_evaluate(run_cfg, fold, tracker, trainer, folder / f"fold{number}"))
        summary_metrics = fold_summary(results)
        parent.log_metrics(summary_metrics)
        parent.log_json(results, "cv_folds.json")
    summary.report(summary_metrics, parent.run_id, run_cfg.tracking.experiment, run_cfg.tracking.uri, None, spec.experiment_id)
    return summary_metrics


CV_ROLE = "cv_role"  # tag: "parent" on a cross-validation's parent run, "fold" on each fold's run


def fold_summary(results: list[dict[str, float]]) -> dict[str, float]:
    """Each metric's mean over the folds under its own name, and its (population) standard deviation as ``<name>_std``."""
    names = [name for name in results[0] if all(name in r for r in results)]
    values = {name: np.array([r[name] for r in results], dtype=np.float64) for name in names}
    return {**{n: float(v.mean()) for n, v in values.items()}, **{f"{n}_std": float(v.std()) for n, v in values.items()}}


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
        **({RAY_NODE_TAG: job.ray_node} if job.ray_node else {}),
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
    name = run_cfg.tracking.run_name or job.run_name(run_cfg.model.name)
    return RunSpec(
        experiment_id, name, tags, params, job.overrides, job.sweep, job.sweep_parent, run_cfg.resume,
        run_cfg.tracking.system_metrics_interval if run_cfg.tracking.system_metrics else None,
    )
