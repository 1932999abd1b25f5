"""Models and checkpoints from elsewhere load without running code from them (runner.track.safe_load).

A model folder someone hands you that would unpickle is refused by ``runner.predict`` unless the
user opts in; the runner's own logged model needs no pickle; a truncated or hostile checkpoint on
``resume=<run id>`` is one clear error and leaves the interrupted run KILLED.
"""

from __future__ import annotations

import io
import json
import pickle
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from PIL import Image

from conftest import CONF, TINY
from runner import predict
from runner.app import run
from runner.errors import ConfigError
from runner.track import safe_load

CLASSES = ["Negative", "Positive"]
SIGNATURE = {  # what runner.predict.describe wants: square RGB images in, one probability per class out
    "inputs": json.dumps([{"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": [-1, 32, 32, 3]}}]),
    "outputs": json.dumps([{"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": [-1, 2]}}]),
}


class Payload:
    """Unpickled, it creates ``marker``: what a hostile file would do with any code it likes."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def config(folder: Path, data_cache: Path, *overrides: str) -> DictConfig:
    """The tiny linear run's config, with its store and artifacts in ``folder``."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=[
            *TINY, f"tracking.uri=sqlite:///{folder / 'mlflow.db'}", f"tracking.artifact_root={folder / 'mlruns'}",
            f"dataset.cache_dir={data_cache}", *overrides,
        ])


@dataclass(frozen=True)
class Trained:
    """One tiny linear run, trained once for the module: its folder (store and artifacts) and its run."""

    folder: Path
    run_id: str

    @property
    def uri(self) -> str:
        return f"sqlite:///{self.folder / 'mlflow.db'}"

    def resume(self, data_cache: Path) -> DictConfig:
        return config(self.folder, data_cache, f"resume={self.run_id}")

    def checkpoint(self, name: str) -> Path:
        artifacts = mlflow.MlflowClient(self.uri).get_run(self.run_id).info.artifact_uri.removeprefix("file://")
        return Path(artifacts, "checkpoints", name)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, data_cache: Path) -> Trained:
    folder = tmp_path_factory.mktemp("untrusted")
    run(config(folder, data_cache, "trainer.keep_checkpoints=true"))  # the checkpoints a resume would read
    client = mlflow.MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    (found,) = client.search_runs([client.get_experiment_by_name("crack-classification").experiment_id])
    return Trained(folder, found.info.run_id)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "photo.png"
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(path)
    return path


def hostile_model(folder: Path, kind: str, marker: Path) -> Path:
    """A model folder that describes like the runner's own but loads by unpickling ``Payload(marker)``."""
    if kind == "pickled pytorch":
        pyfunc = {"loader_module": "mlflow.pytorch", "data": "data", "pickle_module_name": "pickle"}
        (folder / "data").mkdir(parents=True)
        (folder / "data" / "model.pth").write_bytes(pickle.dumps(Payload(marker)))
        (folder / "data" / "pickle_module_info.txt").write_text("pickle")
        flavors = {"python_function": pyfunc, "pytorch": {"model_data": "data", "pytorch_version": torch.__version__}}
    else:  # a python_model saved with cloudpickle
        folder.mkdir(parents=True)
        (folder / "python_model.pkl").write_bytes(pickle.dumps(Payload(marker)))
        flavors = {"python_function": {"loader_module": "mlflow.pyfunc.model", "python_model": "python_model.pkl"}}
    mlmodel = {"flavors": flavors, "metadata": {"classes": CLASSES}, "signature": SIGNATURE, "mlflow_version": mlflow.__version__}
    (folder / "MLmodel").write_text(json.dumps(mlmodel))  # JSON is YAML
    return folder


@pytest.mark.parametrize("kind, culprit", [("pickled pytorch", "data/model.pth"), ("cloudpickled python_model", "python_model.pkl")])
def test_predict_refuses_a_model_that_would_unpickle(kind, culprit, trained, image, tmp_path, caplog, monkeypatch):
    monkeypatch.delenv(safe_load.PICKLE_VARIABLE, raising=False)  # MLflow's default: unpickle
    marker = tmp_path / "payload-ran"
    folder = hostile_model(tmp_path / "handed-to-you", kind, marker)

    assert predict.main([str(folder), str(image), "--tracking-uri", trained.uri]) == 2

    assert not marker.exists()
    assert f"refusing to load the model {str(folder)!r}" in caplog.text and culprit in caplog.text
    assert "--allow-pickle" in caplog.text and "MLFLOW_ALLOW_PICKLE_DESERIALIZATION=true" in caplog.text


def test_allow_pickle_lets_a_trusted_model_load(trained, image, tmp_path, monkeypatch):
    """The opt-in reaches MLflow's loader: the payload runs (the file is no model, so loading then fails)."""
    monkeypatch.delenv(safe_load.PICKLE_VARIABLE, raising=False)
    marker = tmp_path / "payload-ran"
    folder = hostile_model(tmp_path / "trusted", "pickled pytorch", marker)
    with pytest.raises(RuntimeError, match="magic number"):  # torch, after unpickling what is no model
        predict.main([str(folder), str(image), "--tracking-uri", trained.uri, "--allow-pickle"])
    assert marker.exists()


def test_the_runners_own_model_predicts_with_pickle_refused(trained, image, monkeypatch, capsys):
    monkeypatch.setenv(safe_load.PICKLE_VARIABLE, "false")  # MLflow itself refuses pickle, and checks the .pt2 archive
    model = Path(mlflow.artifacts.download_artifacts(f"runs:/{trained.run_id}/model", tracking_uri=trained.uri))
    assert safe_load.pickle_reason(model) is None
    assert (model / "data" / "model.pt2").is_file() and not (model / "data" / "model.pth").exists()

    assert predict.main([trained.run_id, str(image), "--tracking-uri", trained.uri, "--json"]) == 0

    (prediction,) = json.loads(capsys.readouterr().out)
    assert prediction["predicted"] in CLASSES and 0.5 <= prediction["probability"] <= 1


@pytest.fixture
def killed(trained: Trained) -> Iterator[Trained]:
    """The trained run marked KILLED (as an interrupted one is), its checkpoints put back afterwards."""
    client = mlflow.MlflowClient(trained.uri)
    client.set_terminated(trained.run_id, "KILLED")
    saved = {name: trained.checkpoint(name).read_bytes() for name in ("last.pt", "best.pt")}
    yield trained
    for name, content in saved.items():
        replace(trained.checkpoint(name), content)


def replace(path: Path, content: bytes) -> None:
    """``path`` as a new file holding ``content``: the artifact is a hard link to the run folder's checkpoint."""
    path.unlink()
    path.write_bytes(content)


def torch_bytes(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("damage", ["truncated", "hostile"])
def test_resume_from_a_bad_checkpoint_is_one_message_and_the_run_stays_killed(damage, killed, data_cache, tmp_path):
    last = killed.checkpoint("last.pt")
    marker = tmp_path / "payload-ran"
    if damage == "truncated":
        replace(last, last.read_bytes()[: last.stat().st_size // 2])
    else:
        replace(last, torch_bytes({"epoch": 1, "model": Payload(marker)}))

    with pytest.raises(ConfigError) as refused:
        run(killed.resume(data_cache))

    said = str(refused.value)
    assert f"resume={killed.run_id}: the checkpoint checkpoints/last.pt of that run" in said
    assert "Resume from the best checkpoint" in said and "start anew" in said
    assert not marker.exists()
    assert mlflow.MlflowClient(killed.uri).get_run(killed.run_id).info.status == "KILLED"


def test_resume_with_a_bad_best_checkpoint_names_it(killed, data_cache):
    best = killed.checkpoint("best.pt")
    replace(best, best.read_bytes()[:100])

    with pytest.raises(ConfigError, match=r"checkpoints/best\.pt of that run .* Remove checkpoints/best\.pt"):
        run(killed.resume(data_cache))
    assert mlflow.MlflowClient(killed.uri).get_run(killed.run_id).info.status == "KILLED"


def test_a_keras_checkpoint_with_code_is_refused_in_safe_mode(tmp_path):
    keras_trainer = pytest.importorskip("runner.train.keras_trainer")
    import keras

    marker = tmp_path / "payload-ran"
    payload = keras.layers.Lambda(lambda x, marker=str(marker): (open(marker, "a").close(), x)[1])
    model = keras.Sequential([keras.Input((4,)), payload, keras.layers.Dense(2)])
    path = tmp_path / "last.keras"
    model.save(path)
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr(keras_trainer.RESUME_STATE, json.dumps({"epoch": 1, "phase": "train", "rng": []}))
    marker.unlink()  # building the model ran the lambda once

    with pytest.raises(safe_load.UnreadableCheckpoint, match="Lambda"):
        keras_trainer.read_checkpoint(path)
    assert not marker.exists()
