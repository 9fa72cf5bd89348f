"""Shared fixtures: the MNIST mirror (a local folder, and the same served over HTTP on
127.0.0.1) and tiny IDX files made on the spot. Helpers live in helpers.py.

And how pytest-xdist's workers share the suite (`make test`: `-n 2 --dist loadgroup`): in
groups, each run whole by one worker, so that the module-scoped fixtures (servers, clusters,
pipeline runs) are each built once. A group is a test module; the workers take the longest
groups first (HEAVY), and the short ones fill in at the end. The session's `champion` is built
by each worker that needs one (seconds: a few epochs), so its many users spread over both. xdist's
own `loadgroup` (xdist_group marks) does not work with pytest 9.2, which no longer reads the
node ids it rewrites: the scheduler here replaces it, grouping by module name."""

from __future__ import annotations

import functools
import http.server
import os
import threading
from pathlib import Path

import pytest

from digits.core import numerics
from helpers import make_fake_mnist, mnist_dir, register_champion


def pytest_configure(config):
    # The tests are an entry point: pin the math libraries before any test module imports
    # torch (collection comes after this hook), so results match the pipeline's bit for bit.
    numerics.pin()


# the groups that take longest, longest first (`make test` prints the slowest tests): a worker
# that started one late would finish long after the other
HEAVY = (
    "test_team",
    "test_sweep",
    "test_s3",
    "test_pipeline",
    "test_loop_retrain",
    "test_mlflow_ui",
)


def group_of(module: str) -> str:
    """The xdist group of a test module (its file name without .py)."""
    return module


@pytest.hookimpl(tryfirst=True, optionalhook=True)  # before xdist's own: firstresult
def pytest_xdist_make_scheduler(config, log):
    if config.getoption("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ByGroup(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:  # tests/test_x.py::test_y -> its group
            return group_of(Path(nodeid.split("::", 1)[0]).stem)

    return ByGroup(config, log)


def pytest_collection_modifyitems(config, items):
    if os.environ.get("PYTEST_XDIST_WORKER"):  # a worker's collection: the scheduler's order
        rank = {name: i for i, name in enumerate(HEAVY)}
        items.sort(key=lambda item: rank.get(group_of(item.path.stem), len(HEAVY)))


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
