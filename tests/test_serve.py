"""The REST server the README documents: `make serve` (= `mlflow models serve -m
models:/mnist-mlp@champion --env-manager local` on 127.0.0.1) with the venv *not* on PATH, as a
user who did not activate it runs it. A batch posted to /invocations gets the same probabilities
as the pyfunc model in this process; malformed bodies get a 4xx and the server keeps serving."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from digits.data.preprocess import read_pair
from helpers import ROOT, glyph_image, mnist_dir, require_executable, served_probabilities

PROBS = [f"p{d}" for d in range(10)]

pytestmark = pytest.mark.slow  # starts a real server (tens of seconds)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def wait_until_up(url: str, proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            with urllib.request.urlopen(url + "/ping", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"the server did not come up (exit {proc.poll()}):\n{log.read_text()}")


@pytest.fixture(scope="module")
def served(champion, tmp_path_factory):
    """`make serve` from a shell whose PATH lacks the venv; yields the server's base URL."""
    make = require_executable("make", "install make (apt-get install make)")
    venv_bin = str(Path(sys.executable).parent)
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if p != venv_bin)
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    env.update(champion["env"], PATH=path, OMP_NUM_THREADS="1")
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    # -o: never rebuild the venv from a test (CI has just built it)
    cmd = [make, "-o", ".venv/.installed", "serve", f"SERVE_PORT={port}"]
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url, proc, log)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # make, mlflow and uvicorn: the group we started
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_a_batch_gets_the_probabilities_of_pyfunc_in_process(served, champion):
    x, y = read_pair(mnist_dir(), "t10k")
    batch = x[:64].astype(np.float32) / 255
    status, answer = post(served + "/invocations", json.dumps({"inputs": batch.tolist()}).encode())
    assert status == 200, answer
    rows = answer["predictions"]
    assert len(rows) == 64 and set(rows[0]) == {"digit", "guess", "confidence", *PROBS}
    got = np.array([[r[p] for p in PROBS] for r in rows])
    np.testing.assert_allclose(
        got, served_probabilities(champion["pyfunc"].predict(batch)), atol=1e-6
    )
    np.testing.assert_allclose(got, champion["classifier"].probabilities(batch), atol=1e-6)
    assert (np.array([r["guess"] for r in rows]) == y[:64]).mean() > 0.9


def test_the_served_model_says_not_a_digit(served, champion):
    """A letter (in a font training never saw) and a blank image: `digit` is null; a digit
    keeps its digit. The same answers as digits.model.inference gives in this process."""
    from digits.data.imaging import preprocess, read_image

    x, y = read_pair(mnist_dir(), "t10k")
    letter = preprocess(read_image(glyph_image("K"), "letter"))
    batch = np.stack([letter, np.zeros(784, np.float32), x[0].astype(np.float32) / 255])
    status, answer = post(served + "/invocations", json.dumps({"inputs": batch.tolist()}).encode())
    assert status == 200, answer
    rows = answer["predictions"]
    assert rows[0]["digit"] is None and rows[1]["digit"] is None
    assert rows[2]["digit"] == y[0]
    said = champion["classifier"].answers(batch)
    assert [r["guess"] for r in rows] == said.guess.tolist()


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (json.dumps({"inputs": [[0.5] * 10]}), "784"),  # wrong shape
        (json.dumps({"inputs": [["a"] * 784]}), ""),  # not numbers
        (json.dumps({"images": [[0.0] * 784]}), ""),  # unknown key
        ("{not json", ""),
    ],
    ids=["shape", "strings", "key", "syntax"],
)
def test_a_malformed_body_gets_a_4xx_and_the_server_keeps_serving(served, body, says):
    status, answer = post(served + "/invocations", body.encode())
    assert 400 <= status < 500, answer
    assert says in answer.get("message", "")
    ok, answer = post(served + "/invocations", json.dumps({"inputs": [[0.0] * 784]}).encode())
    assert ok == 200 and answer["predictions"][0]["digit"] is None  # a blank image
