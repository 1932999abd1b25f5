"""``python -m runner.compare``: the runs of an experiment or a sweep as one table, best first.

    python -m runner.compare                       # the latest sweep of the default experiment
    python -m runner.compare --all                 # every run of the experiment
    python -m runner.compare --sweep multirun/2026-11-25/10-00-00 --metric test_f1
    python -m runner.compare --format markdown --output sweep.md

``val_loss`` and ``val_accuracy`` are the kept epoch's (``trainer.select``: the best by default).
A cross-validation (``dataset.folds=K``) is one row, its parent run: each metric's mean over
the folds, shown as ``mean ± std`` (CSV: a ``<metric>_std`` column), and ``folds`` = K; the
fold runs themselves are left out.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import mlflow
import pandas as pd
from tabulate import tabulate

from runner.config import MINIMISED
from runner.epochs import SELECTED
from runner.errors import USER_ERRORS, RunnerError
from runner.store import check_server
from runner.tracking import SWEEP_PARENT_ROLE

DEFAULT_METRICS = ("val_accuracy", "test_accuracy", "test_balanced_accuracy", "test_f1", "test_roc_auc", "test_loss", "best_epoch")
# Params that differ between runs without being a choice of the user.
NOISE_PARAMS = {"num_train", "num_val", "num_test", "threads", "trainer.num_threads", "device"}


def load_runs(uri: str, experiment: str, sweep: str | None, latest_sweep: bool) -> tuple[pd.DataFrame, str | None]:
    """Finished and failed runs (no sweep parents) of ``experiment``, narrowed to one sweep if asked."""
    check_server(uri)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise RunnerError(f"no experiment {experiment!r} in the store {uri}. Pass --experiment NAME or --tracking-uri.")
    if latest_sweep and sweep is None:
        parents = client.search_runs(
            [exp.experiment_id], f"tags.sweep_role = '{SWEEP_PARENT_ROLE}'", order_by=["attributes.start_time DESC"], max_results=1
        )
        sweep = parents[0].data.tags["sweep_id"] if parents else None
    query = f"tags.sweep_id = '{sweep}'" if sweep else ""
    runs = mlflow.search_runs([exp.experiment_id], filter_string=query, output_format="pandas")
    if not runs.empty and "tags.sweep_role" in runs:
        runs = runs[runs["tags.sweep_role"].isna()]
    if not runs.empty and "tags.cv_role" in runs:  # a cross-validation is its parent's row
        runs = runs[runs["tags.cv_role"] != "fold"]
    for name in ("val_loss", "val_accuracy"):  # the kept epoch's (trainer.select), not the last epoch's, where logged
        if f"metrics.{SELECTED}{name}" in runs and f"metrics.{name}" in runs:
            runs[f"metrics.{name}"] = runs[f"metrics.{SELECTED}{name}"].fillna(runs[f"metrics.{name}"])
    if runs.empty:
        where = f"sweep {sweep!r}" if sweep else f"experiment {experiment!r}"
        raise RunnerError(f"no runs in {where} of {uri}. Run `python -m runner -m ...` first, or pass --all.")
    return runs, sweep


def table(runs: pd.DataFrame, metric: str, metrics: tuple[str, ...] = DEFAULT_METRICS) -> pd.DataFrame:
    """One row per run: the params that differ between runs, then the final metrics, best first."""
    param_cols = [c for c in runs.columns if c.startswith("params.") and c[len("params.") :] not in NOISE_PARAMS]
    varying = [c for c in param_cols if runs[c].astype(str).nunique(dropna=False) > 1]
    metric_cols = [f"metrics.{m}{std}" for m in dict.fromkeys((metric, *metrics)) for std in ("", STD) if f"metrics.{m}{std}" in runs]
    if f"metrics.{metric}" not in runs:
        raise RunnerError(f"no run logged the metric {metric!r}. Use --metric with one of: {', '.join(metrics)}.")
    folds = ["tags.cv_folds"] if "tags.cv_folds" in runs and runs["tags.cv_folds"].notna().any() else []
    out = runs[["run_id", "status", *varying, *folds, *metric_cols]].copy()
    out["run_id"] = out["run_id"].str[:8]
    out = out.rename(columns=lambda c: c.split(".", 1)[1] if c.startswith(("params.", "metrics.", "tags.")) else c)
    out = out.rename(columns={"cv_folds": "folds"})
    return out.sort_values(metric, ascending=metric in MINIMISED, na_position="last").reset_index(drop=True)


STD = "_std"  # a cross-validation parent's metric spread over its folds


def render(frame: pd.DataFrame, fmt: str) -> str:
    """CSV keeps full precision; tables show metrics to 4 places (``mean ± std`` for cross-validations) and params as logged."""
    if fmt == "csv":
        return frame.to_csv(index=False)
    frame = frame.astype(object).copy()
    for name in [c for c in frame.columns if f"{c}{STD}" in frame.columns]:
        spread = frame.pop(f"{name}{STD}")
        frame[name] = [v if pd.isna(s) else f"{v:.4f} ± {s:.4f}" for v, s in zip(frame[name], spread)]
    shown = frame.map(lambda v: f"{v:.4f}" if isinstance(v, float) else v)
    for name in [c for c in frame.columns if c.endswith("_epoch")]:  # epochs are counts (a fold mean may not be)
        shown[name] = [f"{v:g}" if isinstance(v, float) else v for v in frame[name]]
    return tabulate(shown, headers="keys", tablefmt="github" if fmt == "markdown" else "simple", showindex=False, disable_numparse=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runner.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"))
    parser.add_argument("--experiment", default="crack-classification")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--sweep", help="a sweep id (its multirun folder, the runs' sweep_id tag)")
    group.add_argument("--all", action="store_true", help="every run of the experiment, not only the latest sweep")
    parser.add_argument("--metric", default="val_accuracy", help="sort by this metric (best first)")
    parser.add_argument("--format", choices=("table", "markdown", "csv"), default="table")
    parser.add_argument("--output", type=Path, help="also write the table to this file")
    args = parser.parse_args(argv)
    try:
        runs, sweep = load_runs(args.tracking_uri, args.experiment, args.sweep, latest_sweep=not args.all)
        text = render(table(runs, args.metric), args.format)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    header = f"{len(runs)} run(s) of {'sweep ' + sweep if sweep else 'experiment ' + args.experiment}, best {args.metric} first"
    if args.format == "csv":  # stdout stays machine-readable
        print(header, file=sys.stderr)
        print(text, end="")
    else:
        print(f"{header}\n\n{text}")
    if args.output:
        args.output.write_text(text if args.format == "csv" else f"{header}\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
