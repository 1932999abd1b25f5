"""Full disks and read-only folders under the store, the artifacts and the checkpoints: one clear message, exit 2.

The faults are real: small tmpfs mounts and read-only bind mounts, which need root (as CI has).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import mlflow
import pytest

import forked
import services
from conftest import runner_args

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs or a read-only folder needs root"),
]


@pytest.fixture
def mount(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """``mount(name, size='64k')``: a tmpfs of that size; ``mount(name, readonly=True)``: an empty read-only folder."""
    mounted: list[Path] = []

    def _mount(name: str, size: str = "1m", readonly: bool = False) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}{',ro' if readonly else ''}", "tmpfs", str(folder)], check=True)
        mounted.append(folder)
        return folder

    yield _mount
    for folder in reversed(mounted):
        subprocess.run(["umount", "-l", str(folder)], check=False)


def statuses(uri: str) -> list[str]:
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("crack-classification")
    return [r.info.status for r in client.search_runs([exp.experiment_id])] if exp else []


def assert_clear_failure(result: subprocess.CompletedProcess, folder: Path, *words: str) -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert str(folder) in result.stderr and all(w in result.stderr for w in words), result.stderr[-2000:]
    assert "epoch 2 " not in result.stderr  # found at once: at the start-up checks or the first write, not at the end


def test_read_only_store_folder_fails_at_once_naming_it(mount, cli):
    folder = mount("store", readonly=True)
    result = cli(f"tracking.uri=sqlite:///{folder / 'mlflow.db'}")
    assert_clear_failure(result, folder, "tracking.uri")
    assert "data:" not in result.stderr  # failed before the data was loaded


def test_read_only_artifact_folder_fails_at_once_naming_it(mount, cli, store):
    folder = mount("artifacts", readonly=True)
    result = cli(f"tracking.artifact_root={folder}")
    assert_clear_failure(result, folder, "tracking.artifact_root")
    assert statuses(store["uri"]) == []  # no run opened


def test_full_artifact_disk_ends_the_run_failed_with_the_folder_named(mount, cli, store):
    folder = mount("artifacts", size="160k")  # room for the start-up check, not for the run
    result = cli(f"tracking.artifact_root={folder}", "trainer.epochs=5")
    assert_clear_failure(result, folder, "Free space")
    assert statuses(store["uri"]) == ["FAILED"]
    assert not list(folder.rglob("*partial*"))


def test_full_checkpoint_disk_ends_the_run_failed_and_leaves_no_partial_file(mount, cli, store):
    folder = mount("outputs", size="160k")  # room for the 64 KiB start-up check, not for a ~200 kB checkpoint
    result = cli(f"hydra.run.dir={folder}", "trainer.epochs=5", "dataset.image_size=64")  # a checkpoint of ~200 kB
    assert_clear_failure(result, folder, "Free space")
    assert statuses(store["uri"]) == ["FAILED"]
    assert not list(folder.rglob("*partial*"))


def test_store_that_fills_mid_run_is_closed_by_the_next_run(mount, cli, store, data_cache, tmp_path):
    folder = mount("store", size="3m")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    env = services.runner_env(uri, data_cache)
    proc = forked.start("runner", runner_args(store["artifacts"], "trainer.epochs=300"), tmp_path, env)
    deadline = time.monotonic() + 300
    while not any(Path(store["artifacts"]).glob("*/artifacts/checkpoints/last.pt")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    filler = folder / "filler"
    subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=64k"], capture_output=True)  # until the disk is full
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "Traceback" not in err, err[-3000:]
    assert "tracking" in err
    filler.unlink()
    # Usually its end cannot be written either (the log says so) and the run stays RUNNING; at
    # times SQLite's rolled-back journal frees the pages the FAILED mark needs.
    unmarked = "could not be marked FAILED" in err
    assert statuses(uri) == (["RUNNING"] if unmarked else ["FAILED"]), err[-3000:]

    result = cli(f"tracking.uri={uri}", "trainer.epochs=1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(statuses(uri)) == sorted(["FINISHED", "KILLED" if unmarked else "FAILED"])  # the next run closed it (or it was FAILED)


@pytest.mark.parametrize("key", ["hydra.run.dir", "hydra.sweep.dir"])
def test_read_only_output_folder_is_one_message_not_hydras_traceback(mount, cli, key):
    folder = mount("outputs", readonly=True)
    result = cli(*(["-m"] if key == "hydra.sweep.dir" else []), f"{key}={folder / 'run'}")
    assert_clear_failure(result, folder, key)
