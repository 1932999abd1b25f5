"""What an Optuna sweep learned, on its parent run: parameter importances, every trial's curve, params against the objective."""

from __future__ import annotations

import json
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any

import mlflow

from runner.report import plots
from runner.report.console import RESULTS
from runner.sweep.study import PRUNED_ATTR

log = logging.getLogger(__name__)

IMPORTANCES, TRIAL_CURVES, PARALLEL = "plots/param_importances.png", "plots/trial_curves.png", "plots/parallel_coordinates.png"
IMPORTANCES_TABLE = "study/param_importances.json"


def log_study(study: Any, parent: str, tracking_uri: str, monitor: str, sign: float) -> list[str]:
    """Draw the study's pictures and log them on the sweep's parent run; returns the artifact paths logged.

    ``sign``: how the trials' reports were oriented (runner.sweep.study.oriented), to draw ``monitor`` as it was measured.
    """
    import optuna

    ended = [t for t in study.get_trials(deepcopy=False) if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    complete = [t for t in ended if t.state == optuna.trial.TrialState.COMPLETE]
    figures: dict[str, Any] = {}
    if any(t.intermediate_values for t in ended):
        figures[TRIAL_CURVES] = trial_curves(ended, monitor, sign)
    importances: dict[str, float] = {}
    if len(complete) >= 2 and len({k for t in complete for k in t.params}) >= 1:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna's matplotlib plots are marked experimental
            from optuna.visualization import matplotlib as optuna_plots

            try:
                importances = optuna.importance.get_param_importances(study)
            except (RuntimeError, ValueError) as err:  # e.g. every trial the same params: nothing to tell apart
                log.info("no parameter importances: %s", err)
            if importances:  # fANOVA fits the complete trials only: how many says how far to trust it
                axes = optuna_plots.plot_param_importances(study)
                axes.set_title(f"Hyperparameter importances ({len(complete)} complete trials)", loc="left")
                figures[IMPORTANCES] = axes.figure
            figures[PARALLEL] = optuna_plots.plot_parallel_coordinate(study).figure
    client = mlflow.MlflowClient(tracking_uri)
    logged = []
    with tempfile.TemporaryDirectory() as folder:
        for name, figure in figures.items():
            path = Path(folder, Path(name).name)
            figure.savefig(path, dpi=100, bbox_inches="tight")
            plots.close(figure)
            client.log_artifact(parent, str(path), str(Path(name).parent))
            logged.append(name)
        if importances:
            path = Path(folder, Path(IMPORTANCES_TABLE).name)
            path.write_text(json.dumps(importances, indent=2))
            client.log_artifact(parent, str(path), str(Path(IMPORTANCES_TABLE).parent))
            logged.append(IMPORTANCES_TABLE)
            shown = ", ".join(f"{key} {value:.2f}" for key, value in importances.items())
            logging.getLogger(RESULTS).info("parameter importances (Optuna's fANOVA over the %d complete trials, share of the objective's "
                                            "variance): %s", len(complete), shown)
    return logged


def trial_curves(trials: list[Any], monitor: str, sign: float) -> Any:
    """Each trial's ``monitor`` by epoch as measured (``sign`` undone), pruned ones marked (runner.report.plots.trial_curves_figure)."""
    curves = []
    for trial in trials:
        steps = sorted(trial.intermediate_values)
        values = [sign * trial.intermediate_values[s] for s in steps]
        curves.append((f"trial {trial.number}", steps, values, PRUNED_ATTR in trial.user_attrs))
    return plots.trial_curves_figure(curves, monitor)
