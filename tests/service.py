"""`digits app` as the service tests run it: a real process (its own session, so that a SIGKILL
reaches every worker) on 127.0.0.1, a registry of its own to promote in, and clients in
threads. Waits are on conditions (/health, the log file) with deadlines, never on sleeps."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np

from helpers import ROOT, photo_like, register, run

DIGITS = str(Path(sys.executable).parent / "digits")
NAME = "mnist-mlp"


def request(
    url: str,
    body: bytes | None = None,
    content_type: str | None = None,
    headers=None,
    method: str | None = None,
):
    """(status, parsed JSON or text) of one HTTP request; 4xx/5xx are answers, not errors."""
    sent = {"Content-Type": content_type} if content_type else {}
    sent.update(headers or {})
    req = urllib.request.Request(url, data=body, headers=sent, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            status, kind, data = r.status, r.headers.get("content-type", ""), r.read()
    except urllib.error.HTTPError as e:
        status, kind, data = e.code, e.headers.get("content-type", ""), e.read()
    return status, json.loads(data) if kind.startswith("application/json") else data.decode()


def wait_for(what: str, check: Callable[[], object], timeout: float = 120, log=None):
    """check()'s first truthy value, polled until `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            tail = log() if log else ""
            raise AssertionError(f"not within {timeout} s: {what}\n{tail}")
        time.sleep(0.1)


class App:
    """`digits app --port 0 ARGS` in `cwd` with `env`; `url` once every worker serves."""

    def __init__(self, args: list[str], env: dict, cwd: Path, workers: int = 2):
        self.args, self.env, self.cwd, self.workers = args, env, cwd, workers
        self.log = cwd / f"app-{time.monotonic_ns()}.log"
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self) -> App:
        cmd = [DIGITS, "app", "--port", "0", "--workers", str(self.workers), *self.args]
        if "--rate-limit" not in self.args:  # Load sends hundreds a second from one address
            cmd += ["--rate-limit", "0"]
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                cmd, cwd=self.cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, **self.env, "OMP_NUM_THREADS": "1"},
            )  # fmt: skip

        def started() -> str | None:
            if self.proc.poll() is not None:
                raise AssertionError(f"digits app exited {self.proc.returncode}:\n{self.text()}")
            m = re.search(r"on (http://127\.0\.0\.1:\d+/)", self.text())
            return m.group(1) if m else None

        self.url = wait_for("digits app printing its URL", started, 180, self.text)
        wait_for(f"{self.workers} workers up", lambda: len(self.workers_seen()) == self.workers,
                 180, self.text)  # fmt: skip
        return self

    def text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def health(self) -> dict:
        status, body = request(self.url + "health")
        assert status == 200, body
        return body

    def workers_seen(self) -> list[dict]:
        try:
            return self.health()["workers"]
        except OSError:
            return []

    def versions(self) -> set[str]:
        """The versions the workers serve now."""
        return {w["version"] for w in self.workers_seen()}

    def stop(self) -> int:
        """Ctrl+C, as a person stops it: a clean shutdown."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL to the parent and every worker: nothing gets to clean up."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=60)

    def __enter__(self) -> App:
        return self.start()

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.stop()
            if self.proc.poll() is None:
                self.kill()


class Load:
    """`clients` threads POSTing photos to /predict until stopped; every answer kept as
    (sent at, status, body)."""

    def __init__(self, url: str, photos: list[bytes], clients: int = 4, limit: int | None = None):
        self.url, self.photos, self.limit = url, photos, limit
        self.answers: list[tuple[float, int, dict | str]] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(i,)) for i in range(clients)]

    def _client(self, k: int) -> None:
        i = k
        while not self.stopping.is_set():
            with self.lock:
                if self.limit is not None and len(self.answers) >= self.limit:
                    return
            sent = time.monotonic()
            status, body = request(self.url + "predict", self.photos[i % len(self.photos)],
                                   "image/png")  # fmt: skip
            with self.lock:
                self.answers.append((sent, status, body))
            i += len(self.threads)

    def count(self) -> int:
        with self.lock:
            return len(self.answers)

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(timeout=120)


def photos(n: int = 20, seed: int = 0) -> tuple[list[bytes], np.ndarray]:
    """`n` MNIST test digits as photos (PNG) and their labels."""
    from digits.data.preprocess import read_pair
    from helpers import mnist_dir

    x, y = read_pair(mnist_dir(), "t10k")
    rng = np.random.default_rng(seed)
    return [photo_like(x[i], rng) for i in range(n)], y[:n]


def variant(weights: Path, dest: Path, tag: str) -> Path:
    """The same network saved with one more metadata entry: other bytes (another sha256, so a
    version of its own), the same answers."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    with safe_open(str(weights), "np") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict
        meta = dict(f.metadata() or {})
    meta["test_variant"] = tag
    dest.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dest), meta)
    return dest


class Registry:
    """A store of its own (tests move its aliases): a SQLite store in `root`, or the tracking
    server at `uri`; versions of the session's champion's network, each approved by the gate's
    tag, the first @champion; and params.yaml + cwd (`root`) for `digits promote`."""

    def __init__(self, root: Path, weights: Path, versions: int = 2, uri: str | None = None):
        import mlflow

        from digits.tracking import registry

        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.uri = uri or f"sqlite:///{root / 'mlflow.db'}"
        self.env = {"MLFLOW_TRACKING_URI": self.uri}
        shutil.copy2(ROOT / "params.yaml", root / "params.yaml")
        previous = os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(self.uri)
        try:
            # a server keeps the artifacts where it likes; a SQLite store's go beside it
            where = None if uri else (root / "mlartifacts").as_uri()
            exp = mlflow.create_experiment("tests", artifact_location=where)
            self.experiment = exp
            self.client = mlflow.MlflowClient(self.uri)
            self.versions = [self.add(weights, f"v{i + 1}") for i in range(versions)]
            registry.record_promotion(
                self.client, NAME, self.versions[0], by="test", reason="first", via="test"
            )
        finally:
            mlflow.set_tracking_uri(previous)

    def add(self, weights: Path, tag: str) -> str:
        """A new approved version of `weights`' network (its own bytes)."""
        import mlflow

        from digits.tracking import registry

        previous = os.environ.get("MLFLOW_TRACKING_URI")
        try:
            file = variant(weights, self.root / "weights" / f"{tag}.safetensors", tag)
            version = register(self.uri, self.experiment, file, NAME)
            self.client.set_model_version_tag(NAME, version, registry.STATUS, registry.APPROVED)
        finally:
            mlflow.set_tracking_uri(previous)
        return version

    def weights_of(self, version: str) -> Path:
        from digits.tracking import resolve

        found = resolve.lookup(self.uri, f"models:/{NAME}/{version}")
        assert found is not None
        path = found.local_weights()
        assert path is not None
        return path

    def promote(self, *args: str) -> str:
        """`digits promote ARGS` in the store's folder: its output."""
        proc = run([DIGITS, "promote", *args], self.root, env=self.env)
        return proc.stdout.strip()

    def champion(self) -> str | None:
        from digits.tracking import registry

        return registry.alias_version(self.client, NAME, registry.CHAMPION)
