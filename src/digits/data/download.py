"""Fetch the four official MNIST .gz files, verified against the official MD5s.

The file names, MD5s and official mirrors are torchvision's (copied in `digits.core.mnist`, so that
checking files already present imports no torch). We reuse torchvision's downloader but not its
loop, because that loop leaves a 0-byte file behind when a mirror fails and cannot read a local
folder. Here every file lands in a temp folder first and is renamed into place only once its
checksum matches."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from digits.core.errors import DigitsError
from digits.core.files import file_digest
from digits.core.mnist import OFFICIAL_MIRRORS, RESOURCES
from digits.core.settings import MNIST_MIRROR, MNIST_TIMEOUT, SettingsError

if TYPE_CHECKING:
    from digits.core.config import Params


class DownloadError(DigitsError):
    pass


def md5_matches(path: Path, md5: str) -> bool:
    """True when `path` is a file with this MD5 (what torchvision's check_integrity does)."""
    if not path.is_file():
        return False
    return file_digest(path, "md5") == md5


def mirrors_from_env() -> list[str]:
    """MNIST_MIRROR: comma-separated http(s) URLs or local folders; unset = the official list."""
    raw = (MNIST_MIRROR.get() or "").strip()
    if not raw:
        return list(OFFICIAL_MIRRORS)
    return [m.strip() for m in raw.split(",") if m.strip()]


def timeout_from_env() -> float:
    """MNIST_TIMEOUT: seconds without a byte before a mirror counts as stalled."""
    try:
        return MNIST_TIMEOUT.get()
    except SettingsError as e:
        raise DownloadError(str(e)) from None


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    # torchvision's downloader has no timeout argument; urllib honours the default socket one.
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def _fetch(mirror: str, name: str, md5: str, tmp_dir: Path, timeout: float) -> Path:
    """Put a verified copy of `name` from `mirror` into tmp_dir, or raise with the reason."""
    if mirror.startswith(("http://", "https://")):
        from torchvision.datasets.utils import download_url  # only when fetching

        url = mirror.rstrip("/") + "/" + name
        with _socket_timeout(timeout):
            download_url(url, str(tmp_dir), filename=name, md5=md5)
        return tmp_dir / name
    source = Path(mirror.removeprefix("file://")).expanduser() / name
    if not source.is_file():
        raise FileNotFoundError(f"no file {source}")
    target = tmp_dir / name
    shutil.copyfile(source, target)
    if not md5_matches(target, md5):
        raise DownloadError("MD5 mismatch")
    return target


def download(
    out_dir: str | Path, mirrors: list[str] | None = None, timeout: float | None = None, log=print
) -> list[Path]:
    """Make out_dir hold the four verified files; return their paths.

    Files already present with the right MD5 are kept without touching the network. For each
    missing file the mirrors are tried in order; when every mirror fails, DownloadError lists
    each mirror's failure. Whatever happens, out_dir holds only complete, verified files."""
    out_dir = Path(out_dir)
    mirrors = mirrors_from_env() if mirrors is None else mirrors
    timeout = timeout_from_env() if timeout is None else timeout
    if not mirrors:
        raise DownloadError("no MNIST mirror given (MNIST_MIRROR is empty)")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, md5 in RESOURCES:
        final = out_dir / name
        paths.append(final)
        if md5_matches(final, md5):
            continue
        final.unlink(missing_ok=True)  # present but corrupt: replace it
        failures = []
        for mirror in mirrors:
            with tempfile.TemporaryDirectory(dir=out_dir, prefix=".download-") as tmp:
                try:
                    fetched = _fetch(mirror, name, md5, Path(tmp), timeout)
                except Exception as e:  # any failure: note it and try the next mirror
                    reason = _reason(e)
                    failures.append(f"{mirror}: {reason}")
                    log(f"download: {name} from {mirror} failed ({reason}); trying next mirror")
                    continue
                os.replace(fetched, final)
                log(f"download: {name} from {mirror} (md5 ok)")
                break
        else:
            raise DownloadError(
                f"could not download {name}: every mirror failed: " + "; ".join(failures)
            )
    return paths


def _reason(e: Exception) -> str:
    text = str(e) or type(e).__name__
    if isinstance(e, RuntimeError) and "corrupted" in text:
        return "MD5 mismatch (truncated or wrong file)"
    if isinstance(e, (TimeoutError, socket.timeout)) or "timed out" in text:
        return "timed out"
    return text.splitlines()[0]


def run(params: Params) -> list[Path]:
    """The `download` stage: data/raw holds the four verified files afterwards."""
    from digits.core.files import RAW_DIR

    return download(RAW_DIR)
