"""Every key that reaches a run is one the schema knows: a typo stops the run and names the nearest key.

Hydra lets ``+key=value`` add any key, and answers a typo without ``+`` with "To append to
your config use +key=value": either way a run could start with the typo ignored (trained at
the default learning rate, the typo in its name). Two checks close that:

- :func:`check_command_line`, before Hydra composes: every override's key must be a key of
  some option of its group (``model.weights`` is one, of the Keras models), else the nearest
  known key is named;
- :func:`check_composed`, on the composed config: every key must belong to the options
  chosen (``+model.weights=...`` with ``model=linear`` belongs to no key of that model).
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import typing
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, OmegaConf

from runner.config.schema import _SCHEMAS, RunConfig, conf_dir
from runner.errors import ConfigError

log = logging.getLogger(__name__)

GROUPS = ("dataset", "model", "optimizer", "augment")  # RunConfig fields whose schema is the chosen option's
SELECTORS = ("experiment", "hydra", *GROUPS)  # group choices: ``model=resnet50``, ``+experiment=...``


def _fields(cls: type, prefix: str) -> dict[str, set[str]]:
    """The dotted keys of a schema class and, for keys of a group, the options (by schema name) that have them."""
    types = typing.get_type_hints(cls)
    keys: dict[str, set[str]] = {}
    for f in dataclasses.fields(cls):
        name, kind = f"{prefix}{f.name}", types.get(f.name)
        if not prefix and name in GROUPS:
            for option, schema in _SCHEMAS[name].items():
                for key in _fields(schema, f"{name}."):
                    keys.setdefault(key, set()).add(option)
        elif isinstance(kind, type) and dataclasses.is_dataclass(kind):
            keys.update(_fields(kind, f"{name}."))
        else:
            keys[name] = set()
    return keys


def known_keys() -> dict[str, set[str]]:
    """Every dotted key a run may be given, with the group options that have it (empty: every option)."""
    return _fields(RunConfig, "")


def nearest(key: str, known: list[str]) -> str:
    """`` (did you mean X?)`` for the known key closest to ``key``, or nothing when none is close."""
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if not close:  # a misspelt group in front of a right key: optimzer.lr -> optimizer.lr
        leaf = key.rpartition(".")[2]
        close = difflib.get_close_matches(key, [k for k in known if k.rpartition(".")[2] == leaf], n=1, cutoff=0.5)
    return f" (did you mean {close[0]}?)" if close else ""


def check_command_line(arguments: list[str]) -> str | None:
    """The message for the first override whose key no option of the schema has, or that the chosen option lacks; or None."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = [a for a in arguments if "=" in a and not a.startswith("-") or a.startswith("~")]
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:  # noqa: BLE001 - a malformed override: Hydra's own message says what is wrong
        return None
    known = known_keys()
    candidates = [*known, *GROUPS, "experiment"]
    choices, partial = [], []
    for override in parsed:
        key = override.key_or_group
        root = key.split(".")[0].split("/")[0]
        if root in SELECTORS and ("." not in key or root == "hydra"):
            choices.append(override.input_line)  # a group choice (model=resnet50, +experiment=linear) or Hydra's own settings
        elif key not in known:
            text = override.input_line or key
            return f"{text}: {key} is not a key of this runner{nearest(key, candidates)}. See every key with: python -m runner --help"
        elif known[key] and not override.is_add() and not override.is_force_add():
            partial.append(override)  # a key of some options of its group only (optimizer.momentum: sgd's)
    return _chosen_option_lacks(partial, [c for c in choices if not c.startswith(("hydra", "+hydra", "~hydra"))], known)


def _chosen_option_lacks(partial: list[Any], choices: list[str], known: dict[str, set[str]]) -> str | None:
    """For keys of only some options of their group, whether the options these ``choices`` compose have them.

    Hydra would answer with "To append to your config use +key=value", which trains with a key
    the chosen option ignores; composing the group choices alone (a fraction of a second, only
    when such a key is given) tells which option each group gets, e.g. the optimizer a model picks.
    """
    if not partial:
        return None
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = compose("config", overrides=choices)
    except Exception:  # noqa: BLE001 - a wrong group choice: Hydra's own message names the options
        return None
    finally:
        GlobalHydra.instance().clear()
    for override in partial:
        group, chosen = override.key_or_group.split(".")[0], _option(cfg, override.key_or_group)
        if chosen is not None and chosen not in known[override.key_or_group]:
            return (f"{override.input_line}: {override.key_or_group} is not a key of {group}={_choice(cfg, group)}, which this "
                    f"command composes: only {_options_with(group, known[override.key_or_group])} take it. Choose that, or remove it.")
    return None


def check_composed(cfg: DictConfig) -> None:
    """Refuse a composed config that holds a key the chosen options do not have (added by ``+``, or by an experiment file)."""
    known = known_keys()
    container = OmegaConf.to_container(cfg, resolve=False)
    assert isinstance(container, dict)
    for key in _leaves(container):
        owners = known.get(key)
        chosen = _option(cfg, key)
        if owners is None:
            raise ConfigError(f"{key} is not a key of this runner{nearest(key, list(known))}. See every key with: python -m runner --help")
        if owners and chosen is not None and chosen not in owners:
            group = key.split(".")[0]
            raise ConfigError(
                f"{key} is not a key of {group}={_choice(cfg, group)}: only {_options_with(group, owners)} take it. "
                f"Remove it, or choose that (python -m runner {group}=<option> --help shows its keys)."
            )


def _leaves(node: dict[str, Any], prefix: str = "") -> list[str]:
    """The dotted keys of a config's values (Hydra's own node aside)."""
    keys = []
    for name, value in node.items():
        if prefix == "" and name == "hydra":
            continue
        keys += _leaves(value, f"{prefix}{name}.") if isinstance(value, dict) and value else [f"{prefix}{name}"]
    return keys


def _option(cfg: DictConfig, key: str) -> str | None:
    """The schema name of the group option that ``key`` is under (e.g. keras_backbone), or None outside groups."""
    group = key.split(".")[0]
    if group not in GROUPS or group not in cfg:
        return None
    schema = OmegaConf.get_type(cfg[group])
    return next((name for name, cls in _SCHEMAS[group].items() if cls is schema), None)


def _choice(cfg: DictConfig, group: str) -> str:
    node = cfg[group]
    return str(node.get("name", _option(cfg, group))) if isinstance(node, DictConfig) else "?"


# Keys that a choice elsewhere makes mean nothing: (key, whether the run uses it, what to do instead).
USED_WHEN: list[tuple[str, Callable[[Any], bool], str]] = [
    ("trainer.fine_tune_epochs", lambda r: r.fine_tune_lr is not None, "set fine_tune_lr=1e-5 for a fine-tuning phase"),
    ("trainer.lr_decay", lambda r: r.trainer.lr_schedule in ("step", "plateau"), "set trainer.lr_schedule=step or plateau"),
    ("trainer.lr_step_epochs", lambda r: r.trainer.lr_schedule == "step", "set trainer.lr_schedule=step"),
    ("trainer.lr_plateau_patience", lambda r: r.trainer.lr_schedule == "plateau", "set trainer.lr_schedule=plateau"),
    ("trainer.min_delta", lambda r: r.trainer.early_stopping_patience is not None or r.trainer.lr_schedule == "plateau",
     "set trainer.early_stopping_patience=3 (or trainer.lr_schedule=plateau)"),
    ("trainer.cache_frozen_features", lambda r: r.model.framework == "keras", "choose model=resnet50 or model=vgg16"),
    ("trainer.feature_cache_dir", lambda r: r.model.framework == "keras", "choose model=resnet50 or model=vgg16"),
    ("trainer.feature_cache_gb", lambda r: r.model.framework == "keras", "choose model=resnet50 or model=vgg16"),
    ("trainer.feature_cache_dtype", lambda r: r.model.framework == "keras", "choose model=resnet50 or model=vgg16"),
    ("dataset.url", lambda r: not r.dataset.path, "drop dataset.path to download from dataset.url"),
    ("dataset.sha256", lambda r: not r.dataset.path, "drop dataset.path to download and check the archive"),
]


def check_ignored(run: Any, overrides: list[str], sweep_job: bool = False) -> None:
    """Refuse a key typed on the command line that this run would ignore (``run``: the RunConfig), with what would make it count.

    In a sweep the key may count for the other jobs (``trainer.lr_schedule=none,step trainer.lr_decay=0.5``): a warning there.
    """
    typed = {o.lstrip("+~").split("=", 1)[0] for o in overrides}
    for key, used, fix in USED_WHEN:
        if key in typed and not used(run):
            message = f"{key}: this run does not use it, so setting it changes nothing. Remove it, or {fix}."
            if not sweep_job:
                raise ConfigError(message)
            log.warning("%s", message)


def _options_with(group: str, schemas: set[str]) -> str:
    """The group's options (conf/<group>/*.yaml) whose schema is one of ``schemas``, as ``model=resnet50, model=vgg16``."""
    options = sorted(
        path.stem for path in (conf_dir() / group).glob("*.yaml")
        if any(f"/schema/{group}/{schema}@" in path.read_text() for schema in schemas)
    )
    return ", ".join(f"{group}={option}" for option in options) or f"other {group} options"
