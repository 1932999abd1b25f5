"""Images per second of the Keras stream on this machine: training steps and evaluation.

It runs the trainer's own pieces (model builder, freezing, optimizer, tf.data pipeline and
predict_proba) on random pixels with random weights, so it needs no download and no data
set. Each measurement follows one warm-up pass (tracing and compilation). Needs the project
installed (pip install -e ".[keras]").

    python benchmarks/keras_throughput.py                                   # resnet50, 224 px, freeze_depth null and 140
    python benchmarks/keras_throughput.py --model vgg16 --freeze-depth 0 15 --image-size 227
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

from runner.train import keras_trainer  # noqa: I001  (first: it puts Keras on TensorFlow)
import numpy as np

from crack_runner.models.keras_backbones import build, freeze, frozen_layer_count
from runner.config.schema import SGDConfig
from runner.train.frozen.tfdata import batch_rows, batches


def images_per_second(step: Callable[[], object], images: int, repeats: int) -> float:
    """Throughput of ``step`` (one pass over ``images``), after a warm-up pass."""
    step()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return images * repeats / (time.perf_counter() - start)


def measure(args: argparse.Namespace, freeze_depth: int | None) -> tuple[int, float, float]:
    """Frozen base layers, training and evaluation images/s of one model at one freeze_depth."""
    size = args.image_size
    model, base = build(args.model, None, (size, size, 3), 2)
    frozen = frozen_layer_count(base, freeze_depth)
    freeze(base, frozen)
    optimizer = SGDConfig(lr=0.01, weight_decay=0.0, momentum=0.9)
    keras_trainer.compile_model(model, optimizer, optimizer.lr)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (args.images, size, size, 3), dtype=np.uint8)
    labels = rng.integers(0, 2, args.images)
    train = batches(pixels, labels, batch_rows(len(pixels), args.batch_size, shuffle_seed=0))
    trained = keras_trainer.KerasModel(model, args.batch_size, history=[])
    training = images_per_second(lambda: model.fit(train, epochs=1, shuffle=False, verbose=0), args.images, args.repeats)
    evaluation = images_per_second(lambda: trained.predict_proba(pixels), args.images, args.repeats)
    return frozen, training, evaluation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50", choices=["resnet50", "vgg16"])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="timed passes after the warm-up")
    parser.add_argument("--threads", type=int, default=None, help="TensorFlow threads (default: all cores)")
    parser.add_argument("--freeze-depth", nargs="+", default=["null", "140"], help="values of freeze_depth; null = whole base")
    args = parser.parse_args()
    keras_trainer.set_threads(args.threads)
    print(f"{args.model}, {args.image_size} px, {args.images} random images, batch {args.batch_size}, "
          f"{args.threads or os.cpu_count()} threads, TensorFlow {keras_trainer.tf.__version__}")
    print(f"{'freeze_depth':>12} {'frozen layers':>14} {'train img/s':>12} {'eval img/s':>11}")
    for text in args.freeze_depth:
        depth = None if text == "null" else int(text)
        frozen, training, evaluation = measure(args, depth)
        print(f"{text:>12} {frozen:>14} {training:>12.1f} {evaluation:>11.1f}", flush=True)


if __name__ == "__main__":
    main()
