"""The real set's scale: how a run's time, memory and disk grow with the number of images.

    python benchmarks/bench_scale.py generate --per-class 20000 --dir /tmp/scale   # the 40,000-image set, timed
    python benchmarks/bench_scale.py linear --images 10000 40000 --dir /tmp/scale  # cold (decode) and warm runs
    python benchmarks/bench_scale.py keras --images 1000 3000 --epochs 2 --dir /tmp/scale

``generate`` makes the synthetic set in the real set's layout (``<dir>/set/Positive``,
``Negative``) on all cores, resumable. The other commands train on the first ``--images``
of it (``dataset=image_folder dataset.limit=<images / 2>``), each run in a fresh process that
reports its stages' seconds (benchmarks/stages.py), its peak RSS and the disk it kept: run
folder, artifacts and logged model together, and the frozen-feature store apart. Printed
as tables, with the growth per 1,000 images between the first and the last size.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stages import MemoryPeaks, bookkeeping_stages, compose_cfg, peak_rss_gb, timed_run  # noqa: E402

from crack_runner.datasets import synthetic  # noqa: E402

KERAS_RUNS = {  # name -> overrides (random weights: no download here)
    "ResNet50, whole base frozen": ["model=resnet50", "model.weights=null", "freeze_depth=null"],
    "ResNet50 freeze_depth=140": ["model=resnet50", "model.weights=null", "freeze_depth=140"],
    "ResNet50 freeze_depth=140 fine_tune_lr=1e-5": ["model=resnet50", "model.weights=null", "freeze_depth=140", "fine_tune_lr=1e-5",
                                                    "trainer.fine_tune_epochs=1"],
}


def disk_bytes(*folders: Path) -> int:
    """Bytes under ``folders``, a file linked several times counted once."""
    seen: dict[int, int] = {}
    for folder in folders:
        for path in folder.rglob("*") if folder.exists() else []:
            if path.is_file():
                seen[path.stat().st_ino] = path.stat().st_size
    return sum(seen.values())


def one_run(work: Path, overrides: list[str]) -> None:
    """In a fresh process: one runner run, its stages, peak RSS and disk as one JSON line on stdout."""
    from runner import app
    from runner.config.schema import register_schemas

    logging.basicConfig(level=logging.WARNING)
    register_schemas()
    if any(o.startswith("model=") and o != "model=linear" for o in overrides):
        from runner.train import keras_trainer as trainer
        from runner.train.frozen import store

        model_class = trainer.KerasModel
        extra = [(store, "compute", "frozen layers, once per image"), (trainer, "fit", "epochs: training + validation"),
                 (trainer.EpochEnd, "on_epoch_end", "epoch ends: checkpoint, metrics")]
    else:
        from runner.train import torch_trainer as trainer

        model_class = trainer.TorchModel
        extra = [(trainer, "train_one_epoch", "epochs: training"), (trainer, "evaluate", "epochs: validation")]
    stages = [(app.datasets, "load", "data: decode or read cache, split"), *extra, *bookkeeping_stages(model_class)]
    with MemoryPeaks() as memory:
        times = timed_run(stages, app.run, compose_cfg(overrides))
    print(json.dumps({
        "times": times,
        "labels": [label for _, _, label in stages],
        "peak_rss_gb": peak_rss_gb(),
        "own_peak_gb": memory.own_gb,
        "own_peak_stage": memory.own_stage,
        "mapped_peak_gb": memory.file_gb,
        "run_disk_gb": disk_bytes(Path(os.environ["TMPDIR"])) / 1e9,  # the run's own artifact root and folder (see measured)
        "store_gb": disk_bytes(work / "data" / "features") / 1e9,
    }))


def measured(work: Path, overrides: list[str]) -> dict:
    """One run in a fresh process (its own peak RSS); its artifacts, logged model (an experiment of its own) and folder
    alone under one folder, data and store shared."""
    own = work / "runs" / str(time.time_ns())
    (own / "mlruns").mkdir(parents=True)
    base = [f"dataset.cache_dir={work / 'data'}", f"tracking.uri=sqlite:///{work / 'mlflow.db'}", f"tracking.artifact_root={own / 'mlruns'}",
            f"tracking.experiment=scale-{own.name}", "trainer.progress=false", "dataset=image_folder", f"dataset.path={work / 'set'}"]
    done = subprocess.run([sys.executable, __file__, "one", "--dir", str(work), "--", *base, *overrides],
                          capture_output=True, text=True, env={**os.environ, "TMPDIR": str(own)})  # the run's folder: a temp folder
    if done.returncode:
        sys.exit(f"run failed ({' '.join(overrides)}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def stage_table(title: str, results: dict[str, dict]) -> None:
    labels = next(iter(results.values()))["labels"]
    rows = [[label, *(f"{r['times'].get(label, 0.0):.1f}" for r in results.values())] for label in labels]
    rows.append(["whole run", *(f"{r['times']['whole run']:.1f}" for r in results.values())])
    rows.append(["peak RSS (GB)", *(f"{r['peak_rss_gb']:.2f}" for r in results.values())])
    rows.append(["  of it, own memory at its peak (GB)", *(f"{r['own_peak_gb']:.2f}" for r in results.values())])
    rows.append(["  mapped file pages at their peak (GB)", *(f"{r['mapped_peak_gb']:.2f}" for r in results.values())])
    rows.append(["  own memory peaked in", *(r["own_peak_stage"] for r in results.values())])
    rows.append(["run disk: folder, artifacts, model (GB)", *(f"{r['run_disk_gb']:.3f}" for r in results.values())])
    rows.append(["frozen-feature store (GB)", *(f"{r['store_gb']:.3f}" for r in results.values())])
    print(f"\n{title} (seconds)\n" + tabulate(rows, headers=["stage", *results]))


def conv5_limit(run: dict, images: int, size: int, epochs: int | None) -> None:
    """A freeze_depth=140 run's epochs (read from the store: training conv5 and the head) against the FLOP limit of this machine."""
    from bench_keras import frozen_gflop, matmul_gflops

    whole, prefix = frozen_gflop(size, None)[1], frozen_gflop(size, 140)[1]
    rate = matmul_gflops()
    train, val = round(images * 0.7), round(images * 0.15)  # the default split
    count = epochs or 10
    limit = count * (3 * train + val) * (whole - prefix) / rate  # training: forward and two backward products; validation: forward
    seconds = run["times"]["epochs: training + validation"]
    print(f"\nfreeze_depth=140 at {size} px: conv5 {whole - prefix:.2f} GFLOP per image forward; float32 matmul {rate:.0f} GFLOP/s; "
          f"{count} epochs over {train} + {val} images: {seconds:.1f} s against a limit of {limit:.1f} s ({100 * limit / seconds:.0f}% of the limit's speed)")


def growth(results: dict[int, dict]) -> str:
    """Seconds and GB per 1,000 more images, between the smallest and the largest size."""
    (small, a), (large, b) = min(results.items()), max(results.items())
    per = (large - small) / 1000
    if per <= 0:
        return ""
    return (f"growth per 1,000 images ({small} -> {large}): {(b['times']['whole run'] - a['times']['whole run']) / per:.1f} s, "
            f"{(b['peak_rss_gb'] - a['peak_rss_gb']) / per:.3f} GB peak RSS ({(b['own_peak_gb'] - a['own_peak_gb']) / per:.3f} GB own), {(b['store_gb'] - a['store_gb']) / per:.3f} GB store")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["generate", "linear", "keras", "one"])
    parser.add_argument("--dir", type=Path, required=True, help="the set (<dir>/set), data cache, store and runs")
    parser.add_argument("--per-class", type=int, default=20000)
    parser.add_argument("--images", type=int, nargs="+", default=[10000, 40000])
    parser.add_argument("--size", type=int, default=227)
    parser.add_argument("--epochs", type=int, default=None, help="default: the config's")
    parser.add_argument("--only", default="", help="keras: only the runs whose name holds this text (e.g. fine_tune)")
    argv = sys.argv[1:]
    rest = argv[argv.index("--") + 1 :] if "--" in argv else []  # one: the run's overrides
    args = parser.parse_args(argv[: len(argv) - len(rest) - (1 if rest else 0)])
    work = args.dir.resolve()
    if args.what == "one":
        one_run(work, rest)
        return
    if args.what == "generate":
        logging.basicConfig(level=logging.INFO)
        start = time.perf_counter()
        synthetic.generate(work / "set", args.per_class, image_size=227, seed=0)
        seconds = time.perf_counter() - start
        print(f"{2 * args.per_class} images at 227 px on {os.cpu_count()} cores: {seconds:.0f} s, {1000 * seconds / (2 * args.per_class):.1f} s per 1,000")
        return
    epochs = [f"trainer.epochs={args.epochs}"] if args.epochs else []
    sized = lambda n: [f"dataset.limit={n // 2}", f"dataset.image_size={args.size}", *epochs]  # noqa: E731
    if args.what == "linear":
        results = {}
        for n in args.images:
            shutil.rmtree(work / "data" / "decoded", ignore_errors=True)
            results[f"{n} cold"] = cold = measured(work, sized(n))
            results[f"{n} warm"] = warm = measured(work, sized(n))
            results[n] = (cold, warm)
        stage_table("linear, default settings", {k: v for k, v in results.items() if isinstance(k, str)})
        print(growth({n: results[n][0] for n in args.images}) + " (cold)")
        print(growth({n: results[n][1] for n in args.images}) + " (warm)")
    else:
        fits = {}
        for name, overrides in ((k, v) for k, v in KERAS_RUNS.items() if args.only in k):
            runs = {n: measured(work, [*overrides, *sized(n)]) for n in args.images}
            again = {f"{n} again": measured(work, [*overrides, *sized(n)]) for n in args.images[-1:]}
            stage_table(name, {**{str(n): r for n, r in runs.items()}, **again})
            print(growth(runs))
            fits[name] = again[f"{args.images[-1]} again"]
        if "ResNet50 freeze_depth=140" in fits:
            conv5_limit(fits["ResNet50 freeze_depth=140"], args.images[-1], args.size, args.epochs)


if __name__ == "__main__":
    main()
