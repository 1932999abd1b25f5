"""Runs of an experiment or a sweep side by side: one table best first, and their curves in one figure.

What ``python -m runner.compare`` prints and draws, and what a sweep shows and logs on its
parent run when its last job ends (runner.track.sweep), from the same functions.
"""

from __future__ import annotations

import functools
import logging
import tempfile
import textwrap
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from tabulate import tabulate

from runner.config.schema import MINIMISED
from runner.errors import RunnerError
from runner.report.console import RESULTS
from runner.track.lease import SWEEP_PARENT_ROLE, split_overrides
from runner.track.store import check_server
from runner.track.tracking import SELECTED
from runner.train.metrics import DEGENERATE_TAG

log = logging.getLogger(__name__)

DEFAULT_METRICS = ("val_accuracy", "test_accuracy", "test_balanced_accuracy", "test_f1", "test_roc_auc", "test_loss", "best_epoch")
# Params that differ between runs without being a choice of the user.
# Params that differ between runs without being a choice of what to train: sizes and counts that
# follow from the data and the model, versions, where things are kept (a path spelled relative in
# one run and absolute in another is no difference), how much is printed.
NOISE_PARAMS = {
    "num_train", "num_val", "num_test", "threads", "trainer.num_threads", "device", "classes", "framework", "base_layers",
    "trainable_params", "python_version", "mlflow_version", "hydra_version", "torch_version", "tensorflow_version", "keras_version",
    "dataset.cache_dir", "trainer.feature_cache_dir", "trainer.progress", "frozen_features",
}
NOISE_PREFIXES = ("tracking.", "phase", "resumed.")  # phaseN.*: what freeze_depth and fine_tune_lr chose, already shown
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


def telling_apart(runs: pd.DataFrame) -> tuple[list[str], list[str]]:
    """(param columns that tell the runs apart, those that differ too but as the shown ones decide).

    Keys typed on the runs' command lines come first, then the groups' choices (``model.name``),
    then the others by name; a key is shown unless the shown keys already decide its value (the
    model group's own keys and its optimizer, once ``model.name`` differs). So a sweep shows
    what it swept, and linear and ResNet50 runs side by side show ``model.name``, not the dozen
    keys that come with it.
    """
    names = [c for c in runs.columns if c.startswith("params.")]
    chosen = [c for c in names if c[len("params.") :] not in NOISE_PARAMS and not c[len("params.") :].startswith(NOISE_PREFIXES)]
    varying = [c for c in chosen if runs[c].astype(str).nunique(dropna=False) > 1]
    typed = {o.lstrip("+~").split("=", 1)[0] for text in runs.get("tags.overrides", pd.Series(dtype=str)).dropna() for o in split_overrides(str(text))}
    shown: list[str] = []
    implied: list[str] = []
    for column in sorted(varying, key=lambda c: (c[len("params.") :] not in typed, not c.endswith(".name"), c)):  # group choices early
        decided = shown and (runs[shown].astype(str).join(runs[column].astype(str).rename("_v")).groupby(shown)["_v"].nunique() <= 1).all()
        (implied if decided else shown).append(column)
    return shown, implied


def table(runs: pd.DataFrame, metric: str, metrics: tuple[str, ...] = DEFAULT_METRICS, each_seed: bool = False) -> pd.DataFrame:
    """One row per run: the params that tell the runs apart (:func:`telling_apart`), then the final metrics, best first.

    Runs that repeat a configuration over seeds (``-m seed=1,2,3 ...``) are one row per
    configuration instead: each metric's mean and standard deviation over its seeds, ranked by
    the mean (:func:`seed_table`); ``each_seed`` shows them one by one.
    ``attrs["implied"]``: the params that differ too, as the shown ones decide (named under the table).
    """
    varying, implied = telling_apart(runs)
    metric_cols = [f"metrics.{m}{std}" for m in dict.fromkeys((metric, *metrics)) for std in ("", STD) if f"metrics.{m}{std}" in runs]
    if f"metrics.{metric}" not in runs:
        raise RunnerError(f"no run logged the metric {metric!r}. Use --metric with one of: {', '.join(metrics)}.")
    others = [c for c in varying if c != SEED]
    repeated = SEED in varying and runs.groupby([runs[c].astype(str) for c in others] or [pd.Series(0, index=runs.index)]).size().max() > 1
    if repeated and not each_seed:
        return seed_table(runs, others, implied, metric, [c for c in metric_cols if not c.endswith(STD)])
    folds = ["tags.cv_folds"] if "tags.cv_folds" in runs and runs["tags.cv_folds"].notna().any() else []
    out = runs[["run_id", "status", *varying, *folds, *metric_cols]].copy()
    out["run_id"] = out["run_id"].str[:8]
    if f"tags.{DEGENERATE_TAG}" in runs:  # a model that predicts one class: its metrics are no ranking of skill
        marks = runs[f"tags.{DEGENERATE_TAG}"]
        out["status"] = [s if pd.isna(m) else f"{s} {DEGENERATE_TAG}={m}" for s, m in zip(out["status"], marks)]
    if "tags.pruned" in runs and "metrics.pruned_epoch" in runs:  # stopped by a sweep's pruner: its metrics are its best epoch's so far
        epochs = runs["metrics.pruned_epoch"]
        out["status"] = [s if pd.isna(e) else f"{s} pruned@{int(e)}" for s, e in zip(out["status"], epochs)]
    out = out.rename(columns=lambda c: c.split(".", 1)[1] if c.startswith(("params.", "metrics.", "tags.")) else c)
    out = out.rename(columns={"cv_folds": "folds"})
    out = out.sort_values(metric, ascending=metric in MINIMISED, na_position="last").reset_index(drop=True)
    out.attrs["implied"] = [c[len("params.") :] for c in implied]
    return out


STD = "_std"  # a metric's spread: over a cross-validation's folds, or over the seeds of one configuration
SEED = "params.seed"


def seed_table(runs: pd.DataFrame, others: list[str], implied: list[str], metric: str, metric_cols: list[str]) -> pd.DataFrame:
    """One row per configuration (the ``others`` params): its runs' seeds, each metric's mean and sample std over them, best mean first."""
    rows = []
    keys = [runs[c].astype(str) for c in others] or [pd.Series(0, index=runs.index)]
    for _, group in runs.groupby(keys, sort=False):
        statuses = group["status"].value_counts()
        row = {"runs": len(group), "seeds": ",".join(sorted(group[SEED].astype(str), key=lambda s: (len(s), s))),
               "status": " ".join(f"{n} {s}" for s, n in statuses.items()) if len(statuses) > 1 else statuses.index[0],
               **{c: group[c].iloc[0] for c in others}}
        for column in metric_cols:
            values = pd.to_numeric(group[column], errors="coerce")
            row[column], row[f"{column}{STD}"] = values.mean(), values.std(ddof=1)  # NaN for a single seed
        rows.append(row)
    out = pd.DataFrame(rows).rename(columns=lambda c: c.split(".", 1)[1] if c.startswith(("params.", "metrics.")) else c)
    out = out.sort_values(metric, ascending=metric in MINIMISED, na_position="last").reset_index(drop=True)
    grouped = runs.groupby(keys, sort=False)
    out.attrs["implied"] = [c[len("params.") :] for c in implied if (grouped[c].nunique(dropna=False) <= 1).all()]  # not the seeds' own
    return out


def ranked(runs: pd.DataFrame, metric: str) -> pd.DataFrame:
    """``runs`` best ``metric`` first (a column that :func:`table` has checked), runs without it last."""
    return runs.sort_values(f"metrics.{metric}", ascending=metric in MINIMISED, na_position="last", kind="stable")


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


SHORT = (("balanced_accuracy", "bal_acc"), ("accuracy", "acc"), ("roc_auc", "auc"), ("best_epoch", "epoch"))  # in a terminal's table


def render(frame: pd.DataFrame, fmt: str) -> str:
    """CSV keeps full precision; tables show metrics to 4 places (``mean ± std`` for cross-validations) and params as logged.

    The terminal's table (``table``) abbreviates metric names (``test_acc``), to stay readable in 120 columns.
    """
    if fmt == "csv":
        return frame.to_csv(index=False)
    implied = frame.attrs.get("implied") or []
    frame = frame.astype(object).copy()
    for name in [c for c in frame.columns if f"{c}{STD}" in frame.columns]:
        spread = frame.pop(f"{name}{STD}")
        frame[name] = [v if pd.isna(s) else f"{v:.4f} ± {s:.4f}" for v, s in zip(frame[name], spread)]
    shown = frame.map(lambda v: f"{v:.4f}" if isinstance(v, float) else v)
    for name in [c for c in frame.columns if c.endswith("_epoch")]:  # epochs are counts (a fold mean may not be)
        shown[name] = [f"{v:g}" if isinstance(v, float) else v for v in frame[name]]
    if fmt == "table":
        shown = shown.rename(columns=lambda c: functools.reduce(lambda name, pair: name.replace(*pair), SHORT, c))
    text = tabulate(shown, headers="keys", tablefmt="github" if fmt == "markdown" else "simple", showindex=False, disable_numparse=True)
    note = textwrap.fill(f"also differing, as the columns above decide: {', '.join(implied)}", 120) if implied else ""
    return f"{text}\n\n{note}" if note else text


SUMMARY, SWEEP_CURVES = "sweep_summary.md", "plots/sweep_curves.png"  # on a sweep's parent run


def report_sweep(uri: str, experiment: str, sweep: str, parent: str, objective: str) -> str:
    """The answer of a sweep whose last job ended: its jobs best first by ``objective``, the parent run and the compare command.

    Printed on stdout (the ``runner.results`` logger); the table and the jobs' curves
    (:func:`write_curves`) are logged on the parent run. Returns the printed text.
    """
    runs, _ = load_runs(uri, experiment, sweep, latest_sweep=False)
    frame = table(runs, objective)
    command = f"python -m runner.compare --tracking-uri '{uri}' --experiment '{experiment}' --sweep '{sweep}' --metric {objective}"
    grouped = f" in {len(frame)} configurations, each the mean ± std over its seeds," if len(frame) < len(runs) else ","
    header = f"sweep {sweep}: {len(runs)} job(s){grouped} best {objective} first (MLflow parent run {parent})"
    client = mlflow.MlflowClient(uri)
    with tempfile.TemporaryDirectory() as folder:
        written = Path(folder, SUMMARY)
        written.write_text(f"{header}\n\n{render(frame, 'markdown')}\n\n{command} --curves sweep.png\n")
        client.log_artifact(parent, str(written))
        curves = Path(folder, Path(SWEEP_CURVES).name)
        write_curves(runs, objective, curves, uri)
        client.log_artifact(parent, str(curves), str(Path(SWEEP_CURVES).parent))
    text = f"\n{header}\n\n{render(frame, 'table')}\n\ncompare: {command}\ncurves:  {SWEEP_CURVES} of the parent run"
    logging.getLogger(RESULTS).info("%s", text)
    return text
