"""Benchmark: the runner's linear run against the plain capstone script, on the same images.

    python benchmarks/bench_linear.py                      # 2,000 synthetic images at 227x227, 3 epochs
    python benchmarks/bench_linear.py --per-class 2000 --epochs 5

Both train the same model (nn.Linear over 227x227x3) with the same optimizer, batch size and
epochs on the same training split. Reported per side: the whole run (all epochs, decoding
included), epochs/s, training images/s and the ratio. The runner is measured twice: with a
cold decode cache (it decodes every image once, in parallel) and warm (a later run or a
sweep job, which maps the decoded pixels), and warm with ``trainer.precision=bf16-mixed``
(bfloat16 batches and matrix products: other results, within bfloat16 rounding). Its MLflow bookkeeping (params, per-epoch
checkpoints, plots, model export), which the plain script does not do, is in the whole run's
row and in a profile of where each run's time went.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
from pathlib import Path

from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent))
import plain_linear  # noqa: E402
from stages import PROFILE_HEADERS, bookkeeping_stages, compose_cfg, profile_rows, timed_run  # noqa: E402

from crack_runner import datasets  # noqa: E402
from runner import app  # noqa: E402
from runner.config.schema import register_schemas, to_run_config  # noqa: E402
from runner.train import torch_trainer  # noqa: E402

# What the runner spends its time on (see stages.py); the first four are the plain script's work
# (decoding, all epochs) plus the validation the runner adds each epoch.
STAGES = [
    (app.datasets, "load", "data: decode + split"),
    (torch_trainer, "channel_stats", "normalisation statistics"),
    (torch_trainer, "train_one_epoch", "epochs: training steps"),
    (torch_trainer, "evaluate", "epochs: validation steps"),
    (torch_trainer, "save_checkpoint", "checkpoint each epoch"),
    *bookkeeping_stages(torch_trainer.TorchModel),
]
WORK = [label for _, _, label in STAGES[:4]]


def runner_times(overrides: list[str]) -> dict[str, float]:
    """Seconds of each stage of one runner run and of the whole run (with MLflow)."""
    return timed_run(STAGES, app.run, compose_cfg(overrides))


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
    run_cfg = to_run_config(compose_cfg(overrides))
    data = datasets.load(run_cfg.dataset, run_cfg.seed, progress=False)  # generates the images once
    shutil.rmtree(work / "data" / "decoded", ignore_errors=True)  # the runner starts cold
    train_files, train_labels = data.train.paths, data.train.labels.tolist()
    n = len(train_files)

    plain = sum(plain_linear.train(train_files, train_labels, args.size, args.epochs, args.batch_size, run_cfg.optimizer.lr))
    cold = runner_times(overrides)
    warm = runner_times(overrides)
    mixed = runner_times([*overrides, "trainer.precision=bf16-mixed"])  # warm too

    rows = []
    for name, times in (("cold decode cache", cold), ("warm decode cache", warm), ("bf16-mixed, warm decode cache", mixed)):
        seconds = sum(times[label] for label in WORK)
        rows.append((f"runner, {name}: data + epochs", seconds, times[WORK[0]]))
    rows.append(("runner, cold: whole run incl. MLflow", cold["whole run"], cold[WORK[0]]))
    print(f"\nlinear classifier, {n} training images of {len(data.train) + len(data.val) + len(data.test)} "
          f"at {args.size}x{args.size}, {args.epochs} epochs, batch {args.batch_size}, {torch_trainer.torch.get_num_threads()} threads\n")
    print(tabulate(
        [(name, f"{seconds:.2f}", "-" if data_s is None else f"{data_s:.2f}", f"{args.epochs / seconds:.3f}",
          f"{n * args.epochs / seconds:.0f}", f"{plain / seconds:.2f}x")
         for name, seconds, data_s in [("plain script (PIL per item, DataLoader)", plain, None), *rows]],
        headers=("", "seconds", "of which data", "epochs/s", "train images/s", "speed-up vs plain"),
    ))
    print("(data + epochs: decoding, normalisation statistics, training and validation steps; the plain script "
          "decodes and trains, without validation)")
    for name, times in (("cold decode cache", cold), ("warm decode cache", warm)):
        print(f"\nwhere the runner's time goes, {name}")
        print(tabulate(profile_rows(STAGES, times), headers=PROFILE_HEADERS))


if __name__ == "__main__":
    main()
