"""``python -m runner.compare``: the runs of an experiment or a sweep as one table, best first.

    python -m runner.compare                       # the latest sweep of the default experiment
    python -m runner.compare --all                 # every run of the experiment
    python -m runner.compare --sweep multirun/2026-11-25/10-00-00 --metric test_f1
    python -m runner.compare --format markdown --output sweep.md
    python -m runner.compare --curves sweep.png    # the runs' curves overlaid in one picture
    python -m runner.compare --register cracks     # the best run's model, alias champion: models:/cracks@champion

``val_loss`` and ``val_accuracy`` are the kept epoch's (``trainer.select``: the best by default).
A cross-validation (``dataset.folds=K``) is one row, its parent run: each metric's mean over
the folds, shown as ``mean ± std`` (CSV: a ``<metric>_std`` column), and ``folds`` = K; the
fold runs themselves are left out.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import pandas as pd

from runner.config.redact import command_logging, redact
from runner.deploy.onnx_export import export_champion
from runner.errors import USER_ERRORS, RunnerError
from runner.report.runs import CURVES_RUNS, EPOCH_METRIC, load_runs, ranked, render, table, write_curves
from runner.track.registry import Champion, register_champion
from runner.train.metrics import DEGENERATE_TAG


def best_run(runs: pd.DataFrame, metric: str) -> pd.Series:
    """The finished run with the best ``metric``."""
    done = runs[(runs["status"] == "FINISHED") & runs[f"metrics.{metric}"].notna()]
    if f"tags.{DEGENERATE_TAG}" in done and done[f"tags.{DEGENERATE_TAG}"].isna().any():  # a one-class model is never champion
        done = done[done[f"tags.{DEGENERATE_TAG}"].isna()]
    if done.empty:
        raise RunnerError(f"no FINISHED run with the metric {metric!r} among the {len(runs)} selected: nothing to register. "
                          "Let a run finish, or select others with --sweep or --all.")
    return ranked(done, metric).iloc[0]


def register_best(runs: pd.DataFrame, metric: str, name: str, tracking_uri: str) -> Champion:
    """Register the best run's model as ``name`` and point the alias ``champion`` at it."""
    best = best_run(runs, metric)
    model_uri = best.get("tags.model_uri")
    if not isinstance(model_uri, str):  # logged before runs tagged their model
        model_uri = f"runs:/{best['run_id']}/model"
    return register_champion(tracking_uri, name, best["run_id"], model_uri, metric, float(best[f"metrics.{metric}"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runner.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"))
    parser.add_argument("--experiment", default="crack-classification")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--sweep", help="a sweep id (its multirun folder, the runs' sweep_id tag)")
    group.add_argument("--all", action="store_true", help="every run of the experiment, not only the latest sweep")
    parser.add_argument("--metric", default="val_accuracy", help="sort by this metric (best first)")
    parser.add_argument("--format", choices=("table", "markdown", "csv"), default="table")
    parser.add_argument("--each-seed", action="store_true",
                        help="one row per run even where runs repeat a configuration over seeds (by default: one row per "
                             "configuration, each metric's mean ± std over its seeds, ranked by the mean)")
    parser.add_argument("--output", type=Path, help="also write the table to this file")
    parser.add_argument("--curves", type=Path, metavar="FILE",
                        help=f"draw the runs' {EPOCH_METRIC} per epoch, ROC, precision-recall and reliability curves "
                             f"overlaid into FILE (.png, .pdf, .svg; the best {CURVES_RUNS})")
    parser.add_argument("--register", metavar="NAME",
                        help="register the best run's model (by --metric) as NAME in the model registry and point "
                             "the alias 'champion' at it: models:/NAME@champion")
    args = parser.parse_args(argv)
    command_logging(logging.WARNING, "%(levelname)s %(name)s: %(message)s")
    try:
        runs, sweep = load_runs(args.tracking_uri, args.experiment, args.sweep, latest_sweep=not args.all)
        frame = table(runs, args.metric, each_seed=args.each_seed)
        text = render(frame, args.format)
        drawn = write_curves(runs, args.metric, args.curves, args.tracking_uri) if args.curves else 0
        champion = register_best(runs, args.metric, args.register, args.tracking_uri) if args.register else None
        if champion is not None:
            export_champion(champion.run_id)
    except USER_ERRORS as err:
        print(f"error: {redact(str(err))}", file=sys.stderr)
        return 2
    grouped = f" in {len(frame)} configurations, each the mean ± std over its seeds," if len(frame) < len(runs) else ","
    header = f"{len(runs)} run(s) of {'sweep ' + sweep if sweep else 'experiment ' + args.experiment}{grouped} best {args.metric} first"
    notes = sys.stderr if args.format == "csv" else sys.stdout  # stdout stays machine-readable
    if args.format == "csv":
        print(header, file=sys.stderr)
        print(text, end="")
    else:
        print(f"{header}\n\n{text}")
    if args.output:
        args.output.write_text(text if args.format == "csv" else f"{header}\n\n{text}\n")
    if args.curves:
        print(f"\ncurves of {drawn} run(s): {args.curves}", file=notes)
    if champion:
        print(f"\nchampion: {champion.uri} = {champion.name} version {champion.version} "
              f"(run {champion.run_id}, {champion.metric} {champion.value:.4f})", file=notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
