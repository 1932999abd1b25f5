"""What the data layer raises for the person at the keyboard (runner.errors reports it without a traceback)."""


class DataError(Exception):
    """The data set cannot be found, read, cached or split: the message names the file or key and the fix."""
