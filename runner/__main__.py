"""``python -m runner [overrides]``: the Hydra entry point."""

from __future__ import annotations

import gc
import logging
import shlex
import sys

import hydra
from omegaconf import DictConfig

from runner.config.keys import check_command_line
from runner.config.schema import conf_dir, register_schemas
from runner.errors import USER_ERRORS
from runner.report.console import missing_plugin, register_resolvers, register_sweeper
from runner.track import interrupt

log = logging.getLogger("runner")

# Each of Python's full garbage collections walks every object that importing torch and MLflow
# made, a noticeable pause; a tenth as many of them. The young generations, where a run's own
# garbage is, are collected as often as ever.
gc.set_threshold(700, 10, 100)

register_schemas()
register_resolvers()
register_sweeper()


@hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    """Run one job; a user error is reported as one clear message without a traceback (exit status 2)."""
    from runner.app import run  # after Hydra has parsed --help, so help never imports a framework

    try:
        return run(cfg)
    except USER_ERRORS as err:
        log.error("%s", err)
        sys.exit(2)


def cli() -> None:
    """Run ``main``; if a sweep dies, its MLflow parent run is closed as FAILED or KILLED, never left RUNNING."""
    interrupt.install()  # Ctrl-C and `kill` stop the run at the next safe point, marked KILLED
    problem = missing_plugin(sys.argv[1:]) or check_command_line(sys.argv[1:])  # before Hydra, which says "Could not find" or "use +key"
    if problem is not None:
        log.error("%s", problem)
        sys.exit(2)
    status = "FAILED"
    try:
        main()
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        log.error("%s", _interrupted(_close_sweep_parents(status)))
        sys.exit(130)
    except SystemExit as stop:
        status = "FINISHED" if stop.code in (0, None) else "FAILED"
        raise
    finally:
        _close_sweep_parents(status)
        gc.freeze()  # exit promptly: the interpreter's final collections over torch's and MLflow's objects take a second or more


def _close_sweep_parents(status: str) -> list[str]:
    """Close the parent runs a sweep left open as ``status``; return their ids."""
    return interrupt.close_all(status)


def _interrupted(parents: list[str]) -> str:
    """What an interruption left in MLflow, as it is: nothing, a finished run, or KILLED runs and the resume command."""
    run = interrupt.stopped_run()
    if run is None and not parents:
        opened = interrupt.opened_runs()
        if opened:
            return f"interrupted after MLflow run {opened[-1]} ended: nothing more was recorded"
        return "interrupted before any MLflow run was opened: nothing was recorded"
    facts = [f"MLflow run {run} is marked KILLED with what it logged so far" if run else "this sweep job had opened no run yet"]
    facts += [f"the sweep's parent run {parent} is marked KILLED" for parent in parents]
    target = parents[0] if parents else run
    args = [arg for arg in sys.argv[1:] if not arg.startswith("resume=")]
    return f"interrupted: {'; '.join(facts)}. Continue with: {shlex.join(['python', '-m', 'runner', *args, f'resume={target}'])}"


if __name__ == "__main__":
    cli()
