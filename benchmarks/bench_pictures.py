"""Benchmark: the seconds each picture of a run takes, built, drawn and written as the run logs it.

    python benchmarks/bench_pictures.py                          # this checkout, 32 and 227 px
    python benchmarks/bench_pictures.py --compare /tmp/before    # against another checkout, taking turns

Every run draws these pictures (runner.report.evaluate, runner.report.explain), so their time is
paid once per run, and many times by the test suite's tiny runs. The inputs are made up (random
pixels, probabilities and heatmaps): the time depends on the pictures' layout and sizes, not on
what the pixels show. Each picture is built, drawn into pixels and written as a 256-colour PNG,
as Tracker.log_figure does, without an MLflow store.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tabulate import tabulate

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["Negative", "Positive"]


def pictures(size: int) -> dict[str, Callable[[], Any]]:
    """Makers of each picture of a run on ``size`` px images: 40 test images, 2 epochs, 8 Grad-CAM examples."""
    import numpy as np

    from runner.report import plots
    from runner.train.metrics import confusion

    rng = np.random.default_rng(0)
    n = 40
    labels = rng.integers(0, 2, n)
    positive = rng.random(n)
    probs = np.stack([1 - positive, positive], axis=1)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    names = [f"{CLASSES[label]}/{i:05d}.jpg" for i, label in enumerate(labels)]
    history = [{"step": s, "phase": "train", "train_loss": 1 / s, "val_loss": 1.2 / s, "train_accuracy": 0.5, "val_accuracy": 0.6}
               for s in (1, 2)]
    curves = plots.test_curves(labels, probs, CLASSES)
    return {
        "learning curves": lambda: plots.learning_curves(history, 2),
        "confusion matrix": lambda: plots.confusion_matrix_figure(confusion(labels, probs, 2), CLASSES),
        "ROC": lambda: plots.roc_figure(curves),
        "precision-recall": lambda: plots.pr_figure(curves),
        "calibration": lambda: plots.calibration_figure(curves),
        "misclassified (16 shown)": lambda: plots.misclassified_grid(images, labels, probs, CLASSES, names),
        "linear weights": lambda: plots.linear_weights_figure(rng.standard_normal((2, size, size, 3)), CLASSES),
        "Grad-CAM (8 shown)": lambda: plots.gradcam_grid(images[:8], rng.random((8, size, size)), labels[:8], probs[:8], CLASSES,
                                                         names[:8], "conv4_block6_out"),
    }


def seconds_per_picture(size: int, repeats: int) -> dict[str, float]:
    """Median seconds of each picture over ``repeats``: built, drawn, quantised and written.

    The drawing and writing repeat Tracker.log_figure's steps, not call it: the other checkout of
    ``--compare`` may draw another way, and no MLflow run is open here.
    """
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from PIL import Image

    from runner.report import plots

    times: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(repeats + 1):  # the first round fills matplotlib's font caches: not timed
            for name, make in pictures(size).items():
                start = time.perf_counter()
                figure = make()
                canvas = FigureCanvasAgg(figure)
                canvas.draw()
                picture = Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3]).quantize(256, method=Image.Quantize.FASTOCTREE)
                picture.save(Path(folder) / "picture.png", format="png")
                plots.close(figure)
                times.setdefault(name, []).append(time.perf_counter() - start)
    return {name: statistics.median(values[1:]) for name, values in times.items()}


def measure(checkout: Path, size: int, repeats: int) -> dict[str, float]:
    """:func:`seconds_per_picture` in a process running ``checkout``'s runner."""
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    done = subprocess.run([sys.executable, __file__, "--size", str(size), "--repeats", str(repeats), "--json"], env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{checkout}: the measurement failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=None, help="one image size only (default: 32 and 227 px)")
    parser.add_argument("--compare", type=Path, default=None, metavar="CHECKOUT", help="also time another checkout, taking turns")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # one measurement, for measure()
    args = parser.parse_args()
    if args.json:
        print(json.dumps(seconds_per_picture(args.size, args.repeats)))
        return
    checkouts = {"this checkout": ROOT} | ({str(args.compare): args.compare.resolve()} if args.compare else {})
    for size in [args.size] if args.size else [32, 227]:
        measured = {name: measure(folder, size, args.repeats) for name, folder in checkouts.items()}  # one process each, in turn
        names = list(next(iter(measured.values())))
        rows = [(name, *(f"{m[name]:.3f}" for m in measured.values())) for name in names]
        rows.append(("all", *(f"{sum(m.values()):.3f}" for m in measured.values())))
        print(f"\n{size} px images, median seconds of {args.repeats}")
        print(tabulate(rows, headers=("picture", *checkouts)))


if __name__ == "__main__":
    main()
