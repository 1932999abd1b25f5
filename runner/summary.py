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
    """Log and return the summary block."""
    rows = [(name, f"{value:.4f}") for name, value in metrics.items()]
    text = "\n".join(
        [
            "",
            tabulate(rows, headers=("metric", "value"), tablefmt="simple"),
            "",
            f"MLflow run:  {run_id}  (experiment {experiment!r})",
            f"model:       {model_uri}",
            f"predict:     python -m runner.predict {run_id} <images or folder>",
            f"MLflow UI:   {ui_command(tracking_uri)}   then open http://127.0.0.1:5000",
        ]
    )
    results.info("%s", text)
    return text
