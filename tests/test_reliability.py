"""Interrupted runs end KILLED, checkpoints are never half-written, and resume continues exactly."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import pytest
import torch

import forked
import services
from conftest import runner_args
from runner.app import run
from runner.errors import ConfigError
from runner.track.files import atomic_path
from runner.train.epochs import Epochs

pytestmark = pytest.mark.slow

LONG = ["trainer.epochs=40"]  # long enough to be interrupted after the first checkpoints


def runs_of(uri: str) -> list:
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("crack-classification")
    return client.search_runs([exp.experiment_id]) if exp else []


def checkpoint_logged(artifacts: Path) -> Callable[[], bool]:
    """Whether a run in ``artifacts`` has logged its first checkpoint."""
    return lambda: any(p.stat().st_size > 0 for p in artifacts.glob("*/artifacts/checkpoints/last.pt"))


def start_and_interrupt(cli_env: dict, args: list[str], cwd: Path, ready: Callable[[], bool], sig: int) -> subprocess.CompletedProcess:
    """Start ``python -m runner *args``, wait until ``ready()`` (e.g. its first checkpoint), then send ``sig`` (mid-training)."""
    proc = forked.start("runner", args, cwd, cli_env)
    deadline = time.monotonic() + 600
    while not ready():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the run did not get there"
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.fixture
def signal_at(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """``signal_at(step, sig, nth=1)``: this process sends itself ``sig`` the ``nth`` time a run closes epoch ``step``.

    For a command run in this interpreter (the ``cli`` fixture), whose handlers are the runner's:
    the signal reaches the same handler as one from a terminal, at a known epoch instead of a
    moment a test waits for. A signal from another process is tested by the linear run below.
    """
    targets: list[list[int]] = []  # [step, signal, times left to see the step]
    end = Epochs.end

    def end_then_signal(self: Epochs, step: int, *args: Any, **kwargs: Any) -> bool:
        stop = end(self, step, *args, **kwargs)
        for target in [t for t in targets if t[0] == step]:
            target[2] -= 1
            if target[2] == 0:
                targets.remove(target)
                if signal.getsignal(target[1]) in (signal.SIG_DFL, signal.default_int_handler):  # not the runner's: it would end pytest
                    pytest.fail("signal_at is for commands run with the cli fixture, which install the runner's handlers")
                signal.raise_signal(target[1])
        return stop

    monkeypatch.setattr(Epochs, "end", end_then_signal)
    return lambda step, sig, nth=1: targets.append([step, sig, nth])


@pytest.mark.parametrize("sig", [signal.SIGINT], ids=["SIGINT"])  # SIGTERM: the Keras resume test (the same handler)
def test_interrupted_run_is_killed_and_resumes_to_the_same_result(sig, store, data_cache, tmp_path, uninterrupted, cli):
    env = services.runner_env(store["uri"], data_cache)
    result = start_and_interrupt(env, runner_args(store["artifacts"], *LONG), tmp_path, checkpoint_logged(Path(store["artifacts"])), sig)
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
    (reference,) = runs_of(uninterrupted(LONG))
    for key in ("test_accuracy", "test_loss", "test_roc_auc", "val_loss", "train_loss"):
        assert finished.data.metrics[key] == reference.data.metrics[key], key


# Two phases of two epochs: the head on the whole frozen base, then the base after layer 140.
KERAS = ["model=resnet50", "model.weights=null", "freeze_depth=140", "fine_tune_lr=0.001", "trainer.epochs=2", "trainer.fine_tune_epochs=2"]


def assert_killed(uri: str, result: subprocess.CompletedProcess, epochs: int) -> str:
    """The run stopped by ``result``'s signal is KILLED with epochs 1..``epochs`` logged, each once: its id."""
    assert result.returncode == 130, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    (killed,) = runs_of(uri)
    assert killed.info.status == "KILLED" and f"resume={killed.info.run_id}" in result.stderr
    steps = [m.step for m in mlflow.MlflowClient(uri).get_metric_history(killed.info.run_id, "val_loss")]
    assert sorted(steps) == list(range(1, epochs + 1))
    return killed.info.run_id


@pytest.fixture
def uninterrupted(make_cfg: Callable[..., Any], tmp_path: Path, empty_store: Path) -> Callable[[list[str]], str]:
    """``uninterrupted(overrides)``: run them once, uninterrupted, in a store of its own (a copy of the empty one); that store's URI."""

    def _run(overrides: list[str]) -> str:
        shutil.copyfile(empty_store, tmp_path / "reference.db")
        reference_store = f"sqlite:///{tmp_path / 'reference.db'}"
        run(make_cfg(*overrides, f"tracking.uri={reference_store}", f"tracking.artifact_root={tmp_path / 'ref-artifacts'}"))
        return reference_store

    return _run


def assert_same_run_as_uninterrupted(uri: str, run_id: str, reference_uri: str) -> None:
    """The resumed run ended FINISHED with each epoch once, and every metric (each epoch's, the test split's) bit for bit the reference's."""
    (finished,) = runs_of(uri)
    (reference,) = runs_of(reference_uri)
    assert finished.info.run_id == run_id and finished.info.status == "FINISHED"
    def results(metrics: dict[str, float]) -> dict[str, float]:
        return {k: v for k, v in metrics.items() if not k.startswith("system/")}  # the machine's load, not the run's results

    assert results(finished.data.metrics) == results(reference.data.metrics)
    for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
        history = [(m.step, m.value) for m in mlflow.MlflowClient(uri).get_metric_history(run_id, key)]
        expected = [(m.step, m.value) for m in mlflow.MlflowClient(reference_uri).get_metric_history(reference.info.run_id, key)]
        assert sorted(history) == sorted(expected) and [s for s, _ in sorted(history)] == [1, 2, 3, 4], key


@pytest.mark.long
def test_keras_run_interrupted_in_each_phase_resumes_to_the_uninterrupted_metrics(store, uninterrupted, cli, signal_at, monkeypatch):
    """On the stored frozen features (the default): SIGTERM in the head phase, resumed; SIGINT in the fine-tune phase, resumed again.
    The uninterrupted run, started last, reads every frozen output from the store the others filled (none computed again)."""
    from runner.train.frozen import store as feature_store

    computed: list[str] = []  # the frozen layers' passes over a split, by their progress label
    compute = feature_store.compute
    monkeypatch.setattr(feature_store, "compute", lambda *args: computed.append(args[4]) or compute(*args))
    signal_at(1, signal.SIGTERM)
    run_id = assert_killed(store["uri"], cli(*KERAS), epochs=1)
    signal_at(3, signal.SIGINT)
    result = cli(*KERAS, f"resume={run_id}")
    assert "resuming after epoch 1 (head phase)" in result.stderr
    assert assert_killed(store["uri"], result, epochs=3) == run_id
    resumed = cli(*KERAS, f"resume={run_id}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming after epoch 3 (fine_tune phase)" in resumed.stderr

    computed.clear()
    reference = uninterrupted(KERAS)
    assert computed == []
    assert_same_run_as_uninterrupted(store["uri"], run_id, reference)


VGG = ["model=vgg16", "model.weights=null", "freeze_depth=15", "fine_tune_lr=0.001", "trainer.epochs=2", "trainer.fine_tune_epochs=2"]


@pytest.mark.long
def test_keras_run_through_the_frozen_layers_resumes_in_the_fine_tune_phase(store, uninterrupted, cli, signal_at):
    """Without stored features (every epoch through the frozen layers), VGG16 for its short build: SIGTERM in the fine-tune
    phase, resumed; then stopped at once after its last epoch (a second SIGTERM), resumed to its test with that epoch's weights,
    the uninterrupted run's metrics bit for bit."""
    through = [*VGG, "trainer.cache_frozen_features=false", "trainer.select=last"]  # last: no best epoch read back to hide a lost one
    signal_at(3, signal.SIGTERM)
    run_id = assert_killed(store["uri"], cli(*through), epochs=3)
    signal_at(4, signal.SIGTERM)
    signal_at(4, signal.SIGTERM)  # the second one stops at once: the run ends KILLED with every epoch done
    result = cli(*through, f"resume={run_id}")
    assert "resuming after epoch 3 (fine_tune phase)" in result.stderr
    assert assert_killed(store["uri"], result, epochs=4) == run_id
    resumed = cli(*through, f"resume={run_id}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming after epoch 4, the last" in resumed.stderr

    # The reference reads its pixels memory-mapped (a Keras run's every epoch through them), the resumed run from memory: the same results.
    assert_same_run_as_uninterrupted(store["uri"], run_id, uninterrupted([*through, "dataset.in_memory_gb=0"]))


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
        "from runner.track.files import atomic_path\n"
        f"with atomic_path(__import__('pathlib').Path({str(path)!r})) as tmp:\n"
        "    with open(tmp, 'wb') as f:\n"
        "        f.write(b'x' * 1000); f.flush(); print('writing', flush=True); time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert torch.load(path)["epoch"] == 1  # the partial file was never taken for the checkpoint


def sweep_jobs(uri: str) -> tuple[mlflow.entities.Run, dict[str, mlflow.entities.Run]]:
    """(the sweep's parent run, its job runs by job number); one parent, one run per job."""
    runs = runs_of(uri)
    (parent,) = [r for r in runs if r.data.tags.get("sweep_role") == "sweep_parent"]
    jobs = [r for r in runs if r is not parent]
    assert all(j.data.tags["mlflow.parentRunId"] == parent.info.run_id for j in jobs)
    by_number = {j.data.tags["sweep_job"]: j for j in jobs}
    assert len(by_number) == len(jobs), "a job ran twice"
    return parent, by_number


SWEEPS = {  # three jobs, the first resumed by another launcher than the one that started it
    "basic": (["optimizer.lr=0.1,0.01,0.001"], []),
    "joblib": (["optimizer.lr=0.1,0.01,0.001"], ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]),
    "optuna": (["+experiment=optuna_linear", "hydra.sweeper.n_trials=3"], []),  # in-memory study, seeded sampler
}


@pytest.mark.parametrize("kind", [pytest.param(k, marks=pytest.mark.long) if k == "joblib" else k for k in SWEEPS])  # joblib: processes
def test_sweep_interrupted_in_its_second_job_resumes_each_job_once_under_the_same_parent(kind, store, cli, signal_at):
    """Each sweep signalled in this process, through the runner's own handler (a signal from another process: the linear run
    above); the joblib kind resumes in worker processes."""
    sweep, resume_with = SWEEPS[kind]
    epochs = 3
    long = [f"trainer.epochs={epochs}"]
    if kind == "joblib":
        long.append("trainer.num_threads=null")  # each job's share of the cores: all of them alone, half in one of two workers
    signal_at(1, signal.SIGTERM, nth=2)  # the second job's first epoch
    result = cli("-m", *sweep, *long)
    assert result.returncode == 130, result.stderr[-3000:]
    parent, jobs = sweep_jobs(store["uri"])
    assert parent.info.status == "KILLED" and f"resume={parent.info.run_id}" in result.stderr
    assert {n: j.info.status for n, j in jobs.items()} == {"0": "FINISHED", "1": "KILLED"}
    first, second = jobs["0"], jobs["1"]
    assert 1 <= len(mlflow.MlflowClient(store["uri"]).get_metric_history(second.info.run_id, "val_loss")) < epochs

    resumed = cli("-m", *sweep, *long, *resume_with, f"resume={parent.info.run_id}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again, jobs = sweep_jobs(store["uri"])
    assert again.info.run_id == parent.info.run_id and again.info.status == "FINISHED"
    assert {n: j.info.status for n, j in jobs.items()} == {"0": "FINISHED", "1": "FINISHED", "2": "FINISHED"}
    assert again.data.metrics["jobs"] == 3 and again.data.metrics["best_val_accuracy"] == max(j.data.metrics["val_accuracy"] for j in jobs.values())
    assert jobs["0"].info.end_time == first.info.end_time and "resumed_with" not in jobs["0"].data.tags  # untouched
    assert jobs["1"].info.run_id == second.info.run_id and "resumed_with" in jobs["1"].data.tags  # continued
    assert jobs["1"].data.params["optimizer.lr"] == second.data.params["optimizer.lr"]
    client = mlflow.MlflowClient(store["uri"])
    steps = [m.step for m in client.get_metric_history(second.info.run_id, "train_loss")]
    assert sorted(steps) == list(range(1, epochs + 1))  # each epoch once
    assert len(client.get_metric_history(jobs["2"].info.run_id, "val_loss")) == epochs
    assert not [n for n, j in jobs.items() if client.list_artifacts(j.info.run_id, "checkpoints")]  # FINISHED: only a resume needed them
    if kind == "joblib":  # the third job ran in one of the n_jobs=2 worker processes: half the cores
        assert jobs["2"].data.params["trainer.num_threads"] == str(max(1, (os.cpu_count() or 1) // 2))
