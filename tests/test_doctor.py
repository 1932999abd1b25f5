"""``python -m runner.doctor``: stale runs and leftovers reported, then closed and removed with --fix, nothing in use touched."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest

import forked
import services
from conftest import TINY, runner_args
from crack_runner.datasets import integrity
from crack_runner.datasets.decoded import MARKER, SOURCES
from runner import doctor
from runner.errors import ConfigError
from runner.track.lease import refuse_if_alive

HOUR_AGO = time.time() - 3600


def plant(path: Path, content: bytes = b"x" * 1000, old: bool = True) -> Path:
    """A file at ``path``, last written an hour ago unless ``old`` is false."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    if old:
        os.utime(path, (HOUR_AGO, HOUR_AGO))
    return path


def copy_with(folder: Path, name: str, file: str, body: dict) -> Path:
    """A copy of the decode-cache ``folder`` named ``name``, its ``file`` (marker or sources) rewritten as ``body``."""
    copy = folder.with_name(name)
    shutil.copytree(folder, copy)
    integrity.write_json(copy / file, body)
    return copy


@pytest.mark.slow
def test_doctor_reports_then_closes_a_killed_run_and_removes_only_unused_leftovers(store, tmp_path):
    cache = tmp_path / "cache"
    env = services.runner_env(store["uri"])
    proc = forked.start("runner", runner_args(store["artifacts"], "trainer.epochs=200", f"dataset.cache_dir={cache}"), tmp_path, env)
    deadline = time.monotonic() + 300
    while not any(Path(store["artifacts"]).glob("*/artifacts/checkpoints/last.pt")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    client = mlflow.MlflowClient(store["uri"])
    (live,) = client.search_runs([client.get_experiment_by_name("crack-classification").experiment_id])
    with pytest.raises(ConfigError, match="still alive: process .* holds its folder lock"):  # no second writer while it trains
        refuse_if_alive(live, "resume")
    proc.send_signal(signal.SIGKILL)  # no handler runs: RUNNING for ever, unless closed
    proc.wait(timeout=30)
    (orphan,) = client.search_runs([client.get_experiment_by_name("crack-classification").experiment_id])
    elsewhere = client.create_run(  # a run of an older runner (no lease) on another host, silent for 2 days: only --other-hosts closes it
        orphan.info.experiment_id, start_time=int((time.time() - 48 * 3600) * 1000), tags={"runner.host": "elsewhere", "runner.pid": "7@1"}
    )

    (decoded,) = [p for p in (cache / "decoded").iterdir() if p.is_dir()]  # the run's own decode cache: in use by no one, usable
    older = copy_with(decoded, "0123456789abcdef-32px", MARKER, {**integrity.read_json(decoded / MARKER), "format": 2})
    gone = copy_with(decoded, "fedcba9876543210-32px", SOURCES, {"root": str(tmp_path / "deleted"), "files": ["Positive/1.jpg"]})
    partial = plant(cache / "decoded" / "0000000000000000-32px.partial" / "pixels.npy").parent
    os.utime(partial, (HOUR_AGO, HOUR_AGO))
    database = Path(store["uri"].removeprefix("sqlite:///"))
    making = plant(database.with_name(f".{database.name}.making"))
    checkpoint = plant(tmp_path / "outputs" / "day" / "time" / "checkpoints" / ".last.partial.pt")
    recent = plant(tmp_path / "outputs" / "day" / "now" / "checkpoints" / ".last.partial.keras", old=False)  # may be a write in progress
    free_lock = plant(cache / "decoded" / "0123456789abcdef-32px.lock", b"")
    held_lock = plant(cache / "held.lock", b"")
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import filelock, time; lock = filelock.FileLock({str(held_lock)!r}); lock.acquire(); print('held', flush=True); time.sleep(300)"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        base = ["--tracking-uri", store["uri"], "--cache-dir", str(cache), "--outputs", str(tmp_path / "outputs")]
        report = services.run_in_process(base, tmp_path, env, "runner.doctor")
        assert report.returncode == 0, report.stderr[-3000:]
        out = report.stdout
        assert f"{orphan.info.run_id}  {orphan.info.run_name}: was left RUNNING: process" in out and "no longer holds its folder lock" in out
        assert f"resume={orphan.info.run_id}" in out
        assert elsewhere.info.run_id not in out
        for path in (older, gone, partial, making, checkpoint, free_lock):
            assert str(path) in out, path
        for path in (decoded, recent, held_lock):
            assert f"{path}:" not in out, path
        assert "older layout (format 2" in out and f"1 of its 1 image files are gone from {tmp_path / 'deleted'}" in out
        assert "nothing changed (dry run)" in out
        assert client.get_run(orphan.info.run_id).info.status == "RUNNING" and all(p.exists() for p in (older, partial, free_lock))

        fixed = services.run_in_process([*base, "--fix", "--other-hosts"], tmp_path, env, "runner.doctor")
        assert fixed.returncode == 0, fixed.stderr[-3000:]
        assert client.get_run(orphan.info.run_id).info.status == "KILLED"
        assert client.get_run(elsewhere.info.run_id).info.status == "KILLED"
        assert f"Continue it with: python -m runner {' '.join(TINY)}" in fixed.stderr and f"resume={orphan.info.run_id}" in fixed.stderr
        assert not any(p.exists() for p in (older, gone, partial, making, checkpoint, free_lock))
        assert all(p.exists() for p in (decoded, recent, held_lock))
        assert "0 stale run(s), 0 leftover(s)" in services.run_in_process(base, tmp_path, env, "runner.doctor").stdout
    finally:
        holder.kill()
        holder.wait()


def test_older_than_takes_seconds_minutes_hours_and_days():
    assert [doctor.parse_age(t) for t in ("90", "90s", "30m", "2h", "1.5d")] == [90, 90, 1800, 7200, 129600]
    with pytest.raises(Exception, match="is not an age"):
        doctor.parse_age("two hours")


@pytest.mark.slow
def test_frozen_features_of_other_versions_or_damaged_are_unusable(tmp_path):
    from runner.train.frozen.store import MADE_BY, made_by

    current, old = tmp_path / "current", tmp_path / "old"
    for folder, made in ((current, made_by()), (old, {**made_by(), "keras": "2.0.0"})):
        folder.mkdir()
        integrity.write_json(folder / MADE_BY, made)
    values = np.zeros((2, 3), np.float32)
    np.save(current / "good.npy", values)
    good = (current / "good.npy").rename(current / f"pixels-{integrity.file_checksum(current / 'good.npy')}.npy")
    damaged = plant(current / f"other-{integrity.file_checksum(good)}.npy", good.read_bytes()[:-4] + b"\1\1\1\1")
    found = dict(doctor.unusable_features(tmp_path))
    assert set(found) == {old, damaged}
    assert "'keras': '2.0.0'" in found[old] and found[damaged].startswith("damaged frozen features")
