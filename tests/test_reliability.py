"""Interrupted runs end KILLED, checkpoints are never half-written, and resume continues exactly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch

from runner.app import run
from runner.errors import ConfigError
from runner.files import atomic_path
from conftest import TINY

pytestmark = pytest.mark.slow

LONG = ["trainer.epochs=40"]  # long enough to be interrupted after the first checkpoints


def runs_of(uri: str) -> list:
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("crack-classification")
    return client.search_runs([exp.experiment_id]) if exp else []


def start_and_interrupt(
    cli_env: dict, cmd: list[str], cwd: Path, artifacts: Path, sig: int, checkpoint: str = "last.pt"
) -> subprocess.CompletedProcess:
    """Start the runner, wait for its first logged checkpoint, then send ``sig`` (mid-training)."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not any(p.stat().st_size > 0 for p in artifacts.glob(f"*/artifacts/checkpoints/{checkpoint}")):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _cmd(store: dict, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "runner", *TINY, f"tracking.artifact_root={store['artifacts']}", *extra]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_run_is_killed_and_resumes_to_the_same_result(sig, store, data_cache, tmp_path, make_cfg, cli):
    env = {**os.environ, "MLFLOW_TRACKING_URI": store["uri"], "CRACK_RUNNER_DATA": str(data_cache)}
    result = start_and_interrupt(env, _cmd(store, LONG), tmp_path, Path(store["artifacts"]), sig)
    assert result.returncode == 130, result.stderr[-3000:]
    (killed,) = runs_of(store["uri"])
    assert killed.info.status == "KILLED"
    run_id = killed.info.run_id
    assert f"resume={run_id}" in result.stderr and "Traceback" not in result.stderr
    epochs_done = len(mlflow.MlflowClient(store["uri"]).get_metric_history(run_id, "val_loss"))
    assert 1 <= epochs_done < 40  # stopped mid-training, with what it logged so far

    resumed = cli(*LONG, f"resume={run_id}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (finished,) = runs_of(store["uri"])  # the same run, continued
    assert finished.info.run_id == run_id and finished.info.status == "FINISHED"
    steps = [m.step for m in mlflow.MlflowClient(store["uri"]).get_metric_history(run_id, "train_loss")]
    assert sorted(set(steps)) == list(range(1, 41))

    # The same config run without interruption, in another store: exactly the same metrics.
    reference_store = f"sqlite:///{tmp_path / 'reference.db'}"
    run(make_cfg(*LONG, f"tracking.uri={reference_store}", f"tracking.artifact_root={tmp_path / 'ref-artifacts'}"))
    (reference,) = runs_of(reference_store)
    for key in ("test_accuracy", "test_loss", "test_roc_auc", "val_loss", "train_loss"):
        assert finished.data.metrics[key] == reference.data.metrics[key], key


def test_interrupted_keras_run_ends_killed(store, data_cache, tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": store["uri"], "CRACK_RUNNER_DATA": str(data_cache)}
    keras_run = ["model=resnet50", "model.weights=null", "trainer.epochs=40"]
    result = start_and_interrupt(env, _cmd(store, keras_run), tmp_path, Path(store["artifacts"]), signal.SIGTERM, "last.keras")
    assert result.returncode == 130, result.stderr[-3000:]
    (killed,) = runs_of(store["uri"])
    assert killed.info.status == "KILLED" and "Traceback" not in result.stderr
    assert 1 <= len(mlflow.MlflowClient(store["uri"]).get_metric_history(killed.info.run_id, "val_loss")) < 40


def test_resume_refuses_a_finished_run_or_another_config(make_cfg, client):
    run(make_cfg())
    (done,) = runs_of(mlflow.get_tracking_uri())
    with pytest.raises(ConfigError, match="already FINISHED"):
        run(make_cfg(f"resume={done.info.run_id}"))
    client.set_terminated(done.info.run_id, "KILLED")
    with pytest.raises(ConfigError, match=r"optimizer.lr=0.1 \(now 0.5\)"):
        run(make_cfg(f"resume={done.info.run_id}", "optimizer.lr=0.5"))
    with pytest.raises(ConfigError, match="no such run"):
        run(make_cfg("resume=0123456789abcdef"))
    assert all(r.info.status != "RUNNING" for r in runs_of(mlflow.get_tracking_uri()))


def test_checkpoint_write_that_fails_keeps_the_previous_file(tmp_path):
    path = tmp_path / "last.pt"
    torch.save({"epoch": 1}, path)
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_bytes(b"half a checkp")
            raise RuntimeError("killed during the write")
    assert torch.load(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_checkpoint_survives_a_sigkill_during_the_write(tmp_path):
    path = tmp_path / "last.pt"
    torch.save({"epoch": 1}, path)
    writer = (
        "import sys, time, torch\n"
        "from runner.files import atomic_path\n"
        f"with atomic_path(__import__('pathlib').Path({str(path)!r})) as tmp:\n"
        "    with open(tmp, 'wb') as f:\n"
        "        f.write(b'x' * 1000); f.flush(); print('writing', flush=True); time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert torch.load(path)["epoch"] == 1  # the partial file was never taken for the checkpoint
