"""The readable end of a run: a metrics table, the MLflow run id and how to look at it."""

from __future__ import annotations

import logging

from tabulate import tabulate

from runner.console import RESULTS

results = logging.getLogger(RESULTS)  # on stdout (conf/config.yaml), apart from the logs on stderr


def ui_command(tracking_uri: str) -> str:
    """The command that opens the MLflow UI on this run's store."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri} in a browser"
    return f"mlflow ui --backend-store-uri {tracking_uri}"


def report(metrics: dict[str, float], run_id: str, experiment: str, tracking_uri: str, model_uri: str | None) -> str:
    """Log and return the summary block.

    A cross-validation's parent (``model_uri`` None) has each metric's mean and, as
    ``<name>_std``, its spread over the folds: shown as ``mean ± std``, the models being the folds'.
    """
    rows = [
        (name, f"{value:.4f}" + (f" ± {metrics[name + '_std']:.4f}" if name + "_std" in metrics else ""))
        for name, value in metrics.items() if not (name.endswith("_std") and name[:-4] in metrics)
    ]
    where = (
        [f"model:       {model_uri}", f"predict:     python -m runner.predict {run_id} <images or folder>"]
        if model_uri else ["models:      one per fold, in the runs nested under this one"]
    )
    text = "\n".join(
        [
            "",
            tabulate(rows, headers=("metric", "value"), tablefmt="simple", disable_numparse=True),
            "",
            f"MLflow run:  {run_id}  (experiment {experiment!r})",
            *where,
            f"MLflow UI:   {ui_command(tracking_uri)}   then open http://127.0.0.1:5000",
        ]
    )
    results.info("%s", text)
    return text
