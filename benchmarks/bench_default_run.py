"""Benchmark: the README's default run (`python -m runner`) with its data cached, and where its time goes.

    python benchmarks/bench_default_run.py                 # 5 timed runs after one that fills the caches
    python benchmarks/bench_default_run.py --repeats 3 --workdir /tmp/bench
    python benchmarks/bench_default_run.py --compare /tmp/before --repeats 7   # against another checkout

Prints the wall time of the whole command (median of the repeats), then a profile of one run:
the imports the command makes (a separate process that imports only them), and, in-process,
the stages of the run (store, data, training, evaluation, model logging). Everything runs in a
folder of its own (data cache, MLflow store), so nothing of the user's is touched.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tabulate import tabulate

ROOT = Path(__file__).resolve().parents[1]
# What `python -m runner` imports before the run starts (the entry point, the app, the linear trainer).
IMPORTS = "import runner.__main__, runner.app, runner.train.torch_trainer, runner.report.evaluate, mlflow.pytorch"


def command_seconds(workdir: Path, env: dict[str, str]) -> float:
    """Wall seconds of one `python -m runner` in ``workdir``."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "runner", "trainer.progress=false"], check=False, cwd=workdir, env=env,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"python -m runner failed:\n{done.stderr[-3000:]}")
    return seconds


def import_seconds(env: dict[str, str]) -> float:
    """Wall seconds of a process that only imports what the command imports."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", IMPORTS], cwd=ROOT, env=env, check=True)
    return time.perf_counter() - start - python_seconds(env)


def python_seconds(env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], env=env, check=True)
    return time.perf_counter() - start


def stage_profile(workdir: Path) -> tuple[dict[str, float], list[str]]:
    """One default run in this process, timed per stage (benchmarks/stages.py)."""
    os.chdir(workdir)
    sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]  # this checkout's runner, whatever is installed
    from stages import compose_cfg, timed_run

    import runner.__main__  # noqa: F401 - the command's process settings (garbage collection) and config schemas
    from runner import app
    from runner.train import torch_trainer
    stages = [
        (app, "open_store", "MLflow store: open, experiment"),
        (app.datasets, "load", "data: find, fingerprint, split, read the cache"),
        (app, "start_run", "MLflow run: start (tags, config, params)"),
        (torch_trainer, "fit", "training: 10 epochs with checkpoints and epoch metrics"),
        (app, "evaluate_and_log", "evaluation: test metrics, plots, JSON"),
        (torch_trainer.TorchModel, "log_model", "model logging: export and upload"),
    ]
    return timed_run(stages, app.run, compose_cfg(["trainer.progress=false"])), [label for _, _, label in stages]


def environment(checkout: Path, workdir: Path) -> dict[str, str]:
    """``python -m runner`` of ``checkout``, with its data cache and store in ``workdir``."""
    workdir.mkdir(parents=True, exist_ok=True)
    return {**os.environ, "CRACK_RUNNER_DATA": str(workdir / "data"), "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}",
            "PYTHONPATH": str(checkout)}


def compare(other: Path, workdir: Path, rounds: int) -> None:
    """This checkout against ``other`` (e.g. `git worktree add /tmp/before <commit>`), one run of each in turn.

    The machine's speed can drift within minutes; taking turns exposes both to the same drift.
    """
    checkouts = {"this checkout": (ROOT, workdir / "tree0"), f"{other}": (other, workdir / "tree1")}
    runs = {name: (folder, environment(tree, folder)) for name, (tree, folder) in checkouts.items()}
    for name, (folder, env) in runs.items():
        print(f"{name}: first run (generates and caches the data): {command_seconds(folder, env):.1f} s", flush=True)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, (folder, env) in runs.items():
            times[name].append(command_seconds(folder, env))
    rows = [(name, f"{statistics.median(t):.2f}", f"{min(t):.2f}", f"{max(t):.2f}") for name, t in times.items()]
    print(tabulate(rows, headers=(f"python -m runner, data cached, {rounds} runs each", "median s", "min", "max")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=None, help="data cache and store here (default: a temp folder)")
    parser.add_argument("--compare", type=Path, default=None, metavar="CHECKOUT",
                        help="time this checkout against another, runs taking turns (no profile)")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-default-"))
    if args.compare is not None:
        compare(args.compare.resolve(), workdir, args.repeats)
        return
    env = environment(ROOT, workdir)
    print(f"first run (generates and caches the data): {command_seconds(workdir, env):.1f} s", flush=True)
    runs = [command_seconds(workdir, env) for _ in range(args.repeats)]
    print(f"python -m runner, data cached: median {statistics.median(runs):.2f} s of {args.repeats} "
          f"({', '.join(f'{s:.2f}' for s in runs)})")
    imports = statistics.median(import_seconds(env) for _ in range(3))
    os.environ.update(env)
    times, labels = stage_profile(workdir)
    rows = [("imports (a process importing only them)", imports)]
    rows += [(label, times.get(label, 0.0)) for label in labels]
    rows.append(("other in the run: seeding, summary, run end", times["whole run"] - sum(times.get(label, 0.0) for label in labels)))
    print(tabulate([(label, f"{seconds:.2f}") for label, seconds in rows], headers=("stage", "seconds")))


if __name__ == "__main__":
    main()
