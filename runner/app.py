"""One run from a composed config: validate, seed, load data, train, evaluate, track."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import hydra
import mlflow
import numpy as np
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

import datasets
from runner import summary
from runner.config import to_run_config
from runner.dispatch import trainer_for
from runner.evaluate import evaluate_and_log
from runner.seeding import seed_everything
from runner.tracking import start_run

log = logging.getLogger(__name__)

# Objectives a sweeper should minimise; every other objective is maximised.
MINIMISED = {"val_loss"}


def _hydra_context() -> tuple[Path, list[str], dict[str, str]]:
    """Output folder, command-line overrides and sweep tags of the current Hydra job."""
    if not HydraConfig.initialized():  # called from Python (tests, notebooks) without @hydra.main
        return Path(tempfile.mkdtemp(prefix="runner-")), [], {}
    hc = HydraConfig.get()
    tags: dict[str, str] = {}
    if hc.mode == RunMode.MULTIRUN:
        tags = {"sweep": Path(hc.sweep.dir).as_posix(), "sweep_job": str(hc.job.num)}
    return Path(hc.runtime.output_dir), list(hc.overrides.task), tags


def run(cfg: DictConfig) -> float:
    """Run one experiment and return its objective (``cfg.objective``) for Hydra sweepers."""
    run_cfg = to_run_config(cfg)
    trainer = trainer_for(run_cfg.model.framework)
    seed_everything(run_cfg.seed)
    data = datasets.load(run_cfg.dataset, run_cfg.seed, progress=run_cfg.trainer.progress)
    output_dir, overrides, sweep_tags = _hydra_context()
    tags = {
        "framework": run_cfg.model.framework,
        "model": run_cfg.model.name,
        "dataset": run_cfg.dataset.name,
        "dataset_fingerprint": data.fingerprint,
        "skipped_images": len(data.skipped),
        **sweep_tags,
    }
    extra_params = {
        **trainer.versions(),
        "mlflow_version": mlflow.__version__,
        "hydra_version": hydra.__version__,
        "classes": ",".join(data.classes),
        "num_train": len(data.train),
        "num_val": len(data.val),
        "num_test": len(data.test),
    }
    with start_run(cfg, output_dir, tags, extra_params, overrides) as tracker:
        if data.skipped:
            tracker.log_json({"skipped": data.skipped}, "data/skipped_images.json")
        model = trainer.fit(run_cfg, data, tracker)
        metrics = evaluate_and_log(model, data, tracker)
        model.log_model(tracker, data.train.images[:4].astype(np.float32))
    summary.report(metrics, tracker.run_id, run_cfg.tracking.experiment, run_cfg.tracking.uri, tracker.model_uri)
    return metrics[run_cfg.objective]
