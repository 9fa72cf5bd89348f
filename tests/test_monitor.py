"""`digits monitor` and `digits feedback` (digits.monitor): the image features, a version's
reference, the drift checks on real MNIST digits (quiet on clean ones, an alert naming what
moved on shifted ones), the prediction log read in bulk from a real SQLite log written by the
service's own writer, the review rule and the export, and the command's exit status, report and
MLflow run on a real registered version."""

from __future__ import annotations

import datetime as dt
import json
import sqlite3

import numpy as np
import pytest

from digits.core.config import MonitorParams
from digits.monitor import drift, features, reference, review, window
from digits.serve import predlog

SETTINGS = MonitorParams()
MODEL = {"name": "mnist-mlp", "version": "3", "uri": "models:/mnist-mlp@champion"}


@pytest.fixture(scope="module")
def mnist():
    from digits.data.preprocess import read_pair
    from helpers import mnist_dir

    x, y = read_pair(mnist_dir(), "t10k")
    # shuffled: MNIST's test set holds two populations of writers, one half each (SD-3, then
    # SD-1); a reference of one half against windows of the other is a real shift
    order = np.random.default_rng(0).permutation(len(y))
    return x.reshape(-1, 784)[order], y.astype(np.int64)[order]


def answers(y, rng, refused=0.01):
    """Stand-in answers: the label, a confidence near 1, a share refused."""
    conf = 1 - rng.beta(1, 60, len(y))
    digit = np.where(rng.random(len(y)) < refused, -1, y)
    return digit, conf


def thicker(x):
    """Strokes one pixel thicker (a 3x3 max filter): a plain style shift."""
    img = x.reshape(-1, 28, 28)
    p = np.pad(img, ((0, 0), (1, 1), (1, 1)))
    out = np.max([p[:, r : r + 28, c : c + 28] for r in range(3) for c in range(3)], axis=0)
    return out.reshape(-1, 784)


def test_features_measure_what_they_name():
    img = np.zeros((2, 28, 28), np.uint8)
    img[0, 10:18, 12:16] = 255  # a bar 8 high, 4 wide
    img[1, 10:18, 10:18] = 255  # a block 8 x 8: thicker
    f = dict(zip(features.NAMES, features.features(img).T, strict=True))
    assert f["height"].tolist() == [8, 8] and f["width"].tolist() == [4, 8]
    assert f["centroid_row"][0] == pytest.approx(13.5) and f["centroid_col"][0] == 13.5
    assert f["area"][0] == pytest.approx(32 / 784) and f["ink"][1] == pytest.approx(64 / 784)
    assert f["stroke_width"][1] > f["stroke_width"][0]
    with pytest.raises(ValueError, match="uint8"):
        features.features(np.zeros((2, 784), np.float32))


def test_a_reference_is_the_same_bytes_every_time_and_counts_every_piece(mnist, tmp_path):
    x, y = mnist
    rng = np.random.default_rng(0)
    digit, conf = answers(y[:5000], rng)
    ref = reference.build(x[:5000], digit, conf)
    again = reference.build(x[:5000].copy(), digit.copy(), conf.copy())
    assert reference.dumps(ref) == reference.dumps(again)
    assert sum(ref["digits"]) + ref["refused"] == ref["pieces"] == 5000
    for binned in [ref["confidence"], *ref["features"].values()]:
        assert sum(binned["counts"]) == 5000 and len(binned["counts"]) == len(binned["edges"]) + 1
    path = tmp_path / "reference.json"
    path.write_text(reference.dumps(ref))
    assert reference.load(path) == json.loads(reference.dumps(ref))
    path.write_text('{"format": 99}')
    with pytest.raises(reference.BadReference, match="expected a digits reference"):
        reference.load(path)


def test_clean_windows_are_quiet_and_each_kind_of_shift_alerts(mnist):
    x, y = mnist
    rng = np.random.default_rng(1)
    digit, conf = answers(y[:5000], rng)
    ref = reference.build(x[:5000], digit, conf)
    rest_x, rest_y = x[5000:], y[5000:]

    def drifted(wx, wd, wc):
        return {(c.kind, c.name) for c in drift.compare(ref, wd, wc, wx, SETTINGS) if c.drifted}

    for i in range(5):  # clean windows of 1,000 other test digits
        idx = np.random.default_rng(i).choice(len(rest_y), 1000, replace=False)
        assert drifted(rest_x[idx], *answers(rest_y[idx], rng)) == set()
    idx = np.arange(1000)
    wd, wc = answers(rest_y[idx], rng)
    assert ("input", "stroke_width") in drifted(thicker(rest_x[idx]), wd, wc)
    ones = rest_y == 1  # a window of nothing but ones
    assert ("prediction", "digit shares") in drifted(rest_x[ones], *answers(rest_y[ones], rng))
    wd, wc = answers(rest_y[idx], rng, refused=0.1)
    assert ("refusal", "refusal rate") in drifted(rest_x[idx], wd, wc)
    wd, wc = answers(rest_y[idx], rng)
    assert ("confidence", "confidence") in drifted(rest_x[idx], wd, wc * 0.8)


def entry(pixels, digits, at, conf=0.99):
    """A logged answer of len(digits) pieces (None: refused), as the service logs it."""
    said = [{"box": [0, 0, 1, 1], "digit": d, "guess": d if d is not None else 0,
             "confidence": conf, "probabilities": [0.1] * 10} for d in digits]  # fmt: skip
    one = said[0] if len(said) == 1 else {"digit": None, "guess": None, "confidence": None}
    record = {**one, "reading": "", "number": None, "digits": said}
    return predlog.Entry(predlog.new_id(), at, "app", MODEL, record, bytes(pixels))


def make_log(tmp_path, entries, corrections=()):
    url = f"sqlite:///{tmp_path / 'predictions.db'}"
    eng = predlog.engine(url)
    predlog.create(eng)
    predlog.write(eng, entries)
    for pid, label, piece, client in corrections:
        predlog.add_feedback(eng, pid, label, piece, client, "pytest")
    return url, eng


def test_the_window_reads_every_piece_and_correction_of_the_version(tmp_path, mnist):
    x, _ = mnist
    now = predlog.now()
    old = now - dt.timedelta(days=2)
    es = [
        entry(x[0], [7], now),
        entry(np.concatenate([x[1], x[2], x[3]]), [2, None, 1], now),
        entry(b"", [], now),  # a blank picture: an answer of no piece
        entry(x[4], [None], now),
        entry(x[5], [4], old),  # before the window
    ]
    other = entry(x[6], [9], now)
    other = predlog.Entry(other.id, now, "app", {**MODEL, "version": "4"}, other.record,
                          other.inputs)  # fmt: skip
    fixes = [(es[0].id, "1", 0, "a"), (es[1].id, "not a digit", 1, "a"),
             (es[1].id, "5", 0, "b"), (es[4].id, "3", 0, "a")]  # fmt: skip
    _, eng = make_log(tmp_path, [*es, other], fixes)
    win = window.read(eng, "mnist-mlp", "3", now - dt.timedelta(days=1), now + dt.timedelta(1))
    assert win.answers == 4 and win.pieces == 5
    assert win.digit.tolist() == [7, 2, -1, 1, -1]
    np.testing.assert_array_equal(win.pixels, np.stack([x[0], x[1], x[2], x[3], x[4]]))
    assert sorted(zip(win.corrected.tolist(), win.labels, strict=True)) == [
        (0, "1"), (1, "5"), (2, "not a digit")]  # fmt: skip
    assert window.accuracy(win) == (pytest.approx(1 / 3), 3)
    # a rejected correction is left out
    rejected = frozenset({1})  # feedback ids count from 1: the first, es[0]'s "1"
    win = window.read(eng, "mnist-mlp", "3", now - dt.timedelta(days=1), now + dt.timedelta(1),
                      rejected)  # fmt: skip
    assert win.labels and "1" not in win.labels
    # the columns read are the service's own
    _, predictions, feedback = predlog.tables()
    ours = window._tables()
    for theirs, mine in zip((predictions, feedback), ours, strict=True):
        assert {c.name for c in mine.c} <= {c.name for c in theirs.c}


def test_since_takes_durations_and_iso_times():
    now = dt.datetime(2026, 12, 7, 12)
    assert window.since("24h", now) == dt.datetime(2026, 12, 6, 12)
    assert window.since("90m", now) == dt.datetime(2026, 12, 7, 10, 30)
    assert window.since("2026-12-01T00:00:00Z", now) == dt.datetime(2026, 12, 1)
    assert window.since("2026-12-01T02:00:00+02:00", now) == dt.datetime(2026, 12, 1)
    with pytest.raises(window.WindowError, match="--since 'yesterday'"):
        window.since("yesterday", now)


def test_review_rule_needs_distinct_sources_and_export_is_content_addressed(tmp_path, mnist):
    x, _ = mnist
    now = predlog.now()
    es = [entry(x[i], [int(i)], now) for i in range(4)]
    es.append(entry(x[0], [3], now))  # the same image again, answered again
    fixes = [(es[1].id, "7", 0, "10.0.0.9")] * 30  # one source, many times: never enough
    fixes += [(es[0].id, "5", 0, "10.0.0.1"), (es[4].id, "5", 0, "10.0.0.2")]  # agree
    fixes += [(es[2].id, "not a digit", 0, "10.0.0.1"), (es[2].id, "not a digit", 0, "10.0.0.3")]
    fixes += [(es[3].id, "8", 0, "10.0.0.1")]
    _, eng = make_log(tmp_path, es, fixes)
    items = review.corrections(eng)
    approved = review.by_rule(items, 2)
    assert {c.prediction_id for c in approved} == {es[0].id, es[4].id, es[2].id}
    review.decide(eng, [c.id for c in approved], review.APPROVED, "rule", "2 sources agree")
    single = next(c.id for c in items if c.prediction_id == es[3].id)
    review.decide(eng, [single], review.REJECTED, "pytest")
    with pytest.raises(review.ReviewError, match="9999: no such correction"):
        review.decide(eng, [9999], review.APPROVED, "pytest")
    items = review.corrections(eng)
    assert sum(c.decision is None for c in items) == 30  # the flood stays pending
    out = tmp_path / "data" / "feedback" / "examples.npz"
    n, changed = review.export(items, out)
    assert (n, changed) == (2, True)  # x[0] once (two approvals, one image), x[2]
    first = out.read_bytes()
    assert review.export(review.corrections(eng), out) == (2, False)
    assert out.read_bytes() == first
    with np.load(out, allow_pickle=False) as f:
        assert list(f["sha256"]) == sorted(f["sha256"])
        by = dict(zip(f["sha256"], f["y"].tolist(), strict=True))
        import hashlib

        assert by[hashlib.sha256(x[0].tobytes()).hexdigest()] == 5
        assert by[hashlib.sha256(x[2].tobytes()).hexdigest()] == review.NOT_A_DIGIT_LABEL
    with sqlite3.connect(tmp_path / "predictions.db") as conn:
        assert conn.execute("SELECT count(*) FROM feedback_reviews").fetchone()[0] == 5


def test_the_command_exits_1_on_an_alert_and_writes_its_report(tmp_path, mnist, capsys):
    from digits.cli import main

    x, y = mnist
    rng = np.random.default_rng(3)
    digit, _ = answers(y[:5000], rng)
    ref = reference.build(x[:5000], digit, np.full(5000, 0.99))  # as entry() answers
    (tmp_path / "ref.json").write_text(reference.dumps(ref))
    now = predlog.now()
    clean = [entry(x[i], [int(y[i])], now) for i in range(5000, 5600)]
    (tmp_path / "clean").mkdir()
    url, _ = make_log(tmp_path / "clean", clean)
    base = ["monitor", "--version", "3", "--reference", str(tmp_path / "ref.json"),
            "--no-track", "--json"]  # fmt: skip
    assert main([*base, "--log-db", url, "--report", str(tmp_path / "clean.html")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["alert"] is False and summary["window"]["pieces"] == 600
    shifted = [entry(t, [int(y[i])], now) for i, t in zip(range(5600, 6200),
               thicker(x[5600:6200]), strict=True)]  # fmt: skip
    (tmp_path / "shifted").mkdir()
    url, _ = make_log(tmp_path / "shifted", shifted)
    assert main([*base, "--log-db", url, "--report", str(tmp_path / "shifted.html")]) == 1
    summary = json.loads(capsys.readouterr().out)
    assert summary["alert"] is True
    assert any(r.startswith("input drift: stroke_width") for r in summary["reasons"])
    page = (tmp_path / "shifted.html").read_text()
    assert "ALERT" in page and "data:image/png;base64," in page
    assert main([*base, "--log-db", url, "--since", "last week"]) == 1
    assert "--since 'last week'" in capsys.readouterr().err
    assert main([*base, "--log-db", str(tmp_path / "none.db")]) == 1
    assert "no prediction log at" in capsys.readouterr().err
    assert not (tmp_path / "none.db").exists()
