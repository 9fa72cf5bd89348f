"""The model a `digits app` worker serves, and how it follows its alias.

`Served` is one loaded version: the model, the registered name and version it is, and the URI
the user asked for. A worker holds one in `Holder.current`; a request reads that reference once
and answers with it, so an answer and its log entry always name the model that gave them.

`Follower` is a thread per worker that asks the store, every `interval` seconds, which version
the alias names (digits.tracking.resolve: a read-only query of the SQLite store, or one GET of a
tracking server's REST API). When it moves, the new version is loaded in full beside the old one
and only then swapped in (one assignment: requests in flight finish on the old model, the next
ones get the new). A version that cannot be loaded (deleted, weights missing, a bad sha256)
leaves the old one serving; the problem is kept for /health and printed once.

Why polling and not MLflow's registry webhooks: a webhook needs an endpoint the tracking server
can reach for every replica of the service, and a SQLite store has no webhooks at all; polling
needs nothing but read access to the store, costs a millisecond (SQLite) or one small GET, and
finds the alias within `interval` seconds wherever the service runs (docs/service.md)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from digits.core.errors import first_line
from digits.serve.predict import Served, load_served

__all__ = ["Follower", "Holder", "Served", "follows", "load_served"]


def follows(uri: str) -> bool:
    """Whether a service started on `uri` follows it: an alias does, a version number is pinned."""
    from digits.tracking import resolve

    ref = resolve.parse(uri)
    return ref is not None and ref[1] is not None


class Holder:
    """The version a worker serves now (`current`), with what happened to it: reloads, failed
    reloads and the problem (if any) that keeps an older version serving."""

    def __init__(self, served: Served):
        self.current = served
        self.reloads = 0
        self.failed = 0
        self.problem: str | None = None


class Follower(threading.Thread):
    """Polls the store for the version `holder`'s URI names and swaps it in when it moves
    (with `follow` False, a pinned service: it only calls `on_change` every interval, which
    publishes the worker's status)."""

    RETRY = 30.0  # seconds before a version that failed to load is tried again

    def __init__(
        self,
        holder: Holder,
        store: str,
        interval: float,
        say: Callable[[str], None],
        on_change: Callable[[], None] = lambda: None,
        on_reload: Callable[[bool], None] = lambda ok: None,
        follow: bool = True,
    ):
        super().__init__(name="digits-follow", daemon=True)
        self.holder, self.store, self.interval = holder, store, interval
        self.follow = follow
        self.say, self.on_change, self.on_reload = say, on_change, on_reload
        self.stopping = threading.Event()
        self._failed: tuple[str, float] | None = None  # (version, when) of the last failure

    def run(self) -> None:
        while not self.stopping.wait(self.interval):
            try:
                if self.follow:
                    self.check()
            except Exception as e:  # a bug here must not stop the following
                self._problem(f"following {self.holder.current.uri}: {first_line(e)}")
            self.on_change()

    def stop(self) -> None:
        self.stopping.set()

    def check(self) -> None:
        """One poll: swap in the version the alias names now, if it moved and loads."""
        from digits.tracking import resolve

        current = self.holder.current
        found = resolve.lookup(self.store, current.uri)
        if found is None:
            self._problem(
                f"{current.uri} names no version the store can serve now (alias removed, "
                f"version deleted, or the store unreachable); still serving version "
                f"{current.version}"
            )
            return
        if found.version == current.version:
            self._clear()
            return
        failed = self._failed
        if failed and failed[0] == found.version and time.monotonic() - failed[1] < self.RETRY:
            return
        try:
            new = load_served(current.uri, self.store, found.version)
        except Exception as e:  # whatever breaks the load, the old one serves
            self._failed = (found.version, time.monotonic())
            self.holder.failed += 1
            self.on_reload(False)
            self._problem(
                f"{current.uri} moved to version {found.version}, which cannot be loaded "
                f"({first_line(e)}); still serving version {current.version}"
            )
            return
        self.holder.current = new  # the swap: one reference, after the load is complete
        self.holder.reloads += 1
        self._failed = None
        self.on_reload(True)
        self._clear()
        self.say(f"{current.uri} moved: now serving version {new.version} (was {current.version})")

    def _problem(self, text: str) -> None:
        if text != self.holder.problem:
            self.say(f"warning: {text}")
        self.holder.problem = text

    def _clear(self) -> None:
        self.holder.problem = None
