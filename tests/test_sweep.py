"""Sweeps: grouped under one MLflow parent, parallel and Ray launchers, Optuna, a real server, compare."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
import pytest
from omegaconf import OmegaConf

import services
from runner.report import runs as compared
from runner.track.job import _threads_per_job

pytestmark = pytest.mark.slow


def sweep_runs(uri: str, experiment: str = "crack-classification") -> tuple[list, list]:
    """(parent runs, job runs) of the store."""
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    parents = [r for r in runs if r.data.tags.get("sweep_role") == "sweep_parent"]
    return parents, [r for r in runs if r not in parents]


def compare_cli(cwd: Path, *args: str) -> str:
    """What ``python -m runner.compare *args`` prints (in this interpreter); it must succeed."""
    done = services.run_in_process(list(args), cwd, dict(os.environ), "runner.compare")
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def assert_grouped(uri: str, n_jobs: int, experiment: str = "crack-classification") -> list:
    """One FINISHED parent, n_jobs FINISHED complete jobs nested under it, none RUNNING."""
    (parent,), jobs = sweep_runs(uri, experiment)
    assert parent.info.status == "FINISHED"
    assert len(jobs) == n_jobs
    for job in jobs:
        assert job.info.status == "FINISHED"
        assert job.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert job.data.tags["sweep_id"] == parent.data.tags["sweep_id"]
        assert {"test_accuracy", "test_roc_auc", "val_accuracy"} <= set(job.data.metrics)
        assert job.data.tags.get("model_uri", "").startswith("models:/")
    best = max(j.data.metrics["val_accuracy"] for j in jobs)
    assert parent.data.metrics["best_val_accuracy"] == pytest.approx(best)
    assert parent.data.metrics["jobs"] == n_jobs
    return jobs


def test_multirun_of_three_learning_rates_is_one_group_and_compares(cli, store, tmp_path):
    result = cli("-m", "optimizer.lr=0.1,0.01,0.001")
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = assert_grouped(store["uri"], 3)
    assert sorted(j.data.params["optimizer.lr"] for j in jobs) == ["0.001", "0.01", "0.1"]
    assert {j.data.tags["sweep_job"] for j in jobs} == {"0", "1", "2"}
    assert all(j.info.run_name.startswith(f"optimizer.lr={j.data.params['optimizer.lr']} linear") for j in jobs)  # swept values first

    # The sweep ends with its answer: every job best first, the parent run, the compare command; logged on the parent.
    parent = jobs[0].data.tags["mlflow.parentRunId"]
    assert f"3 job(s), best val_accuracy first (MLflow parent run {parent})" in result.stdout
    summary = result.stdout[result.stdout.index("3 job(s), best"):]
    assert "python -m runner.compare" in summary
    best_first = sorted(jobs, key=lambda j: -j.data.metrics["selected_val_accuracy"])
    assert [summary.index(j.info.run_id[:8]) for j in best_first] == sorted(summary.index(j.info.run_id[:8]) for j in jobs)
    logged = {a.path for d in ("", "plots") for a in mlflow.MlflowClient(store["uri"]).list_artifacts(parent, d)}
    assert {"sweep_summary.md", "plots/sweep_curves.png"} <= logged

    runs, sweep = compared.load_runs(store["uri"], "crack-classification", None, latest_sweep=True)
    frame = compared.table(runs, "val_accuracy")
    assert sweep == jobs[0].data.tags["sweep_id"]
    assert list(frame.columns[:3]) == ["run_id", "status", "optimizer.lr"]
    assert "trainer.epochs" not in frame.columns  # only the swept keys
    assert frame["val_accuracy"].is_monotonic_decreasing and len(frame) == 3

    out = tmp_path / "sweep.md"
    shown = compare_cli(tmp_path, "--tracking-uri", store["uri"], "--format", "markdown", "--output", str(out))
    assert "| optimizer.lr" in shown and out.read_text().count("| FINISHED") == 3
    csv = compare_cli(tmp_path, "--tracking-uri", store["uri"], "--format", "csv", "--metric", "test_f1")
    lines = csv.splitlines()
    assert lines[0].startswith("run_id,status,optimizer.lr,test_f1,") and len(lines) == 4


@pytest.mark.parametrize("cores, n_jobs, threads", [(2, 2, 1), (8, 2, 4), (8, 4, 2), (8, -1, 1), (1, 4, 1), (8, None, 8)])
def test_parallel_jobs_share_the_cores(monkeypatch, cores, n_jobs, threads):
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    assert _threads_per_job(OmegaConf.create({"n_jobs": n_jobs})) == threads


@pytest.mark.long
def test_ray_launcher_runs_two_jobs(cli, store):
    # Ray's dashboard off: a local cluster starts it by default, in processes of its own that nothing here looks at.
    # One CPU: one worker process, which runs both jobs one after the other (a worker is seconds of imports; the
    # two-node cluster test in tests/test_multinode.py runs jobs side by side).
    result = cli("-m", "hydra/launcher=ray", "+hydra.launcher.ray.init.num_cpus=1", "+hydra.launcher.ray.init.include_dashboard=false",
                 "optimizer.lr=0.01,0.001", "trainer.num_threads=null",
                 process="forked")  # Ray's driver state outlives the command: not in the test's process
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = assert_grouped(store["uri"], 2)
    assert {j.data.params["trainer.num_threads"] for j in jobs} == {"1"}  # one core per Ray task


def test_optuna_search_logs_every_trial(cli, store):
    result = cli("-m", "+experiment=optuna_linear", "hydra.sweeper.n_trials=3", "trainer.epochs=1")
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = assert_grouped(store["uri"], 3)
    assert len({j.data.params["optimizer.lr"] for j in jobs}) == 3
    assert "Best value" in result.stderr + result.stdout


def test_run_logs_through_a_real_tracking_server(cli, mlflow_server, tmp_path):
    """A server with a database backend and an artifact store it proxies, as the README documents."""
    server = mlflow_server(
        "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination", str(tmp_path / "server-artifacts")
    )
    result = cli(f"tracking.uri={server}", "tracking.pictures=true")  # pictures: binary artifacts through the server
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"open {server}/#/experiments/1/runs?workflowType=machine_learning" in result.stdout  # the summary (stdout) links the training view
    client = mlflow.MlflowClient(server)
    (run,) = client.search_runs([client.get_experiment_by_name("crack-classification").experiment_id])
    assert run.info.status == "FINISHED" and "test_accuracy" in run.data.metrics
    logged = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config", "plots"} <= logged and "checkpoints" not in logged  # deleted through the server once FINISHED
    assert (tmp_path / "server-artifacts").is_dir()  # artifacts went through the server
    mlflow.set_tracking_uri(server)
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    assert model.metadata.get_input_schema().inputs[0].shape == (-1, 32, 32, 3)


def test_experiment_presets_compose(make_cfg):
    from runner.config.schema import to_run_config

    linear = to_run_config(make_cfg("+experiment=linear", tiny=False))
    assert linear.model.name == "linear" and linear.trainer.epochs == 5 and linear.tracking.experiment == "capstone-linear"
    features = to_run_config(make_cfg("+experiment=resnet50_feature_extraction", tiny=False))
    assert features.model.name == "resnet50" and features.freeze_depth is None and features.fine_tune_lr is None
    assert features.optimizer.name == "adam" and features.dataset.image_size == 224
    fine = to_run_config(make_cfg("+experiment=resnet50_fine_tune", tiny=False))
    assert fine.freeze_depth == 140 and fine.fine_tune_lr == 1e-5 and fine.trainer.fine_tune_epochs == 2
    assert to_run_config(make_cfg("+experiment=vgg16", tiny=False)).model.name == "vgg16"
    search = make_cfg("+experiment=optuna_resnet50", tiny=False, return_hydra=True)
    assert set(search.hydra.sweeper.params) == {"optimizer.lr", "trainer.batch_size", "freeze_depth"}


def test_compare_all_over_linear_and_keras_runs_shows_what_tells_them_apart_in_120_columns(make_cfg, store, tmp_path):
    # The params a linear and a ResNet50 run log (their whole configs, versions, sizes), the store spelled two ways.
    from runner.track.tracking import flatten

    client = mlflow.MlflowClient(store["uri"])
    experiment = client.create_experiment("crack-classification")
    logged = {
        "linear": {**flatten(make_cfg()), "framework": "torch", "torch_version": "2.13.0", "num_train": 22, "device": "cpu"},
        "resnet50": {**flatten(make_cfg("model=resnet50", "freeze_depth=140", "fine_tune_lr=1e-5")), "framework": "keras",
                     "tensorflow_version": "2.21.0", "keras_version": "3.15.1", "base_layers": 175, "phase1.name": "head",
                     "phase1.trainable_params": 262402, "phase2.name": "fine_tune", "num_train": 22, "device": "cpu"},
    }
    for number, (model, params) in enumerate(logged.items()):
        run = client.create_run(experiment, run_name=model)
        uri = store["uri"] if number else store["uri"].replace(str(tmp_path), os.path.relpath(tmp_path))  # relative in one run
        for key, value in {**params, "tracking.uri": uri}.items():
            client.log_param(run.info.run_id, key, str(value))
        for metric in ("val_accuracy", "test_accuracy", "test_balanced_accuracy", "test_f1", "test_roc_auc", "test_loss", "best_epoch"):
            client.log_metric(run.info.run_id, metric, 0.5 + number / 10)
        client.set_terminated(run.info.run_id)

    shown = compare_cli(tmp_path, "--tracking-uri", store["uri"], "--all")
    lines = shown.splitlines()
    assert max(map(len, lines)) <= 120, shown
    header = next(line for line in lines if line.startswith("run_id"))
    assert header.split()[:3] == ["run_id", "status", "model.name"]  # what tells them apart
    implied = shown[shown.index("also differing, as the columns above decide:"):]
    assert "freeze_depth" in implied and "fine_tune_lr" in implied and "optimizer.name" in implied  # what comes with the model
    for noise in ("tracking.uri", "framework_version", "tensorflow_version", "num_train", "phase1", "cache_dir", "device"):
        assert noise not in shown, noise
