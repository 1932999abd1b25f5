"""Shared fixtures: real Hydra composition, a real MLflow store and a small real data set in tmp."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import mlflow
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

import forked
import services
from runner.config.schema import register_schemas

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
    # One thread a run: pytest-xdist already runs a worker per core, where a run's second thread only competes
    # with the other worker's run for the same cores (the tests of how cores are divided set it back to null).
    "trainer.num_threads=1",
    "export.onnx=false",  # made by default for the linear model; tests/test_export.py makes and checks them
    # A tiny run's pictures take longer than its training, and its system metrics sample a machine the tests keep busy:
    # the tests of those (tests/test_results.py, test_explain.py, test_mlflow_native.py, test_ui.py ...) turn them on.
    "tracking.pictures=false",
    "tracking.system_metrics=false",
]


def runner_args(artifacts: str, *args: str, tiny: bool = True) -> list[str]:
    """The arguments of ``python -m runner`` for ``args`` (flags such as -m first, as Hydra wants them), on TINY's data
    unless ``tiny`` is false, its artifacts under ``artifacts``."""
    flags = [a for a in args if a.startswith("-")]
    overrides = [a for a in args if not a.startswith("-")]
    return [*flags, *(TINY if tiny else []), f"tracking.artifact_root={artifacts}", *overrides]


@pytest.fixture(scope="session", autouse=True)
def temp_under_pytest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Temporary files of the tests' own process under pytest's folder, which pytest prunes.

    A run started from Python without Hydra (``runner.app.run(cfg)``) takes a temporary folder
    for its checkpoints; in /tmp those would outlive the suite, hundreds of them per run of it.
    """
    saved = tempfile.tempdir
    tempfile.tempdir = str(tmp_path_factory.mktemp("tmp"))
    yield
    tempfile.tempdir = saved


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The long tests first, then the slow ones, each module's in its order: pytest-xdist gives each worker a run of this
    list and the idle one takes tests from the other's end, so a minute-long test collected last would run alone while a core waits.
    A module fixture shared by a long test and others is made once per group: mark all its users long (tests/test_multinode.py)."""
    items.sort(key=lambda item: (item.get_closest_marker("long") is None, item.get_closest_marker("slow") is None))


@pytest.fixture
def traces(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the Keras models whose training step gets traced, one entry per trace: Python runs
    ``train_step`` only while tf.function traces it (for tests that have imported the Keras trainer)."""
    import keras

    traced: list[str] = []
    train_step = keras.Model.train_step

    def spy(model: keras.Model, data: object) -> object:
        traced.append(model.name)
        return train_step(model, data)

    monkeypatch.setattr(keras.Model, "train_step", spy)
    return traced


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data cache for the session, so the synthetic set is generated once."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty sqlite MLflow store, made once by MLflow's migrations (about a second each time)."""
    database = tmp_path_factory.mktemp("empty-store") / "mlflow.db"
    mlflow.MlflowClient(f"sqlite:///{database}").search_experiments()
    services.forget_sqlite_engines()
    return database


@pytest.fixture
def store(tmp_path: Path, empty_store: Path) -> dict[str, str]:
    """A fresh sqlite MLflow store with artifacts in tmp: a copy of the empty one.

    The runner makes a store that does not exist yet itself (tests/test_concurrency.py and
    test_storage_faults.py cover that on URIs of their own).
    """
    shutil.copyfile(empty_store, tmp_path / "mlflow.db")
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
def imbalanced_folder(tmp_path: Path) -> list[str]:
    """Overrides for a class-per-folder set of 30 Negative and 10 Positive 32 px images (18 and 6 in training).

    They replace TINY (whose dataset keys are the synthetic set's): compose with ``make_cfg(*overrides, tiny=False)``.
    """
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for name, count, level in (("Negative", 30, 100), ("Positive", 10, 150)):
        (tmp_path / "imbalanced" / name).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(np.clip(rng.normal(level, 30, (32, 32, 3)), 0, 255).astype(np.uint8)).save(tmp_path / "imbalanced" / name / f"{i}.png")
    return ["dataset=image_folder", f"dataset.path={tmp_path / 'imbalanced'}", "dataset.image_size=32",
            "dataset.val_fraction=0.2", "dataset.test_fraction=0.2", *(o for o in TINY if o.startswith(("trainer.", "export.")))]


@pytest.fixture
def client(store: dict[str, str]) -> mlflow.MlflowClient:
    mlflow.set_tracking_uri(store["uri"])
    return mlflow.MlflowClient(store["uri"])


@pytest.fixture
def cli(store: dict[str, str], data_cache: Path, tmp_path: Path) -> Callable[..., subprocess.CompletedProcess]:
    """Run ``python -m runner`` in tmp against the tmp store (``env``: more variables).

    In this interpreter (services.run_in_process: the same entry point, without a second's
    imports per call); ``process="forked"``: a process of its own forked with the libraries
    already imported (tests/forked.py), for what needs one (signals, state that outlives the
    command); ``process="fresh"``: a fresh interpreter, for what only that shows (which modules
    it imports, native libraries' output). Either within ``timeout`` seconds.
    """

    def _run(*args: str, tiny: bool = True, timeout: float = 600, env: dict[str, str] | None = None,
             process: Literal["forked", "fresh"] | None = None) -> subprocess.CompletedProcess:
        env = {**services.runner_env(store["uri"], data_cache), **(env or {})}
        arguments = runner_args(store["artifacts"], *args, tiny=tiny)
        if process is None:
            return services.run_in_process(arguments, tmp_path, env)
        if process == "forked":
            return forked.run("runner", arguments, tmp_path, env, timeout)
        return subprocess.run([sys.executable, "-m", "runner", *arguments], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=timeout)

    return _run


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[Callable[..., str]]:
    """Start real ``mlflow server`` processes on 127.0.0.1 (a free port each); returns their URL.

    Arguments are the store options, e.g. ``--backend-store-uri sqlite:///... --artifacts-destination DIR``.
    Each server runs in its own process group, stopped with its workers whatever happens.
    """
    servers: list[forked.Forked] = []

    def start(*store_args: str, timeout: float = 90) -> str:
        try:
            server, url = services.start_mlflow_server(tmp_path / f"mlflow-server-{len(servers)}.log", *store_args, timeout=timeout)
        except RuntimeError as err:
            pytest.fail(str(err))
        servers.append(server)
        return url

    yield start
    for server in servers:
        services.stop(server)
