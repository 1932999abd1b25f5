"""Dataset lineage: a run's train, validation and test data as MLflow dataset inputs.

MLflow then shows, per run, which data it saw (the runs table's Dataset column, the run
page's "Datasets used"), and which runs share data: a dataset is one entity per experiment,
keyed by name and digest, and the digest is the data's fingerprint (the ``dataset_fingerprint``
tag: file names, labels and contents). Only metadata is logged, never pixels: the source
(the folder, archive or URL the images came from) and a schema of what the trainers receive.

MLflow registers a dataset by looking for it and inserting it when absent; two runs doing
that at the same moment both insert, and the second fails on the table's unique key. The
first run's row is then there: trying again links to it (:func:`log_data_inputs`).
"""

from __future__ import annotations

import logging
import random
import time

import mlflow
import numpy as np
from mlflow.data.http_dataset_source import HTTPDatasetSource
from mlflow.data.meta_dataset import MetaDataset
from mlflow.data.sources import LocalArtifactDatasetSource
from mlflow.types import Schema, TensorSpec

from crack_runner.datasets import DataSplits, Split
from runner.config.redact import redact
from runner.config.schema import DatasetConfig

log = logging.getLogger(__name__)

# MLflow's dataset context of each split (the ``mlflow.data.context`` input tag).
CONTEXTS = {"train": "train", "val": "validation", "test": "test"}


def source_of(cfg: DatasetConfig, data: DataSplits) -> str:
    """Where the images came from: ``dataset.path`` when given, else the download URL or the generated folder."""
    if cfg.path:
        return cfg.path
    return getattr(cfg, "url", None) or str(data.root)


def split_dataset(cfg: DatasetConfig, data: DataSplits, split: str) -> MetaDataset:
    """One split as an MLflow dataset: name ``<dataset>-<split>``, digest the data's fingerprint, no pixels."""
    source = redact(source_of(cfg, data))  # a download URL's token is no metadata to keep
    images: Split = getattr(data, split)
    schema = Schema(
        [
            TensorSpec(np.dtype(np.uint8), (-1, *data.image_shape), "image"),
            TensorSpec(np.dtype(images.labels.dtype), (-1,), "label"),
        ]
    )
    origin = HTTPDatasetSource(source) if source.startswith(("http://", "https://")) else LocalArtifactDatasetSource(source)
    return MetaDataset(origin, name=f"{cfg.name}-{split}", digest=data.fingerprint, schema=schema)


def log_data_inputs(cfg: DatasetConfig, data: DataSplits, seed: int) -> None:
    """Log the three splits as inputs of the active run, each tagged with its context, size and split seed.

    Logging them again (a resumed run) links nothing twice: MLflow keeps one input per dataset and run.
    A registration that lost a race with another run's (a unique-key error) is tried again.
    """
    names = list(CONTEXTS)
    for attempt in range(1, RACE_ATTEMPTS + 1):
        try:
            mlflow.log_inputs(
                datasets=[split_dataset(cfg, data, name) for name in names],
                contexts=[CONTEXTS[name] for name in names],
                tags_list=[
                    {"images": str(len(getattr(data, name))), "classes": ",".join(data.classes), "split_seed": str(seed)}
                    for name in names
                ],
            )
            return
        except mlflow.exceptions.MlflowException as err:
            if attempt == RACE_ATTEMPTS or not lost_a_race(err):
                raise
            log.debug("dataset registration raced another run's (%s); trying again", str(err).splitlines()[0][:200])
            time.sleep(random.uniform(0.05, 0.3) * attempt)


RACE_ATTEMPTS = 5
UNIQUE_KEY_ERRORS = ("UNIQUE constraint failed", "duplicate key value", "IntegrityError", "Duplicate entry")  # sqlite, PostgreSQL, SQLAlchemy, MySQL


def lost_a_race(err: Exception) -> bool:
    """Whether a store refused a write because another process had just written the same key."""
    return any(marker in str(err) for marker in UNIQUE_KEY_ERRORS)
