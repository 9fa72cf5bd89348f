"""Test helpers (imported by test modules; the fixtures that use them are in conftest.py):
the MNIST mirror, tiny IDX files made on the spot, a throwaway git+DVC copy of the project, and
system tools (PostgreSQL, Chromium) that skip a test where absent, except in CI, where a skip
would hide a missing install step and so fails instead."""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT_FILES = ["dvc.yaml", "params.yaml", "pipeline", "src", ".dvcignore", "plots"]


def mnist_dir() -> Path:
    """The official files: $MNIST_DIR, else ../shared/mnist beside the checkout."""
    d = Path(os.environ.get("MNIST_DIR", ROOT.parent / "shared" / "mnist"))
    if not (d / "train-images-idx3-ubyte.gz").exists():
        missing(f"no MNIST mirror at {d}", "set MNIST_DIR to a folder with the four .gz files")
    return d


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


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing(what: str, hint: str) -> None:
    """Skip the calling test because `what` is absent, saying how to get it; fail in CI."""
    message = f"{what}; {hint}"
    if in_ci():
        pytest.fail(f"{message} (CI must run this test, not skip it)", pytrace=False)
    pytest.skip(message)


def require_executable(name: str, hint: str, paths: tuple[str, ...] = ()) -> str:
    """Path of a system program (PATH, then `paths`), or skip/fail via `missing`."""
    for candidate in (shutil.which(name), *paths):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    missing(f"{name} is not installed", hint)
    raise AssertionError("unreachable")


CHROMIUM_HINT = "install Debian's browser: apt-get install chromium chromium-driver"


def start_chromium(width: int = 1280, height: int = 900):
    """Debian's Chromium, headless, driven by Selenium through chromium-driver: no browser is
    downloaded. The flags keep it off the network (this machine has none) and let it run as
    root. The caller quits the returned driver."""
    binary = require_executable("chromium", CHROMIUM_HINT, ("/usr/bin/chromium",))
    driver_path = require_executable("chromedriver", CHROMIUM_HINT, ("/usr/bin/chromedriver",))
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--window-size={width},{height}",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver_path), options=options)
