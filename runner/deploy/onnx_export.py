"""A logged model as ONNX (float32) and, if it keeps its accuracy, int8: checked when made, logged with the model's run.

Why these converters: torch models go through ``torch.onnx.export`` (its dynamo exporter,
which reads the torch.export program the runner logs); Keras models through Keras' own
``model.export(format="onnx")``, which drives tf2onnx on the TensorFlow backend: the model
as Keras saved it, no second description of its layers. int8 is ONNX Runtime's static
quantization (QDQ, per-channel weights) calibrated on a seeded sample of training images.

Nothing is kept that was not checked: the float32 file must give the native model's
probabilities on the validation images within :data:`TOLERANCE`, and the int8 file must lose
at most ``export.max_accuracy_drop`` of test accuracy against it. Either verdict is logged
(metrics and the ``onnx`` / ``onnx_int8`` tags), so a user sees why no file was kept.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from crack_runner.datasets import DataSplits
from runner.deploy.runtime import MISSING_EXTRA, MODEL_FILE, ONNX_MODELS, exports, predict_file
from runner.errors import ConfigError

log = logging.getLogger(__name__)

TOLERANCE = 1e-4  # largest difference of a probability between ONNX and the native model
INPUT = "pixels"  # the ONNX input: raw pixels (N, size, size, 3) float32 0..255, as the logged model takes


@dataclass(frozen=True)
class ExportSettings:
    """What ``export.*`` (or the command's flags) ask for."""

    int8: bool = False
    max_accuracy_drop: float = 0.005
    calibration_images: int = 256
    seed: int = 0


def export_run(run_id: str, framework: str, data: DataSplits, settings: ExportSettings, batch_size: int = 64,
               allow_pickle: bool = False) -> dict[str, float]:
    """Export run ``run_id``'s logged model, check it, log what passed to the run; returns the metrics logged.

    ``allow_pickle``: load a model that unpickles (refused otherwise, see runner.track.safe_load).

    A float32 export that does not match the native model raises ConfigError (nothing kept);
    an int8 export that loses too much accuracy is refused and said so, the float32 one kept.
    """
    import mlflow

    from runner.track.safe_load import load_model

    if not available():
        raise ConfigError(MISSING_EXTRA)
    client = mlflow.MlflowClient()
    with _quiet(), tempfile.TemporaryDirectory(prefix="onnx-") as tmp:
        native = load_model(f"runs:/{run_id}/model", allow_pickle)
        path = Path(tmp) / "model.onnx"
        convert(native.get_raw_model(), framework, data.val.images[:2].astype(np.float32), path)  # the very model loaded and checked
        onnx_predict = predict_file(path)
        val = data.val.images
        expected = in_batches(lambda x: np.asarray(native.predict(x)), val, batch_size)
        got = in_batches(onnx_predict, val, batch_size)
        diff = float(np.abs(expected - got).max()) if len(val) else 0.0
        metrics = {"onnx_max_abs_diff": diff, "onnx_size_mb": path.stat().st_size / 2**20}
        if not diff <= TOLERANCE:
            client.set_tag(run_id, "onnx", f"refused: its probabilities differ from the native model's by {diff:.2g} > {TOLERANCE}")
            client.log_metric(run_id, "onnx_max_abs_diff", diff)
            raise ConfigError(
                f"the ONNX export of run {run_id} gives probabilities up to {diff:.2g} away from the native model's on the "
                f"validation images (allowed: {TOLERANCE}); nothing was kept. The native model stands: use --runtime native."
            )
        log_onnx_model(run_id, path, "onnx")
        client.set_tag(run_id, "onnx", f"kept: matches the native model within {diff:.2g} on {len(val)} validation images")
        log.info("ONNX file logged with run %s: %s (matches the native model within %.2g); python -m runner.predict ... --runtime onnx",
                 run_id, ONNX_MODELS["onnx"], diff)
        if settings.int8:
            metrics.update(quantize(run_id, path, onnx_predict, data, settings, batch_size))
    for key, value in metrics.items():
        client.log_metric(run_id, key, value)
    return metrics


def quantize(run_id: str, fp32: Path, fp32_predict: Callable[[np.ndarray], np.ndarray], data: DataSplits, settings: ExportSettings,
             batch_size: int) -> dict[str, float]:
    """int8 static quantization, kept (logged beside the float32 file) only if its test accuracy is close enough."""
    import mlflow
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    rng = np.random.default_rng(settings.seed)
    chosen = rng.choice(len(data.train), size=min(settings.calibration_images, len(data.train)), replace=False)
    calibration = data.train.images[np.sort(chosen)].astype(np.float32)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(np.array_split(calibration, max(1, len(calibration) // 32)))

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {INPUT: batch}

    prepared, int8 = fp32.with_name("model.prepared.onnx"), fp32.with_name("model.int8.onnx")
    quant_pre_process(str(fp32), str(prepared))
    quantize_static(str(prepared), str(int8), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    test = data.test.images
    labels = np.asarray(data.test.labels)
    accuracy = float((in_batches(fp32_predict, test, batch_size).argmax(1) == labels).mean())
    int8_accuracy = float((in_batches(predict_file(int8), test, batch_size).argmax(1) == labels).mean())
    drop = accuracy - int8_accuracy
    client = mlflow.MlflowClient()
    metrics = {"onnx_test_accuracy": accuracy, "int8_test_accuracy": int8_accuracy, "int8_accuracy_drop": drop,
               "int8_size_mb": int8.stat().st_size / 2**20}
    if drop <= settings.max_accuracy_drop:
        log_onnx_model(run_id, int8, "onnx-int8")
        client.set_tag(run_id, "onnx_int8", f"kept: test accuracy {int8_accuracy:.4f}, {drop:+.4f} from float32's {accuracy:.4f}")
        log.info("int8 export kept: test accuracy %.4f (float32 %.4f)", int8_accuracy, accuracy)
    else:
        why = f"refused: test accuracy {int8_accuracy:.4f} loses {drop:.4f} of float32's {accuracy:.4f}, over export.max_accuracy_drop={settings.max_accuracy_drop}"
        client.set_tag(run_id, "onnx_int8", why)
        log.warning("int8 export %s", why)
    return metrics


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The converters' progress notes, deprecation warnings and MLflow's download bars kept off the run's log; errors still show."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "onnxscript", "onnx_ir", "tf2onnx", "onnxruntime")]
    levels = [lg.level for lg in loggers]
    bar = os.environ.get(PROGRESS_BAR)
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    os.environ[PROGRESS_BAR] = "false"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        if bar is None:
            os.environ.pop(PROGRESS_BAR, None)
        else:
            os.environ[PROGRESS_BAR] = bar


PROGRESS_BAR = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"


def log_onnx_model(run_id: str, path: Path, runtime: str) -> None:
    """Log the ONNX file at ``path`` with run ``run_id`` as an MLflow model of the onnx flavor (ONNX_MODELS[runtime]): one file, servable."""
    import mlflow
    import mlflow.onnx
    import onnx
    import onnxruntime

    folder = path.parent / runtime
    mlflow.onnx.save_model(onnx.load(str(path)), str(folder), onnx_execution_providers=["CPUExecutionProvider"], save_as_external_data=False,
                           pip_requirements=[f"onnx=={onnx.__version__}", f"onnxruntime=={onnxruntime.__version__}", "numpy"])
    if not (folder / MODEL_FILE).is_file():
        raise ConfigError(f"MLflow saved the ONNX model without {MODEL_FILE}: this MLflow version lays it out otherwise")
    mlflow.MlflowClient().log_artifacts(run_id, str(folder), ONNX_MODELS[runtime])


def convert(model: Any, framework: str, example: np.ndarray, path: Path) -> None:
    """Write ``model`` (a logged model as its flavor loads it: a torch module, a Keras model) as an ONNX file taking ``pixels`` of any batch size."""
    if framework == "torch":
        import torch

        batch = torch.export.Dim("batch", min=1)
        program = torch.export.export(model, (torch.from_numpy(example),), dynamic_shapes=({0: batch},))
        torch.onnx.export(program, f=str(path), input_names=[INPUT], output_names=["probabilities"], dynamo=True, external_data=False,
                          verbose=False)  # one file, weights inside it
    elif framework == "keras":
        model.predict(example, verbose=0)  # Keras exports only a model that has been called; predict takes any input structure
        model.export(str(path), format="onnx", verbose=False)
        _rename_input(path)
    else:
        raise ConfigError(f"cannot export a {framework} model to ONNX")


def _rename_input(path: Path) -> None:
    """Name the graph's one input ``pixels`` (Keras names it after its input layer)."""
    import onnx

    model = onnx.load(str(path))
    old = model.graph.input[0].name
    if old == INPUT:
        return
    model.graph.input[0].name = INPUT
    for node in model.graph.node:
        node.input[:] = [INPUT if name == old else name for name in node.input]
    onnx.save(model, str(path))


def in_batches(predict: Callable[[np.ndarray], np.ndarray], images: np.ndarray, batch_size: int) -> np.ndarray:
    """``predict`` over ``images`` a batch at a time, the probabilities stacked (float64)."""
    parts = [np.asarray(predict(batch.astype(np.float32)), np.float64) for batch in _chunks(images, batch_size)]  # float32 a batch at a time
    return np.concatenate(parts) if parts else np.zeros((0, 2))


def _chunks(images: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(images), size):
        yield images[start : start + size]


@dataclass(frozen=True)
class RunData:
    """What an export of a finished run needs from it: its framework, seed and data, split as it was."""

    framework: str
    seed: int
    data: DataSplits


def run_data(run_id: str) -> RunData:
    """Run ``run_id``'s framework, seed and data: the dataset section its config/config.yaml logged, loaded again.

    What the run trained on must still be where it was (the synthetic set is made again from its
    seed, an image folder read from its path); a ConfigError says so otherwise.
    """
    import mlflow
    import yaml
    from mlflow.exceptions import MlflowException

    from crack_runner import datasets
    from runner.config.schema import dataset_config

    try:
        run = mlflow.MlflowClient().get_run(run_id)
        logged = yaml.safe_load(Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="config/config.yaml")).read_text())
        framework, section, seed = run.data.tags["framework"], logged["dataset"], int(logged["seed"])
    except (MlflowException, OSError, KeyError, TypeError, ValueError, yaml.YAMLError) as err:
        raise ConfigError(f"run {run_id} has no config this runner logged (config/config.yaml with its dataset and seed, the framework "
                          f"tag): {type(err).__name__}: {str(err)[:200]}. Export a run made by python -m runner.") from None
    data = datasets.load(dataset_config(section), seed, progress=False)
    if data.fingerprint != run.data.tags.get("dataset_fingerprint", data.fingerprint):
        raise ConfigError(f"the data of run {run_id} has changed since it trained (its fingerprint differs): exporting would check the "
                          "model on other images. Export from where the run's data is as it was.")
    return RunData(framework, seed, data)


def available() -> bool:
    """Whether the export extra (onnx, onnxruntime, onnxscript, tf2onnx) is installed."""
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in ("onnx", "onnxruntime", "onnxscript"))


def export_after_run(run_id: str, framework: str, data: DataSplits, settings: ExportSettings) -> None:
    """:func:`export_run` when a run has ended: a failure is a warning (and the run's tags say why), never the run's failure."""
    try:
        export_run(run_id, framework, data, settings)
    except Exception as err:  # noqa: BLE001 - the run trained and is logged; an export is an extra
        log.warning("no ONNX file for run %s (%s: %s); the run and its native model stand. Retry with: python -m runner.export %s%s",
                    run_id, type(err).__name__, str(err)[:300], run_id, " --int8" if settings.int8 else "")


def export_champion(run_id: str) -> None:
    """The model ``runner.compare --register`` made champion goes to the field: ONNX and int8, unless its run has them already."""
    try:
        if exports(run_id):
            return
        if not available():
            raise ConfigError(MISSING_EXTRA)
        found = run_data(run_id)
    except Exception as err:  # noqa: BLE001 - registering stands without an export
        log.warning("no ONNX file for champion run %s (%s: %s). Export it where it trained: python -m runner.export %s --int8",
                    run_id, type(err).__name__, str(err)[:300], run_id)
        return
    export_after_run(run_id, found.framework, found.data, ExportSettings(int8=True, seed=found.seed))
