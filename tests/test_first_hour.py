"""A new user's first hour: missing extras named, logs a person can read, results on stdout."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY
from services import disk_bytes, runner_env


def run_hiding(module: str, args: list[str], store: dict, data_cache: Path, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m runner args`` in a process where ``module`` cannot be imported, as if its extra were not installed."""
    code = f"import runpy, sys; sys.modules[{module!r}] = None; runpy.run_module('runner', run_name='__main__', alter_sys=True)"
    env = runner_env(store["uri"], data_cache)
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_a_missing_framework_names_the_extra(store, data_cache, tmp_path):
    result = run_hiding("keras", [*TINY, "model=resnet50", "model.weights=null"], store, data_cache, tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "pip install -e '.[keras]'" in result.stderr and "Traceback" not in result.stderr


def test_a_missing_launcher_names_the_extra(store, data_cache, tmp_path):
    result = run_hiding("hydra_plugins.hydra_joblib_launcher", ["-m", "hydra/launcher=joblib", *TINY], store, data_cache, tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "pip install -e '.[sweep]'" in result.stderr and "Traceback" not in result.stderr


def test_help_shows_the_users_groups_and_the_keras_keys_not_the_schemas(cli):
    result = cli("--help", tiny=False)
    assert result.returncode == 0
    assert "model: linear, resnet50, vgg16" in result.stdout and "schema" not in result.stdout
    assert "freeze_depth" in result.stdout and "model.weights" in result.stdout and "fine_tune_lr" in result.stdout


@pytest.mark.slow
def test_every_line_of_a_sweep_job_says_which_job(cli):
    result = cli("-m", "optimizer.lr=0.1,0.01")
    assert result.returncode == 0, result.stderr[-3000:]
    epoch_lines = [line for line in result.stderr.splitlines() if re.search(r"epoch \d+ \[", line)]
    assert epoch_lines and all(re.search(r"\[job [01]\]", line) for line in epoch_lines)
    assert {re.search(r"\[job (\d)\]", line).group(1) for line in epoch_lines} == {"0", "1"}


@pytest.mark.slow
def test_a_default_run_takes_little_disk(cli, store, tmp_path):
    # The default model and image size (227 px, the linear model's 1.2 MB of weights); fewer images and epochs.
    result = cli("dataset.samples_per_class=20", "trainer.epochs=2", "trainer.progress=false", tiny=False)
    assert result.returncode == 0, result.stderr[-3000:]
    artifacts, outputs = Path(store["artifacts"]), tmp_path / "outputs"
    names = {path.name for path in artifacts.rglob("*") if path.is_file()}
    assert {"model.pt2", "misclassified.png"} <= names
    assert not names & {"input_example.json", "serving_input_example.json"}  # megabytes of pixels as JSON
    assert not names & {"last.pt", "best.pt"} and not list(outputs.rglob("*.pt"))  # a FINISHED run needs no resume
    assert disk_bytes(artifacts, outputs) < 8 * 2**20
