"""The epoch policy, schedules, class weights and augmentation in the Keras stream: tiny VGG16 runs (random weights, 32 px)."""

from __future__ import annotations

import math

from runner.train import keras_trainer  # noqa: I001  (first: it puts Keras on TensorFlow before keras is imported)
import keras
import mlflow
import numpy as np
import pytest

from crack_runner import datasets
from runner.app import run
from runner.config.schema import AugmentConfig, to_run_config
from runner.train.augment import augment
from runner.train.frozen.tfdata import batch_rows, batch_seeds, batches

VGG = ["model=vgg16", "model.weights=null"]


def only_run(client: mlflow.MlflowClient):
    (found,) = client.search_runs(client.get_experiment_by_name("crack-classification").experiment_id)
    return found


def history(client: mlflow.MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_augmented_keras_batches_repeat_with_the_seed_and_change_each_epoch():
    images = np.random.default_rng(0).integers(0, 256, (12, 8, 8, 3), dtype=np.uint8)
    labels = np.arange(12) % 2
    cfg = AugmentConfig("basic", True, True, True, 0.1, 0.2)

    def two_epochs(seed: int) -> list[np.ndarray]:
        dataset = batches(images, labels, batch_rows(12, 4, seed, range(1, 3)), lambda x, s: augment(x, s, cfg), batch_seeds(12, 4, seed, range(1, 3)))
        seen = [x.numpy() for x, _ in dataset]  # 3 batches an epoch
        return [np.concatenate(seen[:3]), np.concatenate(seen[3:])]

    first, again, other = two_epochs(1), two_epochs(1), two_epochs(2)
    for mine, theirs in zip(first, again):
        np.testing.assert_array_equal(mine, theirs)
    assert not np.array_equal(first[0], first[1]) and not np.array_equal(first[0], other[0])
    plain = np.concatenate([x.numpy() for x, _ in batches(images, labels, batch_rows(12, 4))])  # validation: unchanged
    np.testing.assert_array_equal(plain, images.astype(np.float32))


@pytest.mark.slow
def test_two_phase_run_keeps_the_best_epoch_stops_early_per_phase_and_schedules_each_phase(make_cfg, client):
    # min_delta=100: only epoch 1 is a gain. Early stopping (patience 1) ends the head phase at
    # epoch 2 and the fine-tune phase at its first epoch, 3; the model kept is epoch 1's.
    run(make_cfg(*VGG, "freeze_depth=15", "fine_tune_lr=0.0005", "trainer.epochs=3", "trainer.fine_tune_epochs=2",
                 "trainer.early_stopping_patience=1", "trainer.min_delta=100", "trainer.lr_schedule=cosine",
                 "trainer.keep_checkpoints=true"))
    found = only_run(client)
    run_id = found.info.run_id
    assert [step for step, _ in history(client, run_id, "val_loss")] == [1, 2, 3]
    assert history(client, run_id, "stopped_epoch") == [(2, 2.0), (3, 3.0)]
    assert [v for _, v in history(client, run_id, "lr")] == pytest.approx([1e-3, 1e-3 * 0.5 * (1 + math.cos(math.pi / 3)), 5e-4])
    assert found.data.metrics["best_epoch"] == 1 and found.data.tags["selected_epoch"] == "1"
    assert {a.path for a in client.list_artifacts(run_id, "checkpoints")} == {"checkpoints/last.keras", "checkpoints/best.keras"}

    run_cfg = to_run_config(make_cfg(*VGG))
    images = datasets.load(run_cfg.dataset, run_cfg.seed, progress=False).test.images.astype(np.float32)
    best, last = (
        keras.saving.load_model(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"checkpoints/{name}")).predict(images, verbose=0)
        for name in ("best.keras", "last.keras")
    )
    assert not np.allclose(best, last, atol=1e-4)  # the fine-tune epoch changed the model
    logged = np.asarray(mlflow.pyfunc.load_model(f"runs:/{run_id}/model").predict(images))
    np.testing.assert_allclose(logged, best, atol=1e-5)


@pytest.mark.slow
def test_augmentation_trains_through_the_frozen_layers_and_class_weights_reach_fit(make_cfg, client, imbalanced_folder, monkeypatch, traces):
    weights: list[dict | None] = []
    seen: list[int] = []
    keras_fit = keras.Model.fit

    def spy_fit(model, *args, **kwargs):
        weights.append(kwargs.get("class_weight"))
        return keras_fit(model, *args, **kwargs)

    def spy_augment(images, seed, cfg):
        seen.append(len(images))
        return augment(images, seed, cfg)

    monkeypatch.setattr(keras.Model, "fit", spy_fit)
    monkeypatch.setattr(keras_trainer, "augment", spy_augment)
    run(make_cfg(*VGG, *imbalanced_folder, "augment=basic", "trainer.class_weights=balanced", tiny=False))
    found = only_run(client)
    assert found.info.status == "FINISHED"
    assert weights == [{0: pytest.approx(24 / 36), 1: pytest.approx(2.0)}]
    assert found.data.params["class_weights"] == "Negative=0.6667,Positive=2"
    assert found.data.params["phase1.cached_up_to"] == "none" and "augment is on" in found.data.params["frozen_features"]
    assert sum(seen) == 2 * 24  # each training image once per epoch; no validation or test image
    assert traces == ["vgg16_classifier"]  # the plain path with class weights: its step traced once (runner.train.keras_fit)
    assert 0 <= found.data.metrics["test_balanced_accuracy"] <= 1
