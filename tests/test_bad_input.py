"""Every bad input gets one clear message (the key or file, and the fix), no framework traceback,
and leaves no MLflow run RUNNING. Each case runs the real command line in a subprocess."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow


def no_running_runs(uri: str) -> None:
    client = mlflow.MlflowClient(uri)
    for exp in client.search_experiments():
        assert all(r.info.status != "RUNNING" for r in client.search_runs([exp.experiment_id]))


def assert_clear_error(result, code: int, *fragments: str) -> None:
    err = result.stderr
    assert result.returncode == code, err[-3000:]
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in:\n{err[-3000:]}"
    assert "Traceback" not in err


def images(folder: Path, n: int, size: int = 24) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(folder)))
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
    return folder


@pytest.mark.parametrize(
    "args, code, fragments",
    [
        (["model=resnet5"], 1, ["Could not find 'model/resnet5'", "Available options in 'model'", "linear"]),
        (["optimizer.lrr=0.1"], 2, ["optimizer.lrr is not a key of this runner (did you mean optimizer.lr?)"]),
        (["optimizer.lr=fast"], 1, ["optimizer.lr", "Value 'fast' of type 'str' could not be converted to Float"]),
        (["trainer.epochs=0"], 2, ["trainer.epochs: must be > 0, got 0"]),
        (["trainer.epochs=-3"], 2, ["trainer.epochs: must be > 0, got -3"]),
        (["trainer.batch_size=0"], 2, ["trainer.batch_size: must be > 0"]),
        (["optimizer.lr=0"], 2, ["optimizer.lr: must be > 0"]),
        (["optimizer.lr=-0.1"], 2, ["optimizer.lr: must be > 0"]),
        (["dataset.image_size=4"], 2, ["dataset.image_size: must be >= 8 pixels"]),
        (["freeze_depth=140"], 2, ["freeze_depth: only applies to Keras"]),
        (["tracking.uri=http://127.0.0.1:9"], 2, ["tracking.uri=http://127.0.0.1:9 does not answer", "tracking.uri=sqlite:///mlflow.db"]),
        (["resume=feedc0ffee"], 2, ["resume=feedc0ffee: no such run"]),
        (["model=resnet50", "model.weights=null", "dataset.image_size=16"], 2,
         ["dataset.image_size: model=resnet50 needs at least 32 pixels, got 16"]),
        (["model=resnet50", "model.weights=null", "freeze_depth=500"], 2,
         ["freeze_depth: must be in 0..175", "has 175 layers"]),
        (["model=vgg16", "model.weights=/no/such/weights.h5"], 2, ["model.weights: no weights file at '/no/such/weights.h5'"]),
        (["model=resnet50", "model.weights=null", "resume=feedc0ffee"], 2, ["resume=feedc0ffee: no such run"]),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_bad_configuration(cli, store, args, code, fragments):
    assert_clear_error(cli(*args), code, *fragments)
    if Path(store["uri"].removeprefix("sqlite:///")).exists():
        no_running_runs(store["uri"])


def test_weights_file_that_does_not_match_the_model(cli, store, tmp_path):
    import keras

    wrong = tmp_path / "vgg16.weights.h5"
    keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3)).save_weights(wrong)
    result = cli("model=resnet50", f"model.weights={wrong}", "dataset.image_size=32")
    assert_clear_error(result, 2, "model.weights:", "does not hold weights of the resnet50 base")
    no_running_runs(store["uri"])


def folder_case(tmp_path: Path, name: str) -> Path:
    root = tmp_path / name
    if name == "empty":
        root.mkdir()
    elif name == "one_class":
        images(root / "Positive", 6)
    elif name == "not_images":
        for cls in ("Negative", "Positive"):
            (root / cls).mkdir(parents=True)
            (root / cls / "notes.txt").write_text("not an image")
            (root / cls / "table.csv").write_text("a,b")
    elif name == "too_few":
        images(root / "Negative", 1)
        images(root / "Positive", 1)
    return root


@pytest.mark.parametrize(
    "case, fragments",
    [
        ("missing", ["missing", "does not exist", "dataset.path"]),
        ("empty", ["has 0 class folder(s)", "at least 2"]),
        ("one_class", ["has 1 class folder(s) (Positive)", "at least 2"]),
        ("not_images", ["holds no image files", "Negative"]),
        ("too_few", ["needs at least", "dataset.val_fraction"]),
    ],
)
def test_bad_dataset(cli, store, tmp_path, case, fragments):
    result = cli("dataset=image_folder", f"dataset.path={folder_case(tmp_path, case)}", "dataset.image_size=16", "trainer.progress=false", tiny=False)
    assert_clear_error(result, 2, *fragments)
    no_running_runs(store["uri"])


def test_corrupt_and_truncated_jpegs_are_skipped_named_and_counted(cli, store, tmp_path):
    root = tmp_path / "cracks"
    images(root / "Negative", 12)
    images(root / "Positive", 12)
    (root / "Positive" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    whole = (root / "Negative" / "0.jpg").read_bytes()
    (root / "Negative" / "cut.jpg").write_bytes(whole[: len(whole) // 2])
    result = cli("dataset=image_folder", f"dataset.path={root}", "dataset.image_size=16", "trainer.epochs=1", "trainer.progress=false", tiny=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "broken.jpg" in result.stderr and "cut.jpg" in result.stderr and "skipped 2 unreadable image(s)" in result.stderr
    client = mlflow.MlflowClient(store["uri"])
    (run,) = client.search_runs([client.get_experiment_by_name("crack-classification").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["skipped_images"] == "2"
    assert run.data.params["num_train"] != "26"  # the two files are not in any split


def test_diverging_loss_ends_failed_with_a_clear_message(cli, store):
    result = cli("optimizer.lr=1e38")
    assert_clear_error(result, 2, "the training loss became", "lower optimizer.lr")
    client = mlflow.MlflowClient(store["uri"])
    (run,) = client.search_runs([client.get_experiment_by_name("crack-classification").experiment_id])
    assert run.info.status == "FAILED"
