"""Shared fixtures: the MNIST mirror (a local folder, and the same served over HTTP on
127.0.0.1), tiny IDX files made on the spot, and a throwaway git+DVC copy of the project."""

from __future__ import annotations

import functools
import gzip
import http.server
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT_FILES = ["dvc.yaml", "params.yaml", "pipeline", "src", ".dvcignore"]


def mnist_dir() -> Path:
    """The official files: $MNIST_DIR, else ../shared/mnist beside the checkout."""
    d = Path(os.environ.get("MNIST_DIR", ROOT.parent / "shared" / "mnist"))
    if not (d / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"no MNIST mirror at {d} (set MNIST_DIR)")
    return d


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


def write_idx(path: Path, arr: np.ndarray, magic: int | None = None) -> Path:
    """Write `arr` (uint8) as an IDX file, gzipped if path ends in .gz."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    if magic is None:
        magic = 0x0800 | arr.ndim
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    data = header + arr.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data, mtime=0) if path.suffix == ".gz" else data)
    return path


def make_fake_mnist(raw_dir: Path, n_train: int = 600, n_test: int = 100, seed: int = 0) -> Path:
    """A tiny MNIST-shaped data set: each digit is a bright bar at a class-specific row, so
    a model can learn it in a second."""
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n, dtype=np.uint8) % 10
        rng.shuffle(labels)
        images = rng.integers(0, 40, size=(n, 28, 28), dtype=np.uint8)
        for i, c in enumerate(labels):
            images[i, 2 + 2 * c : 4 + 2 * c, 4:24] = 255
        write_idx(raw_dir / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(raw_dir / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return raw_dir


@pytest.fixture
def fake_raw(tmp_path) -> Path:
    return make_fake_mnist(tmp_path / "raw")


def run(
    cmd: list[str], cwd: Path, env: dict | None = None, check: bool = True, timeout: float = 900
) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(
        cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}\n"
            f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"
        )
    return proc


def make_project(dest: Path) -> Path:
    """A fresh git repo holding the project's pipeline (code, dvc.yaml, params), with DVC
    initialised: what a user's clone looks like before the first `dvc repro`."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(
                src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
            )
        elif src.exists():
            shutil.copy2(src, dest / name)
    shutil.copy2(ROOT / ".gitignore", dest / ".gitignore")
    run(["git", "init", "-q", "-b", "main"], dest)
    run(["git", "config", "user.email", "test@example.com"], dest)
    run(["git", "config", "user.name", "test"], dest)
    run([sys.executable, "-m", "dvc", "init", "-q"], dest)
    run([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], dest)
    run(["git", "add", "-A"], dest)
    run(["git", "commit", "-qm", "project"], dest)
    return dest


def project_env(project: Path, mirror: str) -> dict:
    """Environment for running the pipeline in `project`: its own copy of the code first on
    the path, MNIST from `mirror`, and MLflow's default store (mlflow.db at the project root)."""
    bin_dir = str(Path(sys.executable).parent)
    return {
        "PYTHONPATH": str(project / "src"),
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
        "MNIST_MIRROR": mirror,
        "MLFLOW_TRACKING_URI": "",  # empty = the project's default store
        "DVC_NO_ANALYTICS": "1",
        "GIT_PYTHON_REFRESH": "quiet",
    }


def set_params(project: Path, **changes) -> None:
    """Edit params.yaml in place: set_params(p, **{"train.epochs": 2})."""
    import yaml

    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for dotted, value in changes.items():
        node = params
        *parents, leaf = dotted.split(".")
        for k in parents:
            node = node[k]
        node[leaf] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def dvc(project: Path, *args: str, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "dvc", *args], project, env=env, check=check)
