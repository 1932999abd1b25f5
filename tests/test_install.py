"""A wheel built from the repo holds everything a run needs and claims no import name that a common package owns."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT, TINY

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel installed (without its dependencies, which this environment has) beside Hugging Face's ``datasets``."""
    folder = tmp_path_factory.mktemp("wheel")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(folder / "dist"), str(ROOT)], check=True, timeout=600)
    (wheel,) = (folder / "dist").glob("crack_runner-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    # Every config and every module of the checkout, wherever a new group or subpackage lands (pyproject lists them).
    shipped = {f"crack_runner/{p.relative_to(ROOT)}" for p in (ROOT / "conf").rglob("*.yaml")}
    shipped |= {f"crack_runner/{p.relative_to(ROOT)}" for top in ("datasets", "models") for p in (ROOT / top).rglob("*.py")}
    shipped |= {str(p.relative_to(ROOT)) for top in ("runner", "hydra_plugins") for p in (ROOT / top).rglob("*.py")}
    assert "crack_runner/conf/model/resnet50.yaml" in shipped and "runner/train/frozen/store.py" in shipped
    missing = sorted(shipped - set(names))
    assert not missing, f"missing from the wheel (add their packages to pyproject.toml): {missing}"
    assert not [n for n in names if n.split("/")[0] in ("datasets", "models", "conf")]  # nothing at the top that others own
    site = folder / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel), "datasets"], check=True, timeout=600)
    assert (site / "datasets" / "arrow_dataset.py").exists()  # Hugging Face's, untouched by the wheel
    return site


def outside(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """``python *args`` from a folder outside the repo, the installed wheel first on the path (not the checkout)."""
    env = {**os.environ, "PYTHONPATH": str(site), "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}", "CRACK_RUNNER_DATA": str(cwd / "data")}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_the_wheel_runs_from_any_folder_beside_hugging_faces_datasets(installed, tmp_path):
    where = outside(installed, tmp_path, "-c", "import runner, crack_runner.datasets as d; print(runner.__file__); print(d.__file__)")
    assert where.returncode == 0, where.stderr[-2000:]
    assert all(line.startswith(str(installed)) for line in where.stdout.split()), where.stdout  # the wheel's files, not the repo's
    helped = outside(installed, tmp_path, "-m", "runner", "--help")
    assert helped.returncode == 0 and "model=resnet50 freeze_depth=140" in helped.stdout, helped.stderr[-2000:]
    ran = outside(installed, tmp_path, "-m", "runner", *TINY, "trainer.epochs=1", "tracking.system_metrics=false")
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert "test_accuracy" in ran.stdout and (tmp_path / "mlflow.db").exists() and (tmp_path / "mlruns").is_dir()
