"""What a person looks at after a real tiny run: the plots and JSON it logged, and
``python -m runner.predict`` on its logged model agreeing with the trainer's own predictions."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import mlflow
import numpy as np
import pytest
from PIL import Image

import services
from crack_runner import datasets
from runner import predict
from runner.app import run
from runner.config.schema import to_run_config

# The plots of every run, with the least width and height a readable picture of each has.
PLOTS = {
    "plots/learning_curves.png": (800, 300),
    "plots/confusion_matrix.png": (400, 350),
    "plots/roc_curve.png": (400, 400),
    "plots/misclassified.png": (400, 200),
}


@pytest.fixture
def finished_run(make_cfg, client) -> mlflow.entities.Run:
    run(make_cfg("optimizer.lr=0.001"))
    (found,) = client.search_runs(client.get_experiment_by_name("crack-classification").experiment_id)
    return found


def artifact(run_id: str, path: str) -> Path:
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path))


def predict_cli(store: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """``python -m runner.predict`` (in this interpreter), against the test's store."""
    return services.run_in_process(list(args), cwd, services.runner_env(store["uri"]), "runner.predict")


def test_a_run_logs_readable_plots_and_json(make_cfg, client):
    run(make_cfg("optimizer.lr=0.001", "tracking.pictures=true"))
    (finished_run,) = client.search_runs(client.get_experiment_by_name("crack-classification").experiment_id)
    run_id, logged = finished_run.info.run_id, finished_run.data.metrics
    for name, (min_width, min_height) in PLOTS.items():
        with Image.open(artifact(run_id, name)) as image:
            image.verify()  # the whole file decodes
            assert image.format == "PNG", name
            width, height = image.size
        assert width >= min_width and height >= min_height, f"{name} is only {width}x{height}"
    metrics = json.loads(artifact(run_id, "metrics.json").read_text())
    assert metrics["classes"] == ["Negative", "Positive"]
    for key in ("test_accuracy", "test_roc_auc", "val_accuracy", "train_loss"):
        assert metrics[key] == pytest.approx(logged[key])
    records = json.loads(artifact(run_id, "test_predictions.json").read_text())
    assert len(records) == int(finished_run.data.params["num_test"])
    assert np.mean([r["true"] == r["predicted"] for r in records]) == pytest.approx(logged["test_accuracy"])
    assert all(0.5 <= r["probability"] <= 1.0 for r in records)  # the top class of two


def test_a_run_without_pictures_logs_the_numbers_behind_them(finished_run, client):
    logged = {a.path for a in client.list_artifacts(finished_run.info.run_id)}  # the tests' runs: tracking.pictures=false
    assert "plots" not in logged and {"curves.json", "metrics.json", "test_predictions.json", "config"} <= logged


def test_predict_on_a_folder_gives_the_trainers_classes(finished_run, make_cfg, store, tmp_path, capsys):
    run_id = finished_run.info.run_id
    records = json.loads(artifact(run_id, "test_predictions.json").read_text())
    root = datasets.resolve_root(to_run_config(make_cfg()).dataset)
    folder = tmp_path / "test images"  # a space, as user folders have
    for record in records:  # the test split, in its class folders
        (folder / record["file"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / record["file"], folder / record["file"])

    done = predict_cli(store, tmp_path, run_id, str(folder), "--json")
    assert done.returncode == 0, done.stderr
    predicted = {Path(p["file"]).relative_to(folder).as_posix(): p for p in json.loads(done.stdout)}
    assert predicted.keys() == {r["file"] for r in records}
    for record in records:
        assert predicted[record["file"]]["predicted"] == record["predicted"], record["file"]
        assert predicted[record["file"]]["probability"] == pytest.approx(record["probability"], abs=1e-4)

    first = folder / records[0]["file"]  # the default output: a table, here from a model URI
    assert predict.main([f"runs:/{run_id}/model", str(first), "--tracking-uri", store["uri"]]) == 0
    header, _, row = capsys.readouterr().out.splitlines()
    assert header.split() == ["file", "predicted", "probability"]
    assert row.split()[-2:] == [records[0]["predicted"], f"{records[0]['probability']:.4f}"]


def test_serving_input_is_what_the_served_model_takes(finished_run, make_cfg, store, capsys):
    run_id = finished_run.info.run_id
    records = json.loads(artifact(run_id, "test_predictions.json").read_text())[:2]
    root = datasets.resolve_root(to_run_config(make_cfg()).dataset)
    files = [str(root / r["file"]) for r in records]
    assert predict.main([run_id, *files, "--serving-input", "--tracking-uri", store["uri"]]) == 0
    inputs = np.asarray(json.loads(capsys.readouterr().out)["inputs"], dtype=np.float32)
    assert inputs.shape == (2, 32, 32, 3)
    probs = np.asarray(mlflow.pyfunc.load_model(f"runs:/{run_id}/model").predict(inputs))
    classes = finished_run.data.params["classes"].split(",")
    assert [classes[k] for k in probs.argmax(axis=1)] == [r["predicted"] for r in records]


def assert_clear_error(done: subprocess.CompletedProcess, message: str) -> None:
    """Exit status 2 and one message on stderr, no traceback, nothing on stdout."""
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""


def test_predict_rejects_a_text_file_named_jpg_and_a_missing_run(finished_run, store, tmp_path):
    notes = tmp_path / "notes.jpg"
    notes.write_text("not an image")
    done = predict_cli(store, tmp_path, finished_run.info.run_id, str(notes))
    assert_clear_error(done, f"cannot read 1 file(s) as images: {notes}")
    missing = "0123456789abcdef0123456789abcdef"
    assert_clear_error(predict_cli(store, tmp_path, missing, str(notes)), f"Run with id={missing} not found")


@pytest.mark.parametrize(
    ("name", "message"), [("no such folder", "does not exist"), ("notes.txt", "is not an image file")]
)
def test_predict_rejects_a_missing_path_or_a_non_image_file(name, message, store, tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    assert_clear_error(predict_cli(store, tmp_path, "any-run-id", str(tmp_path / name)), message)
