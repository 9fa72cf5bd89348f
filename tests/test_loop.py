"""The production loop on real parts (docs/production-loop.md): a running `digits app` on a
registered champion whose run holds its reference; clean MNIST traffic -> `digits monitor` exits
0; digits drawn with a thicker pen -> exit 1 naming input drift, its run in MLflow; corrections
for part of them from two sources -> `digits feedback review` approves them by the default rule
-> `digits feedback export` writes them, content-addressed; a flood of wrong corrections from
one source stays pending. (The second half, `dvc repro` on the export, the new champion served
and poisoned corrections refused, is tests/test_loop_retrain.py; the retraining hook and the
gate's checks are tested apart in tests/test_feedback_loop.py.)"""

from __future__ import annotations

import datetime as dt
import io
import json
import subprocess

import numpy as np
import pytest

from service import DIGITS, NAME, App, Registry, request, wait_for

pytestmark = pytest.mark.slow


def png(img: np.ndarray, side: int = 28) -> bytes:
    """An MNIST digit as a picture: dark ink on white paper, `side` pixels. At its own 28 the
    service reads back nearly the same pixels; scaled up, the reader's resampling changes the
    widths and the model's confidence enough to alert (docs/production-loop.md)."""
    from PIL import Image

    b = io.BytesIO()
    Image.fromarray(255 - img.reshape(28, 28)).resize((side, side), Image.BILINEAR).save(b, "PNG")
    return b.getvalue()


def thicker(x: np.ndarray) -> np.ndarray:
    img = x.reshape(-1, 28, 28)
    p = np.pad(img, ((0, 0), (1, 1), (1, 1)))
    return np.max([p[:, r : r + 28, c : c + 28] for r in range(3) for c in range(3)], axis=0)


def logged(db) -> int:
    import sqlite3

    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT count(*) FROM predictions").fetchone()[0]


def iso_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")


def digits(*args: str, cwd, env) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([DIGITS, *args], cwd=cwd, env={**os.environ, **env}, text=True,
                          capture_output=True, timeout=300)  # fmt: skip


def test_monitor_alerts_on_a_shift_and_corrections_become_reviewed_data(champion, tmp_path):
    from digits.data.preprocess import read_pair, split
    from digits.model.inference import Classifier
    from digits.monitor import reference
    from helpers import mnist_dir

    reg = Registry(tmp_path / "store", champion["weights"], versions=1)
    version = reg.versions[0]
    x, y = read_pair(mnist_dir(), "train")
    val_x = split(x, y, 5000, 42)[1]
    ref = reference.of_classifier(Classifier.from_file(reg.weights_of(version)), val_x)
    (tmp_path / "reference.json").write_text(reference.dumps(ref))
    run_id = reg.client.get_model_version(NAME, version).run_id
    reg.client.log_artifact(run_id, str(tmp_path / "reference.json"), reference.ARTIFACT)

    tx, ty = read_pair(mnist_dir(), "t10k")
    order = np.random.default_rng(0).permutation(len(ty))  # both populations of writers
    clean, shifted = order[:300], order[300:600]
    log = tmp_path / "predictions.db"
    env, cwd = reg.env, reg.root
    with App(["--log-db", str(log)], env, cwd) as app:
        start = iso_now()
        for i in clean:
            status, body = request(app.url + "predict", png(tx[i]), "image/png")
            assert status == 200, body
        wait_for("the answers in the log", lambda: logged(log) == 300)
        done = digits("monitor", "--log-db", str(log), "--since", start, "--json",
                      "--report", str(tmp_path / "clean.html"), cwd=cwd, env=env)  # fmt: skip
        summary = json.loads(done.stdout)
        assert done.returncode == 0, (summary["reasons"], done.stderr)
        assert summary["window"]["pieces"] >= 290 and summary["model"]["version"] == version

        start = iso_now()
        answers = []
        for i, img in zip(shifted, thicker(tx[shifted]), strict=True):
            status, body = request(app.url + "predict", png(img), "image/png")
            assert status == 200, body
            answers.append((body["prediction_id"], int(ty[i])))
        wait_for("the answers in the log", lambda: logged(log) == 600)
        done = digits("monitor", "--log-db", str(log), "--since", start, "--json",
                      "--report", str(tmp_path / "shifted.html"), cwd=cwd, env=env)  # fmt: skip
        summary = json.loads(done.stdout)
        assert done.returncode == 1, summary
        assert any(r.startswith("input drift") for r in summary["reasons"]), summary["reasons"]
        run = reg.client.get_run(summary["mlflow_run"])
        assert run.data.tags["model_version"] == version and run.data.tags["alert"] == "true"

        def correct(pid: str, label, source: str) -> None:
            body = json.dumps({"prediction_id": pid, "label": label}).encode()
            status, said = request(app.url + "feedback", body, "application/json",
                                   {"X-Forwarded-For": source})  # fmt: skip
            assert status == 201, said

        for pid, label in answers[:40]:  # two people agree on the right label
            correct(pid, label, "10.0.0.1")
            correct(pid, label, "10.0.0.2")
        for pid, label in answers[40:80]:  # one source, many wrong labels
            for _ in range(3):
                correct(pid, (label + 1) % 10, "10.6.6.6")

    done = digits("feedback", "review", "--log-db", str(log), cwd=cwd, env=env)
    assert done.returncode == 0, done.stderr
    assert "80 correction(s) approved by the rule" in done.stdout
    assert "120 pending, 80 approved, 0 rejected" in done.stdout
    out = tmp_path / "examples.npz"
    done = digits("feedback", "export", "--log-db", str(log), "--out", str(out), cwd=cwd, env=env)
    assert done.returncode == 0 and "40 approved example(s)" in done.stdout, done.stdout
    with np.load(out, allow_pickle=False) as f:
        got = sorted(f["y"].tolist())
        assert list(f["sha256"]) == sorted(f["sha256"])
    assert got == sorted(label for _, label in answers[:40])  # the agreed labels, none poisoned
    first = out.read_bytes()
    done = digits("feedback", "export", "--log-db", str(log), "--out", str(out), cwd=cwd, env=env)
    assert "(unchanged)" in done.stdout and out.read_bytes() == first
