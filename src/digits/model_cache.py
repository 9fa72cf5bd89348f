"""The weights of the models `digits predict` and `digits app` load, kept on this machine between
commands, so that a command that only reads a picture does not import MLflow (more than a
second) to ask the store what it answered a moment ago.

An entry is used only while nothing can have changed: its store is a SQLite file whose size and
modification time are as they were when the entry was written (any write to the store, an alias
moved for one, changes them), and its weights file still has the sha256 it was written with.
Otherwise the model is resolved through MLflow as usual and the entry written again. A tracking
server gives no such guarantee cheaply: its models always go through MLflow. The cache lives in
$XDG_CACHE_HOME/digits/models (default ~/.cache); deleting it is always safe. Standard library
only."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from digits.files import atomic_path


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "digits" / "models"


def _entry(store: str, uri: str) -> Path:
    key = hashlib.sha256(f"{store}\0{uri}".encode()).hexdigest()[:24]
    return cache_dir() / key


def _stamp(db: Path) -> list[int] | None:
    try:
        st = db.stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def lookup(store: str, db: Path | None, uri: str) -> Path | None:
    """The cached weights of `uri` in `store` (a SQLite store whose file is `db`), or None."""
    if db is None:
        return None
    entry = _entry(store, uri)
    try:
        record = json.loads((entry / "entry.json").read_text())
    except (OSError, ValueError):
        return None
    weights = entry / "model.safetensors"
    now = _stamp(db)
    if now is None or record.get("stamp") != now or not weights.is_file():
        return None
    if _sha256(weights) != record.get("sha256"):
        return None
    return weights


def stamp(db: Path | None) -> list[int] | None:
    """The store file's state, taken before resolving a model through MLflow (`remember`)."""
    return _stamp(db) if db is not None else None


def remember(
    store: str, db: Path | None, uri: str, weights: Path, before: list[int] | None
) -> None:
    """Keep `weights` as what `uri` in `store` resolved to, if the store file is still as it
    was `before` the resolution (else a write may have moved the alias meanwhile). Never fails
    the command: a cache that cannot be written is simply not there next time."""
    now = stamp(db)
    if now is None or now != before:
        return
    entry = _entry(store, uri)
    try:
        entry.mkdir(parents=True, exist_ok=True)
        with atomic_path(entry / "model.safetensors") as tmp:
            shutil.copyfile(weights, tmp)
        record = {
            "store": store,
            "uri": uri,
            "stamp": now,
            "sha256": _sha256(entry / "model.safetensors"),
        }
        with atomic_path(entry / "entry.json") as tmp:
            tmp.write_text(json.dumps(record))
    except OSError:
        return
