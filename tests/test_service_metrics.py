"""`GET /metrics` of a real `digits app` with two workers (prometheus-client's multiprocess
mode), read with prometheus-client's own parser: the counters equal what the clients sent and
got, whichever worker answered each request and whichever answers /metrics."""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

import pytest

from service import App, photos, request, wait_for

pytestmark = pytest.mark.slow  # a real server, a trained model


def families(url: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    status, text = request(url + "metrics")
    assert status == 200
    return {f.name: f for f in text_string_to_metric_families(text)}


def samples(family, suffix: str = "_total") -> dict:
    """{labels as a sorted tuple: value} of a family's samples named name + suffix."""
    return {
        tuple(sorted(s.labels.items())): s.value
        for s in family.samples
        if s.name == family.name + suffix
    }


def test_the_counters_equal_what_was_sent(champion, tmp_path):
    pictures, _ = photos(30)
    args = ["--model", champion["model_uri"], "--log-db", str(tmp_path / "log.db")]
    with App(args, champion["env"], tmp_path) as app:
        before = families(app.url)  # a fresh service: nothing answered yet
        assert "digits_answers" not in before  # a labelled counter appears with its first
        said: Counter = Counter()
        for body in pictures:
            status, answer = request(app.url + "predict", body, "image/png")
            assert status == 200
            said.update(str(d["digit"]) if d["digit"] is not None else "not a digit"
                        for d in answer["digits"])  # fmt: skip
        for _ in range(4):
            assert request(app.url + "predict", b"not an image", "image/png")[0] == 400
        assert request(app.url + "predict", pictures[0], "text/plain")[0] == 415
        wait_for("every answer logged",
                 lambda: sum(w["log"]["written"] for w in app.workers_seen()) == 30)  # fmt: skip

        got = families(app.url)
        requests = samples(got["digits_requests"])
        assert requests[(("path", "/predict"), ("status", "200"))] == 30
        assert requests[(("path", "/predict"), ("status", "400"))] == 4
        assert requests[(("path", "/predict"), ("status", "415"))] == 1
        answers = samples(got["digits_answers"])
        assert {dict(k)["answer"]: v for k, v in answers.items()} == dict(said)
        latency = got["digits_request_seconds"]
        count = [s.value for s in latency.samples if s.name.endswith("_count")]
        assert count == [35]  # every POST /predict, refused ones too
        inf = [s.value for s in latency.samples if s.labels.get("le") == "+Inf"]
        assert inf == [35]
        # the version each worker serves, one sample per worker
        versions = got["digits_model_version"].samples
        pids = {w["pid"] for w in app.workers_seen()}
        assert {int(s.labels["pid"]) for s in versions} == pids
        assert {(s.labels["name"], s.value) for s in versions} == {("mnist-mlp", 1.0)}
        assert samples(got["digits_log_written"]) == {(): 30.0}
        assert samples(got["digits_log_dropped"]) == {(): 0.0}
        assert samples(got["digits_model_reloads"]) == {(): 0.0}
        assert samples(got["digits_model_reload_failures"]) == {(): 0.0}
        # the workers' numbers are files in the service's own folder (PROMETHEUS_MULTIPROC_DIR)
        mine = Path(tempfile.gettempdir()).glob(
            f"digits-app-*/workers/{app.health()['worker']}.json"
        )
        (folder,) = (p.parent.parent for p in mine)
        assert any((folder / "prometheus").glob("*.db"))
    assert not folder.exists()  # deleted when the service stopped
    assert "Traceback" not in app.text(), app.text()
