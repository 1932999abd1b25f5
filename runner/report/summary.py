"""The readable end of a run: a metrics table, the MLflow run id and how to look at it."""

from __future__ import annotations

import logging

from tabulate import tabulate

from runner.report.console import RESULTS

results = logging.getLogger(RESULTS)  # on stdout (conf/config.yaml), apart from the logs on stderr


LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default
# MLflow 3.17's UI opens an experiment in its GenAI view (traces, an assistant) unless the link
# asks for the model-training view: its own toggle decides, not the experiment's kind tag.
TRAINING_VIEW = "workflowType=machine_learning"


def ui_link(tracking_uri: str, experiment_id: str) -> str:
    """The experiment's runs table in the UI's model-training view."""
    host = tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else LOCAL_UI
    return f"{host}/#/experiments/{experiment_id}/runs?{TRAINING_VIEW}"


def report(
    metrics: dict[str, float], run_id: str, experiment: str, tracking_uri: str, model_uri: str | None, experiment_id: str,
    notes: list[str] | None = None,
) -> str:
    """Log and return the summary block, with a link to the experiment's runs in the UI.

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
    link = ui_link(tracking_uri, experiment_id)
    remote = tracking_uri.startswith(("http://", "https://"))
    ui = f"open {link}" if remote else f"mlflow ui --backend-store-uri {tracking_uri}   then open {link}"
    text = "\n".join(
        [
            "",
            tabulate(rows, headers=("metric", "value"), tablefmt="simple", disable_numparse=True),
            "",
            f"MLflow run:  {run_id}  (experiment {experiment!r})",
            *where,
            f"MLflow UI:   {ui}",
            *(f"WARNING:     {note}" for note in notes or []),
        ]
    )
    results.info("%s", text)
    return text
