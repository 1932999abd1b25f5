"""The champion: the best run's model in MLflow's model registry, with the alias ``champion`` pointing at it.

Aliases replace the deprecated stages: ``models:/NAME@champion`` always loads the version the
alias points at, so ``python -m runner.predict models:/NAME@champion`` and
``mlflow models serve -m models:/NAME@champion`` follow a new champion without a change.
Each registration is a new version; earlier ones stay, and the alias moves.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import mlflow
from mlflow.exceptions import MlflowException

from runner.errors import RunnerError

log = logging.getLogger(__name__)

CHAMPION = "champion"


class RegistryError(RunnerError):
    """The model registry cannot take the model."""


@dataclass(frozen=True)
class Champion:
    """A registered version and the run it came from."""

    name: str
    version: str
    run_id: str
    metric: str
    value: float

    @property
    def uri(self) -> str:
        """What predict, serve and pyfunc load: whichever version the alias points at."""
        return f"models:/{self.name}@{CHAMPION}"


def register_champion(tracking_uri: str, name: str, run_id: str, model_uri: str, metric: str, value: float) -> Champion:
    """Register ``model_uri`` (run ``run_id``'s logged model) as a new version of ``name`` and point ``champion`` at it."""
    client = mlflow.MlflowClient(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    try:
        version = mlflow.register_model(
            model_uri, name, tags={"source_run": run_id, "selected_by": metric, metric: f"{value:.6g}"}
        )
        client.update_model_version(name, version.version, f"best {metric} = {value:.4f}: run {run_id}")
        client.set_registered_model_alias(name, CHAMPION, version.version)
    except MlflowException as err:
        raise RegistryError(
            f"cannot register the model of run {run_id} as {name!r} in {tracking_uri}: {err.message}. "
            "Use a store with a model registry (sqlite:///..., a database or an MLflow server) and a name of letters, "
            "digits, '-', '_' or '.'."
        ) from None
    champion = Champion(name, str(version.version), run_id, metric, value)
    log.info("registered %s version %s (run %s, %s=%.4f); %s points at it: %s",
             name, champion.version, run_id, metric, value, CHAMPION, champion.uri)
    return champion
