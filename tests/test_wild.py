"""The out-of-MNIST sets (digits.data.wild): seeded, MNIST-shaped, halves that share nothing,
fonts that training never draws, and their measure (digits.model.ood.measure_wild) against a
hand computation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fontTools.ttLib import TTFont

from digits.data import outliers, wild
from digits.model import ood


@pytest.fixture(scope="module")
def mnist() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = np.zeros((40, 28, 28), np.float32)
    x[:, 6:22, 12:16] = rng.uniform(0.6, 1.0, (40, 1, 1))  # a bar: something to redraw
    return x.reshape(40, 784), np.arange(40) % 10


@pytest.mark.parametrize("name", wild.SETS)
def test_every_set_is_mnist_shaped_seeded_and_split(name, mnist):
    a = wild.make(name, "validation", mnist, n=10)
    assert a.images.shape == (10, 784) and a.images.dtype == np.float32
    assert a.images.min() >= 0 and a.images.max() <= 1
    assert (a.images.max(1) > 0.2).all()  # something is there
    assert np.array_equal(a.images, wild.make(name, "validation", mnist, n=10).images)
    assert not np.array_equal(a.images, wild.make(name, "report", mnist, n=10).images)
    assert a.digits == (name in wild.DIGIT_SETS)
    if a.labels is not None:
        assert a.labels.shape == (10,) and set(a.labels) <= set(range(10))


def test_printed_digits_use_no_training_font_and_the_halves_none_of_each_other():
    val, rep = (set(wild.PRINTED_FONTS[h]) for h in wild.HALVES)
    assert not val & rep
    assert not (val | rep) & set(outliers.TRAIN_FONTS)
    for name in val | rep - {wild.AILERON}:
        cmap = TTFont(str(outliers.font_dir() / name)).getBestCmap()
        assert all(ord(c) in cmap for c in "0123456789"), name
    labels = wild.make("printed", "report", n=20).labels
    assert labels is not None and list(labels[:10]) == list(range(10))


def test_every_sign_is_in_the_faces_that_draw_it_and_none_reads_as_a_digit():
    for glyphs, faces in wild.SIGNS:
        for face in faces:
            cmap = TTFont(str(outliers.font_dir() / face)).getBestCmap()
            assert all(ord(c) in cmap for c in glyphs), face
        assert not set(glyphs) & set("0123456789θδσρζξε↑↓|/-")


def test_handwritten_halves_are_the_two_halves_of_optdigits():
    a, b = (wild.make("handwritten", h) for h in wild.HALVES)
    assert len(a.images) + len(b.images) == 1797  # every optdigits image, once
    assert a.labels is not None and set(a.labels) == set(range(10))
    assert set(wild.source_sha256()) == {"optdigits", *wild.PHOTOS}


def test_bad_names_are_refused_in_one_line(mnist):
    with pytest.raises(wild.WildError, match="'letters': unknown, expected one of handwritten"):
        wild.make("letters", "report")
    with pytest.raises(wild.WildError, match="'test': unknown, expected one of validation"):
        wild.make("shapes", "test")
    with pytest.raises(wild.WildError, match="needs MNIST digits"):
        wild.make("lowres", "report")


def _probs(top: list[int], p: list[float]) -> np.ndarray:
    out = np.full((len(top), 10), 0.0)
    for i, (t, q) in enumerate(zip(top, p, strict=True)):
        out[i] = (1 - q) / 9
        out[i, t] = q
    return out


def test_measure_wild_against_a_hand_computation():
    # set a: right and sure, wrong and sure, right and unsure: read 1/3, misread 1/3, refused 1/3
    a = (_probs([1, 2, 3], [0.9, 0.9, 0.3]), np.array([1, 5, 3]))
    b = (_probs([4, 4], [0.8, 0.7]), np.array([4, 4]))  # all read
    shapes = _probs([0, 0, 0, 0], [0.2, 0.4, 0.6, 0.95])  # half refused at 0.5
    m = ood.measure_wild({"a": a, "b": b}, {"shapes": shapes}, 0.5)
    assert m["digits"]["sets"]["a"] == {
        "read": round(1 / 3, 6),
        "refused": round(1 / 3, 6),
        "misread": round(1 / 3, 6),
        "images": 3,
    }
    assert m["digits"]["read"] == 0.6 and m["digits"]["refused"] == 0.2
    assert m["digits"]["worst_read"] == round(1 / 3, 6)
    assert m["digits"]["worst_refused"] == round(1 / 3, 6)
    assert m["non_digits"]["refused"] == 0.5 == m["non_digits"]["worst_refused"]
    # digit scores 0.9 0.9 0.3 0.8 0.7 against 0.2 0.4 0.6 0.95: 3 + 3 + 1 + 3 + 3 of 20 pairs
    assert m["auroc"] == 0.65


def _figures() -> dict:
    digits = {"printed": (_probs([1, 2, 3, 4], [0.9, 0.9, 0.3, 0.9]), np.array([1, 2, 3, 5]))}
    digits["pens"] = (_probs([1, 2], [0.9, 0.9]), np.array([1, 2]))
    return ood.measure_wild(digits, {"shapes": _probs([0, 0], [0.2, 0.9])}, 0.5)


def test_the_gate_judges_the_worst_wild_set_only_when_asked(tmp_path):
    import json

    from digits.core.config import GateParams
    from digits.core.metrics import Evaluation
    from digits.gate import governance, policy
    from digits.scoring import cache
    from digits.scoring import wild as scoring

    path = tmp_path / "wild.json"
    scoring.write(_figures(), path)
    figures = scoring.read(path)
    assert (figures.worst_read, figures.worst_read_set) == (0.5, "printed")
    assert (figures.worst_refused, figures.worst_refused_set) == (0.25, "printed")
    root = Path(__file__).resolve().parents[1]
    ev = Evaluation.from_dict(json.loads((root / "reports/metrics.json").read_text()))
    new = cache.Score(version="1", evaluation=ev, correct=np.ones(10, bool), model_sha256="m")

    off = GateParams()  # the wild gates are off by default: nothing read, nothing judged
    assert not policy.reads_wild(off)
    assert not {c.gate for c in policy.checks(off, new, comparison=None, high=None)} & {
        "min_wild_read"
    }
    on = GateParams(min_wild_read=0.6, max_wild_refused=0.3, min_wild_refused_non_digits=0.5)
    assert policy.reads_wild(on)
    by_gate = {c.gate: c for c in policy.checks(on, new, comparison=None, high=None, wild=figures)}
    assert not by_gate["min_wild_read"].passed  # printed: half read right
    assert by_gate["min_wild_read"].metric == "printed digits read right (worst set)"
    assert by_gate["max_wild_refused"].passed and by_gate["min_wild_refused_non_digits"].passed
    with pytest.raises(ValueError, match="min_wild_read is on but the score has no wild"):
        policy.checks(on, new, comparison=None, high=None)
    assert {"min_wild_read", "max_wild_refused", "min_wild_refused_non_digits"} <= set(
        governance.STRICTER
    )


def test_a_missing_or_foreign_wild_report_is_one_line(tmp_path):
    from digits.scoring import wild as scoring

    with pytest.raises(scoring.WildReportError, match="not found; the evaluate stage writes it"):
        scoring.read(tmp_path / "wild.json")
    (tmp_path / "wild.json").write_text('{"digits": {}}')
    with pytest.raises(scoring.WildReportError, match="not the figures evaluate writes"):
        scoring.read(tmp_path / "wild.json")


def test_mlflow_names_of_the_figures():
    from digits.scoring.wild import flat as mlflow_names

    flat = mlflow_names(_figures())
    assert flat["wild/printed/read"] == 0.5 and flat["wild/shapes/refused"] == 0.5
    assert flat["wild/digits/worst_read"] == 0.5 and "wild/auroc" in flat
    assert all(isinstance(v, float) for v in flat.values())
