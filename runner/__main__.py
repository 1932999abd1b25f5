"""``python -m runner [overrides]``: the Hydra entry point."""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

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


if __name__ == "__main__":
    main()
