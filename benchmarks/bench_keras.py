"""Benchmark: the runner's ResNet50 runs against the plain capstone notebook, on the same images.

    python benchmarks/bench_keras.py                                  # 2,000 synthetic images at 227x227, 3 epochs
    python benchmarks/bench_keras.py --per-class 100 --size 64        # a quick look
    python benchmarks/bench_keras.py --uncached                       # also the runner with trainer.cache_frozen_features=false
    python benchmarks/bench_keras.py --precision 32                   # the runner in float32 only

For ResNet50 with the whole base frozen and with freeze_depth=140, both sides train on the
same training split and validate on the same validation split each epoch, with the same
batch size and epochs, random weights (no download). Per side: seconds (data and model
building included), epochs/s, training images/s and the speed-up. The runner starts with a
cold decode cache each time (it decodes every image once, in parallel); the plain script
(benchmarks/plain_keras.py) decodes every JPEG with PIL each epoch. The runner runs twice:
its 1st run starts with an empty feature store and runs the frozen layers once per image; the
next run (what a sweep's next job or a rerun gets) reads their output from the store. It
does so for each ``--precision``: float32 (``32``, the plain script's) and ``bf16-mixed``
(bfloat16 compute: frozen features of its own, so its 1st run computes them too). Then,
per runner run, where its time went: decoding, model building, the frozen layers, the
epochs, checkpoints and MLflow, the test evaluation, the model export.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent))
import plain_keras  # noqa: E402
from stages import PROFILE_HEADERS, bookkeeping_stages, compose_cfg, profile_rows, timed_run  # noqa: E402

from crack_runner import datasets  # noqa: E402
from crack_runner.models.keras_backbones import build, freeze, frozen_layer_count  # noqa: E402
from runner import app  # noqa: E402
from runner.config.schema import register_schemas, to_run_config  # noqa: E402
from runner.train import keras_trainer  # noqa: E402
from runner.train.epochs import Epochs  # noqa: E402
from runner.train.frozen import store as feature_store  # noqa: E402
from runner.train.frozen.cut import cut_after_frozen  # noqa: E402

# What the runner spends its time on (see stages.py).
STAGES = [
    (app.datasets, "load", "data: decode (cold cache) + split"),
    (keras_trainer, "build", "model build"),
    (feature_store, "compute", "frozen layers, once per image (train, val, test)"),
    (feature_store, "layers_key", "feature store: hashing weights"),
    (feature_store, "pixels_key", "feature store: hashing pixels"),
    (keras_trainer, "fit", "epochs: training + validation steps"),
    (Epochs, "end", "epoch end: checkpoint .keras, metrics, artifact"),
    *bookkeeping_stages(keras_trainer.KerasModel),
]


def runner_times(overrides: list[str]) -> dict[str, float]:
    """Seconds of each stage of one runner run, of its fit (inclusive: the plain script's work with the data) and of the whole run."""
    cfg = compose_cfg(overrides)
    fit = keras_trainer.fit
    times: dict[str, float] = {}

    def whole_fit(*args, **kwargs):
        start, cpu = time.perf_counter(), time.process_time()
        try:
            return fit(*args, **kwargs)
        finally:
            times["fit"], times["cpu:fit"] = time.perf_counter() - start, time.process_time() - cpu

    keras_trainer.fit = whole_fit
    try:
        return {**timed_run(STAGES, app.run, cfg), **times}
    finally:
        keras_trainer.fit = fit


def frozen_gflop(size: int, freeze_depth: int | None) -> tuple[str, float]:
    """The cut the runner makes and the GFLOP (2 x multiply-adds of convolutions and dense layers) of the frozen part per image."""
    keras = keras_trainer.keras
    model, base = build("resnet50", None, (size, size, 3), 2)
    freeze(base, frozen_layer_count(base, freeze_depth))
    cut = cut_after_frozen(model, base).cut
    fresh = keras.applications.ResNet50(include_top=False, weights=None, input_shape=(size, size, 3))  # one node per layer
    macs = 0
    for layer in fresh.layers:
        if isinstance(layer, keras.layers.Conv2D):
            _, height, width, channels = layer.output.shape
            macs += height * width * channels * math.prod(layer.kernel.shape[:-1])
        if layer.name == cut:
            break
    return cut, 2 * macs / 1e9


def matmul_gflops(seconds: float = 3.0) -> float:
    """This machine's float32 matrix-multiply rate, the practical ceiling of convolution throughput."""
    tf = keras_trainer.tf
    a = tf.random.normal((2048, 2048))
    b = tf.linalg.matmul(a, a)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        b = tf.linalg.matmul(a, b * 1e-3)
        count += 1
    _ = b.numpy()
    return count * 2 * 2048**3 / (time.perf_counter() - start) / 1e9


def load() -> str:
    """The 1-minute load average: how busy the machine was (2 cores; the benchmark alone keeps it near 2)."""
    return open("/proc/loadavg").read().split()[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-class", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=100, help="the notebook's batch size")
    parser.add_argument("--size", type=int, default=227)
    parser.add_argument("--freeze-depth", nargs="+", default=["null", "140"], help="null = the whole base frozen")
    parser.add_argument("--precision", nargs="+", default=["32", "bf16-mixed"], help="the runner's trainer.precision values to run")
    parser.add_argument("--uncached", action="store_true", help="also run the runner with trainer.cache_frozen_features=false")
    parser.add_argument("--workdir", type=Path, default=None, help="keep data and store here (default: a temp folder)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    register_schemas()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-keras-"))
    common = [
        "model=resnet50", "model.weights=null",
        f"dataset.samples_per_class={args.per_class}", f"dataset.image_size={args.size}",
        f"trainer.epochs={args.epochs}", f"trainer.batch_size={args.batch_size}", "trainer.progress=false",
        f"dataset.cache_dir={work / 'data'}", f"tracking.uri=sqlite:///{work / 'mlflow.db'}",
        f"tracking.artifact_root={work / 'mlruns'}", "tracking.experiment=benchmark",
    ]
    run_cfg = to_run_config(compose_cfg(common))
    data = datasets.load(run_cfg.dataset, run_cfg.seed, progress=False)  # generates the images once
    train_files, train_labels = data.train.paths, data.train.labels.tolist()
    val_files, val_labels = data.val.paths, data.val.labels.tolist()
    n, n_val = len(train_files), len(val_files)
    n_all = n + n_val + len(data.test)
    print(f"ResNet50 (random weights), {n} training + {n_val} validation images (of {n_all}) "
          f"at {args.size}x{args.size}, {args.epochs} epochs, batch {args.batch_size}, {os.cpu_count()} cores, "
          f"TensorFlow {keras_trainer.tf.__version__}", flush=True)

    rows, profiles, notes = [], [], []
    for text in args.freeze_depth:
        depth = None if text == "null" else int(text)
        name = "whole base frozen" if depth is None else f"freeze_depth={depth}"
        cpu = time.process_time()
        plain, epoch_seconds = plain_keras.train(train_files, train_labels, val_files, val_labels, args.size, args.epochs, args.batch_size, depth)
        plain_cpu = time.process_time() - cpu
        print(f"{name}: plain {plain:.1f} s, {plain_cpu:.1f} CPU s (epochs {', '.join(f'{s:.1f}' for s in epoch_seconds)}) "
              f"load {load()}", flush=True)
        sides = [("plain script (PIL per batch, model.fit)", plain, plain_cpu, None)]
        shutil.rmtree(work / "data" / "features", ignore_errors=True)  # the first runner run computes the frozen features
        variants = []
        for precision in args.precision:  # each precision has frozen features of its own: its 1st run computes them
            runner = "runner" if precision == "32" else f"runner {precision}"
            variants += [(f"{runner}, 1st run", "true", precision), (f"{runner}, next run (feature store)", "true", precision)]
            variants += [(f"{runner}, cache_frozen_features=false", "false", precision)] if args.uncached else []
        for label, cache, precision in variants:
            shutil.rmtree(work / "data" / "decoded", ignore_errors=True)  # each runner run decodes anew
            times = runner_times([*common, f"freeze_depth={text}", f"trainer.cache_frozen_features={cache}", f"trainer.precision={precision}"])
            data_s = times["data: decode (cold cache) + split"]
            fit_s, cpu_s = times["fit"], times["cpu:data: decode (cold cache) + split"] + times["cpu:fit"]
            print(f"{name}: {label} {data_s + fit_s:.1f} s, {cpu_s:.1f} CPU s (data {data_s:.1f}), whole run {times['whole run']:.1f} s "
                  f"load {load()}", flush=True)
            sides += [(f"{label}: data + fit", data_s + fit_s, cpu_s, data_s),
                      (f"{label}: whole run incl. test + MLflow", times["whole run"], times["cpu:whole run"], data_s)]
            profiles.append((f"{name}, {label}", times))
            if label.endswith("1st run"):
                cut, gflop = frozen_gflop(args.size, depth)
                frozen_s = times.get("frozen layers, once per image (train, val, test)", 0.0)
                extract = frozen_s * (n + n_val) / n_all  # the train and val part, in the fit
                fixed = data_s + extract + times.get("model build", 0.0)
                per_epoch = (data_s + fit_s - fixed) / args.epochs
                plain_epoch = sum(epoch_seconds[1:]) / max(1, len(epoch_seconds) - 1)  # the first one also traces
                at10 = (plain - sum(epoch_seconds) + epoch_seconds[0] + 9 * plain_epoch) / (fixed + 10 * per_epoch)
                notes.append(
                    f"{name}, {label}: frozen part up to {cut}, {gflop:.2f} GFLOP per image, run once for {n_all} images in "
                    f"{frozen_s:.1f} s = {n_all / max(frozen_s, 1e-9):.1f} images/s, {gflop * n_all / max(frozen_s, 1e-9):.0f} GFLOP/s; "
                    f"then {per_epoch:.1f} s per epoch (plain: {plain_epoch:.1f} s). Projected from these parts at "
                    f"trainer.epochs=10 (the runner's default): {at10:.1f}x"
                )
        for side, seconds, cpu_s, data_s in sides:
            rows.append((name, side, f"{seconds:.1f}", f"{data_s:.1f}" if data_s is not None else "-",
                         f"{args.epochs / seconds:.4f}", f"{n * args.epochs / seconds:.1f}", f"{plain / seconds:.2f}x",
                         f"{cpu_s:.0f}", f"{plain_cpu / cpu_s:.2f}x"))

    print()
    print(tabulate(rows, headers=("", "", "seconds", "of which data", "epochs/s", "train images/s", "speed-up vs plain",
                                  "CPU seconds", "CPU speed-up")))
    print("(CPU seconds: of this process, all threads; less sensitive than wall time to other programs on the machine)")
    print(f"\nthis machine's float32 matmul rate (the ceiling for convolutions): {matmul_gflops():.0f} GFLOP/s")
    for note in notes:
        print(note)
    for title, times in profiles:
        print(f"\nwhere the runner's time goes: {title}")
        print(tabulate(profile_rows(STAGES, times), headers=PROFILE_HEADERS))


if __name__ == "__main__":
    main()
