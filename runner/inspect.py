"""``python -m runner.inspect MODEL PHOTO_OR_FOLDER...``: crack maps of whole photos with a logged patch classifier.

The model's own patch window (its input size, or ``--patch`` pixels of the photo resized to
it) slides over each photo at ``--stride`` (default half a patch), the last window flush with
each edge; every window is classified in batches. Per photo, in ``--out/<photo stem>/``: the
photo with the crack probability over it and the windows at or above ``--threshold`` outlined
(overlay.png; a truth's cracks in cyan), every window as a row (patches.csv), and a summary (summary.json), scored
against a truth mask when there is one (``--truth``, or the ``<stem>.truth.png`` that
``python -m runner.photos`` writes beside its photos). ``--log`` records the inspection as an
MLflow run in the ``inspections`` experiment. A photo that cannot be read is named and
skipped; the exit status is 2 only when no photo could be inspected.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from crack_runner.datasets import photos, stopping
from crack_runner.datasets.errors import DataError
from runner.config.redact import command_logging
from runner.deploy import runtime as runtimes
from runner.errors import USER_ERRORS, ConfigError, StorageError
from runner.inspection.crack_map import CrackMap
from runner.inspection.windows import Window, grid
from runner.predict import DEFAULT_TRACKING_URI, LoggedModel, describe, image_files
from runner.track import interrupt
from runner.track.safe_load import PICKLE_VARIABLE

log = logging.getLogger("runner.inspect")

EXPERIMENT = "inspections"
CRACK_CLASS = "Positive"  # the real set's name for the crack class


def crack_index(classes: Sequence[str]) -> int:
    """The index of the crack class among the model's classes: 'Positive', else the last one."""
    return list(classes).index(CRACK_CLASS) if CRACK_CLASS in classes else len(classes) - 1


def batches(photo: photos.Photo, windows: list[Window], size: int, batch_size: int) -> Iterator[np.ndarray]:
    """The windows' pixels (in the row-by-row order of :func:`grid`), (n, size, size, 3) float32, ``batch_size`` at a time, read from the photo a strip of rows at a time."""
    batch: list[np.ndarray] = []
    for top, in_row in itertools.groupby(windows, key=lambda w: w.y):  # grid() lists the windows row by row
        row = list(in_row)
        strip = photo.rows(top, top + row[0].height)
        for w in row:
            patch = strip[:, w.x : w.x + w.width]
            if patch.shape[:2] != (size, size):  # a --patch other than the model's size, or a photo smaller than a patch
                patch = np.asarray(Image.fromarray(patch).resize((size, size), Image.Resampling.BILINEAR))
            batch.append(patch)
            if len(batch) == batch_size:
                yield np.stack(batch).astype(np.float32)
                batch = []
    if batch:
        yield np.stack(batch).astype(np.float32)


def inspect_photo(
    path: Path, model: runtimes.Runtime, logged: LoggedModel, patch: int, stride: int, threshold: float, batch_size: int,
    progress: bool = False,
) -> tuple[CrackMap, photos.Photo]:
    """The crack map of the photo at ``path`` (a DataError if it cannot be read or is too large); the photo stays open for drawing."""
    photo = photos.open_photo(path)
    width, height = photo.size
    windows = grid(width, height, patch, stride)
    crack = crack_index(logged.classes)
    started = time.perf_counter()
    found: list[np.ndarray] = []
    try:
        with tqdm(total=len(windows), desc=path.name, unit="patch", disable=not progress, leave=False) as bar:
            for pixels in batches(photo, windows, logged.image_size, batch_size):
                stopping.check()
                with contextlib.redirect_stdout(sys.stderr):  # stdout is the result: frameworks' progress bars go to stderr
                    found.append(np.asarray(model.predict(pixels))[:, crack])
                bar.update(len(pixels))
    except BaseException:  # a photo cut short mid-stream, an interrupt: let its pixels go before the next photo
        photo.close()
        raise
    extra = {"patch": patch, "stride": stride, "model_input": logged.image_size, "model_uri": logged.uri, "runtime": model.name,
             "seconds": round(time.perf_counter() - started, 3)}
    return CrackMap(path, width, height, windows, np.concatenate(found).astype(np.float64), threshold, extra), photo


def out_folder(root: Path, photo: Path, taken: set[Path]) -> Path:
    """``root/<stem>``, with a number added when another photo of this command has the stem."""
    folder, n = root / photo.stem, 1
    while folder in taken:
        n += 1
        folder = root / f"{photo.stem}-{n}"
    taken.add(folder)
    return folder


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m runner.inspect", description=__doc__.split("\n\n")[0].strip("`: "))
    parser.add_argument("model", help="MLflow run id, or a model URI (runs:/<id>/model, models:/<name>@champion) or model folder")
    parser.add_argument("photos", nargs="+", type=Path, help="photos and/or folders of photos (searched recursively)")
    parser.add_argument("--out", type=Path, default=Path("inspections"), help="folder of the results, one subfolder a photo (default: %(default)s)")
    parser.add_argument("--stride", type=int, help="pixels between windows (default: half a patch)")
    parser.add_argument("--patch", type=int, help="window side in the photo's pixels, resized to the model's input (default: the model's input size)")
    parser.add_argument("--threshold", type=float, default=0.5, help="crack probability from which a window counts as cracked (default: %(default)s)")
    parser.add_argument("--runtime", choices=runtimes.RUNTIMES, help="native, onnx or onnx-int8 (default: the fastest the model has)")
    parser.add_argument("--truth", type=Path, help="truth mask of the one photo given (white: crack); default: <stem>.truth.png beside it")
    parser.add_argument("--log", action="store_true", help=f"record the inspection as an MLflow run in the '{EXPERIMENT}' experiment")
    parser.add_argument("--batch-size", type=int, default=64, help="windows per model call (default: %(default)s)")
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI),
                        help=f"MLflow store of the model's run (default: $MLFLOW_TRACKING_URI, else {DEFAULT_TRACKING_URI})")
    parser.add_argument("--allow-pickle", action="store_true", help=f"load a model that unpickles (as {PICKLE_VARIABLE}=true): only one you trust")
    args = parser.parse_args(argv)
    for name in ("stride", "patch", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, not {getattr(args, name)}")
    if not 0.0 <= args.threshold <= 1.0:
        parser.error(f"--threshold must be in 0..1, not {args.threshold}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """One line per photo on stdout; a photo that cannot be read is named on stderr and skipped."""
    args = parse_args(argv)
    command_logging(logging.INFO, "%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # Ctrl-C and `kill` stop at the next batch or photo, and the logged run is closed KILLED. Not a
    # KeyboardInterrupt raised wherever the signal lands: inside libvips' logging callback it was lost.
    interrupt.install()
    try:
        files = [f for f in image_files(args.photos) if not f.name.endswith(photos.TRUTH_SUFFIX)]  # masks beside photos are no photos
        if not files:
            raise DataError(f"no photos in {', '.join(map(str, args.photos))}: only truth masks (*{photos.TRUTH_SUFFIX}).")
        if args.truth is not None and len(files) != 1:
            raise ConfigError(f"--truth goes with one photo, and {len(files)} were found; for several, put each mask beside its photo "
                              f"as <stem>{photos.TRUTH_SUFFIX}.")
        logged = describe(args.model, args.tracking_uri)
        model = runtimes.load(logged.uri, logged.run_id, args.runtime, args.allow_pickle)
        patch = args.patch or logged.image_size
        stride = args.stride or max(1, patch // 2)
        stopping.check()  # stopped while the model loaded: no inspection run opened only to be closed
        tracker = InspectionRun(args, logged, model.name, patch, stride, files) if args.log else None
    except USER_ERRORS as err:
        log.error("%s", err)
        return 2
    except KeyboardInterrupt:  # a stop before the first photo (a second signal stops a slow load at once)
        log.error("interrupted before the first photo; nothing was inspected")
        return 130
    status, done = "FAILED", 0
    try:
        done = inspect_all(args, files, model, logged, patch, stride, tracker)
        status = "FINISHED" if done else "FAILED"
    except KeyboardInterrupt:
        status = "KILLED"
        log.error("interrupted%s", f"; MLflow run {tracker.run_id} is marked KILLED" if tracker else "")
        return 130
    except USER_ERRORS as err:
        log.error("%s", err)
        return 2
    finally:
        if tracker is not None:
            tracker.end(status)  # however it ends: no inspection run is left RUNNING
    if not done:
        log.error("no photo could be inspected")
        return 2
    return 0


def inspect_all(args: argparse.Namespace, files: list[Path], model: runtimes.Runtime, logged: LoggedModel, patch: int, stride: int,
                tracker: InspectionRun | None) -> int:
    """Inspect each photo in turn, naming and skipping those that cannot be read or written; how many were inspected."""
    done, taken = 0, set()
    for path in files:
        stopping.check()
        try:
            crack_map, photo = inspect_photo(path, model, logged, patch, stride, args.threshold, args.batch_size, sys.stderr.isatty())
        except (DataError, ConfigError) as err:
            log.error("skipped: %s", err)
            continue
        try:
            truth_path = args.truth or photos.truth_beside(path)
            truth = photos.read_truth(truth_path, photo.size) if truth_path else None
            folder = out_folder(args.out, path, taken)
            written, scores = crack_map.write(folder, photo, truth)
        except (DataError, ConfigError) as err:
            log.error("skipped: %s", err)
            continue
        except OSError as err:
            raise StorageError(f"cannot write the results of {path} into {args.out}: {err.strerror or err}. "
                               "Pass a folder you can write to with --out, with room for them.") from None
        finally:
            photo.close()
        done += 1
        print(line(crack_map, scores, folder), flush=True)
        if tracker is not None:
            tracker.add(folder.name, written, crack_map, scores)
    return done


def line(crack_map: CrackMap, scores: dict[str, float] | None, folder: Path) -> str:
    """The stdout line of a photo: counts, cracked share, highest probability, scores, where the files are."""
    s = crack_map.summary
    text = (f"{crack_map.photo}: {s['cracked_patches']}/{s['patches']} patches cracked, {100 * s['cracked_area_share']:.1f}% of the area, "
            f"max p {s['max_p_crack']:.3f} ({s['runtime']}, {s['seconds']:.1f} s)")
    if scores:
        text += f"; vs truth: precision {scores['precision']:.3f} recall {scores['recall']:.3f} F1 {scores['f1']:.3f} IoU {scores['iou']:.3f}"
    return f"{text} -> {folder}"


class InspectionRun:
    """The MLflow run of ``--log``: the photos as its dataset input, the model as params, each photo's files as artifacts."""

    def __init__(self, args: argparse.Namespace, logged: LoggedModel, runtime: str, patch: int, stride: int, files: list[Path]) -> None:
        import mlflow
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.data.sources import LocalArtifactDatasetSource

        from runner.track.lease import process_tags
        from runner.track.store import open_store

        experiment_id = open_store(args.tracking_uri, EXPERIMENT, "mlruns")
        self.client = mlflow.MlflowClient()
        # Host and process: a run whose process was killed outright (SIGKILL) is found and closed by runner.doctor.
        tags = {"model_uri": logged.uri, **({"model_run_id": logged.run_id} if logged.run_id else {}), **process_tags()}
        if logged.uri.startswith("models:/"):
            tags["model_version"] = str(mlflow.models.get_model_info(logged.uri).registered_model_version or "")
        run = self.client.create_run(experiment_id, tags=tags, run_name=f"inspect {len(files)} photo(s)")
        self.run_id = run.info.run_id
        params = {"model_uri": logged.uri, "runtime": runtime, "patch": patch, "stride": stride, "threshold": args.threshold,
                  "photos": len(files)}
        self.client.log_batch(self.run_id, params=[mlflow.entities.Param(k, str(v)) for k, v in params.items()])
        digest = hashlib.sha256("\n".join(f"{f.resolve()}:{f.stat().st_size}" for f in files).encode()).hexdigest()[:16]
        source = LocalArtifactDatasetSource(str(Path(os.path.commonpath([str(f.resolve()) for f in files]))))
        dataset = MetaDataset(source, name="photos", digest=digest)._to_mlflow_entity()
        self.client.log_inputs(self.run_id, [mlflow.entities.DatasetInput(dataset, [mlflow.entities.InputTag("mlflow.data.context", "inspection")])])
        self.totals: dict[str, float] = {"photos": 0, "patches": 0, "cracked_patches": 0}
        self.scores: list[dict[str, float]] = []

    def add(self, name: str, written: dict[str, Path], crack_map: CrackMap, scores: dict[str, float] | None) -> None:
        for path in written.values():
            self.client.log_artifact(self.run_id, str(path), name)
        summary = crack_map.summary
        self.totals["photos"] += 1
        self.totals["patches"] += summary["patches"]
        self.totals["cracked_patches"] += summary["cracked_patches"]
        if scores:
            self.scores.append(scores)

    def end(self, status: str) -> None:
        import mlflow

        metrics = dict(self.totals)
        for key in ("precision", "recall", "f1", "iou"):
            if self.scores:
                metrics[f"truth_{key}"] = float(np.mean([s[key] for s in self.scores]))
        stamp = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[mlflow.entities.Metric(k, float(v), stamp, 0) for k, v in metrics.items()])
        self.client.set_terminated(self.run_id, status)
        log.info("MLflow run %s (experiment '%s') ended %s: %s", self.run_id, EXPERIMENT, status, json.dumps(metrics))


if __name__ == "__main__":
    sys.exit(main())
