"""The one base class of the errors this project raises on purpose.

A `DigitsError` is a problem with the user's input or surroundings (params, data, a model file,
an MLflow store, a failed gate): the CLI prints its message as one line and exits 1. Anything
else is a bug, and the CLI lets its traceback show. This module imports only the standard
library, so the CLI can catch project errors without importing the modules that raise them;
`first_line` and `redact` make other libraries' errors and URIs fit such a line;
`sigterm_raises` makes a polite stop (SIGTERM) an exception, so `finally` blocks clean up."""

import contextlib
import re
import signal
from collections.abc import Iterator


class DigitsError(Exception):
    """str(e) is the one-line message shown to the user: culprit first, then what was expected."""


def first_line(e: BaseException) -> str:
    """An exception's message cut to its first line (its type's name when it says nothing)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def redact(uri: str) -> str:
    """The URI without its password, for messages: user:secret@host -> user:***@host."""
    return re.sub(r"(//[^/:@]+):[^/@]*@", r"\1:***@", uri)


@contextlib.contextmanager
def sigterm_raises(error: type[BaseException]) -> Iterator[None]:
    """While the block runs, SIGTERM raises `error("signal 15")` in the main thread, as Ctrl+C
    raises KeyboardInterrupt; the previous handler is back after it. Outside the main thread,
    where Python cannot handle signals, signals are left alone."""

    def handler(signum, frame):
        raise error(f"signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
