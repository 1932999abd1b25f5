"""ONNX and int8 exports: made when a linear run ends, equal to the native model, the int8 gate both ways, runtimes by name."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest
from PIL import Image

import services
from crack_runner import datasets
from runner.app import run
from runner.config.schema import to_run_config
from runner.deploy import onnx_export, runtime


def only_run(client: mlflow.MlflowClient):
    (found,) = client.search_runs(client.get_experiment_by_name("crack-classification").experiment_id)
    return found


def artifacts(client: mlflow.MlflowClient, run_id: str) -> set[str]:
    return {a.path for a in client.list_artifacts(run_id, "onnx")}


def test_a_linear_run_ends_with_onnx_files_that_match_it_and_predict_runs_them(make_cfg, client, store, tmp_path):
    cfg = make_cfg("export.onnx=null", "export.int8=true", "export.max_accuracy_drop=0.5")  # null: the linear model's default, yes
    run(cfg)
    found = only_run(client)
    assert found.info.status == "FINISHED"
    assert artifacts(client, found.info.run_id) == {"onnx/float32", "onnx/int8"}
    assert found.data.metrics["onnx_max_abs_diff"] <= onnx_export.TOLERANCE
    assert found.data.tags["onnx"].startswith("kept") and found.data.tags["onnx_int8"].startswith("kept")
    assert found.data.metrics["int8_accuracy_drop"] <= 0.5

    # Each runtime gives the native model's classes on the test images (int8 up to its measured accuracy drop).
    run_cfg = to_run_config(cfg)
    data = datasets.load(run_cfg.dataset, run_cfg.seed, progress=False)
    images = data.test.images.astype(np.float32)
    native = runtime.load(f"runs:/{found.info.run_id}/model", found.info.run_id, "native").predict(images)
    onnx = runtime.load(f"runs:/{found.info.run_id}/model", found.info.run_id, "onnx").predict(images)
    np.testing.assert_allclose(onnx, native, atol=onnx_export.TOLERANCE)
    assert runtime.load(f"runs:/{found.info.run_id}/model", found.info.run_id).name == "onnx-int8"  # the fastest it has
    # Each file is an MLflow model of the onnx flavor too: what `mlflow models serve -m runs:/<id>/onnx/int8` loads.
    served = mlflow.pyfunc.load_model(f"runs:/{found.info.run_id}/onnx/float32").predict({"pixels": images})
    np.testing.assert_allclose(np.asarray(served["probabilities"]), native, atol=onnx_export.TOLERANCE)

    folder = tmp_path / "one"
    folder.mkdir()
    Image.fromarray(data.test.images[0].astype(np.uint8)).save(folder / "a.png")
    env = services.runner_env(store["uri"])
    done = services.run_in_process([found.info.run_id, str(folder), "--runtime", "onnx", "--json"], tmp_path, env, "runner.predict")
    assert done.returncode == 0 and "predicting with the onnx runtime" in done.stderr, done.stderr[-2000:]


def test_the_int8_gate_refuses_a_file_that_loses_accuracy_and_says_why(make_cfg, client, monkeypatch):
    run(make_cfg())  # TINY: no export at the end
    found = only_run(client)
    assert not artifacts(client, found.info.run_id)
    real = onnx_export.predict_file

    def int8_gets_it_backwards(path: Path):
        predict = real(path)
        return (lambda x: predict(x)[:, ::-1]) if path.name == "model.int8.onnx" else predict

    monkeypatch.setattr(onnx_export, "predict_file", int8_gets_it_backwards)
    found_data = onnx_export.run_data(found.info.run_id)
    metrics = onnx_export.export_run(found.info.run_id, found_data.framework, found_data.data, onnx_export.ExportSettings(int8=True, max_accuracy_drop=0.0))
    again = client.get_run(found.info.run_id)
    assert artifacts(client, found.info.run_id) == {"onnx/float32"}  # float32 kept, int8 not
    assert metrics["int8_accuracy_drop"] > 0 and again.data.tags["onnx_int8"].startswith("refused: test accuracy")
    assert "export.max_accuracy_drop=0.0" in again.data.tags["onnx_int8"]


def test_an_export_that_does_not_match_keeps_nothing_and_a_failed_one_never_fails_the_run(make_cfg, client, monkeypatch, caplog):
    monkeypatch.setattr(onnx_export, "TOLERANCE", -1.0)  # no file can match: refused
    run(make_cfg("export.onnx=true"))
    found = only_run(client)
    assert found.info.status == "FINISHED" and not artifacts(client, found.info.run_id)
    assert found.data.tags["onnx"].startswith("refused") and "no ONNX file for run" in caplog.text
    with pytest.raises(onnx_export.ConfigError, match="nothing was kept"):
        onnx_export.export_run(found.info.run_id, "torch", onnx_export.run_data(found.info.run_id).data, onnx_export.ExportSettings())
