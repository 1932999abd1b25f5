"""Errors meant for the person at the keyboard.

A RunnerError carries a message that names the key or file at fault and how to fix it;
the entry point prints it without a traceback and exits with status 2.
"""


class RunnerError(Exception):
    """A problem with the user's input, reported without a traceback."""


class ConfigError(RunnerError):
    """A configuration value is invalid."""


class DataError(RunnerError):
    """The data set cannot be found, read or split."""


class TrainingError(RunnerError):
    """Training cannot go on (for example the loss became NaN)."""
