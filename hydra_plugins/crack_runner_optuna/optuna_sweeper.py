"""``hydra/sweeper=optuna`` (conf/hydra/sweeper/optuna.yaml): the search itself is runner.sweep.search.

Hydra imports every module of ``hydra_plugins`` when any command starts, so this one imports
nothing heavy: Optuna and the search load when a sweep begins.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class OptunaSweeper(Sweeper):
    """An Optuna search whose trials can be pruned and run by free-running workers (docs/sweeps.md)."""

    def __init__(self, sampler: Any, direction: str, study_name: str | None, n_trials: int, n_jobs: int, max_failure_rate: float,
                 params: DictConfig | None) -> None:
        from runner.sweep.search import OptunaSearch

        self.search = OptunaSearch(sampler, direction, study_name, n_trials, n_jobs, max_failure_rate, params)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.search.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> None:
        with said_plainly():
            self.search.sweep(arguments)


@contextlib.contextmanager
def said_plainly() -> Iterator[None]:
    """A user error (a key out of range, a database that cannot be opened) as one message and exit status 2, as a run says it."""
    from runner.errors import USER_ERRORS

    try:
        yield
    except USER_ERRORS as err:
        logging.getLogger("runner").error("%s", err)
        sys.exit(2)
