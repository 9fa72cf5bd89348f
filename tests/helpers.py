"""Test helpers (imported by test modules; the fixtures that use them are in conftest.py):
the MNIST mirror, tiny IDX files made on the spot, a throwaway git+DVC copy of the project, and
system tools (PostgreSQL, Chromium) that skip a test where absent, except in CI, where a skip
would hide a missing install step and so fails instead."""

from __future__ import annotations

import functools
import gzip
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT_FILES = ["dvc.yaml", "params.yaml", "sweep.yaml", "pipeline", "src", ".dvcignore", "plots"]


def mnist_candidates(root: Path = ROOT) -> list[Path]:
    """Where MNIST may already be, in the order the tests look: $MNIST_DIR, the local folders of
    $MNIST_MIRROR (as the download stage reads them), data/raw (after `make run`),
    ../shared/mnist beside the checkout, and the tests' own download cache."""
    mirrors = [m.strip() for m in os.environ.get("MNIST_MIRROR", "").split(",")]
    found = [os.environ.get("MNIST_DIR", ""), *(m for m in mirrors if "://" not in m)]
    return [Path(p) for p in found if p] + [
        root / "data" / "raw",
        root.parent / "shared" / "mnist",
        mnist_cache(),
    ]


def mnist_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "digits" / "mnist"


@functools.cache
def mnist_dir(root: Path = ROOT) -> Path:
    """A folder with the four official files (MD5-checked): the first candidate that has them,
    else a download into the cache (the official mirrors, or $MNIST_MIRROR's URLs); skipped
    (failed in CI) when there is none and no mirror answers."""
    from digits.core.mnist import RESOURCES
    from digits.data.download import DownloadError, download, md5_matches

    for d in mnist_candidates(root):
        if all(md5_matches(d / name, md5) for name, md5 in RESOURCES):
            return d
    try:
        download(mnist_cache(), log=lambda line: None)
    except DownloadError as e:
        missing(
            f"no MNIST at {', '.join(map(str, mnist_candidates(root)))} and no download ({e})",
            "set MNIST_DIR to a folder with the four .gz files, or run `make run` first",
        )
    return mnist_cache()


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


def imported(stderr: str) -> set[str]:
    """The modules a process imported, from its stderr under PYTHONPROFILEIMPORTTIME=1."""
    marked = (line for line in stderr.splitlines() if line.startswith("import time:"))
    return {line.split("|")[-1].strip() for line in marked}


def git(root: Path, *args: str, check: bool = True) -> str:
    """stdout of `git ARGS` in `root`, stripped: the one way tests run git."""
    return run(["git", *args], root, check=check).stdout.strip()


def init_git(root: Path, name: str = "test", email: str = "test@example.com") -> Path:
    """`root` as a git repository on `main`, everything in it committed by `name <email>`."""
    git(root, "init", "-q", "-b", "main")
    git(root, "config", "user.email", email)
    git(root, "config", "user.name", name)
    git(root, "add", "-A")
    git(root, "commit", "-qm", "first")
    return root


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
    git(dest, "init", "-q", "-b", "main")
    git(dest, "config", "user.email", "test@example.com")
    git(dest, "config", "user.name", "test")
    run([sys.executable, "-m", "dvc", "init", "-q"], dest)
    run([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], dest)
    git(dest, "add", "-A")
    git(dest, "commit", "-qm", "project")
    return dest


def make_trained_project(root: Path) -> Path:
    """A project folder where the evaluate stage can run, in seconds: the real dvc.yaml and
    .gitignore, params for a tiny run, fake data preprocessed, and a model trained on it (2
    epochs) with the files the train stage writes (weights, history), but no MLflow run: for
    evaluate it is a model trained elsewhere."""
    import yaml

    from digits.core.config import parse_params
    from digits.core.reports import write_history
    from digits.data.preprocess import load_split, preprocess
    from digits.model.network import save_model
    from digits.stages.train import train

    raw = make_fake_mnist(root.parent / f"{root.name}-raw")
    root.mkdir(parents=True)
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy2(ROOT / name, root / name)
    (root / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS))
    train_npz = root / "data/processed/train.npz"
    preprocess(raw, train_npz, root / "data/processed/test.npz", root / "reports/data.json", 100, 0)
    p = parse_params(TINY_PARAMS).train
    result = train(p, load_split(train_npz, "train", "val"), progress=False)
    save_model(result.model, root / "models/model.safetensors", p.hidden_sizes, p.dropout)
    write_history(root / "reports/train_history.csv", result.history)
    return root


TINY_PARAMS = {
    "data": {"val_size": 100},
    "train": {"epochs": 2, "batch_size": 32, "device": "cpu"},
    "evaluate": {"misclassified_shown": 6},
}


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


# main's gates ask for a champion (99% accurate, robust, calibrated, refusing non-digits) that a
# test's few epochs do not make: these leave the absolute gates a short run can pass
SHORT_RUN_GATES = {
    "gates.min_corruption_accuracy": 0.0,
    "gates.max_ece": 1.0,
    "gates.max_ood_fpr95": 1.0,
    "gates.max_refused_digits": 1.0,
}


# smaller outlier sets (the training pool, the evaluate suite: 50 of each kind, not 400 and
# 500) save about 2 s of every pipeline run a test makes; what they measure is the same
SMALL_OUTLIERS = {"train.outliers.per_kind": 50, "evaluate.outliers_per_kind": 50}


# a pipeline run of seconds for the team tests: one epoch of batches of 256 (215 steps) reaches
# ~95%, and the absolute gates are relaxed so that it is promoted
SHORT_RUN = {
    "train.epochs": 1,
    "train.batch_size": 256,
    **SMALL_OUTLIERS,
    "gates.min_accuracy": 0.85,
    "gates.max_loss": 1.0,
    "gates.min_class_recall": 0.7,
    "gates.max_accuracy_drop": 0.05,
    **SHORT_RUN_GATES,
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


def wait_still(driver, timeout: float = 30) -> None:
    """Return once the page looks the same in two screenshots in a row (its transitions and
    animations over): what a test waits for before taking a picture. Fails after `timeout`."""
    from selenium.webdriver.support.ui import WebDriverWait

    last = [driver.get_screenshot_as_png()]

    def still(d) -> bool:
        shot = d.get_screenshot_as_png()
        same, last[0] = shot == last[0], shot
        return same

    WebDriverWait(driver, timeout, poll_frequency=0.3).until(still, "the page never stopped moving")


def register_champion(store: Path, epochs: int = 4, name: str = "mnist-mlp") -> dict:
    """A real model for the tests that use one: the project's trainer with outlier exposure, a
    few epochs on real MNIST (about 97% accurate, seconds on a CPU), calibrated as the train
    stage calibrates (temperature and refusal threshold on validation digits), logged and
    registered as the evaluate stage does it (digits.tracking.pyfunc: a pyfunc over the weights
    file) into a fresh SQLite store in `store` as `name` with the alias champion. Returns the
    store's URI, the model's URI, the loaded pyfunc model, the weights file, the model in numpy
    (digits.model.inference.Classifier), and `env`: what a subprocess needs to find the store."""
    import mlflow
    import torch

    from digits.core.config import TrainParams
    from digits.data.preprocess import read_pair, split
    from digits.model.inference import Classifier
    from digits.model.network import save_model
    from digits.stages.train import calibrate, outlier_pool, train

    x, y = read_pair(mnist_dir(), "train")
    train_x, val_x, train_y, val_y = split(x, y, 5000, 42)
    images = lambda a: torch.from_numpy(a).float().div_(255)  # noqa: E731
    labels = lambda a: torch.from_numpy(a).long()  # noqa: E731
    p = TrainParams(epochs=epochs, device="cpu", outliers={"enabled": True, "per_kind": 200})
    data = (images(train_x), labels(train_y), images(val_x), labels(val_y))
    result = train(p, data, outliers=outlier_pool(p, data[0]), progress=False)
    store.mkdir(parents=True, exist_ok=True)
    weights = store / "model.safetensors"
    cal = calibrate(result.model, data[2], data[3], p.refuse_val_share)
    save_model(result.model, weights, p.hidden_sizes, p.dropout, cal)
    uri = f"sqlite:///{store / 'mlflow.db'}"
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)  # also sets the env var: restored below
    try:
        exp = mlflow.create_experiment("tests", artifact_location=(store / "mlartifacts").as_uri())
        version = register(uri, exp, weights, name)
        mlflow.MlflowClient(uri).set_registered_model_alias(name, "champion", version)
        model_uri = f"models:/{name}@champion"
        pyfunc = mlflow.pyfunc.load_model(model_uri)
    finally:
        mlflow.set_tracking_uri(previous)  # None unsets it, env var included
    return {
        "tracking_uri": uri,
        "model_uri": model_uri,
        "version": version,
        "pyfunc": pyfunc,
        "weights": weights,
        "classifier": Classifier.from_file(weights),
        "env": {"MLFLOW_TRACKING_URI": uri},
    }


def register(store_uri: str, experiment_id: str, weights: Path, name: str) -> str:
    """Log and register `weights` as a new version of `name` as the evaluate stage does (a
    pyfunc over the weights file, tagged with its sha256); returns the version."""
    import mlflow

    from digits.core.files import file_digest
    from digits.tracking import pyfunc as serving
    from digits.tracking import registry

    mlflow.set_tracking_uri(store_uri)
    with mlflow.start_run(experiment_id=experiment_id) as run:
        version = serving.log_and_register(weights, name, run.info.run_id)
    client = mlflow.MlflowClient(store_uri)
    client.set_model_version_tag(name, version, registry.MODEL_TAG, file_digest(weights))
    return version


def served_probabilities(table) -> np.ndarray:
    """The (N, 10) probabilities in what the registered pyfunc returns (a table,
    digits.tracking.pyfunc)."""
    return table[[f"p{d}" for d in range(10)]].to_numpy(dtype=np.float64)


def glyph_image(char: str, font: str = "cmr10.ttf", side: int = 160) -> bytes:
    """A PNG of `char` in dark ink on white paper, in a font of the outlier suite (never seen
    in training): a picture of something that is not a digit."""
    import io

    from PIL import Image, ImageDraw, ImageFont

    from digits.data.outliers import font_dir

    img = Image.new("L", (side, side), 255)
    face = ImageFont.truetype(str(font_dir() / font), side // 2)
    ImageDraw.Draw(img).text((side / 2, side / 2), char, fill=20, font=face, anchor="mm")
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def registered(project: Path, uri: str | None = None, name: str = "mnist-mlp") -> dict:
    """What the pipeline in `project` registered for its model file (no file in the project
    names it: the store does): the newest version of that file, its run and experiment."""
    from mlflow import MlflowClient

    from digits.core.files import file_digest
    from digits.tracking import registry

    uri = uri or f"sqlite:///{project / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    version = registry.version_of_model(
        client, name, file_digest(project / "models/model.safetensors")
    )
    assert version is not None, f"no version of {project}'s model in {uri}"
    run_id = client.get_model_version(name, version).run_id
    return {
        "registered_model": name,
        "version": version,
        "run_id": run_id,
        "experiment_id": client.get_run(run_id).info.experiment_id,
        "tracking_uri": uri,
    }


def photo_like(digit: np.ndarray, rng: np.random.Generator, fmt: str = "PNG") -> bytes:
    """An MNIST digit (784 uint8, light ink on black) as a user's picture of it: dark blue ink on
    off-white paper, 1.5-6x larger, somewhere off-centre on a bigger page, RGB, saved as `fmt`
    (PNG, or JPEG at quality 85)."""
    import io

    from PIL import Image

    side = round(28 * rng.uniform(1.5, 6))
    ink = Image.fromarray(255 - digit.reshape(28, 28))
    ink = ink.resize((side, side), Image.Resampling.BICUBIC)
    w, h = (int(v) for v in rng.integers(side + 20, 3 * side, size=2))
    page = Image.new("L", (w, h), 255)
    page.paste(ink, (int(rng.integers(0, w - side)), int(rng.integers(0, h - side))))
    paper = np.asarray(page, np.float32)[..., None] / 255  # 1 = paper, 0 = ink
    pen, white = np.array([20, 30, 90]), np.array([245, 240, 228])
    rgb = Image.fromarray((pen + (white - pen) * paper).round().astype(np.uint8), "RGB")
    buf = io.BytesIO()
    rgb.save(buf, fmt, **({"quality": 85} if fmt == "JPEG" else {}))
    return buf.getvalue()
