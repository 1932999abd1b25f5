"""Lengths that MLflow or the file system refuse or cut, checked before a run opens.

Unchecked, each goes wrong late or silently: MLflow cuts a param value over its limit without
a word, and ``resume=`` of that run is then refused because the config "differs" from what
was logged; an experiment name over MLflow's limit is reported as a problem of tracking.uri;
a path over the file system's limits is a traceback wherever it is first used.
:func:`check_limits` reports each with its key, the limit and the length, as one ConfigError.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH, MAX_EXPERIMENT_NAME_LENGTH, MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH

from runner.config.redact import redact
from runner.errors import ConfigError
from runner.track.files import absolute_path
from runner.track.lease import join_overrides
from runner.track.store import sqlite_file

RUN_NAME_LENGTH = 250  # the name column of MLflow's runs table (runner.track.tracking cuts a longer name)
PATH_KEYS = ("dataset.path", "dataset.cache_dir", "trainer.feature_cache_dir", "tracking.artifact_root", "model.weights")
NAME_MAX, PATH_MAX = 255, 4096  # Linux's, where os.pathconf cannot tell (PATH_MAX counts the terminating byte)
SHOWN = 60  # characters of a long value shown in a message


def check_limits(run_cfg_flat: Mapping[str, Any], overrides: Sequence[str] = ()) -> None:
    """Raise a ConfigError naming every key of ``run_cfg_flat`` (see runner.track.tracking.flatten) over a limit.

    MLflow's limits on a param's name and value, an experiment name and a run name; the file
    system's on each path key (a name in it, and the whole path made absolute); MLflow's limit
    on a tag's value for ``overrides`` (the command line's, kept in the run's ``overrides`` tag).
    """
    problems = [problem for key in PATH_KEYS if run_cfg_flat.get(key) for problem in _path_problems(key, str(run_cfg_flat[key]))]
    database = sqlite_file(str(run_cfg_flat.get("tracking.uri", "")))
    if database is not None:
        problems += _path_problems("tracking.uri", str(database))
    for key, limit, what in (
        ("tracking.experiment", MAX_EXPERIMENT_NAME_LENGTH, "an experiment name"),
        ("tracking.run_name", RUN_NAME_LENGTH, "a run name"),
    ):
        if run_cfg_flat.get(key) is not None and len(str(run_cfg_flat[key])) > limit:
            problems.append(f"{key} is {len(str(run_cfg_flat[key]))} characters, over MLflow's limit of {limit} for {what}")
    for key, value in run_cfg_flat.items():
        if len(key) > MAX_ENTITY_KEY_LENGTH:
            problems.append(f"the key {_shown(key)} is {len(key)} characters, over MLflow's limit of {MAX_ENTITY_KEY_LENGTH} for a param name")
        logged = redact(str(value))  # as runner.track.tracking logs it
        if len(logged) > MAX_PARAM_VAL_LENGTH:
            problems.append(
                f"{key} is {len(logged)} characters ({_shown(logged)}), over MLflow's limit of {MAX_PARAM_VAL_LENGTH} "
                "for a param value: MLflow would log it cut short, and resume= of the run would then refuse it as changed"
            )
    tag = redact(join_overrides(list(overrides)))  # the overrides tag as runner.track.tracking writes it
    if len(tag) > MAX_TAG_VAL_LENGTH:
        problems.append(
            f"the overrides are {len(tag)} characters together, over MLflow's limit of {MAX_TAG_VAL_LENGTH} for a tag value "
            "(the run's overrides tag, which its resume command is read from)"
        )
    if problems:
        raise ConfigError(f"{'; '.join(problems)}. Shorten {'it' if len(problems) == 1 else 'them'}.")


def _path_problems(key: str, value: str) -> list[str]:
    """What is too long in the path ``value`` of ``key``, expanded and made absolute: a name in it, or the whole."""
    path = absolute_path(value)
    name_max, path_max = _file_system_limits(path)
    problems = [
        f"{key} has a name of {len(os.fsencode(name))} bytes ({_shown(name)}), over the file system's limit of {name_max} bytes (NAME_MAX)"
        for name in path.parts
        if len(os.fsencode(name)) > name_max
    ]
    length = len(os.fsencode(path))
    if length >= path_max:
        problems.append(
            f"{key} is {length} bytes as an absolute path ({_shown(str(path))}), over the system's limit of "
            f"{path_max - 1} bytes (PATH_MAX {path_max} counts the terminating byte)"
        )
    return problems


def _file_system_limits(path: Path) -> tuple[int, int]:
    """NAME_MAX and PATH_MAX of the file system that holds ``path`` (its nearest existing folder)."""
    existing = next((str(p) for p in (path, *path.parents) if os.path.isdir(p)), os.sep)

    def asked(name: str, default: int) -> int:
        try:
            value = os.pathconf(existing, name)
        except (AttributeError, OSError, ValueError):  # no pathconf (Windows), or the file system does not say
            return default
        return value if value > 0 else default  # -1: no fixed limit

    return asked("PC_NAME_MAX", NAME_MAX), asked("PC_PATH_MAX", PATH_MAX)


def _shown(text: str) -> str:
    """``text`` redacted, cut to SHOWN characters, quoted: what a message shows of a long value."""
    text = redact(text)
    return repr(text if len(text) <= SHOWN else f"{text[:SHOWN]}...")
