"""``python -m runner.export MODEL [--int8]``: a logged model as ONNX (and int8), checked, logged with its run.

MODEL as ``runner.predict`` takes it: a run id, ``runs:/<id>/model`` or ``models:/<name>@champion``.
The float32 file is kept only if it gives the native model's probabilities on the run's
validation images within 1e-4; the int8 file only if its test accuracy is within
``--max-accuracy-drop`` of float32's. ``runner.predict``, ``runner.inspect`` and serving then
take ``--runtime onnx`` or ``onnx-int8`` (by default the fastest the model has).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from runner.config.redact import command_logging
from runner.deploy.onnx_export import ExportSettings, export_run, run_data
from runner.errors import USER_ERRORS, ConfigError
from runner.predict import DEFAULT_TRACKING_URI, describe
from runner.report.console import quiet_native_logs
from runner.track.safe_load import PICKLE_VARIABLE

log = logging.getLogger("runner.export")


def main(argv: Sequence[str] | None = None) -> int:
    """Export, print what was kept and why; a user error is one message and exit status 2."""
    parser = argparse.ArgumentParser(prog="python -m runner.export", description=__doc__.split("\n\n")[0].strip("`: "))
    parser.add_argument("model", help="MLflow run id, or a model URI (runs:/<id>/model, models:/<name>@champion)")
    parser.add_argument("--int8", action="store_true", help="also make an int8 file (ONNX Runtime static quantization)")
    parser.add_argument("--max-accuracy-drop", type=float, default=0.005, help="test accuracy int8 may lose (default: %(default)s)")
    parser.add_argument("--calibration-images", type=int, default=256, help="training images that calibrate int8 (default: %(default)s)")
    parser.add_argument("--allow-pickle", action="store_true", help=f"load a model that unpickles (as {PICKLE_VARIABLE}=true): only one you trust")
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI),
                        help=f"MLflow store of the run (default: $MLFLOW_TRACKING_URI, else {DEFAULT_TRACKING_URI})")
    args = parser.parse_args(argv)
    if not 0 <= args.max_accuracy_drop < 1 or args.calibration_images < 1:
        parser.error("--max-accuracy-drop must be in [0, 1) and --calibration-images at least 1")
    command_logging(logging.INFO, "%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        logged = describe(args.model, args.tracking_uri)
        if logged.run_id is None:
            raise ConfigError(f"{args.model!r} is a model folder, not a logged run's model: export a run id or a runs:/ or models:/ URI.")
        found = run_data(logged.run_id)
        if found.framework == "keras":
            quiet_native_logs()  # TensorFlow's C++ notes while the model converts
        settings = ExportSettings(args.int8, args.max_accuracy_drop, args.calibration_images, found.seed)
        metrics = export_run(logged.run_id, found.framework, found.data, settings, allow_pickle=args.allow_pickle)
    except USER_ERRORS as err:
        log.error("%s", err)
        return 2
    import mlflow

    tags = mlflow.MlflowClient().get_run(logged.run_id).data.tags
    print(f"run {logged.run_id}: onnx {tags.get('onnx', '-')}")
    if args.int8:
        print(f"run {logged.run_id}: onnx-int8 {tags.get('onnx_int8', '-')}")
    print("  " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
