"""Many processes on one store and one folder at once: every run recorded, nothing shared by mistake."""

from __future__ import annotations

import signal
import sqlite3
import time
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest

import forked
import services
from conftest import runner_args

pytestmark = pytest.mark.slow


def start(store: dict, data_cache: Path, cwd: Path, *args: str) -> forked.Forked:
    """``python -m runner`` in the background, a process of its own, against the tmp store (flags such as -m first)."""
    return forked.start("runner", runner_args(store["artifacts"], *args), cwd, services.runner_env(store["uri"], data_cache))


def finish(procs: list[forked.Forked]) -> list[str]:
    """Wait for every process; assert each succeeded; return their stderr."""
    errs = []
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        errs.append(err)
    return errs


def all_runs(uri: str) -> list:
    client = mlflow.MlflowClient(uri)
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


@pytest.mark.long
def test_runs_started_together_on_a_new_store_and_one_folder_are_all_recorded_apart(store, data_cache, tmp_path, cli):
    assert cli("trainer.epochs=1").returncode == 0  # the data cache exists: the three start training together
    Path(store["uri"].removeprefix("sqlite:///")).unlink()
    Path(store["artifacts"]).rename(tmp_path / "old-artifacts")
    same_folder = f"hydra.run.dir={tmp_path / 'outputs' / 'same'}"  # as if all started in the same second
    finish([start(store, data_cache, tmp_path, same_folder, f"seed={seed}") for seed in (1, 2, 3)])

    runs = all_runs(store["uri"])
    assert sorted(r.data.params["seed"] for r in runs) == ["1", "2", "3"]
    assert all(r.info.status == "FINISHED" for r in runs)
    folders = {r.data.tags["output_dir"] for r in runs}
    assert len(folders) == 3  # each run its own folder for checkpoints
    for folder in folders:
        assert Path(folder).is_dir()
    with sqlite3.connect(store["uri"].removeprefix("sqlite:///")) as db:
        tables = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
    assert not [t for t in tables if t.startswith("_alembic_tmp")]


@pytest.mark.long
def test_sweeps_started_in_the_same_second_never_share_a_parent(store, data_cache, tmp_path):
    same_folder = f"hydra.sweep.dir={tmp_path / 'multirun' / 'same'}"
    finish([start(store, data_cache, tmp_path, "-m", same_folder, "optimizer.lr=0.1,0.01") for _ in range(2)])

    runs = all_runs(store["uri"])
    parents = [r for r in runs if r.data.tags.get("sweep_role") == "sweep_parent"]
    jobs = [r for r in runs if r not in parents]
    assert len(parents) == 2 and len(jobs) == 4
    assert len({p.data.tags["sweep_id"] for p in parents}) == 2
    for parent in parents:
        mine = [j for j in jobs if j.data.tags["mlflow.parentRunId"] == parent.info.run_id]
        assert len(mine) == 2 and {j.data.tags["sweep_id"] for j in mine} == {parent.data.tags["sweep_id"]}
        assert parent.info.status == "FINISHED" and parent.data.metrics["jobs"] == 2
    assert len({j.data.tags["output_dir"] for j in jobs}) == 4


@pytest.mark.parametrize(
    "damage, named",
    [
        ("CREATE TABLE _alembic_tmp_runs (run_uuid VARCHAR(32))", "_alembic_tmp_runs"),  # a crash in a migration
        ("UPDATE alembic_version SET version_num = '0a8213491aaa'", "another schema than this MLflow's (found version 0a8213491aaa"),  # an old store
    ],
)
def test_a_store_left_half_made_or_old_gets_the_fix_not_a_traceback(store, tmp_path, cli, damage, named):
    assert cli("trainer.epochs=1").returncode == 0
    with sqlite3.connect(store["uri"].removeprefix("sqlite:///")) as db:
        db.execute(damage)
    result = cli("trainer.epochs=1")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert named in result.stderr and "mlflow db upgrade" in result.stderr
    assert "data:" not in result.stderr  # found when the store opened, before the data loaded


def test_a_run_whose_process_was_killed_is_closed_by_the_next_run(store, data_cache, tmp_path, cli):
    proc = start(store, data_cache, tmp_path, "trainer.epochs=200")
    deadline = time.monotonic() + 300
    while not any(Path(store["artifacts"]).glob("*/artifacts/checkpoints/last.pt")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)  # no handler runs: the run stays RUNNING in the store
    proc.wait(timeout=30)
    (orphan,) = all_runs(store["uri"])
    assert orphan.info.status == "RUNNING"
    assert {"runner.host", "runner.pid", "runner.started"} <= set(orphan.data.tags)

    result = cli("trainer.epochs=1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert mlflow.MlflowClient(store["uri"]).get_run(orphan.info.run_id).info.status == "KILLED"
    assert f"resume={orphan.info.run_id}" in result.stderr


def test_a_dataset_registration_that_lost_a_race_links_the_winners(client, monkeypatch):
    import numpy as np

    from crack_runner.datasets import DataSplits, Split
    from runner.track import lineage

    real, calls = mlflow.log_inputs, []

    def racing(*args, **kwargs):  # the other run inserted the same dataset between MLflow's look and its insert
        calls.append(1)
        if len(calls) == 1:
            raise mlflow.exceptions.MlflowException(
                "(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id, datasets.name, datasets.digest")
        return real(*args, **kwargs)

    monkeypatch.setattr(mlflow, "log_inputs", racing)
    split = lambda n: Split(np.zeros((n, 32, 32, 3), np.uint8), np.zeros(n, np.int64), [])  # noqa: E731
    data = DataSplits(["Negative", "Positive"], split(6), split(2), split(2), "f" * 16, Path("/data"), [])
    cfg = SimpleNamespace(name="synthetic_cracks", path="/data")
    with mlflow.start_run() as run:
        lineage.log_data_inputs(cfg, data, seed=42)
    assert len(calls) == 2
    assert {d.dataset.name for d in client.get_run(run.info.run_id).inputs.dataset_inputs} == {
        "synthetic_cracks-train", "synthetic_cracks-val", "synthetic_cracks-test"}
