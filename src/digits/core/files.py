"""Where things live, and how they are written: every output goes to a temp file in the same
folder first and is renamed into place, so a crash or a bad input never leaves half a file."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from digits.core.settings import DVC_ROOT

# The layout dvc.yaml declares, relative to the repository root (stages run with cwd = root).
RAW_DIR = Path("data/raw")
TRAIN_DATA = Path("data/processed/train.npz")  # train + validation split
TEST_DATA = Path("data/processed/test.npz")
DATA_SUMMARY = Path("reports/data.json")
MODEL = Path("models/model.safetensors")
HISTORY = Path("reports/train_history.csv")
METRICS = Path("reports/metrics.json")
PREDICTIONS = Path("reports/predictions.csv")
FIGURES = Path("reports/figures")
GATE_REPORT = Path("reports/gate.md")  # not tracked by DVC: it names registry versions
GATE_VERDICT = Path("reports/gate.json")  # the absolute gates passed: the gate's DVC output


def repo_root() -> Path:
    """The project root: DVC_ROOT when DVC runs us (for a queued experiment it names the parent
    repository, not the temporary copy), else the nearest folder up from cwd with a dvc.yaml."""
    if root := DVC_ROOT.get():
        return Path(root).resolve()
    here = Path.cwd().resolve()
    for d in (here, *here.parents):
        if (d / "dvc.yaml").exists():
            return d
    return here


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:  # the bytes are on disk before the name points at them
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes, read in chunks: sha256 is the identity recorded for data
    and models (and the score cache's key); md5 is what MNIST's official checksums use."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()
