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


# ``python -c RUNNER_THEN_IMPORTS <arguments>`` is ``python -m runner <arguments>`` whose last line on stderr names the
# heavy packages it imported, whether it ended well or not.
HEAVY = ("torch", "tensorflow", "keras", "mlflow", "sklearn")
RUNNER_THEN_IMPORTS = (
    "import runpy, sys\n"
    "try:\n"
    "    runpy.run_module('runner', run_name='__main__', alter_sys=True)\n"
    "finally:\n"
    f"    sys.__stderr__.write('imported: ' + ','.join(m for m in {HEAVY!r} if m in sys.modules) + '\\n')\n"
)


def imported(result: subprocess.CompletedProcess) -> list[str]:
    """The heavy packages a ``RUNNER_THEN_IMPORTS`` command imported."""
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("imported: ")]
    return [name for name in line.removeprefix("imported: ").split(",") if name]


def test_the_wheel_runs_from_any_folder_beside_hugging_faces_datasets(installed, tmp_path):
    # The commands that load a logged model split no data: scikit-learn's second of imports is not theirs to pay.
    where = outside(installed, tmp_path, "-c", "import importlib.util, sys, runner.predict, runner.inspect, runner.export\n"
                    "print(runner.__file__, importlib.util.find_spec('crack_runner.datasets').origin, 'sklearn' in sys.modules)")
    assert where.returncode == 0, where.stderr[-2000:]
    *files, sklearn = where.stdout.split()
    assert all(file.startswith(str(installed)) for file in files), where.stdout  # the wheel's files, not the repo's
    assert sklearn == "False"
    helped = outside(installed, tmp_path, "-c", RUNNER_THEN_IMPORTS, "--help")
    assert helped.returncode == 0 and "model=resnet50 freeze_depth=140" in helped.stdout, helped.stderr[-2000:]
    assert imported(helped) == []  # no framework, no MLflow
    ran = outside(installed, tmp_path, "-c", RUNNER_THEN_IMPORTS, *TINY, "trainer.epochs=1", "tracking.system_metrics=false")
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert "test_accuracy" in ran.stdout and (tmp_path / "mlflow.db").exists() and (tmp_path / "mlruns").is_dir()
    assert "torch" in imported(ran) and not {"tensorflow", "keras"} & set(imported(ran))  # only the framework of the run's model
