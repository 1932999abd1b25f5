"""What MLflow records natively for each run, on a real store: the data splits as dataset inputs,
system metrics, the experiment's kind, and the best run's model registered with the alias ``champion``
(loaded by ``runner.predict`` and served by ``mlflow models serve`` through ``models:/NAME@champion``)."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
from PIL import Image

import forked
from conftest import ARTIFACTS
from crack_runner import datasets
from runner import compare, predict
from runner.app import run
from runner.config.schema import to_run_config
from runner.deploy import runtime
from runner.track import lineage
from runner.track.store import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, experiment_id, open_store
from services import free_port, runner_env

SPLITS = {"train": "train", "val": "validation", "test": "test"}  # split -> MLflow context
SYSTEM = ("system/cpu_utilization_percentage", "system/system_memory_usage_megabytes", "system/disk_usage_percentage")


def runs_by_start(client: mlflow.MlflowClient) -> list[mlflow.entities.Run]:
    experiment = client.get_experiment_by_name("crack-classification")
    return sorted(client.search_runs([experiment.experiment_id]), key=lambda r: r.info.start_time)


def test_runs_log_their_splits_as_shared_datasets_and_system_metrics(make_cfg, client):
    # An interval far longer than the run: the run still gets its sample (at its end) and does not wait for one.
    run(make_cfg("optimizer.lr=0.01", "tracking.system_metrics=true", "tracking.system_metrics_interval=600"))
    run(make_cfg("optimizer.lr=0.001", "tracking.system_metrics=false"))
    first, second = runs_by_start(client)
    root = datasets.resolve_root(to_run_config(make_cfg()).dataset)

    fingerprint = first.data.tags["dataset_fingerprint"]
    inputs = {i.dataset.name: i for i in first.inputs.dataset_inputs}
    assert set(inputs) == {f"synthetic_cracks-{split}" for split in SPLITS}
    for split, context in SPLITS.items():
        logged = inputs[f"synthetic_cracks-{split}"]
        tags = {tag.key: tag.value for tag in logged.tags}
        assert logged.dataset.digest == fingerprint
        assert json.loads(logged.dataset.source) == {"uri": str(root)}
        assert logged.dataset.source_type == "local"
        assert tags["mlflow.data.context"] == context
        assert tags["images"] == first.data.params[f"num_{split}"]
        schema = {column["name"]: column["tensor-spec"] for column in json.loads(logged.dataset.schema)["mlflow_colspec"]}
        assert schema["image"] == {"dtype": "uint8", "shape": [-1, 32, 32, 3]}  # what the trainers receive, not the pixels
    # The other run saw the same data: the same datasets (name and digest), which the UI groups runs by.
    assert {(i.dataset.name, i.dataset.digest) for i in second.inputs.dataset_inputs} == {
        (name, fingerprint) for name in inputs
    }

    for key in SYSTEM:
        assert len(client.get_metric_history(first.info.run_id, key)) >= 1, key
    assert first.info.end_time - first.info.start_time < 60_000  # ms: the 600 s interval was not waited for
    assert not [key for key in second.data.metrics if key.startswith("system/")]  # tracking.system_metrics=false

    assert client.get_experiment(first.info.experiment_id).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND


@pytest.mark.parametrize(
    ("overrides", "source_type", "source"),
    [
        (["dataset=concrete_cracks"], "http", None),  # None: its dataset.url
        (["dataset=concrete_cracks", "dataset.path=/data/cracks.zip"], "local", {"uri": "/data/cracks.zip"}),
        (["dataset=image_folder", "dataset.path=/data/cracks"], "local", {"uri": "/data/cracks"}),
    ],
)
def test_a_dataset_source_is_the_url_or_the_path_it_came_from(make_cfg, overrides, source_type, source):
    cfg = to_run_config(make_cfg(*overrides, tiny=False)).dataset
    split = datasets.Split(np.zeros((2, 8, 8, 3), np.uint8), np.array([0, 1]), [Path("a.jpg"), Path("b.jpg")])
    data = datasets.DataSplits(["Negative", "Positive"], split, split, split, "0123456789abcdef", Path("/cache/x"), [])
    logged = lineage.split_dataset(cfg, data, "val")
    assert (logged.name, logged.digest, logged.source._get_source_type()) == (f"{cfg.name}-val", "0123456789abcdef", source_type)
    assert json.loads(logged.source.to_json()) == (source or {"url": cfg.url})


def test_experiments_are_tagged_for_model_training_unless_a_kind_was_chosen(store):
    uri = store["uri"]
    new = open_store(uri, "new", store["artifacts"])
    client = mlflow.MlflowClient(uri)
    older = client.create_experiment("made by an older runner")
    agents = client.create_experiment("agents", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    for name in ("made by an older runner", "agents"):
        experiment_id(uri, name, store["artifacts"])
    kinds = {exp: client.get_experiment(exp).tags.get(EXPERIMENT_KIND_TAG) for exp in (new, older, agents)}
    assert kinds == {new: EXPERIMENT_KIND, older: EXPERIMENT_KIND, agents: "genai_development"}


def serve(model_uri: str, tracking_uri: str, cwd: Path, timeout: float = 180) -> tuple[forked.Forked, str]:
    """``mlflow models serve -m MODEL_URI`` on a free loopback port, in a session of its own (forked with MLflow imported,
    tests/forked.py; its scoring server a fresh interpreter); returns the process and its URL once it answers."""
    port = free_port()
    args = ["models", "serve", "-m", model_uri, "-p", str(port), "--env-manager", "local"]
    env = {**runner_env(tracking_uri), "MLFLOW_DISABLE_TELEMETRY": "true"}
    server = forked.start("mlflow", args, cwd, env, stdout=cwd / "serve.log", stderr=cwd / "serve.log")
    url = f"http://127.0.0.1:{port}"
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + timeout
    while True:
        if server.poll() is not None:
            pytest.fail(f"mlflow models serve exited with {server.returncode}:\n{(cwd / 'serve.log').read_text()[-3000:]}")
        try:
            with direct.open(f"{url}/ping", timeout=2):
                return server, url
        except OSError:
            if time.monotonic() > deadline:
                os.killpg(server.pid, signal.SIGKILL)
                pytest.fail(f"mlflow models serve did not answer within {timeout:.0f} s")
            time.sleep(0.5)


@pytest.mark.slow
def test_the_best_run_becomes_the_champion_that_predict_and_serve_load(client, store, tmp_path, make_cfg, capsys):
    # Runs selected with --all (the latest sweep's are selected the same way: tests/test_sweep.py, runner.compare.load_runs).
    for lr in ("0.1", "0.0001"):
        run(make_cfg(f"optimizer.lr={lr}", "trainer.epochs=1"))
    curves = ARTIFACTS / "mlflow_native" / "runs_curves.png"
    assert compare.main(["--tracking-uri", store["uri"], "--all", "--register", "cracks", "--curves", str(curves)]) == 0
    out = capsys.readouterr().out
    assert "champion: models:/cracks@champion = cracks version 1" in out
    with Image.open(curves) as picture:
        assert picture.size[0] >= 1000 and picture.size[1] >= 1000

    jobs = runs_by_start(client)
    champion = client.get_model_version_by_alias("cracks", "champion")
    best = max(r.data.metrics["val_accuracy"] for r in jobs)
    source = client.get_run(champion.run_id)
    assert source.info.run_id in {r.info.run_id for r in jobs}
    assert source.data.metrics["val_accuracy"] == best
    assert champion.tags["source_run"] == source.info.run_id

    # predict through the alias gives the champion run's own test predictions
    records = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=source.info.run_id, artifact_path="test_predictions.json")).read_text())
    root = datasets.resolve_root(to_run_config(make_cfg()).dataset)
    files = [str(root / r["file"]) for r in records]
    assert set(runtime.exports(source.info.run_id)) == {"onnx", "onnx-int8"}  # the champion goes to the field: exported as it was registered
    assert predict.main(["models:/cracks@champion", *files, "--json", "--runtime", "native", "--tracking-uri", store["uri"]]) == 0
    predicted = json.loads(capsys.readouterr().out)
    assert [p["predicted"] for p in predicted] == [r["predicted"] for r in records]
    assert [p["probability"] for p in predicted] == pytest.approx([r["probability"] for r in records], abs=1e-4)

    # and so does the model server
    assert predict.main([source.info.run_id, *files[:2], "--serving-input", "--tracking-uri", store["uri"]]) == 0
    body = capsys.readouterr().out.encode()
    server, url = serve("models:/cracks@champion", store["uri"], tmp_path)
    try:
        request = urllib.request.Request(f"{url}/invocations", body, {"Content-Type": "application/json"})
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=60) as answer:
            served = json.loads(answer.read())["predictions"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    assert [max(p) for p in served] == pytest.approx([r["probability"] for r in records[:2]], abs=1e-4)

    # a later registration is a new version, and the alias moves to it
    assert compare.main(["--tracking-uri", store["uri"], "--all", "--register", "cracks"]) == 0
    assert int(client.get_model_version_by_alias("cracks", "champion").version) == 2
    print(f"picture: {curves}")
