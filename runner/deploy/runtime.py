"""The runtimes a logged model runs in: ``native`` (its MLflow flavor), ``onnx`` and ``onnx-int8`` (ONNX Runtime).

The ONNX files are artifacts of the model's run (``python -m runner.export`` makes them), each
in a folder that is an MLflow model of the onnx flavor, so ``mlflow models serve`` serves it too.
Asked for none, a command takes the fastest the model has: int8, then float32 ONNX, then
native. An ONNX file is data: ONNX Runtime runs its graph of built-in operators, no code of
the file's author.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runner.errors import ConfigError
from runner.track.safe_load import load_model

RUNTIMES = ("native", "onnx", "onnx-int8")
# In the model's run's artifacts, each an MLflow model of the onnx flavor (`mlflow models serve -m runs:/<id>/onnx/int8`)
# whose file is MODEL_FILE.
ONNX_MODELS = {"onnx": "onnx/float32", "onnx-int8": "onnx/int8"}
MODEL_FILE = "model.onnx"
FASTEST_FIRST = ("onnx-int8", "onnx", "native")
MISSING_EXTRA = "ONNX exports and runtimes need the export extra: pip install -e '.[export]' (or '.[all]')"


@dataclass(frozen=True)
class Runtime:
    """A loaded model: the runtime's name and its ``predict(pixels) -> class probabilities``."""

    name: str
    predict: Callable[[np.ndarray], np.ndarray]


def exports(run_id: str | None) -> list[str]:
    """The ONNX runtimes the run has files for."""
    if run_id is None:
        return []
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        logged = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id, "onnx")}
    except (MlflowException, OSError):  # its artifacts cannot be listed: it has none to offer
        return []
    return [name for name, folder in ONNX_MODELS.items() if folder in logged]


def load(uri: str, run_id: str | None, runtime: str | None = None, allow_pickle: bool = False) -> Runtime:
    """The model at ``uri`` in ``runtime`` (None: the fastest it has); a runtime it lacks is a ConfigError saying how to make it."""
    have = [*exports(run_id), "native"]
    name = runtime or next(r for r in FASTEST_FIRST if r in have)
    if name not in RUNTIMES:
        raise ConfigError(f"--runtime {name}: not a runtime; choose one of {', '.join(RUNTIMES)}.")
    if name not in have:
        how = f"python -m runner.export {run_id}{' --int8' if name == 'onnx-int8' else ''}" if run_id else "log it with python -m runner first"
        raise ConfigError(f"the model {uri!r} has no {name} export (it has: {', '.join(have)}). Make it with: {how}")
    if name == "native":
        model = load_model(uri, allow_pickle)
        return Runtime(name, lambda pixels: np.asarray(model.predict(pixels)))
    return Runtime(name, onnx_session(run_id, f"{ONNX_MODELS[name]}/{MODEL_FILE}"))  # type: ignore[arg-type]


def onnx_session(run_id: str, artifact: str) -> Callable[[np.ndarray], np.ndarray]:
    """``predict`` of an ONNX file among the run's artifacts."""
    import mlflow

    return predict_file(Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact)))


def predict_file(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    """``predict`` of an ONNX file on ONNX Runtime's CPU provider; without onnxruntime, a ConfigError saying what to install."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ConfigError(MISSING_EXTRA) from None
    return session_predict(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]))


def session_predict(session: object) -> Callable[[np.ndarray], np.ndarray]:
    """Probabilities from an ONNX Runtime session whose one input takes raw pixels (N, size, size, 3) float32."""
    name = session.get_inputs()[0].name  # type: ignore[attr-defined]
    return lambda pixels: np.asarray(session.run(None, {name: np.ascontiguousarray(pixels, np.float32)})[0])  # type: ignore[attr-defined]
