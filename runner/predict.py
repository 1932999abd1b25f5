"""``python -m runner.predict MODEL IMAGE_OR_FOLDER...``: the class and probability of each image.

MODEL is a run id (its logged model) or any MLflow model URI (``runs:/<id>/model``,
``models:/<name>@champion`` (the version ``runner.compare --register`` pointed the alias at),
``models:/<name>/<version>``, a local model folder). Both streams work alike: the logged
model takes raw pixels and holds its own preprocessing, the input size comes from the
model's signature and the files are decoded by ``datasets.folder``, as in training.

A model that would unpickle, or import code from its folder, to load (one someone handed you)
is refused unless ``--allow-pickle`` is passed (runner.track.safe_load); the runner's own need neither.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tabulate import tabulate

from crack_runner.datasets.folder import IMAGE_SUFFIXES, decode_image
from runner.config.redact import command_logging
from runner.deploy import runtime as runtimes
from runner.errors import USER_ERRORS, ConfigError, DataError
from runner.track.safe_load import PICKLE_VARIABLE

log = logging.getLogger("runner.predict")

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"  # the default of conf/config.yaml tracking.uri


@dataclass(frozen=True)
class LoggedModel:
    """Where a logged model is, with the class names and input size that decoding and reporting need."""

    uri: str
    classes: list[str]
    image_size: int
    run_id: str | None = None  # the run that logged it (where its ONNX exports are), None for a model folder


@dataclass(frozen=True)
class Prediction:
    """One line of the output; the keys of ``--json`` (those of a run's test_predictions.json)."""

    file: str
    predicted: str
    probability: float


def model_uri(ref: str) -> str:
    """A run id means that run's model; a URI or an existing model folder is used as it is."""
    return ref if ":/" in ref or Path(ref).is_dir() else f"runs:/{ref}/model"


def image_files(inputs: Sequence[Path]) -> list[Path]:
    """The image files named, and those under the folders named (recursively, sorted)."""
    files: list[Path] = []
    for path in inputs:
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise DataError(f"folder {str(path)!r} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))}).")
            files += found
        elif path.is_file():
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                raise DataError(
                    f"{str(path)!r} is not an image file: its suffix is not one of {', '.join(sorted(IMAGE_SUFFIXES))}."
                )
            files.append(path)
        else:
            raise DataError(f"{str(path)!r} does not exist. Pass image files or folders of images.")
    return files


def _check_store(tracking_uri: str) -> None:
    """A sqlite store that is not there is a wrong path, not a new empty store to create; a server must let us in."""
    from runner.track.store import check_server

    check_server(tracking_uri)
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri.removeprefix("sqlite:///")).is_file():
        raise ConfigError(
            f"no MLflow store at {tracking_uri}: run from the folder that holds it, or pass the store of the run "
            "with --tracking-uri (or MLFLOW_TRACKING_URI)."
        )


def describe(ref: str, tracking_uri: str) -> LoggedModel:
    """Class names (model metadata, else the source run's ``classes`` param) and input size (the signature)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    _check_store(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    uri = model_uri(ref)
    try:
        info = mlflow.models.get_model_info(uri)
        classes = (info.metadata or {}).get("classes")
        if not classes and info.run_id:
            classes = mlflow.MlflowClient().get_run(info.run_id).data.params["classes"].split(",")
    except (MlflowException, OSError, KeyError) as err:
        raise ConfigError(
            f"cannot find the model {uri!r} with its class names in the MLflow store {tracking_uri}: {err}. "
            "Pass the run id printed at the end of `python -m runner` (or a runs:/ or models:/ URI) and the store "
            "it was logged to with --tracking-uri (or MLFLOW_TRACKING_URI)."
        ) from None
    if not classes:
        raise ConfigError(
            f"the model {uri!r} names no classes (no 'classes' metadata, no source run): it was not logged by this runner."
        )
    inputs = info.signature.inputs if info.signature is not None else None
    shape = inputs.inputs[0].shape if inputs is not None and inputs.is_tensor_spec() else None
    if shape is None or len(shape) != 4 or shape[3] != 3 or shape[1] != shape[2]:
        raise ConfigError(
            f"the model {uri!r} does not take square RGB images (its input is {inputs}): it was not logged by this runner."
        )
    return LoggedModel(uri, list(classes), int(shape[1]), info.run_id)


def decode(files: Sequence[Path], image_size: int) -> np.ndarray:
    """Pixels (N, size, size, 3) float32 0..255, decoded exactly as in training; any unreadable file is an error."""
    decoded = [decode_image(path, image_size) for path in files]
    unreadable = [f"{path} ({result})" for path, result in zip(files, decoded) if isinstance(result, str)]
    if unreadable:
        raise DataError(f"cannot read {len(unreadable)} file(s) as images: {'; '.join(unreadable)}. Pass only image files.")
    return np.stack(decoded).astype(np.float32)


def predict(logged: LoggedModel, files: Sequence[Path], batch_size: int = 64, allow_pickle: bool = False,
            runtime: str | None = "native") -> list[Prediction]:
    """The most probable class of each image file and its probability; a batch at a time, so any folder fits in memory.

    ``allow_pickle``: load the model even if that unpickles (otherwise refused, see runner.track.safe_load).
    ``runtime``: native, onnx or onnx-int8 (runner.deploy.runtime); None: the fastest the model has.
    """
    model = runtimes.load(logged.uri, logged.run_id, runtime, allow_pickle)
    log.info("predicting with the %s runtime", model.name)
    predictions: list[Prediction] = []
    for start in range(0, len(files), batch_size):
        batch = files[start : start + batch_size]
        probs = np.asarray(model.predict(decode(batch, logged.image_size)))
        best = probs.argmax(axis=1)
        predictions += [Prediction(str(f), logged.classes[k], float(p[k])) for f, k, p in zip(batch, best, probs)]
    return predictions


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m runner.predict",
        description="Predict the class of image files with a model logged by `python -m runner`.",
    )
    parser.add_argument(
        "model",
        help="MLflow run id, or a model URI (runs:/<id>/model, models:/<name>@champion, models:/<name>/<version>) or model folder",
    )
    parser.add_argument("images", nargs="+", type=Path, help="image files and/or folders (searched recursively)")
    parser.add_argument(
        "--tracking-uri",
        default=os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI),
        help=f"MLflow store of the run (default: $MLFLOW_TRACKING_URI, else {DEFAULT_TRACKING_URI})",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="images per model call (default: %(default)s)")
    parser.add_argument("--runtime", choices=runtimes.RUNTIMES,
                        help="native (the logged model), onnx or onnx-int8 (python -m runner.export makes them); default: the fastest the model has")
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help=f"load a model that unpickles or imports code from its folder, which runs whatever its author put there: "
        f"only one you trust (as does {PICKLE_VARIABLE}=true); the runner's own models need neither",
    )
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print a JSON list of {file, predicted, probability}")
    output.add_argument(
        "--serving-input",
        action="store_true",
        help="print the decoded images as the JSON body for `mlflow models serve` instead of predicting "
        "(with --runtime onnx or onnx-int8: for the ONNX model served from runs:/<id>/onnx/float32 or onnx/int8)",
    )
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, not {args.batch_size}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Print one line per image (or JSON); a user error is one message on stderr and exit status 2."""
    args = parse_args(argv)
    command_logging(logging.WARNING, "%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)  # the runtime used, on stderr beside the warnings
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        files = image_files(args.images)
        logged = describe(args.model, args.tracking_uri)
        if args.serving_input:  # the native model takes the pixels, an ONNX one (onnx/float32, onnx/int8) them by its input's name
            pixels = decode(files, logged.image_size).tolist()
            print(json.dumps({"inputs": {"pixels": pixels} if args.runtime in ("onnx", "onnx-int8") else pixels}))
            return 0
        with contextlib.redirect_stdout(sys.stderr):  # stdout is the result: frameworks' progress bars go to stderr
            predictions = predict(logged, files, args.batch_size, args.allow_pickle, args.runtime)
    except USER_ERRORS as err:
        log.error("%s", err)
        return 2
    if args.json:
        print(json.dumps([asdict(p) for p in predictions], indent=2))
    else:
        rows = [(p.file, p.predicted, f"{p.probability:.4f}") for p in predictions]
        print(tabulate(rows, headers=("file", "predicted", "probability")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
