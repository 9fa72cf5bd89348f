"""Shared fixtures: the MNIST mirror (a local folder, and the same served over HTTP on
127.0.0.1) and tiny IDX files made on the spot. Helpers live in helpers.py."""

from __future__ import annotations

import functools
import http.server
import threading
from pathlib import Path

import pytest

from digits.core import numerics
from helpers import make_fake_mnist, mnist_dir, register_champion


def pytest_configure(config):
    # The tests are an entry point: pin the math libraries before any test module imports
    # torch (collection comes after this hook), so results match the pipeline's bit for bit.
    numerics.pin()


@pytest.fixture(scope="session")
def mnist_local() -> Path:
    return mnist_dir()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep test output clean
        pass


@pytest.fixture(scope="session")
def mnist_http(mnist_local) -> str:
    """MNIST served by a real HTTP server on 127.0.0.1 for the whole session."""
    handler = functools.partial(_QuietHandler, directory=str(mnist_local))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


@pytest.fixture
def fake_raw(tmp_path) -> Path:
    return make_fake_mnist(tmp_path / "raw")


@pytest.fixture(scope="session")
def champion(tmp_path_factory) -> dict:
    """A real model registered as mnist-mlp@champion in a fresh SQLite store, trained once per
    session for the tests of `digits predict`, `digits app` and `mlflow models serve`."""
    return register_champion(tmp_path_factory.mktemp("champion"))
