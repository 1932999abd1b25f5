"""Liveness is a lease (runner.track.lease): a live run is never closed nor resumed by another process, a dead one is closable on any host."""

from __future__ import annotations

import shlex
import socket
import time

import mlflow
import pytest

from crack_runner.datasets import stopping
from runner import doctor
from runner.app import run
from runner.errors import ConfigError
from runner.track.lease import HEARTBEAT_TAG, LEASE_S_TAG, LEASE_TAG, Lease, close_dead_runs, liveness, resume_command


def planted_run(client: mlflow.MlflowClient, host: str, seen_ago: float, **tags: str) -> mlflow.entities.Run:
    """A RUNNING run as another process left it: its host, a pid that is not running here, its last heartbeat ``seen_ago`` s ago."""
    exp = client.get_experiment_by_name("crack-classification") or client.get_experiment(client.create_experiment("crack-classification"))
    base = {"runner.host": host, "runner.pid": "4242424@1:1", LEASE_TAG: "someone-else", LEASE_S_TAG: "60",
            HEARTBEAT_TAG: f"{time.time() - seen_ago:.1f}", "overrides": "trainer.epochs=3"}
    return client.create_run(exp.experiment_id, tags={**base, **tags})


def test_a_live_run_of_another_pid_namespace_on_this_host_is_neither_closed_nor_resumed(store, client, make_cfg, tmp_path, capsys):
    # Same host name, a pid that does not exist here (another container): host and pid would call it dead.
    live = planted_run(client, socket.gethostname(), seen_ago=5)
    assert liveness(client.get_run(live.info.run_id)).alive is True
    assert doctor.main(["--tracking-uri", store["uri"], "--cache-dir", str(tmp_path), "--fix", "--other-hosts", "--outputs"]) == 0
    assert client.get_run(live.info.run_id).info.status == "RUNNING"
    assert "0 stale run(s)" in capsys.readouterr().out
    with pytest.raises(ConfigError) as refused:
        run(make_cfg(f"resume={live.info.run_id}"))
    message = str(refused.value)
    assert "still alive" in message and socket.gethostname() in message and "4242424" in message and "s ago (lease 60 s: alive)" in message
    assert client.get_run(live.info.run_id).info.status == "RUNNING"


def test_a_run_whose_lease_expired_is_closed_on_any_host_and_older_than_applies_on_top(store, client, tmp_path, capsys):
    dead = planted_run(client, "another-machine", seen_ago=200)
    args = ["--tracking-uri", store["uri"], "--cache-dir", str(tmp_path), "--outputs"]
    assert doctor.main([*args, "--fix", "--older-than", "1h"]) == 0  # started just now: not silent for an hour
    assert client.get_run(dead.info.run_id).info.status == "RUNNING"
    assert doctor.main([*args, "--fix"]) == 0  # no --other-hosts needed: the lease tells
    assert client.get_run(dead.info.run_id).info.status == "KILLED"
    assert "on another-machine was last seen 3 min ago (lease 60 s: gone)" in capsys.readouterr().out


def test_a_process_whose_run_was_taken_over_stops_and_writes_nothing_more(store, client, monkeypatch):
    monkeypatch.setenv("CRACK_RUNNER_LEASE_S", "1")
    monkeypatch.setattr(stopping, "_requested", None)
    exp = client.create_experiment("leases")
    run_id = client.create_run(exp).info.run_id
    lease = Lease(store["uri"], None)
    for key, value in lease.tags().items():
        client.set_tag(run_id, key, value)
    lease.hold(run_id)
    try:
        time.sleep(0.6)
        beat = float(client.get_run(run_id).data.tags[HEARTBEAT_TAG])
        assert time.time() - beat < 1 and lease.lost is None and stopping.requested() is None
        client.set_tag(run_id, LEASE_TAG, "a-resuming-process")  # another process took the run over
        deadline = time.monotonic() + 10
        while lease.lost is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert lease.lost is not None and "taken over" in lease.lost and stopping.requested() == "lease lost"
    finally:
        lease.release(lambda: pytest.fail("a lease taken over does not write the run's end"))
        monkeypatch.setattr(stopping, "_requested", None)


def test_a_run_that_is_ending_is_never_closed_by_another_process_looking_for_dead_runs(cli, store, monkeypatch):
    """Another process opening the store closes the runs whose owner is gone. Looking just before a job's or
    the sweep's end status is written, it finds them all alive: the lease is given back only after that write
    (a joblib job once marked KILLED a run that the other worker had just FINISHED)."""
    closed: list[str] = []
    set_terminated = mlflow.MlflowClient.set_terminated

    def look_then_end(self, run_id, status=None, end_time=None):
        if status == "FINISHED":
            closed.extend(close_dead_runs(store["uri"], self.get_run(run_id).info.experiment_id))
        return set_terminated(self, run_id, status, end_time)

    monkeypatch.setattr(mlflow.MlflowClient, "set_terminated", look_then_end)
    result = cli("-m", "optimizer.lr=0.1,0.01", "trainer.epochs=1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert closed == [] and "marked KILLED" not in result.stderr
    client = mlflow.MlflowClient(store["uri"])
    runs = client.search_runs([client.get_experiment_by_name("crack-classification").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FINISHED"] * 3  # the parent and its two jobs


def test_the_printed_resume_command_reproduces_the_overrides_and_runs_nothing_else(client):
    overrides = ["tracking.run_name=$(touch /tmp/pwned)", 'tracking.run_name="lr 0.1, sgd"', "optimizer.lr=0.01"]
    planted = planted_run(client, "elsewhere", seen_ago=500, overrides=shlex.join(overrides))
    command = resume_command(client.get_run(planted.info.run_id))
    words = shlex.split(command)
    assert words == ["python", "-m", "runner", *overrides, f"resume={planted.info.run_id}"]
    assert "'tracking.run_name=$(touch /tmp/pwned)'" in command  # single-quoted: the shell expands nothing
