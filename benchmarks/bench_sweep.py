"""Pruned against unpruned: the same seeded Optuna search with each pruner, what it found and what it trained.

    python benchmarks/bench_sweep.py linear --trials 16 --workers 1 2
    python benchmarks/bench_sweep.py resnet50 --trials 16 --workers 1
    python benchmarks/bench_sweep.py linear --pruners none median asha --set sweep.min_epochs=3   # more overrides, every search
    python benchmarks/bench_sweep.py linear --seeds 0 1 2 3 4   # each search with 5 sampler seeds, and their means

Each search is ``python -m runner -m`` in a fresh folder and store: ``hydra/sweeper=optuna``
with a fixed sampler seed, ``sweep.pruner`` none, median and asha, with ``sweep.workers``
1 (or 2, with the joblib launcher). ``linear``: the linear model at 227 px on the embedded
set over lr x batch size x weight decay, 10 epochs. ``resnet50``: ResNet50 from random
weights (no download here) at 32 px on 200 images a class over lr x freeze_depth, 3 epochs
of the head and 3 of fine-tuning. Reported per search: the best objective (val_accuracy of
the best complete trial, the one Optuna would pick) and that trial's test accuracy, the
epochs trained by all trials together, the trials pruned, and the wall time. With several
``--seeds`` (the sampler's), each pruned search is compared with the unpruned one of its seed,
and a second table gives each pruner's means over the seeds: one seed's search follows one
path of TPE's, which pruning changes (pruned trials report fewer epochs), so a single pair of
searches can differ by the one trial that only one of them drew.
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
from tabulate import tabulate

SEARCHES = {
    "linear": ["model=linear", "optimizer.lr=tag(log, interval(0.001, 3.0))", "trainer.batch_size=choice(16, 32, 64, 128)",
               "optimizer.weight_decay=tag(log, interval(0.000001, 0.01))", "trainer.epochs=10"],
    "resnet50": ["model=resnet50", "model.weights=null", "dataset.image_size=32", "dataset.limit=200", "optimizer=adam",
                 "optimizer.lr=tag(log, interval(0.00001, 0.01))", "freeze_depth=choice(80, 120, 140, 165, 175)", "fine_tune_lr=0.0001",
                 "trainer.epochs=3", "trainer.fine_tune_epochs=3"],
}


def search(model: str, pruner: str, workers: int, trials: int, data: Path, extra: list[str], seed: int = 0) -> dict[str, object]:
    """Run one search in a folder of its own; what it found, trained and took."""
    folder = Path(tempfile.mkdtemp(prefix=f"sweep-{model}-{pruner}-{workers}-"))
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    command = [sys.executable, "-m", "runner", "-m", "hydra/sweeper=optuna", "hydra.sweeper.direction=maximize",
               f"hydra.sweeper.n_trials={trials}", f"hydra.sweeper.sampler.seed={seed}", "hydra.sweeper.study_name=bench",
               *SEARCHES[model], *extra, f"sweep.pruner={pruner}", f"sweep.workers={workers}",
               "trainer.progress=false", "export.onnx=false",
               *(["hydra/launcher=joblib", f"hydra.launcher.n_jobs={workers}"] if workers > 1 else [])]
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "CRACK_RUNNER_DATA": str(data)}
    started = time.perf_counter()
    done = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{model} {pruner} x{workers} failed:\n{done.stderr[-3000:]}")
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("crack-classification").experiment_id])
    jobs = [r for r in runs if r.data.tags.get("sweep_role") != "sweep_parent"]
    complete = [r for r in jobs if r.data.tags.get("pruned") != "true" and r.info.status == "FINISHED"]
    best = max(complete, key=lambda r: r.data.metrics["val_accuracy"])
    epochs = sum(len(client.get_metric_history(r.info.run_id, "val_loss")) for r in jobs)
    return {"model": model, "pruner": pruner, "settings": " ".join(extra), "workers": workers, "seed": seed, "trials": len(jobs),
            "pruned": len(jobs) - len(complete),
            "best val_accuracy": best.data.metrics["val_accuracy"], "its test_accuracy": best.data.metrics["test_accuracy"],
            "epochs": epochs, "wall s": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", choices=sorted(SEARCHES))
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--workers", type=int, nargs="+", default=[1])
    parser.add_argument("--pruners", nargs="+", default=["none", "median", "asha"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="the sampler's seeds: one search each")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more overrides for every search")
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "bench-sweep-data", help="the data cache, shared")
    args = parser.parse_args()
    rows = [search(args.model, pruner, workers, args.trials, args.data, args.set, seed)
            for workers in args.workers for seed in args.seeds for pruner in args.pruners]
    for row in rows:
        base = next(r for r in rows if (r["workers"], r["seed"], r["pruner"]) == (row["workers"], row["seed"], "none"))
        row["epochs vs none"] = row["epochs"] / base["epochs"]
        row["best vs none (points)"] = 100 * (row["best val_accuracy"] - base["best val_accuracy"])
    print(tabulate(rows, headers="keys", tablefmt="github", floatfmt=".4f"))
    if len(args.seeds) > 1:
        print()
        print(tabulate(means(rows), headers="keys", tablefmt="github", floatfmt=".4f"))


def means(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    """Per pruner and workers, the means over the seeds (and how many seeds met the goal: within 1 point at 40% of the epochs)."""
    out = []
    for key in dict.fromkeys((r["pruner"], r["workers"]) for r in rows):
        group = [r for r in rows if (r["pruner"], r["workers"]) == key]
        mean = lambda name: sum(float(r[name]) for r in group) / len(group)  # noqa: E731
        out.append({"pruner": key[0], "workers": key[1], "seeds": len(group), "mean best val_accuracy": mean("best val_accuracy"),
                    "mean its test_accuracy": mean("its test_accuracy"), "mean epochs": mean("epochs"),
                    "mean epochs vs none": mean("epochs vs none"), "mean best vs none (points)": mean("best vs none (points)"),
                    "seeds within 1 point": sum(float(r["best vs none (points)"]) >= -1.0 for r in group), "mean wall s": mean("wall s")})
    return out


if __name__ == "__main__":
    main()
