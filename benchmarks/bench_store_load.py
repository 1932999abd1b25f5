"""Load benchmark: many `python -m runner` processes at once against one tracking store.

    python benchmarks/bench_store_load.py                                # 8 and 16 at once, sqlite and the server
    python benchmarks/bench_store_load.py --concurrency 32 --stores server

Stores: ``sqlite`` (a new ``mlflow.db`` file, opened first by all the processes at once) and
``server`` (a throwaway PostgreSQL cluster behind ``mlflow server --app-name basic-auth`` with
proxied artifacts, started as tests/services.py does; the runs log in as a user of it). Each
run is tiny (16 images per class at 32 px, 2 epochs, one thread) so the store, not training, is
what is loaded; one run before the measured ones fills the data cache.

Per store and concurrency it prints: runs recorded (FINISHED in the store with their test
metrics and model), lost (the process exited 0 but its run is missing or incomplete: must be
0), failed (the process exited non-zero; their last log lines follow the table), the wall time
of the batch and seconds per run (wall time / runs) and the mean time of one process.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
from tabulate import tabulate

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import services  # noqa: E402

TINY = ["dataset.samples_per_class=16", "dataset.source_size=64", "dataset.image_size=32", "trainer.epochs=2",
        "trainer.num_threads=1", "trainer.progress=false"]
HEADERS = ["store", "concurrent runs", "recorded", "lost", "failed", "wall s", "s per run", "mean s of a process"]


@contextmanager
def store(kind: str, folder: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """The tracking URI of a fresh store of ``kind`` and the environment its clients need."""
    if kind == "sqlite":
        yield f"sqlite:///{folder / 'mlflow.db'}", {}
        return
    server = services.start_auth_server(services.start_postgres(folder), folder)
    try:
        yield server.url, server.credentials()
    finally:
        server.stop()


def launch(uri: str, env: dict[str, str], cwd: Path, experiment: str, name: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "runner", *TINY, f"tracking.uri={uri}", f"tracking.experiment={experiment}",
               f"tracking.run_name={name}", f"tracking.artifact_root={cwd / 'mlruns'}"]
    with open(cwd / f"{name}.log", "w") as log:  # the child keeps its own copy of the file
        return subprocess.Popen(command, cwd=cwd, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)


def batch(uri: str, env: dict[str, str], cwd: Path, kind: str, n: int) -> tuple[list, list[str]]:
    """Start ``n`` runs at once, wait for all; the table row and the log tails of failed processes."""
    experiment = f"load-{kind}-{n}"
    started = time.monotonic()
    processes = {f"{experiment}-{i}": launch(uri, env, cwd, experiment, f"{experiment}-{i}") for i in range(n)}
    durations: dict[str, float] = {}
    while len(durations) < n:
        for name, process in processes.items():
            if name not in durations and process.poll() is not None:
                durations[name] = time.monotonic() - started
        time.sleep(0.1)
    wall = max(durations.values())
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id], max_results=1000)
    complete = {r.info.run_name for r in runs if r.info.status == "FINISHED" and "test_accuracy" in r.data.metrics
                and r.data.tags.get("model_uri", "").startswith("models:/")}
    failed = [name for name, p in processes.items() if p.returncode != 0]
    lost = [name for name, p in processes.items() if p.returncode == 0 and name not in complete]
    tails = [f"{name} (exit {processes[name].returncode}):\n" + "\n".join((cwd / f"{name}.log").read_text().splitlines()[-5:])
             for name in failed + lost]
    row = [kind, n, len(complete), len(lost), len(failed), f"{wall:.1f}", f"{wall / n:.2f}", f"{sum(durations.values()) / n:.1f}"]
    return row, tails


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--stores", nargs="+", choices=["sqlite", "server"], default=["sqlite", "server"])
    args = parser.parse_args()
    rows, tails = [], []
    with tempfile.TemporaryDirectory(prefix="store-load-") as tmp:
        os.environ["CRACK_RUNNER_DATA"] = str(Path(tmp) / "data")  # one data cache for every run
        for kind in args.stores:
            cwd = Path(tmp) / kind
            cwd.mkdir()
            with store(kind, cwd) as (uri, env):
                os.environ.update(env)  # this process reads the results as the runs' user
                warm = launch(uri, env, cwd, "warm-up", "warm-up")
                if warm.wait() != 0:
                    sys.exit(f"the warm-up run failed:\n{(cwd / 'warm-up.log').read_text()[-3000:]}")
                for n in args.concurrency:
                    row, failures = batch(uri, env, cwd, kind, n)
                    rows.append(row)
                    tails += failures
                    print(tabulate([row], HEADERS, tablefmt="github"), flush=True)
                for key in env:
                    os.environ.pop(key)
    print(f"\n{os.cpu_count()} cores; each run: {' '.join(TINY)}\n")
    print(tabulate(rows, HEADERS, tablefmt="github"))
    for tail in tails:
        print(f"\n{tail}")


if __name__ == "__main__":
    main()
