"""What a person sees: which job wrote a log line, where results go, and which groups ``--help`` lists.

Logs go to stderr and results (the summary table, the run id, the commands that follow) to
stdout, so ``python -m runner > results.txt`` keeps the results and a terminal shows both.
Hydra's logging configuration (conf/config.yaml, ``hydra.job_logging``) wires these in.
"""

from __future__ import annotations

import atexit
import importlib.util
import logging
import os
import re
import sys
import threading

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf

from runner.config.schema import conf_dir

RESULTS = "runner.results"  # the logger whose lines go to stdout (see conf/config.yaml)
INSTALL_ALL = "pip install -e '.[all]' (every headline command: both frameworks and the launchers)"
# Hydra plugins a command line may pick, and the extra that brings them.
PLUGINS = {
    "hydra/launcher=joblib": "hydra_plugins.hydra_joblib_launcher",
    "hydra/launcher=ray": "hydra_plugins.hydra_ray_launcher",
    "hydra/sweeper=optuna": "optuna",  # the sweeper is the runner's own (hydra_plugins.crack_runner_optuna), on Optuna
}


class JobLabel(logging.Filter):
    """Adds ``record.job``: `` job N`` in a sweep, so the interleaved lines of parallel jobs say whose they are."""

    def filter(self, record: logging.LogRecord) -> bool:
        label = ""
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            label = f"[job {HydraConfig.get().job.num}]"
        record.job = label
        return True


INTERNAL_GROUPS = ("hydra", "shared")  # Hydra's own groups; the keys dataset options share (conf/shared/)


def config_groups() -> str:
    """The user's config groups and their options (``conf/<group>/*.yaml``), one line each, for ``--help``.

    Read from the folder, so it never goes stale; the typed schemas Hydra also knows (``schema/*``) are internal.
    """
    lines = []
    for group in sorted(p for p in conf_dir().iterdir() if p.is_dir() and p.name not in INTERNAL_GROUPS):
        options = sorted(f.stem for f in group.glob("*.yaml"))
        lines.append(f"{group.name}: {', '.join(options)}")
    return "\n".join(lines)


def register_sweeper() -> None:
    """Name the runner's sweeper to Hydra outright: Hydra finds plugins by walking the folders of ``hydra_plugins``, which an
    editable install (pip install -e) does not show it; a built wheel's copy is found either way."""
    from hydra.core.plugins import Plugins

    from hydra_plugins.crack_runner_optuna.optuna_sweeper import OptunaSweeper

    Plugins.instance().register(OptunaSweeper)


def register_resolvers() -> None:
    """``${runner_groups:}`` for the help template (conf/config.yaml)."""
    if not OmegaConf.has_resolver("runner_groups"):
        OmegaConf.register_new_resolver("runner_groups", config_groups)


RIVAL_SWEEPER = "hydra_plugins.hydra_optuna_sweeper"  # Hydra's Optuna sweeper: it claims hydra/sweeper=optuna too


def missing_plugin(arguments: list[str]) -> str | None:
    """The message for a launcher or sweeper chosen on the command line but not installed (or claimed twice), or None."""
    if any("optuna" in argument for argument in arguments) and _installed(RIVAL_SWEEPER):
        return ("Hydra's own Optuna sweeper (hydra-optuna-sweeper) is installed beside the runner's, and both claim "
                "hydra/sweeper=optuna: remove it with pip uninstall hydra-optuna-sweeper (docs/sweeps.md).")
    for argument in arguments:
        module = PLUGINS.get(argument.split("@")[0])
        if module is not None and not _installed(module):
            return f"{argument}: the Hydra plugin {module} is not installed. Install it with pip install -e '.[sweep]', or {INSTALL_ALL}."
    return None


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ModuleNotFoundError, ValueError):  # its parent package is missing too, or it is blocked (None in sys.modules)
        return False


# TensorFlow 2.21 logs through absl, which ignores TF_CPP_MIN_LOG_LEVEL: an info note about
# oneDNN on every import, and an "E0000 ... NodeDef mentions attribute use_unbounded_threadpool"
# line that looks like an error and is not one.
NATIVE_LOG_LINE = re.compile(rb"^(?:[IWE]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ [\w.]+:\d+\] |WARNING: All log messages before absl::InitializeLog\(\))")


_quieted = False


def quiet_native_logs() -> None:
    """Drop the C++ libraries' absl log lines from this process's stderr (file descriptor 2).

    fd 2 becomes a pipe that a thread copies to the real stderr, line by line, less those
    lines; at exit the real stderr is put back and the pipe drained, so no line of ours is
    lost. ``TF_CPP_MIN_LOG_LEVEL=0`` keeps them all.
    """
    global _quieted
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "0" or _quieted:  # once a process: a second pipe would only relay the first
        return
    _quieted = True
    sys.stderr.flush()
    real = os.dup(2)
    read, write = os.pipe()
    os.dup2(write, 2)
    os.close(write)

    def copy() -> None:
        with os.fdopen(read, "rb") as lines:
            for line in lines:
                if not NATIVE_LOG_LINE.match(line):
                    os.write(real, line)

    thread = threading.Thread(target=copy, name="native-log-filter", daemon=True)
    thread.start()

    def restore() -> None:
        sys.stderr.flush()
        os.dup2(real, 2)  # the pipe's last writer closes: the thread reads to the end, then stops
        thread.join(timeout=5)

    atexit.register(restore)
