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

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from tabulate import tabulate

from runner.config.redact import command_logging, redact
from runner.config.schema import MINIMISED
from runner.deploy.onnx_export import export_champion
from runner.errors import USER_ERRORS, RunnerError
from runner.track.lease import SWEEP_PARENT_ROLE, split_overrides
from runner.track.registry import Champion, register_champion
from runner.track.store import check_server
from runner.track.tracking import SELECTED
from runner.train.metrics import DEGENERATE_TAG

log = logging.getLogger("runner.compare")

DEFAULT_METRICS = ("val_accuracy", "test_accuracy", "test_balanced_accuracy", "test_f1", "test_roc_auc", "test_loss", "best_epoch")
# Params that differ between runs without being a choice of the user.
NOISE_PARAMS = {"num_train", "num_val", "num_test", "threads", "trainer.num_threads", "device"}
CURVES_RUNS = 10  # runs drawn by --curves, best first: more lines are no longer readable
EPOCH_METRIC = "val_accuracy"  # the per-epoch curve of --curves


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
    if f"tags.{DEGENERATE_TAG}" in runs:  # a model that predicts one class: its metrics are no ranking of skill
        marks = runs[f"tags.{DEGENERATE_TAG}"]
        out["status"] = [s if pd.isna(m) else f"{s} {DEGENERATE_TAG}={m}" for s, m in zip(out["status"], marks)]
    out = out.rename(columns=lambda c: c.split(".", 1)[1] if c.startswith(("params.", "metrics.", "tags.")) else c)
    out = out.rename(columns={"cv_folds": "folds"})
    return out.sort_values(metric, ascending=metric in MINIMISED, na_position="last").reset_index(drop=True)


STD = "_std"  # a cross-validation parent's metric spread over its folds


def ranked(runs: pd.DataFrame, metric: str) -> pd.DataFrame:
    """``runs`` best ``metric`` first (a column that :func:`table` has checked), runs without it last."""
    return runs.sort_values(f"metrics.{metric}", ascending=metric in MINIMISED, na_position="last", kind="stable")


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


def run_labels(runs: pd.DataFrame) -> dict[str, str]:
    """Per run id: its command-line overrides that not all the runs share (``optimizer.lr=0.01``; else its name), and its short id."""
    given = {row["run_id"]: split_overrides(str(row.get("tags.overrides") or "")) for _, row in runs.iterrows()}
    names = dict(zip(runs["run_id"], runs.get("tags.mlflow.runName", runs["run_id"])))
    shared = set.intersection(*(set(overrides) for overrides in given.values())) if given else set()
    labels = {}
    for run_id, overrides in given.items():
        own = " ".join(o for o in overrides if o not in shared) or str(names[run_id])
        labels[run_id] = f"{own[:60]}{'...' if len(own) > 60 else ''} ({run_id[:8]})"
    return labels


def write_curves(runs: pd.DataFrame, metric: str, path: Path, tracking_uri: str) -> int:
    """Draw the best ``CURVES_RUNS`` runs' curves overlaid into ``path`` (PNG, PDF or SVG by its suffix); returns how many."""
    from runner.report import plots
    from runner.report.evaluate import CURVES

    client = mlflow.MlflowClient(tracking_uri)
    labels = run_labels(runs)
    drawn = []
    for _, row in ranked(runs, metric).head(CURVES_RUNS).iterrows():
        try:
            curves = mlflow.artifacts.load_dict(f"{row['artifact_uri']}/{CURVES}")
        except (MlflowException, OSError):
            log.warning("run %s has no %s (it failed, or was logged by an older runner): only its %s is drawn",
                        row["run_id"], CURVES, EPOCH_METRIC)
            curves = None
        epochs = [(m.step, m.value) for m in sorted(client.get_metric_history(row["run_id"], EPOCH_METRIC), key=lambda m: m.step)]
        drawn.append((labels[row["run_id"]], curves, epochs))
    more = f", the best {CURVES_RUNS} of {len(runs)} by {metric}" if len(runs) > CURVES_RUNS else ""
    figure = plots.runs_curves_figure(drawn, EPOCH_METRIC, f"{len(drawn)} run(s){more}")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plots.close(figure)
    return len(drawn)


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
        text = render(table(runs, args.metric), args.format)
        drawn = write_curves(runs, args.metric, args.curves, args.tracking_uri) if args.curves else 0
        champion = register_best(runs, args.metric, args.register, args.tracking_uri) if args.register else None
        if champion is not None:
            export_champion(champion.run_id)
    except USER_ERRORS as err:
        print(f"error: {redact(str(err))}", file=sys.stderr)
        return 2
    header = f"{len(runs)} run(s) of {'sweep ' + sweep if sweep else 'experiment ' + args.experiment}, best {args.metric} first"
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
