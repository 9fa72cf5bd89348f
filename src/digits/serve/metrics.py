"""`GET /metrics` of `digits app`, in Prometheus' text format (prometheus-client).

Several workers share the numbers through prometheus-client's multiprocess mode: `digits app`
sets PROMETHEUS_MULTIPROC_DIR to a folder of its own before the workers start (and deletes it
at exit); each worker writes its counts there, and whichever worker answers /metrics sums them.
Otherwise (an app made in-process) the numbers are this process's.

The metrics are made by `Metrics()`, not at import, and kept out of prometheus-client's global
registry: importing this module has no side effect."""

from __future__ import annotations

import os
import time

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus-client's own variable
# seconds: a one-digit photo takes ~1-3 ms, a big photo up to seconds
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
PATHS = ("/predict", "/feedback", "/health", "/metrics", "/")


class Metrics:
    def __init__(self, multiprocess: bool = False) -> None:
        """`multiprocess`: `digits app` has set MULTIPROC_ENV for this process (before
        prometheus-client was imported): the values live in that folder's files."""
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.multiprocess = multiprocess
        self.registry = CollectorRegistry()
        # in multiprocess mode the values live in files and the collector reads them all;
        # registering the metrics too would count this process twice
        reg = None if self.multiprocess else self.registry
        self.requests = Counter(
            "digits_requests", "HTTP requests answered, by path and status", ["path", "status"],
            registry=reg,
        )  # fmt: skip
        self.latency = Histogram(
            "digits_request_seconds", "Time to answer POST /predict", buckets=BUCKETS,
            registry=reg,
        )  # fmt: skip
        self.answers = Counter(
            "digits_answers",
            'Digits answered, one per piece of a picture: "0".."9", "not a digit", or "no ink" '
            "for a blank picture",
            ["answer"],
            registry=reg,
        )
        self.version = Gauge(
            "digits_model_version", "The registered version each worker serves (by pid)",
            ["name"], registry=reg, multiprocess_mode="liveall",
        )  # fmt: skip
        self.reloads = Counter(
            "digits_model_reloads", "Moves of the alias followed to a new version", registry=reg
        )
        self.failed_reloads = Counter(
            "digits_model_reload_failures",
            "Versions the alias moved to that could not be loaded (the old one kept serving)",
            registry=reg,
        )
        self.log_written = Counter(
            "digits_log_written", "Answers written to the prediction log", registry=reg
        )
        self.log_dropped = Counter(
            "digits_log_dropped",
            "Answers that could not be written to the prediction log (database down, disk full, "
            "queue full)",
            registry=reg,
        )
        self.feedback = Counter(
            "digits_feedback", "Corrections received, by label", ["label"], registry=reg
        )
        self._paths = {p: p for p in PATHS}

    def path(self, path: str) -> str:
        """A bounded label for a request path (anything unknown is "other")."""
        return self._paths.get(path) or ("/static" if path.startswith("/static/") else "other")

    def served(self, name: str | None, version: str | None) -> None:
        if version is not None and version.isdigit():
            self.version.labels(name or "").set(int(version))

    def logged(self, written: int, dropped: int) -> None:
        if written:
            self.log_written.inc(written)
        if dropped:
            self.log_dropped.inc(dropped)

    def exposition(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

        registry = self.registry
        if self.multiprocess:
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST

    def worker_gone(self) -> None:
        """This worker is stopping: its `liveall` gauge leaves the sums."""
        if self.multiprocess:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(os.getpid())


class CountRequests:
    """ASGI middleware: each request counted by path and status, /predict's time observed."""

    def __init__(self, app, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        t0 = time.perf_counter()
        try:
            await self.app(scope, receive, sending)
        finally:
            path = self.metrics.path(scope["path"])
            self.metrics.requests.labels(path, str(status[0])).inc()
            if path == "/predict":
                self.metrics.latency.observe(time.perf_counter() - t0)
