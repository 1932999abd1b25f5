"""The route beyond one machine, with real processes: PostgreSQL, an MLflow server with basic auth
that proxies the artifacts, and a Ray cluster of a head and a worker node running a sweep.

One PostgreSQL cluster and one server serve the module (they take about half a minute to start).
Skipped, with the reason, where PostgreSQL or Ray cannot start (``apt-get install postgresql``).
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import mlflow
import optuna
import pytest
from test_sweep import assert_grouped

import services
from runner.track.store import RAY_NODE_TAG

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[services.AuthServer]:
    folder = tmp_path_factory.mktemp("server")
    try:
        db = services.start_postgres(folder)
    except services.Unavailable as why:
        pytest.skip(str(why))
    auth_server = services.start_auth_server(db, folder)
    yield auth_server
    auth_server.stop()


@pytest.fixture
def as_runner(server: services.AuthServer, monkeypatch: pytest.MonkeyPatch) -> mlflow.MlflowClient:
    """This process's MLflow client, logged in as the jobs' user."""
    for key, value in server.credentials().items():
        monkeypatch.setenv(key, value)
    mlflow.set_tracking_uri(server.url)
    return mlflow.MlflowClient(server.url)


def command_lines() -> list[str]:
    """The command line of every process on the machine, as any user sees them in ``ps``."""
    lines = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            lines.append(cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:  # the process ended meanwhile
            continue
    return lines


def run_module(server: services.AuthServer, cwd: Path, module: str, *args: str, password: str | None = None) -> subprocess.CompletedProcess:
    """``python -m <module> <args> --tracking-uri <server>`` as the jobs' user (with ``password``: a wrong one), in this interpreter."""
    return services.run_in_process([*args, "--tracking-uri", server.url], cwd, {**os.environ, **server.credentials(password)}, module)


@pytest.mark.long  # beside the cluster test: one server for both (a module fixture)
def test_server_refuses_clients_without_valid_credentials(cli, server, tmp_path):
    for env, who in (({}, "without credentials"), (server.credentials("wrong"), "'runner'")):
        for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            env.setdefault(key, "")  # none inherited from the test's own environment
        result = cli(f"tracking.uri={server.url}", env=env)
        assert result.returncode == 2, result.stderr[-3000:]
        (message,) = [line for line in result.stderr.splitlines() if "refused" in line]
        assert who in message and "(HTTP 401)" in message and "MLFLOW_TRACKING_PASSWORD" in message
        assert "Traceback" not in result.stderr
    shown = run_module(server, tmp_path, "runner.compare", password="wrong")
    assert shown.returncode == 2 and "refused the user 'runner'" in shown.stderr
    secrets = [server.admin_password, server.runner_password, server.db.pgpass.read_text().strip().rsplit(":", 1)[1]]
    assert not [line for line in command_lines() if any(secret in line for secret in secrets)]


@pytest.mark.long
def test_pruned_search_with_free_running_workers_on_a_two_node_ray_cluster(cli, server, as_runner, tmp_path, caplog, monkeypatch):
    """An Optuna search whose study is on the PostgreSQL server, two workers: each trial on a node of its own (one CPU each),
    its data cached on that node, its run and model on the server; compared and used for predictions by run id through the server."""
    node_data = [tmp_path / "head-data", tmp_path / "worker-data"]
    database = {"PGPASSFILE": str(server.db.pgpass)}  # the study's database: the password never on a command line
    try:
        cluster = services.start_ray_cluster([{"CRACK_RUNNER_DATA": str(d), **server.credentials(), **database} for d in node_data])
    except services.Unavailable as why:
        pytest.skip(str(why))
    try:
        result = cli("-m", "hydra/launcher=ray_cluster", f"hydra.launcher.ray.init.address={cluster.address}",
                     f"tracking.uri={server.url}", "tracking.experiment=cluster", "+experiment=optuna_linear", "hydra.sweeper.n_trials=2",
                     "sweep.workers=2", "sweep.pruner=median", f"sweep.storage={server.db.uri('optuna')}",
                     "tracking.pictures=true",  # binary artifacts through the server
                     env={**cluster.env, **server.credentials(), **database, "CRACK_RUNNER_DATA": str(tmp_path / "driver-data")},
                     process="forked")  # Ray's driver state outlives the command: not in the test's process
    finally:
        cluster.stop()
    assert result.returncode == 0, result.stderr[-5000:]
    jobs = assert_grouped(server.url, 2, experiment="cluster")  # parent and jobs FINISHED, params and metrics
    parent = as_runner.get_run(jobs[0].data.tags["mlflow.parentRunId"])
    monkeypatch.setenv("PGPASSFILE", str(server.db.pgpass))
    trials = optuna.load_study(study_name=f"linear-search-{parent.info.run_id}", storage=server.db.uri("optuna")).trials
    assert sorted(t.state.name for t in trials) == ["COMPLETE", "COMPLETE"]  # too few to prune, each reported to the server
    assert all(len(t.intermediate_values) == 2 for t in trials)
    assert len({job.data.tags[RAY_NODE_TAG] for job in jobs}) == 2
    assert {job.data.params["dataset.cache_dir"] for job in jobs} == {str(d) for d in node_data}
    assert all(any(d.rglob("*.jpg")) for d in node_data) and not (tmp_path / "driver-data").exists()
    assert not (tmp_path / "mlflow-artifacts:").exists()  # the server's artifact URI is no folder of ours

    caplog.set_level(logging.DEBUG, logger="mlflow.store.artifact")  # why a download failed, if one does
    for job in jobs:  # uploaded through the server, downloaded through it
        assert job.info.artifact_uri.startswith("mlflow-artifacts:")
        assert {"config", "plots"} <= {a.path for a in as_runner.list_artifacts(job.info.run_id)}
        assert "optimizer:" in mlflow.artifacts.load_text(f"runs:/{job.info.run_id}/config/config.yaml")
        model = mlflow.pyfunc.load_model(f"runs:/{job.info.run_id}/model")
        assert model.metadata.get_input_schema().inputs[0].shape == (-1, 32, 32, 3)

    shown = run_module(server, tmp_path, "runner.compare", "--experiment", "cluster")
    assert shown.returncode == 0 and shown.stdout.count("FINISHED") == 2, shown.stderr[-3000:]
    images = sorted(str(p) for p in node_data[0].rglob("*.jpg"))[:3]
    predicted = run_module(server, tmp_path, "runner.predict", jobs[0].info.run_id, *images)
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    assert sum(line.split()[0] in images for line in predicted.stdout.splitlines() if line.strip()) == 3
