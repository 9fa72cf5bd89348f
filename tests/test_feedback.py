"""Corrections: `POST /feedback` on a real `digits app` (two workers, so a correction may reach
the other worker than the answer did) stores the label beside the logged answer with where it
came from; unknown ids and bad labels get a 4xx. Then the page in Chromium: under an answer,
the button "7" records that the picture was a 7."""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest

from service import App, photos, request, wait_for

pytestmark = pytest.mark.slow  # a real server, a trained model, a browser


@pytest.fixture(scope="module")
def served(champion, tmp_path_factory):
    folder = tmp_path_factory.mktemp("feedback")
    db = folder / "log.db"
    args = ["--model", champion["model_uri"], "--log-db", str(db)]
    with App(args, champion["env"], folder) as app:
        yield app, db


def feedback(url: str, body, content_type: str = "application/json", agent: str = "tests/1"):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return request(url + "feedback", data, content_type, {"User-Agent": agent})


def stored(db, pid: str) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute(
            "SELECT piece, label, client, user_agent FROM feedback WHERE prediction_id = ? "
            "ORDER BY id",
            (pid,),
        ).fetchall()


def test_a_correction_is_stored_beside_its_answer(served):
    app, db = served
    pictures, _ = photos(2)
    status, answer = request(app.url + "predict", pictures[0], "image/png")
    assert status == 200
    pid = answer["prediction_id"]
    status, got = feedback(app.url, {"prediction_id": pid, "label": 3})  # at once: maybe not
    assert status == 201, got  # written yet, maybe asked of the other worker
    assert got == {"feedback": got["feedback"], "prediction_id": pid, "piece": 0, "label": "3"}
    status, _ = feedback(app.url, {"prediction_id": pid, "label": "not a digit"}, agent="x")
    assert status == 201
    assert stored(db, pid) == [
        (0, "3", "127.0.0.1", "tests/1"),
        (0, "not a digit", "127.0.0.1", "x"),
    ]
    # the model is not changed by what people say: the same picture, the same answer
    status, again = request(app.url + "predict", pictures[0], "image/png")
    assert again["probabilities"] == answer["probabilities"]


def test_a_digit_of_a_number_can_be_corrected(served, mnist_strip):
    app, db = served
    status, answer = request(app.url + "predict", mnist_strip, "image/png")
    assert status == 200 and len(answer["digits"]) == 3, answer
    pid = answer["prediction_id"]
    assert feedback(app.url, {"prediction_id": pid, "label": 1, "piece": 2})[0] == 201
    assert stored(db, pid)[0][:2] == (2, "1")
    status, got = feedback(app.url, {"prediction_id": pid, "label": 1, "piece": 3})
    assert status == 400 and "has 3 piece(s)" in got["detail"]


@pytest.fixture(scope="module")
def mnist_strip() -> bytes:
    from digits.data.preprocess import read_pair
    from helpers import mnist_dir
    from strips import strip

    x, _ = read_pair(mnist_dir(), "t10k")
    return strip(x[10:13], np.random.default_rng(3), "PNG")


@pytest.mark.parametrize(
    ("body", "content_type", "status", "says"),
    [
        ({"prediction_id": "0" * 32, "label": 7}, None, 404, "no such answer"),
        ({"prediction_id": "not-an-id", "label": 7}, None, 400, "32 hex digits"),
        ({"prediction_id": "KNOWN", "label": 10}, None, 400, 'expected a digit 0-9 or "not'),
        ({"prediction_id": "KNOWN", "label": "seven"}, None, 400, "expected a digit"),
        ({"prediction_id": "KNOWN", "label": True}, None, 400, "expected a digit"),
        ({"prediction_id": "KNOWN", "label": 7, "piece": -1}, None, 400, "piece -1"),
        (b"{not json", None, 400, "not JSON"),
        ([1, 2], None, 400, "a JSON object"),
        ({"prediction_id": "KNOWN", "label": 7}, "text/plain", 415, "application/json"),
    ],
    ids=["unknown", "bad-id", "ten", "word", "bool", "piece", "syntax", "list", "type"],
)
def test_bad_corrections_get_a_4xx_and_store_nothing(served, body, content_type, status, says):
    app, db = served
    ok, answer = request(app.url + "predict", photos(1)[0][0], "image/png")
    assert ok == 200
    if isinstance(body, dict) and body.get("prediction_id") == "KNOWN":
        body = {**body, "prediction_id": answer["prediction_id"]}
    got, detail = feedback(app.url, body, content_type or "application/json")
    assert got == status and says in detail["detail"], detail
    assert stored(db, answer["prediction_id"]) == []


def test_correcting_an_answer_on_the_page_in_chromium(served, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from helpers import glyph_image, start_chromium

    app, db = served
    driver = start_chromium()
    try:
        driver.get(app.url)
        correct = driver.find_element(By.ID, "correct")
        assert not correct.is_displayed()  # nothing to correct yet
        picture = tmp_path / "a letter.png"
        picture.write_bytes(glyph_image("K"))
        driver.find_element(By.ID, "upload").send_keys(str(picture))
        digit = driver.find_element(By.ID, "digit")
        WebDriverWait(driver, 30).until(lambda d: digit.get_attribute("data-answers") == "1")
        assert digit.text == "not a digit"
        assert "version 1" in driver.find_element(By.ID, "version").text
        assert correct.is_displayed()
        assert not driver.find_element(By.ID, "piece").is_displayed()  # one piece: no choice
        driver.find_element(By.CSS_SELECTOR, '#labels button[data-label="7"]').click()
        thanks = driver.find_element(By.ID, "thanks")
        WebDriverWait(driver, 30).until(lambda d: thanks.get_attribute("data-state") != "pending")
        assert thanks.get_attribute("data-state") == "sent", thanks.text
        assert thanks.text == "Thanks: recorded that it is a 7."
        pid = correct.get_attribute("data-prediction-id")
        ((piece, label, client, agent),) = wait_for("the correction", lambda: stored(db, pid))
        assert (piece, label, client) == (0, "7", "127.0.0.1") and "Chrome" in agent
    finally:
        driver.quit()
