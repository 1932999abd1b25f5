"""Benchmark: writing and reading a Keras run's checkpoint (runner.train.keras_trainer).

    python benchmarks/bench_keras_checkpoint.py                      # ResNet50 at 32 px, 5 repeats
    python benchmarks/bench_keras_checkpoint.py --model vgg16 --size 227

A Keras run writes ``last.keras`` every epoch. A resume checks each checkpoint in Keras' safe
mode (``read_checkpoint``: the model rebuilt from the file's config), then restores the last one
into the run's own model, and a run that keeps its best epoch restores that one at the end
(``restore_checkpoint``: arrays only). The model here has random weights, its base frozen after
layer 140 (ResNet50; VGG16: 15), Adam's state from one training step: a fine-tune phase's checkpoint.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runner.train import keras_trainer  # noqa: E402,I001  (first: it puts Keras on TensorFlow)
import keras  # noqa: E402
import numpy as np  # noqa: E402

from crack_runner.models.keras_backbones import build, freeze  # noqa: E402

FREEZE = {"resnet50": 140, "vgg16": 15}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(FREEZE), default="resnet50")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    keras.utils.set_random_seed(0)
    model, base = build(args.model, None, (args.size, args.size, 3), 2)
    freeze(base, FREEZE[args.model])
    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    rng = np.random.default_rng(0)
    model.fit(rng.uniform(0, 255, (8, args.size, args.size, 3)).astype(np.float32), rng.integers(0, 2, 8), epochs=1, verbose=0)
    times: dict[str, list[float]] = {}

    def timed(name: str, step: Callable[[], object]) -> None:
        start = time.perf_counter()
        step()
        times.setdefault(name, []).append(time.perf_counter() - start)

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder, keras_trainer.CHECKPOINT)
        for _ in range(args.repeats + 1):  # the first round is not counted (first calls trace and cache)
            timed("save_checkpoint (every epoch)", lambda: keras_trainer.save_checkpoint(path, model, 1, "fine_tune"))
            timed("read_checkpoint (a resume's safe check: rebuilt from the file)", lambda: keras_trainer.read_checkpoint(path))
            timed("restore_checkpoint, optimizer too (a resume inside its phase)",
                  lambda: keras_trainer.restore_checkpoint(path, model, optimizer=True))
            timed("restore_checkpoint, weights only (the best epoch at the end)",
                  lambda: keras_trainer.restore_checkpoint(path, model, optimizer=False))
        size_mb = path.stat().st_size / 2**20
    print(f"{args.model} at {args.size} px, checkpoint {size_mb:.0f} MB; median seconds of {args.repeats}:")
    for name, values in times.items():
        print(f"  {statistics.median(values[1:]):6.2f}  {name}")


if __name__ == "__main__":
    main()
