"""Runtimes for the field, measured: predict throughput and accuracy, and whole-photo inspections, native vs ONNX vs int8.

    python -m runner                                          # the default linear run (227 px)
    python -m runner model=resnet50 model.weights=null        # ResNet50 from random weights (offline), 227 px
    python benchmarks/bench_deploy.py LINEAR_RUN RESNET_RUN   # their run ids; exports what they lack (--int8)

Per model and runtime: images/s of the model call at batch 1 and 64 on the run's test images
(decoding apart), and test accuracy; then the seconds and the peak RSS of
``python -m runner.inspect`` on a 4,032 x 3,024 and (linear model) a 12,000 x 9,000 photo, each
in a fresh process (peak RSS: its VmHWM). Run from the folder whose mlflow.db holds the runs. Prints
Markdown tables.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
from PIL import Image

from crack_runner.datasets.synthetic import render_photo
from runner.deploy import runtime
from runner.deploy.onnx_export import ExportSettings, export_run, in_batches, run_data


def throughput(predict, images: np.ndarray, batch: int, seconds: float = 5.0) -> float:
    """Images per second of ``predict`` on batches of ``batch`` (after one warm-up call), over about ``seconds``."""
    chunk = images[:batch] if len(images) >= batch else np.resize(images, (batch, *images.shape[1:]))
    predict(chunk)
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        predict(chunk)
        done += batch
    return done / (time.perf_counter() - started)


def photo(path: Path, width: int, height: int) -> Path:
    """A synthetic photo of this size: one 2,016 x 1,512 render tiled, so large sizes cost no render memory."""
    if not path.exists():
        tile, _ = render_photo(7, 2016, 1512, cracks=3)
        canvas = Image.new("RGB", (width, height))
        for y in range(0, height, tile.height):
            for x in range(0, width, tile.width):
                canvas.paste(tile, (x, y))
        canvas.save(path, quality=90)
    return path


# `python -m runner.inspect ARGS` that says its peak memory (VmHWM) as it exits. Not wait4's ru_maxrss: Linux counts in it
# the memory of this benchmark, the process that started the command, as it stood at the exec.
INSPECT_SAYING_PEAK = (
    "import atexit, runpy, sys\n"
    "atexit.register(lambda: print('PEAK_KB', next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')), file=sys.stderr))\n"
    "sys.argv = ['runner.inspect', *sys.argv[1:]]\n"
    "runpy.run_module('runner.inspect', run_name='__main__')\n"
)


def inspect(run_id: str, path: Path, name: str, out: Path) -> tuple[float, float]:
    """Seconds and peak RSS (GB) of one ``python -m runner.inspect`` in a fresh process."""
    cmd = [sys.executable, "-c", INSPECT_SAYING_PEAK, run_id, str(path), "--runtime", name, "--out", str(out)]
    started = time.perf_counter()
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {done.stderr[-2000:]}")
    peak_kb = next(line.split()[1] for line in done.stderr.splitlines() if line.startswith("PEAK_KB"))
    return seconds, int(peak_kb) * 1024 / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run ids (their models are exported with --int8 if they have no ONNX file)")
    parser.add_argument("--seconds", type=float, default=5.0, help="time per throughput figure")
    parser.add_argument("--no-photos", action="store_true", help="skip the whole-photo inspections")
    args = parser.parse_args()
    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"))
    client = mlflow.MlflowClient()
    rows, photo_rows = [], []
    folder = Path(tempfile.mkdtemp(prefix="bench-deploy-"))
    sizes = [] if args.no_photos else [(4032, 3024), (12000, 9000)]
    photos = [photo(folder / f"{w}x{h}.jpg", w, h) for w, h in sizes]
    for run_id in args.runs:
        found = run_data(run_id)
        framework, data = found.framework, found.data
        if "onnx" not in runtime.exports(run_id):
            export_run(run_id, framework, data, ExportSettings(int8=True, seed=found.seed))
        model = client.get_run(run_id).data.tags["model"]
        test = data.test.images.astype(np.float32)
        for name in [*runtime.exports(run_id), "native"]:
            loaded = runtime.load(f"runs:/{run_id}/model", run_id, name)
            accuracy = float((in_batches(loaded.predict, test, 64).argmax(1) == data.test.labels).mean())
            rows.append((model, name, throughput(loaded.predict, test, 1, args.seconds), throughput(loaded.predict, test, 64, args.seconds), accuracy))
            print(f"| {model} | {name} | {rows[-1][2]:.1f} | {rows[-1][3]:.1f} | {accuracy:.4f} |", flush=True)
            for path in photos if framework == "torch" else photos[:1]:  # ResNet50 on 12,000 x 9,000: minutes a runtime, the 4k photo says it
                seconds, rss = inspect(run_id, path, name, folder / "out")
                photo_rows.append((model, name, path.stem, seconds, rss))
                print(f"| {model} | {name} | {path.stem} | {seconds:.1f} | {rss:.2f} |", flush=True)
    print("\n| model | runtime | images/s, batch 1 | images/s, batch 64 | test accuracy |\n| --- | --- | --- | --- | --- |")
    for model, name, one, many, accuracy in rows:
        print(f"| {model} | {name} | {one:.1f} | {many:.1f} | {accuracy:.4f} |")
    if photo_rows:
        print("\n| model | runtime | photo | inspect s | peak RSS GB |\n| --- | --- | --- | --- | --- |")
        for model, name, stem, seconds, rss in photo_rows:
            print(f"| {model} | {name} | {stem} | {seconds:.1f} | {rss:.2f} |")


if __name__ == "__main__":
    main()
