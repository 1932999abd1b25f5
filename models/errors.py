"""What the model builders raise for the person at the keyboard (runner.errors reports it without a traceback)."""


class ModelError(Exception):
    """A model cannot be built as asked: its message names the setting (model.weights, freeze_depth...) and the fix."""
