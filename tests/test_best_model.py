"""Experiments that find the best model, on real tiny linear runs: best epoch, early stopping,
schedules, class weights, augmentation, cross-validation, the true test loss, defaults per model."""

from __future__ import annotations

import math

import mlflow
import numpy as np
import pytest
import torch

from crack_runner import datasets
from crack_runner.datasets.split import stratified_folds
from runner.app import run
from runner.config.schema import AugmentConfig, to_run_config
from runner.errors import ConfigError, TrainingError
from runner.report import runs as compared
from runner.train import torch_trainer
from runner.train.augment import augment
from runner.train.metrics import classification_metrics
from runner.train.schedules import Schedule, epoch_lr

BASIC = AugmentConfig("basic", True, True, True, 0.1, 0.2)


def runs(client: mlflow.MlflowClient, **tags: str) -> list:
    experiment = client.get_experiment_by_name("crack-classification").experiment_id
    query = " and ".join(f"tags.{k} = '{v}'" for k, v in tags.items())
    return client.search_runs(experiment, query, order_by=["attributes.start_time ASC"])


def history(client: mlflow.MlflowClient, run_id: str, key: str) -> list[float]:
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def load_data(make_cfg, *overrides: str) -> datasets.DataSplits:
    return to_run_config_data(make_cfg(*overrides))


def to_run_config_data(cfg) -> datasets.DataSplits:
    """The splits a run of ``cfg`` trains, validates and tests on."""
    run_cfg = to_run_config(cfg)
    return datasets.load(run_cfg.dataset, run_cfg.seed, progress=False)


def checkpoint_probs(run_id: str, name: str, data: datasets.DataSplits) -> np.ndarray:
    """The test probabilities of the linear model in a logged checkpoint."""
    state = torch.load(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"checkpoints/{name}"))
    mean, std = np.zeros(3, np.float32), np.ones(3, np.float32)  # buffers come from the state
    module = torch_trainer.LinearClassifier(data.image_shape, 2, mean, std)
    module.load_state_dict(state["model"])
    return torch_trainer.TorchModel(module, torch.device("cpu"), 8, torch.float32, []).predict_proba(data.test.images.astype(np.float32))


# --- the shared pieces, without training --------------------------------------------------------


@pytest.mark.parametrize(
    "schedule, rates",
    [
        (Schedule("none"), [0.4] * 4),
        (Schedule("cosine"), [0.4, 0.4 * 0.5 * (1 + math.cos(math.pi / 4)), 0.2, 0.4 * 0.5 * (1 + math.cos(3 * math.pi / 4))]),
        (Schedule("step", step_epochs=2, decay=0.5), [0.4, 0.4, 0.2, 0.2]),
        (Schedule("cosine", warmup_epochs=1), [0.2, 0.4, 0.4 * 0.5 * (1 + math.cos(math.pi / 3)), 0.4 * 0.5 * (1 + math.cos(2 * math.pi / 3))]),
        (Schedule("none", warmup_epochs=3), [0.1, 0.2, 0.3, 0.4]),
    ],
)
def test_each_schedule_gives_the_rate_of_each_epoch(schedule, rates):
    assert [epoch_lr(schedule, 0.4, epoch, 4) for epoch in range(1, 5)] == pytest.approx(rates)


def test_plateau_cuts_the_rate_per_cut_counted():
    assert [epoch_lr(Schedule("plateau", decay=0.1), 1.0, 5, 10, cuts) for cuts in (0, 1, 2)] == pytest.approx([1.0, 0.1, 0.01])


def test_test_loss_is_the_true_cross_entropy_not_capped_at_16():
    labels = np.array([0, 1])
    probs = np.array([[1.0, 0.0], [1.0 - 1e-30, 1e-30]])  # the second image confidently wrong: -log(1e-30) = 69.1
    loss = classification_metrics(labels, probs, ["Negative", "Positive"])["loss"]
    assert loss == pytest.approx(69.08 / 2, rel=1e-3)  # the old 1e-7 clipping gave 16.1 / 2
    assert classification_metrics(labels, probs.astype(np.float32), ["Negative", "Positive"])["loss"] == pytest.approx(loss, rel=1e-3)  # float32 holds 1e-30


def test_balanced_accuracy_is_the_mean_recall_of_the_classes():
    labels = np.array([0, 0, 0, 0, 1])
    probs = np.array([[0.9, 0.1]] * 5)  # always Negative: accuracy 0.8, balanced 0.5
    metrics = classification_metrics(labels, probs, ["Negative", "Positive"])
    assert metrics["accuracy"] == pytest.approx(0.8) and metrics["balanced_accuracy"] == pytest.approx(0.5)


def test_augmentation_is_the_same_for_the_same_seed_and_each_switch_alone_changes_only_its_part():
    images = np.random.default_rng(0).integers(0, 256, (16, 8, 8, 3), dtype=np.uint8)
    first, again, other = augment(images, 7, BASIC), augment(images, 7, BASIC), augment(images, 8, BASIC)
    assert first.dtype == np.float32 and first.shape == images.shape and 0 <= first.min() and first.max() <= 255
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    np.testing.assert_array_equal(augment(images, 7, AugmentConfig("none", False, False, False, 0.0, 0.0)), images.astype(np.float32))  # all off: unchanged
    flips = augment(images, 7, AugmentConfig("flips", hflip=True, vflip=False, rot90=False, brightness=0.0, contrast=0.0))
    changed = [i for i in range(16) if not np.array_equal(flips[i], images[i])]
    assert 0 < len(changed) < 16
    for i in changed:
        np.testing.assert_array_equal(flips[i], images[i, :, ::-1])


def test_folds_are_disjoint_stratified_and_cover_train_and_val(make_cfg):
    data = load_data(make_cfg)
    pool = sorted(map(str, data.train.paths + data.val.paths))
    folds = list(datasets.folds(data, 3, seed=42))
    assert len(folds) == 3
    vals = [sorted(map(str, fold.val.paths)) for fold in folds]
    assert sorted(path for val in vals for path in val) == pool  # every train+val image is validated on exactly once
    for fold, val in zip(folds, vals):
        assert not set(val) & set(map(str, fold.train.paths))
        assert sorted(map(str, fold.train.paths + fold.val.paths)) == pool
        assert fold.test.paths == data.test.paths  # the test split is held out, the same in every fold
        counts = np.bincount(fold.val.labels, minlength=2)
        assert abs(counts[0] - counts[1]) <= 1  # stratified: both classes in every fold, in proportion
    with pytest.raises(datasets.DataError, match="dataset.folds=40"):
        stratified_folds(np.array([0] * 30 + [1] * 30), 40, 0)


# --- defaults per model ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, optimizer, lr",
    [
        ([], "sgd", 0.1),
        (["model=resnet50"], "adam", 0.001),
        (["model=vgg16"], "adam", 0.001),
        (["model=resnet50", "optimizer=sgd"], "sgd", 0.1),  # the command line wins over the model's choice
        (["model=vgg16", "optimizer.lr=0.01"], "adam", 0.01),
        (["+experiment=resnet50_fine_tune"], "adam", 0.001),
    ],
)
def test_each_model_brings_its_optimizer_and_the_command_line_overrides_it(make_cfg, overrides, optimizer, lr):
    run_cfg = to_run_config(make_cfg(*overrides))
    assert (run_cfg.optimizer.name, run_cfg.optimizer.lr) == (optimizer, lr)


@pytest.mark.parametrize(
    "override, key",
    [
        ("trainer.monitor=train_loss", "trainer.monitor"),
        ("trainer.select=first", "trainer.select"),
        ("trainer.early_stopping_patience=0", "trainer.early_stopping_patience"),
        ("trainer.lr_schedule=linear", "trainer.lr_schedule"),
        ("trainer.warmup_epochs=2", "trainer.warmup_epochs"),  # TINY trains 2 epochs
        ("trainer.class_weights=inverse", "trainer.class_weights"),
        ("dataset.folds=1", "dataset.folds"),
        ("augment.brightness=1.5", "augment.brightness"),
    ],
)
def test_out_of_range_keys_name_the_key_and_the_fix(make_cfg, override, key):
    with pytest.raises(ConfigError, match=f"^{key}: must be"):
        to_run_config(make_cfg(override))


# --- real runs --------------------------------------------------------------------------------------


def test_the_logged_model_and_test_metrics_are_the_best_epochs(make_cfg, client):
    # min_delta=10: no epoch after the first counts as a gain, so epoch 1 is the best of 3.
    run(make_cfg("trainer.epochs=3", "trainer.min_delta=10", "trainer.keep_checkpoints=true"))
    (found,) = runs(client)
    run_id, data = found.info.run_id, load_data(make_cfg)
    assert found.data.metrics["best_epoch"] == 1 and found.data.tags["selected_epoch"] == "1"
    names = {a.path for a in client.list_artifacts(run_id, "checkpoints")}
    assert names == {"checkpoints/last.pt", "checkpoints/best.pt"}
    best, last = checkpoint_probs(run_id, "best.pt", data), checkpoint_probs(run_id, "last.pt", data)
    assert not np.allclose(best, last)
    logged = np.asarray(mlflow.pyfunc.load_model(f"runs:/{run_id}/model").predict(data.test.images.astype(np.float32)))
    np.testing.assert_allclose(logged, best, atol=1e-5)
    assert found.data.metrics["test_accuracy"] == pytest.approx((best.argmax(1) == data.test.labels).mean())
    assert found.data.metrics["selected_val_loss"] == history(client, run_id, "val_loss")[0]  # what sweeps and compare rank
    assert found.data.metrics["test_loss"] == pytest.approx(-np.log(best[np.arange(len(best)), data.test.labels]).mean(), rel=1e-5)


def test_select_last_keeps_the_last_epoch(make_cfg, client):
    run(make_cfg("trainer.epochs=3", "trainer.min_delta=10", "trainer.select=last", "trainer.keep_checkpoints=true"))
    (found,) = runs(client)
    data = load_data(make_cfg)
    logged = np.asarray(mlflow.pyfunc.load_model(f"runs:/{found.info.run_id}/model").predict(data.test.images.astype(np.float32)))
    np.testing.assert_allclose(logged, checkpoint_probs(found.info.run_id, "last.pt", data), atol=1e-5)
    assert found.data.metrics["best_epoch"] == 1 and found.data.tags["selected_epoch"] == "3"


def test_early_stopping_ends_a_run_whose_val_loss_stops_improving(make_cfg, client):
    run(make_cfg("trainer.epochs=10", "trainer.early_stopping_patience=2", "trainer.min_delta=10"))
    (found,) = runs(client)
    assert found.info.status == "FINISHED"
    assert len(history(client, found.info.run_id, "val_loss")) == 3  # the best (1), then 2 epochs without a gain
    assert found.data.metrics["stopped_epoch"] == 3 and found.data.metrics["best_epoch"] == 1


def test_early_stopping_waits_while_val_loss_improves(make_cfg, client):
    run(make_cfg("trainer.epochs=4", "trainer.early_stopping_patience=1", "optimizer.lr=0.01"))  # a small rate: it keeps improving
    (found,) = runs(client)
    losses = history(client, found.info.run_id, "val_loss")
    assert losses == sorted(losses, reverse=True) and len(losses) == 4 and "stopped_epoch" not in found.data.metrics


@pytest.mark.parametrize(
    "overrides, rates",
    [
        (["trainer.lr_schedule=step", "trainer.lr_step_epochs=2", "trainer.lr_decay=0.5"], [0.1, 0.1, 0.05, 0.05]),
        (["trainer.lr_schedule=cosine", "trainer.warmup_epochs=1"], [0.05, 0.1, 0.075, 0.025]),
        (["trainer.lr_schedule=plateau", "trainer.lr_plateau_patience=1", "trainer.min_delta=10"], [0.1, 0.1, 0.01, 0.001]),
    ],
)
def test_a_schedule_sets_and_logs_the_rate_of_each_epoch(make_cfg, client, monkeypatch, overrides, rates):
    used: list[float] = []
    train = torch_trainer.train_one_epoch

    def spy(model, loader, optimizer, *args):
        used.append(optimizer.param_groups[0]["lr"])
        return train(model, loader, optimizer, *args)

    monkeypatch.setattr(torch_trainer, "train_one_epoch", spy)
    run(make_cfg("trainer.epochs=4", "optimizer.lr=0.1", *overrides))
    (found,) = runs(client)
    assert history(client, found.info.run_id, "lr") == pytest.approx(rates)
    assert used == pytest.approx(rates)  # what the optimizer trained each epoch at


def test_balanced_class_weights_on_an_imbalanced_folder(make_cfg, client, imbalanced_folder):
    folder = imbalanced_folder
    run(make_cfg(*folder, "trainer.class_weights=balanced", tiny=False))
    run(make_cfg(*folder, tiny=False))
    weighted, plain = runs(client)
    counts = np.bincount(to_run_config_data(make_cfg(*folder, tiny=False)).train.labels)
    assert counts.tolist() == [18, 6]
    assert weighted.data.params["class_weights"] == "Negative=0.6667,Positive=2"  # 24 / (2 x 18), 24 / (2 x 6)
    assert "class_weights" not in plain.data.params
    assert history(client, weighted.info.run_id, "train_loss") != history(client, plain.info.run_id, "train_loss")
    for found in (weighted, plain):
        assert 0 <= found.data.metrics["test_balanced_accuracy"] <= 1


def test_augmentation_changes_training_batches_only_and_repeats_with_the_seed(make_cfg, client, monkeypatch):
    seen: list[int] = []

    def spy(images, seed, cfg):
        seen.append(len(images))
        return augment(images, seed, cfg)

    monkeypatch.setattr(torch_trainer, "augment", spy)
    data = load_data(make_cfg)
    run(make_cfg("augment=basic", "objective=val_loss"))
    assert sum(seen) == 2 * len(data.train)  # every training image in each of the 2 epochs, no val or test image
    again = run(make_cfg("augment=basic", "objective=val_loss"))
    other_seed = run(make_cfg("augment=basic", "objective=val_loss", "seed=7"))
    plain = run(make_cfg("objective=val_loss"))
    first, second, _, _ = runs(client)
    assert history(client, first.info.run_id, "train_loss") == history(client, second.info.run_id, "train_loss")
    assert first.data.metrics["selected_val_loss"] == again and plain != again and other_seed != again
    assert first.data.params["augment.rot90"] == "True"


def test_cross_validation_is_one_parent_with_mean_and_std_and_compare_shows_it(make_cfg, client, store):
    objective = run(make_cfg("dataset.folds=3"))
    (parent,) = runs(client, cv_role="parent")
    folds = runs(client, cv_role="fold")
    assert [f.data.tags["cv_fold"] for f in folds] == ["1", "2", "3"]
    assert all(f.data.tags["mlflow.parentRunId"] == parent.info.run_id and f.info.status == "FINISHED" for f in folds)
    for key in ("val_accuracy", "test_accuracy", "test_loss"):
        values = [f.data.metrics[key] for f in folds]
        assert parent.data.metrics[key] == pytest.approx(np.mean(values))
        assert parent.data.metrics[f"{key}_std"] == pytest.approx(np.std(values))
    assert objective == pytest.approx(parent.data.metrics["val_accuracy"])
    assert sum(int(f.data.params["num_val"]) for f in folds) == int(folds[0].data.params["num_train"]) + int(folds[0].data.params["num_val"])

    frame, _ = compared.load_runs(store["uri"], "crack-classification", None, latest_sweep=False)
    table = compared.table(frame, "val_accuracy")
    assert len(table) == 1 and table["folds"][0] == "3"  # the folds are the parent's row
    shown = compared.render(table, "table")
    assert f"{parent.data.metrics['val_accuracy']:.4f} ± {parent.data.metrics['val_accuracy_std']:.4f}" in shown


def test_a_loss_that_explodes_is_tagged_diverged_and_the_best_epoch_kept(make_cfg, client):
    run(make_cfg("trainer.epochs=4", "optimizer.lr=3000"))  # the capstone's rate scale: the loss explodes
    (found,) = runs(client)
    assert found.info.status == "FINISHED" and "over 10x its lowest" in found.data.tags["diverged"]
    losses = history(client, found.info.run_id, "val_loss")
    assert found.data.metrics["best_epoch"] == 1 + int(np.argmin(losses))


def test_a_nan_loss_stops_the_run_tagged_diverged(make_cfg, client):
    with pytest.raises(TrainingError):
        run(make_cfg("optimizer.lr=1e38"))
    (found,) = runs(client)
    assert found.info.status == "FAILED" and "the training loss became" in found.data.tags["diverged"]
