"""The one base class of the errors this project raises on purpose.

A `DigitsError` is a problem with the user's input or surroundings (params, data, a model file,
an MLflow store, a failed gate): the CLI prints its message as one line and exits 1. Anything
else is a bug, and the CLI lets its traceback show. This module imports nothing, so the CLI can
catch project errors without importing the modules that raise them."""


class DigitsError(Exception):
    """str(e) is the one-line message shown to the user: culprit first, then what was expected."""
