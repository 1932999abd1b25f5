"""``python -m runner [overrides]``: the Hydra entry point."""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from runner import interrupt
from runner.config import register_schemas
from runner.errors import RunnerError

log = logging.getLogger("runner")

register_schemas()


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    """Run one job; a RunnerError is reported as one clear message without a traceback (exit status 2)."""
    from runner.app import run  # after Hydra has parsed --help, so help never imports a framework

    try:
        return run(cfg)
    except RunnerError as err:
        log.error("%s", err)
        sys.exit(2)


def cli() -> None:
    """Run ``main``; if a sweep dies, its MLflow parent run is closed as FAILED or KILLED, never left RUNNING."""
    interrupt.install()  # Ctrl-C and `kill` stop the run at the next batch, marked KILLED
    status = "FAILED"
    try:
        main()
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        log.error("interrupted: the MLflow run is marked KILLED and keeps its last complete checkpoint")
        sys.exit(130)
    except SystemExit as stop:
        status = "FINISHED" if stop.code in (0, None) else "FAILED"
        raise
    finally:
        if "runner.sweep" in sys.modules:  # Hydra made the sweep callback: close what it left open
            sys.modules["runner.sweep"].close_open_parents(status)


if __name__ == "__main__":
    cli()
