"""The weights files of registered versions that `digits predict` and `digits app` downloaded,
kept on this machine by their content: `$XDG_CACHE_HOME/digits/models/<sha256>.safetensors`
(default ~/.cache).

Which version a URI names is asked of the store every time (digits.tracking.resolve: milliseconds,
no MLflow import); only the bytes are kept, under the sha256 the version was registered with. So
the cache can never answer with an old version: an alias that moved names another sha256, a
file whose bytes no longer match its name is ignored, and deleting the folder is always safe.
A version of a local store is read in place and not copied here; this is for the versions a
tracking server or an object store holds."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from digits.core.files import atomic_path
from digits.core.settings import XDG_CACHE_HOME
from digits.data.preprocess import file_digest

_SHA256 = re.compile(r"[0-9a-f]{64}")


def cache_dir() -> Path:
    base = XDG_CACHE_HOME.get() or str(Path.home() / ".cache")
    return Path(base) / "digits" / "models"


def get(digest: str) -> Path | None:
    """The kept weights file whose sha256 is `digest`, or None."""
    if not _SHA256.fullmatch(digest):
        return None
    path = cache_dir() / f"{digest}.safetensors"
    try:
        return path if file_digest(path) == digest else None
    except OSError:
        return None


def keep(weights: Path, digest: str) -> None:
    """Keep a copy of `weights`, whose sha256 the caller has checked is `digest`. Never fails
    the command: a cache that cannot be written is simply not there next time."""
    if not _SHA256.fullmatch(digest):
        return
    try:
        cache_dir().mkdir(parents=True, exist_ok=True)
        with atomic_path(cache_dir() / f"{digest}.safetensors") as tmp:
            shutil.copyfile(weights, tmp)
    except OSError:
        return
