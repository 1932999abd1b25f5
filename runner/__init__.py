"""Compose a run with Hydra, dispatch it to its framework's trainer, track it in MLflow."""

import os

# MLflow's usage telemetry sends records off the machine from threads that hold every command's exit
# (seconds of a default run here, where nothing outside is reachable). Off unless the user sets it.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
