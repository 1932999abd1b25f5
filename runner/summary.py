"""The readable end of a run: a metrics table, the MLflow run id and how to look at it."""

from __future__ import annotations

import logging

from tabulate import tabulate

log = logging.getLogger(__name__)


LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default
# MLflow 3.17's UI opens an experiment in its GenAI view (traces, an assistant) unless the link
# asks for the model-training view: its own toggle decides, not the experiment's kind tag.
TRAINING_VIEW = "workflowType=machine_learning"


def ui_link(tracking_uri: str, experiment_id: str) -> str:
    """The experiment's runs table in the UI's model-training view."""
    host = tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else LOCAL_UI
    return f"{host}/#/experiments/{experiment_id}/runs?{TRAINING_VIEW}"


def report(
    metrics: dict[str, float], run_id: str, experiment: str, tracking_uri: str, model_uri: str | None, experiment_id: str
) -> str:
    """Log and return the summary block, with a link to the experiment's runs in the UI."""
    rows = [(name, f"{value:.4f}") for name, value in metrics.items()]
    link = ui_link(tracking_uri, experiment_id)
    remote = tracking_uri.startswith(("http://", "https://"))
    ui = f"open {link}" if remote else f"mlflow ui --backend-store-uri {tracking_uri}   then open {link}"
    text = "\n".join(
        [
            "",
            tabulate(rows, headers=("metric", "value"), tablefmt="simple"),
            "",
            f"MLflow run:  {run_id}  (experiment {experiment!r})",
            f"model:       {model_uri}",
            f"predict:     python -m runner.predict {run_id} <images or folder>",
            f"MLflow UI:   {ui}",
        ]
    )
    log.info("run summary:%s", text)
    return text
