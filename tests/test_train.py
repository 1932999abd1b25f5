"""A real short training run of the linear classifier, tracked in a real MLflow store."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest
import yaml
from PIL import Image

from crack_runner import datasets
from runner.app import run
from runner.config.schema import to_run_config
from runner.errors import TrainingError


@pytest.fixture
def finished_run(make_cfg, client):
    objective = run(make_cfg("optimizer.lr=0.001", "trainer.keep_checkpoints=true", "tracking.pictures=true"))
    (found,) = client.search_runs(client.get_experiment_by_name("crack-classification").experiment_id)
    return found, objective


def test_run_logs_params_metrics_and_tags(finished_run, client):
    found, objective = finished_run
    assert found.info.status == "FINISHED"
    params = found.data.params
    assert params["optimizer.lr"] == "0.001" and params["model.name"] == "linear"
    assert params["dataset.image_size"] == "32" and params["trainer.epochs"] == "2"
    assert params["framework"] == "torch" and params["torch_version"].startswith("2.")
    assert params["classes"] == "Negative,Positive"
    tags = found.data.tags
    assert len(tags["dataset_fingerprint"]) == 16 and tags["git_commit"]
    for key in ("test_accuracy", "test_precision", "test_recall", "test_f1", "test_roc_auc", "val_accuracy"):
        assert 0.0 <= found.data.metrics[key] <= 1.0
    assert objective == found.data.metrics["val_accuracy"]
    for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
        history = client.get_metric_history(found.info.run_id, key)
        assert [m.step for m in history] == [1, 2]


def test_run_logs_config_checkpoint_and_plots(finished_run, client, make_cfg):
    found, _ = finished_run
    run_id = found.info.run_id
    names = {a.path for d in ("config", "checkpoints", "plots") for a in client.list_artifacts(run_id, d)}
    assert {"config/config.yaml", "config/overrides.yaml", "checkpoints/last.pt",
            "plots/learning_curves.png", "plots/confusion_matrix.png"} <= names
    config = yaml.safe_load(open(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="config/config.yaml")))
    assert config["optimizer"]["lr"] == 0.001
    png = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="plots/confusion_matrix.png")
    assert Image.open(png).size[0] > 100
    metrics = json.load(open(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="metrics.json")))
    assert metrics["test_accuracy"] == pytest.approx(found.data.metrics["test_accuracy"])

    import torch

    state = torch.load(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="checkpoints/last.pt"))
    assert state["epoch"] == 2 and "linear.weight" in state["model"]


def test_logged_model_loads_and_predicts_like_the_trainer(finished_run, make_cfg):
    found, _ = finished_run
    model = mlflow.pyfunc.load_model(f"runs:/{found.info.run_id}/model")
    run_cfg = to_run_config(make_cfg())
    data = datasets.load(run_cfg.dataset, run_cfg.seed, progress=False)
    probs = model.predict(data.test.images.astype(np.float32))
    probs = np.asarray(probs)
    assert probs.shape == (len(data.test), 2)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    accuracy = (probs.argmax(1) == data.test.labels).mean()
    assert accuracy == pytest.approx(found.data.metrics["test_accuracy"])


def test_same_seed_same_metrics_with_pixels_in_memory_or_memory_mapped(make_cfg, client):
    assert run(make_cfg("seed=5", "objective=val_loss")) == run(make_cfg("seed=5", "objective=val_loss", "dataset.in_memory_gb=0"))


def test_diverging_training_ends_failed_with_a_clear_error(make_cfg, client):
    with pytest.raises(TrainingError, match="lower optimizer.lr"):
        run(make_cfg("optimizer.lr=1e38"))
    (found,) = client.search_runs(client.get_experiment_by_name("crack-classification").experiment_id)
    assert found.info.status == "FAILED"
    assert found.data.params["optimizer.lr"] == "1e+38"  # what was logged before the error stays


def test_bf16_mixed_precision_trains_like_float32_up_to_rounding(make_cfg, client):
    import torch

    from runner.train import torch_trainer

    run_cfg = to_run_config(make_cfg("trainer.precision=bf16-mixed"))
    data = datasets.load(run_cfg.dataset, run_cfg.seed, progress=False)
    batch, _ = next(iter(torch_trainer.Batches(data.train, 8, torch.device("cpu"), torch.bfloat16)))
    assert batch.dtype == torch.bfloat16  # half the bytes, and exact: bfloat16 holds every integer 0..255
    np.testing.assert_array_equal(batch.float().numpy(), data.train.images[:8])

    run(make_cfg("optimizer.lr=0.001"))
    run(make_cfg("optimizer.lr=0.001", "trainer.precision=bf16-mixed"))
    experiment = client.get_experiment_by_name("crack-classification").experiment_id
    full, mixed = client.search_runs(experiment, order_by=["attributes.start_time ASC"])
    assert mixed.data.params["trainer.precision"] == "bf16-mixed" and full.data.params["trainer.precision"] == "32"
    for key in ("train_loss", "val_loss"):
        ours = [m.value for m in client.get_metric_history(mixed.info.run_id, key)]
        theirs = [m.value for m in client.get_metric_history(full.info.run_id, key)]
        assert ours != theirs  # it did compute in bfloat16
        np.testing.assert_allclose(ours, theirs, rtol=0.1)  # measured: within 3%


def test_a_cuda_gpu_is_used_when_present(make_cfg, client):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this machine: the linear model trains on the CPU (param device=cpu)")
    run(make_cfg())
    (found,) = client.search_runs(client.get_experiment_by_name("crack-classification").experiment_id)
    assert found.info.status == "FINISHED" and found.data.params["device"] == "cuda"
