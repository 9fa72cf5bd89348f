"""The download stage against real mirrors on 127.0.0.1: a local folder, and an HTTP server of
our own that fails in the ways real mirrors do (404, 500, a dropped connection, wrong bytes, a
stall). Whatever fails, the next mirror is tried, the log names the failed one, and the output
folder never holds a partial, empty or temporary file."""

from __future__ import annotations

import hashlib
import http.server
import shutil
import socket
import sys
import threading
from pathlib import Path

import pytest

from digits.data.download import (
    RESOURCES,
    DownloadError,
    download,
    mirrors_from_env,
    timeout_from_env,
)
from helpers import ROOT, make_fake_mnist, run

NAMES = [name for name, _ in RESOURCES]
MD5 = dict(RESOURCES)
MISSING = "t10k-labels-idx1-ubyte.gz"  # the smallest file: the one the HTTP tests fetch
TIMEOUT = 1.0  # seconds; the stalling server holds a request for STALL seconds
STALL = 8.0


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def closed_port_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connections are refused at once
    return f"http://127.0.0.1:{port}/"


class FaultyMirror(http.server.ThreadingHTTPServer):
    """GET /<mode>/<file>: mode 'good' serves the real file; the others fail."""

    daemon_threads = True

    def __init__(self, files: Path):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files = files
        self.release = threading.Event()
        self.requests: list[str] = []

    def handle_error(self, request, client_address):
        pass  # clients that time out and hang up are expected here

    def url(self, mode: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{mode}/"


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        srv: FaultyMirror = self.server
        srv.requests.append(self.path)
        _, mode, name = self.path.split("/", 2)
        path = srv.files / name
        if mode in ("404", "500") or not path.is_file():
            self.send_error(404 if mode != "500" else 500)
            return
        body = path.read_bytes()
        if mode == "wrong":  # right length, wrong bytes
            body = bytes(b ^ 0x5A for b in body)
        if mode == "stall-headers":  # accepts the connection, never answers
            srv.release.wait(STALL)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if mode == "truncated":  # the connection drops halfway through the body
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if mode == "stall-body":  # half the body, then silence
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            srv.release.wait(STALL)
            return
        self.wfile.write(body)


@pytest.fixture(scope="module")
def mirror(mnist_local):
    srv = FaultyMirror(mnist_local)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.release.set()
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def out_dir(tmp_path, mnist_local) -> Path:
    """An output folder already holding three of the four verified files."""
    out = tmp_path / "raw"
    out.mkdir()
    for name in NAMES:
        if name != MISSING:
            shutil.copy2(mnist_local / name, out / name)
    return out


def assert_only_verified(out: Path, expected: set[str]) -> None:
    """out holds exactly `expected`, each with its official MD5: no temp folder, no partial."""
    assert {p.name for p in out.iterdir()} == expected
    for name in expected:
        assert md5(out / name) == MD5[name], name


# --- local folders ---------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["", "file://"])
def test_local_mirror(tmp_path, mnist_local, scheme):
    log: list[str] = []
    out = tmp_path / "raw"
    paths = download(out, [scheme + str(mnist_local)], log=log.append)
    assert paths == [out / n for n in NAMES]
    assert_only_verified(out, set(NAMES))
    assert len(log) == 4 and all("(md5 ok)" in line for line in log)


def test_local_mirror_with_wrong_files_is_rejected(tmp_path, mnist_local):
    fake = make_fake_mnist(tmp_path / "fake")  # same names, wrong bytes
    out = tmp_path / "raw"
    with pytest.raises(DownloadError) as err:
        download(out, [str(fake)], log=lambda _: None)
    assert f"{fake}: MD5 mismatch" in str(err.value)
    assert list(out.iterdir()) == []  # the copy was checked before it was put in place

    log: list[str] = []
    download(out, [str(fake), str(mnist_local)], log=log.append)
    assert_only_verified(out, set(NAMES))
    assert sum(f"from {fake} failed (MD5 mismatch)" in line for line in log) == 4


def test_present_files_need_no_network(tmp_path, mnist_local):
    out = tmp_path / "raw"
    out.mkdir()
    for name in NAMES:
        shutil.copy2(mnist_local / name, out / name)
    before = {n: (out / n).stat().st_mtime_ns for n in NAMES}
    log: list[str] = []
    # the only mirror refuses every connection: success means none was attempted
    paths = download(out, [closed_port_url()], timeout=TIMEOUT, log=log.append)
    assert paths == [out / n for n in NAMES]
    assert log == []
    assert {n: (out / n).stat().st_mtime_ns for n in NAMES} == before


def test_corrupt_present_file_is_replaced(out_dir, mnist_local):
    (out_dir / MISSING).write_bytes(b"\0" * 100)  # e.g. left by another tool's failed fetch
    log: list[str] = []
    download(out_dir, [str(mnist_local)], log=log.append)
    assert_only_verified(out_dir, set(NAMES))
    assert log == [f"download: {MISSING} from {mnist_local} (md5 ok)"]


# --- HTTP faults -----------------------------------------------------------------------------

FAULTS = {  # mode -> words of the logged reason
    "404": "HTTP Error 404",
    "500": "HTTP Error 500",
    "truncated": "MD5 mismatch",  # urllib ends a short body quietly; the MD5 catches it
    "wrong": "MD5 mismatch",
    "stall-body": "timed out",
    "stall-headers": "timed out",
}


@pytest.mark.parametrize("mode", FAULTS)
def test_failed_mirror_then_good_one(out_dir, mirror, mode):
    bad, good = mirror.url(mode), mirror.url("good")
    seen = len(mirror.requests)
    log: list[str] = []
    download(out_dir, [bad, good], timeout=TIMEOUT, log=log.append)
    assert_only_verified(out_dir, set(NAMES))
    # only the missing file was asked for; the three present ones were not fetched again
    assert {r.rsplit("/", 1)[1] for r in mirror.requests[seen:]} == {MISSING}
    assert len(log) == 2, log
    assert log[0].startswith(f"download: {MISSING} from {bad} failed (")
    assert FAULTS[mode] in log[0] and "trying next mirror" in log[0]
    assert log[1] == f"download: {MISSING} from {good} (md5 ok)"


def test_every_mirror_fails(out_dir, mirror):
    bad = [mirror.url(m) for m in FAULTS] + [closed_port_url()]
    log: list[str] = []
    with pytest.raises(DownloadError) as err:
        download(out_dir, bad, timeout=TIMEOUT, log=log.append)
    msg = str(err.value)
    assert msg.startswith(f"could not download {MISSING}: every mirror failed: ")
    assert "\n" not in msg
    parts = msg.split(": every mirror failed: ", 1)[1].split("; ")
    assert len(parts) == len(bad)
    for part, url, words in zip(parts, bad, [*FAULTS.values(), "Connection refused"], strict=True):
        assert part.startswith(f"{url}: ") and words in part, part
    assert len(log) == len(bad)
    # nothing half-written: no 0-byte or partial MISSING, no .download-* temp folder
    assert_only_verified(out_dir, set(NAMES) - {MISSING})


def test_local_mirror_missing_file(out_dir, tmp_path):
    partial = tmp_path / "partial"
    partial.mkdir()
    with pytest.raises(DownloadError, match=r"no file .*partial/t10k-labels"):
        download(out_dir, [str(partial)], log=lambda _: None)
    assert_only_verified(out_dir, set(NAMES) - {MISSING})


def test_mirrors_and_timeout_from_env(monkeypatch):
    monkeypatch.setenv("MNIST_MIRROR", " http://a/ , /data/mnist,, ")
    assert mirrors_from_env() == ["http://a/", "/data/mnist"]
    monkeypatch.delenv("MNIST_MIRROR")
    assert mirrors_from_env()[0].startswith("http")  # the official list
    monkeypatch.setenv("MNIST_TIMEOUT", "2.5")
    assert timeout_from_env() == 2.5
    for bad in ("soon", "0", "-3"):
        monkeypatch.setenv("MNIST_TIMEOUT", bad)
        with pytest.raises(DownloadError, match="MNIST_TIMEOUT"):
            timeout_from_env()
    with pytest.raises(DownloadError, match="no MNIST mirror"):
        download("unused", [], timeout=1)


@pytest.mark.slow
def test_stage_reports_one_line_and_leaves_nothing(tmp_path, mirror):
    # the real stage script, its mirrors from the environment: one bad, one refusing
    shutil.copy2(ROOT / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    bad = [mirror.url("404"), closed_port_url()]
    proc = run(
        [sys.executable, str(ROOT / "pipeline/download.py")],
        tmp_path,
        check=False,
        env={"MNIST_MIRROR": ",".join(bad), "MNIST_TIMEOUT": "2"},
        timeout=120,
    )
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("digits ")]
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith("digits download: error: could not download ")
    assert all(u in errors[0] for u in bad)
    assert "Traceback" not in proc.stderr
    assert list((tmp_path / "data/raw").iterdir()) == []
