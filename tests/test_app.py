"""`digits app`, the drawing page: the real server (`digits app` in a subprocess on 127.0.0.1)
with a real registered model, its /predict endpoint under good and bad requests, and the page
in Debian's headless Chromium: strokes drawn with pointer events must be read as a 1 and a 0,
and an uploaded picture as its digit."""

from __future__ import annotations

import io
import json
import os
import re
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
from PIL import Image

from digits.data.imaging import MAX_BYTES, preprocess, read_image
from digits.data.preprocess import read_pair
from helpers import glyph_image, mnist_dir, photo_like, run, start_chromium
from service import request

DIGITS = str(Path(sys.executable).parent / "digits")
pytestmark = pytest.mark.slow  # a real server, a trained model, a browser


@pytest.fixture(scope="module")
def mnist_test() -> tuple[np.ndarray, np.ndarray]:
    return read_pair(mnist_dir(), "t10k")


@pytest.fixture(scope="module")
def server(champion, tmp_path_factory):
    """`digits app --port 0` (a free port, which it prints): the base URL while it runs."""
    log = tmp_path_factory.mktemp("app") / "app.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [DIGITS, "app", "--port", "0", "--workers", "2", "--model", champion["model_uri"]],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **champion["env"], "OMP_NUM_THREADS": "1"},
            cwd=log.parent,
        )
    try:
        url = wait_for_url(proc, log)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)  # uvicorn's Ctrl+C: a clean shutdown
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_for_url(proc: subprocess.Popen, log: Path, timeout: float = 180) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(r"on (http://127\.0\.0\.1:\d+/)", log.read_text())
        if m:
            return m.group(1)
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    raise AssertionError(f"digits app did not start (exit {proc.poll()}):\n{log.read_text()}")


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


# --- the server -------------------------------------------------------------------------------


def test_the_page_and_everything_it_loads_are_served_locally(server):
    status, page = request(server)
    assert status == 200
    assert '<canvas id="pad"' in page and 'id="upload"' in page
    assets = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert sorted(assets) == ["static/app.js", "static/style.css"]
    for text in [page] + [request(server + a)[1] for a in assets]:
        assert not re.search(r"https?:|//[a-z]|@import", text), "the page must not need a network"
    from service import wait_for

    # every worker up (the URL is printed before the second one has loaded its model)
    wait_for("two workers", lambda: len(request(server + "health")[1]["workers"]) == 2)
    status, health = request(server + "health")
    assert status == 200 and health["status"] == "ok" and health["problems"] == []
    assert health["model"] == "models:/mnist-mlp@champion"
    assert (health["name"], health["version"]) == ("mnist-mlp", "1")
    # every worker, each saying which version it serves
    assert len(health["workers"]) == 2
    assert [w["version"] for w in health["workers"]] == ["1", "1"]
    assert health["worker"] in {w["pid"] for w in health["workers"]}


def test_an_upload_is_read_as_digits_predict_reads_it(server, mnist_test, champion):
    """The endpoint answers with the digit, ten probabilities, and the very 28x28 image that
    the shared preprocessing makes of the upload; each answer has its id and is logged."""
    x, y = mnist_test
    rng = np.random.default_rng(5)
    right = 0
    ids: set[str] = set()
    for i in range(20):
        fmt = "JPEG" if i % 2 else "PNG"
        body = photo_like(x[i], rng, fmt)
        status, answer = request(server + "predict?images=true", body, f"image/{fmt.lower()}")
        assert status == 200, answer
        # without ?images, the JSON of `digits predict --json` alone (no "file")
        status, plain = request(server + "predict", body, f"image/{fmt.lower()}")
        assert plain["prediction_id"] != answer["prediction_id"]  # each answer has its own
        assert re.fullmatch(r"[0-9a-f]{32}", plain["prediction_id"])
        other = ("images", "image", "prediction_id")
        assert {k: v for k, v in plain.items() if k != "prediction_id"} == {
            k: v for k, v in answer.items() if k not in other
        }
        model = {"name": "mnist-mlp", "version": "1", "uri": "models:/mnist-mlp@champion"}
        assert answer["model"] == model
        assert len(answer["probabilities"]) == 10
        assert sum(answer["probabilities"]) == pytest.approx(1, abs=1e-4)
        assert answer["guess"] == int(np.argmax(answer["probabilities"]))
        assert answer["digit"] in (answer["guess"], None)
        assert answer["confidence"] == max(answer["probabilities"])
        (seen,) = (np.array(image, dtype=np.float32) for image in answer["images"])
        assert seen.shape == (28, 28)
        np.testing.assert_allclose(seen.ravel(), preprocess(read_image(body)), atol=6e-4)
        right += answer["digit"] == y[i]
        ids.update((answer["prediction_id"], plain["prediction_id"]))
    assert right >= 18
    # every answer is in the prediction log, by default predictions.db beside mlflow.db
    import sqlite3

    from service import wait_for

    db = Path(champion["tracking_uri"].removeprefix("sqlite:///")).parent / "predictions.db"

    def logged() -> set[str]:
        with sqlite3.connect(db) as conn:
            return {r[0] for r in conn.execute("SELECT id FROM predictions")}

    wait_for("the answers in the log", lambda: ids <= logged())


def test_a_big_photo_is_read_too(server, mnist_test):
    """A picture past INLINE_BYTES is read in a thread rather than the event loop: the same
    answer."""
    from digits.serve.app import INLINE_BYTES

    x, y = mnist_test
    photo = Image.open(io.BytesIO(photo_like(x[3], np.random.default_rng(1)))).convert("L")
    photo = photo.resize((1000, 1000), Image.Resampling.BICUBIC)
    grain = np.random.default_rng(2).integers(-4, 5, (1000, 1000))
    photo = Image.fromarray(np.clip(np.asarray(photo, int) + grain, 0, 255).astype(np.uint8))
    body = png_bytes(photo)
    assert len(body) > INLINE_BYTES
    status, answer = request(server + "predict", body, "image/png")
    assert status == 200 and answer["digit"] == y[3], answer


def test_a_letter_and_a_blank_page_are_not_digits(server):
    status, letter = request(server + "predict", glyph_image("K"), "image/png")
    assert status == 200 and letter["digit"] is None and 0 <= letter["guess"] <= 9
    status, blank = request(server + "predict", BLANK, "image/png")
    assert status == 200, blank
    assert (blank["digit"], blank["guess"], blank["probabilities"]) == (None, None, None)


BLANK = png_bytes(Image.new("RGB", (200, 200), "white"))


@pytest.mark.parametrize(
    ("method", "body", "content_type", "status", "says"),
    [
        ("POST", b'{"inputs": [1, 2]}', "application/json", 415, "expected an image type"),
        ("POST", BLANK, None, 415, "expected an image type"),  # urllib: a form's type
        ("POST", b"", "image/png", 400, "empty body"),
        ("POST", b"GIF89a but not really", "image/gif", 400, "not an image"),
        ("POST", b"\0" * (MAX_BYTES + 1), "image/png", 413, "limit is 25 MiB"),
        ("GET", None, None, 405, "Method Not Allowed"),
    ],
    ids=["json", "form", "empty", "garbage", "huge", "get"],
)
def test_bad_requests_get_a_4xx_that_says_why(
    server, mnist_test, method, body, content_type, status, says
):
    got, answer = request(server + "predict", body, content_type, method=method)
    assert got == status
    assert says in answer["detail"]
    # and the server still serves
    ok, answer = request(
        server + "predict", photo_like(mnist_test[0][0], np.random.default_rng(0)), "image/png"
    )
    assert ok == 200 and answer["digit"] == mnist_test[1][0]


def test_a_taken_port_is_one_line(champion, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = run([DIGITS, "app", "--port", str(port)], tmp_path, env=champion["env"], check=False)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        f"digits app: error: 127.0.0.1:{port}: cannot listen (Address already in use); "
        "try another --port"
    ]


# --- the page, in a real browser ---------------------------------------------------------------


def draw(driver, pad, points: list[tuple[float, float]]) -> None:
    """One stroke through `points` (pixels from the pad's centre), as pointer events."""
    from selenium.webdriver.common.action_chains import ActionChains

    actions = ActionChains(driver, duration=0)
    actions.move_to_element_with_offset(pad, *points[0]).click_and_hold()
    for x, y in points[1:]:
        actions.move_to_element_with_offset(pad, x, y)
    actions.release().perform()


def answer_after(driver, count: int) -> str:
    """The digit shown once the page has had `count` answers in all."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    digit = driver.find_element(By.ID, "digit")
    WebDriverWait(driver, 30).until(
        lambda d: (
            digit.get_attribute("data-answers") == str(count)
            or digit.get_attribute("data-state") == "error"
        )
    )
    assert digit.get_attribute("data-state") == "done", driver.find_element(By.ID, "status").text
    return digit.text


def test_drawing_and_uploading_in_chromium(server, mnist_test, tmp_path):
    driver = start_chromium()
    from selenium.webdriver.common.by import By

    try:
        driver.get(server)
        pad = driver.find_element(By.ID, "pad")
        assert driver.find_element(By.ID, "digit").text == "?"

        one = [(8 - 0.08 * (y + 100), y) for y in range(-100, 101, 10)]  # slightly slanted
        draw(driver, pad, one)
        assert answer_after(driver, 1) == "1"

        driver.find_element(By.ID, "clear").click()
        assert driver.find_element(By.ID, "digit").text == "?"
        angles = np.linspace(0, 2 * np.pi, 41)
        zero = [(65 * np.sin(a), -95 * np.cos(a)) for a in angles]
        draw(driver, pad, zero)
        assert answer_after(driver, 2) == "0"
        bars = driver.find_elements(By.CSS_SELECTOR, "#bars li")
        assert len(bars) == 10 and "top" in bars[0].get_attribute("class")
        # the 28x28 image the model saw is drawn: a ring of ink, dark in the middle
        seen = driver.execute_script(
            "const c = document.getElementById('seen').getContext('2d');"
            "return Array.from(c.getImageData(0, 0, 28, 28).data).filter((v, i) => i % 4 == 0);"
        )
        seen = np.array(seen).reshape(28, 28)
        assert seen.max() == 255 and seen[14, 14] < 50 and seen[4:24, 4:24].mean() > 30

        x, y = mnist_test
        picture = tmp_path / "my digit.jpg"
        picture.write_bytes(photo_like(x[1], np.random.default_rng(6), "JPEG"))  # a 2
        driver.find_element(By.ID, "upload").send_keys(str(picture))
        assert answer_after(driver, 3) == str(y[1])
        assert "my digit.jpg" in driver.find_element(By.ID, "status").text

        # a number: a 4 and a 2 side by side, read as one number with a box for each
        driver.find_element(By.ID, "clear").click()
        # each stroke is sent when it ends, and the page drops an answer overtaken by a newer
        # stroke's: wait for each one, as a person drawing at human speed would
        draw(driver, pad, [(-95, -80), (-115, 15), (-30, 15)])  # the 4's slant and bar
        answer_after(driver, 4)
        draw(driver, pad, [(-55, -70), (-55, 90)])  # its stem
        answer_after(driver, 5)
        draw(driver, pad, [(25, -55), (55, -80), (90, -55), (85, -20), (20, 75), (100, 75)])
        assert answer_after(driver, 6) == "42"
        assert "reads your drawing as 42" in driver.find_element(By.ID, "status").text
        drawn = driver.execute_script(
            "const c = document.getElementById('boxes').getContext('2d');"
            "return Array.from(c.getImageData(0, 0, 280, 280).data).filter((v, i) => i % 4 == 3);"
        )
        assert np.array(drawn).reshape(280, 280).max() > 0  # the boxes are drawn over the pad
        assert driver.find_element(By.ID, "seen").get_attribute("width") == "56"  # two digits

        letter = tmp_path / "a letter.png"
        letter.write_bytes(glyph_image("K"))
        driver.find_element(By.ID, "upload").send_keys(str(letter))
        assert answer_after(driver, 7) == "not a digit"
        assert "best guess" in driver.find_element(By.ID, "confidence").text
        assert "is not a digit" in driver.find_element(By.ID, "status").text
        driver.save_screenshot(str(tmp_path / "page.png"))
    finally:
        driver.quit()


# --- facing the public: headers, a rate limit, loopback unless told ---------------------------


def test_every_answer_carries_the_security_headers(server):
    from digits.serve.guard import CSP

    for path, body in [("", None), ("static/app.js", None), ("health", None),
                       ("predict", b""), ("nowhere", None)]:  # fmt: skip
        req = urllib.request.Request(
            server + path, data=body, headers={"Content-Type": "image/png"}
        )
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                headers = r.headers
        except urllib.error.HTTPError as e:  # the 400, the 404: headers too
            headers = e.headers
        assert headers["Content-Security-Policy"] == CSP, path
        assert headers["X-Content-Type-Options"] == "nosniff", path
        assert headers["X-Frame-Options"] == "DENY", path
        assert headers["Referrer-Policy"] == "no-referrer", path


def test_a_flood_from_one_client_gets_429_and_others_are_served(champion, mnist_test, tmp_path):
    """One token a hundred seconds after a burst of 3: the fourth request from 127.0.0.1 is
    refused while another address (127.0.0.2, loopback too) is answered."""
    import http.client

    from service import App

    x, y = mnist_test
    photo = photo_like(x[0], np.random.default_rng(0))
    limits = ["--model", champion["model_uri"], "--no-log", "--rate-limit", "0.01",
              "--rate-burst", "3"]  # fmt: skip
    with App(limits, champion["env"], tmp_path, workers=1) as app:
        port = int(app.url.rstrip("/").rsplit(":", 1)[1])

        def post(source: str) -> tuple[int, dict, dict]:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60,
                                              source_address=(source, 0))  # fmt: skip
            try:
                conn.request("POST", "/predict", photo, {"Content-Type": "image/png"})
                r = conn.getresponse()
                return r.status, dict(r.getheaders()), json.loads(r.read())
            finally:
                conn.close()

        flood = [post("127.0.0.1") for _ in range(6)]
        assert [status for status, _, _ in flood] == [200, 200, 200, 429, 429, 429]
        _, headers, body = flood[-1]
        assert body == {"detail": "too many requests from 127.0.0.1: slow down"}
        assert int(headers["retry-after"]) >= 1
        assert headers["x-frame-options"] == "DENY"
        status, _, answer = post("127.0.0.2")
        assert status == 200 and answer["digit"] == y[0]


def test_a_public_address_needs_public(champion, tmp_path):
    proc = run([DIGITS, "app", "--host", "0.0.0.0", "--port", "0"], tmp_path,
               env=champion["env"], check=False)  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        "digits app: error: --host 0.0.0.0: not a loopback address, so the page and its API "
        "would be open to the network; say so with --public (and put TLS in front: "
        "docs/service.md)"
    ]
