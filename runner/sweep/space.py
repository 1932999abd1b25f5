"""Hydra's sweep grammar (``choice``, ``range``, ``interval``, ``tag(log, ...)``) read into Optuna's distributions."""

from __future__ import annotations

from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep

from runner.errors import ConfigError


def search_space(overrides: list[str]) -> tuple[dict[str, Any], list[str]]:
    """The distributions of the swept keys (by key) and the other overrides as they were typed, passed to every trial."""
    import optuna

    space: dict[str, Any] = {}
    fixed: list[str] = []
    for override in OverridesParser.create().parse_overrides(overrides):
        if not override.is_sweep_override():
            fixed.append(override.input_line)
            continue
        space[override.get_key_element()] = _distribution(override, optuna.distributions)
    return space, fixed


def _distribution(override: Override, distributions: Any) -> Any:
    sweep = override.value()
    key = override.get_key_element()
    log = "log" in sweep.tags
    if isinstance(sweep, ChoiceSweep):
        choices = list(sweep.list)
        if not all(value is None or isinstance(value, (bool, int, float, str)) for value in choices):
            raise ConfigError(f"{key}: an Optuna sweep chooses among numbers, strings and booleans, got {override.input_line!r}.")
        return distributions.CategoricalDistribution(choices)
    if isinstance(sweep, RangeSweep):
        values = _range(sweep)
        if not values:
            raise ConfigError(f"{key}: {override.input_line!r} is an empty range.")
        if all(isinstance(v, int) for v in values) and sweep.step > 0:  # ordered: the sampler may learn that more is better
            return distributions.IntDistribution(values[0], values[-1], step=int(sweep.step))
        return distributions.CategoricalDistribution(values)
    if isinstance(sweep, IntervalSweep):
        low, high = sweep.start, sweep.end
        if "int" in sweep.tags or (isinstance(low, int) and isinstance(high, int)):
            return distributions.IntDistribution(int(low), int(high), log=log)
        return distributions.FloatDistribution(float(low), float(high), log=log)
    raise ConfigError(f"{key}: {override.input_line!r} is not a sweep an Optuna search understands (choice, range, interval).")


def _range(sweep: RangeSweep) -> list[Any]:
    values, value = [], sweep.start
    while (sweep.step > 0 and value < sweep.stop) or (sweep.step < 0 and value > sweep.stop):
        values.append(value)
        value += sweep.step
    return values
