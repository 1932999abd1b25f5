"""Compose a run with Hydra, dispatch it to its framework's trainer, track it in MLflow."""
