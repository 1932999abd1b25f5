"""Benchmark: the runner's linear run against the plain capstone script, on the same images.

    python benchmarks/bench_linear.py                      # 2,000 synthetic images at 227x227, 3 epochs
    python benchmarks/bench_linear.py --per-class 2000 --epochs 5

Both train the same model (nn.Linear over 227x227x3) with the same optimizer, batch size and
epochs on the same training split. Reported per side: the whole run (all epochs, decoding
included), epochs/s, training images/s and the ratio. The runner is measured twice: with a
cold decode cache (it decodes every image once, in parallel) and warm (a later run or a
sweep job, which maps the decoded pixels). Its MLflow bookkeeping (params, per-epoch
checkpoints, plots, model export) is timed apart, since the plain script tracks nothing.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_dir
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent))
import plain_linear  # noqa: E402

import datasets  # noqa: E402
from runner import torch_trainer  # noqa: E402
from runner.app import run  # noqa: E402
from runner.config import register_schemas, to_run_config  # noqa: E402

CONF = Path(__file__).resolve().parents[1] / "conf"


def runner_times(overrides: list[str]) -> dict[str, float]:
    """Seconds of the runner's data loading, training and whole run (with MLflow)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    times: dict[str, float] = {}
    load, fit = datasets.load, torch_trainer.fit

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                times[name] = time.perf_counter() - start

        return wrapper

    datasets.load, torch_trainer.fit = timed("data", load), timed("fit", fit)
    try:
        start = time.perf_counter()
        run(cfg)
        times["whole"] = time.perf_counter() - start
    finally:
        datasets.load, torch_trainer.fit = load, fit
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-class", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--size", type=int, default=227)
    parser.add_argument("--workdir", type=Path, default=None, help="keep data and store here (default: a temp folder)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    register_schemas()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-linear-"))
    overrides = [
        f"dataset.samples_per_class={args.per_class}", f"dataset.image_size={args.size}",
        f"trainer.epochs={args.epochs}", f"trainer.batch_size={args.batch_size}", "trainer.progress=false",
        f"dataset.cache_dir={work / 'data'}", f"tracking.uri=sqlite:///{work / 'mlflow.db'}",
        f"tracking.artifact_root={work / 'mlruns'}", "tracking.experiment=benchmark",
    ]
    run_cfg = to_run_config_from(overrides)
    data = datasets.load(run_cfg.dataset, run_cfg.seed, progress=False)  # generates the images once
    shutil.rmtree(work / "data" / "decoded", ignore_errors=True)  # the runner starts cold
    train_files, train_labels = data.train.paths, data.train.labels.tolist()
    n = len(train_files)

    plain = sum(plain_linear.train(train_files, train_labels, args.size, args.epochs, args.batch_size, run_cfg.optimizer.lr))
    cold = runner_times(overrides)
    warm = runner_times(overrides)

    rows = []
    for name, seconds, data_s in (
        ("plain script (PIL per item, DataLoader)", plain, None),
        ("runner, cold decode cache: data + fit", cold["data"] + cold["fit"], cold["data"]),
        ("runner, warm decode cache: data + fit", warm["data"] + warm["fit"], warm["data"]),
        ("runner, cold: whole run incl. MLflow", cold["whole"], cold["data"]),
    ):
        rows.append((name, f"{seconds:.1f}", f"{data_s:.1f}" if data_s is not None else "-", f"{args.epochs / seconds:.3f}",
                     f"{n * args.epochs / seconds:.0f}", f"{plain / seconds:.2f}x"))
    print(f"\nlinear classifier, {n} training images of {len(data.train) + len(data.val) + len(data.test)} "
          f"at {args.size}x{args.size}, {args.epochs} epochs, batch {args.batch_size}, {torch_trainer.torch.get_num_threads()} threads\n")
    print(tabulate(rows, headers=("", "seconds", "of which data", "epochs/s", "train images/s", "speed-up vs plain")))
    print(f"\nrunner MLflow bookkeeping (cold run): {cold['whole'] - cold['data'] - cold['fit']:.1f} s")


def to_run_config_from(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return to_run_config(compose("config", overrides=overrides))


if __name__ == "__main__":
    main()
