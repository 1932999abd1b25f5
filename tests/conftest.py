"""Shared fixtures: real Hydra composition, a real MLflow store and a small real data set in tmp."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import mlflow
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from runner.config import register_schemas

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
# Pictures and screenshots the tests make for a person to look at (git-ignored).
ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS") or Path(__file__).parent / "artifacts")

register_schemas()

# A few dozen small synthetic images: fast, yet a real generator, decoder, split and model.
TINY = [
    "dataset.samples_per_class=16",
    "dataset.source_size=64",
    "dataset.image_size=32",
    "trainer.epochs=2",
    "trainer.batch_size=8",
    "trainer.progress=false",
]


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data cache for the session, so the synthetic set is generated once."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture
def store(tmp_path: Path) -> dict[str, str]:
    """A fresh sqlite MLflow store with artifacts in tmp."""
    return {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "artifacts": str(tmp_path / "mlruns")}


@pytest.fixture
def make_cfg(store: dict[str, str], data_cache: Path) -> Callable[..., DictConfig]:
    """Compose the real conf/ with overrides, pointed at the tmp store and data cache."""

    def _make(*overrides: str, tiny: bool = True, return_hydra: bool = False) -> DictConfig:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose(
                "config",
                return_hydra_config=return_hydra,
                overrides=[
                    *(TINY if tiny else []),
                    f"tracking.uri={store['uri']}",
                    f"tracking.artifact_root={store['artifacts']}",
                    f"dataset.cache_dir={data_cache}",
                    *overrides,
                ],
            )

    return _make


@pytest.fixture
def client(store: dict[str, str]) -> mlflow.MlflowClient:
    mlflow.set_tracking_uri(store["uri"])
    return mlflow.MlflowClient(store["uri"])


@pytest.fixture
def cli(store: dict[str, str], data_cache: Path, tmp_path: Path) -> Callable[..., subprocess.CompletedProcess]:
    """Run ``python -m runner`` in a subprocess, in tmp, against the tmp store."""

    def _run(*args: str, tiny: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
        env = {**os.environ, "MLFLOW_TRACKING_URI": store["uri"], "CRACK_RUNNER_DATA": str(data_cache)}
        flags = [a for a in args if a.startswith("-")]  # Hydra wants -m and --help before the overrides
        overrides = [a for a in args if not a.startswith("-")]
        cmd = [sys.executable, "-m", "runner", *flags, *(TINY if tiny else []), f"tracking.artifact_root={store['artifacts']}", *overrides]
        return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)

    return _run


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[Callable[..., str]]:
    """Start real ``mlflow server`` processes on 127.0.0.1 (a free port each); returns their URL.

    Arguments are the store options, e.g. ``--backend-store-uri sqlite:///... --artifacts-destination DIR``.
    Each server runs in its own process group, stopped with its workers whatever happens.
    """
    servers: list[subprocess.Popen] = []

    def start(*store_args: str, timeout: float = 90) -> str:
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        log = tmp_path / f"mlflow-server-{port}.log"
        command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1", *store_args]
        env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
        with open(log, "w") as out:
            servers.append(subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True))
        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy
        deadline = time.monotonic() + timeout
        while True:
            if servers[-1].poll() is not None:
                pytest.fail(f"mlflow server exited with status {servers[-1].returncode}:\n{log.read_text()[-3000:]}")
            try:
                with direct.open(f"{url}/health", timeout=2) as answer:
                    if answer.status == 200:
                        return url
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"mlflow server did not answer at {url} within {timeout:.0f} s:\n{log.read_text()[-3000:]}")
                time.sleep(0.5)

    yield start
    for server in servers:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
