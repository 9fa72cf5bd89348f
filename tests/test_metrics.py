"""The metric definitions shared by evaluate and gate agree with scikit-learn's; the typed
record writes reports/metrics.json byte for byte; one scorer composes it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix as sk_confusion
from sklearn.metrics import f1_score, precision_recall_fscore_support

from digits.core.metrics import Evaluation, compute_metrics, confusion_matrix


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, 500)
    probs = rng.random((500, 10))
    probs[np.arange(250), y[:250]] += 2  # half right, half random
    probs[:, 7] *= seed != 2  # seed 2: a class never predicted (precision 0 by convention)
    probs /= probs.sum(1, keepdims=True)
    pred = probs.argmax(1)
    m = compute_metrics(probs, y)
    precision, recall, _, _ = precision_recall_fscore_support(
        y, pred, labels=list(range(10)), zero_division=0
    )
    assert m.accuracy == round(float((pred == y).mean()), 6)
    f1 = f1_score(y, pred, labels=list(range(10)), average="macro", zero_division=0)
    assert m.macro_f1 == pytest.approx(f1, abs=1e-6)
    for c in range(10):
        assert m.per_class[str(c)].precision == pytest.approx(precision[c], abs=1e-6)
        assert m.per_class[str(c)].recall == pytest.approx(recall[c], abs=1e-6)
    expected_loss = -np.log(np.clip(probs[np.arange(500), y], 1e-12, None)).mean()
    assert m.loss == pytest.approx(expected_loss, abs=1e-6)
    assert (confusion_matrix(y, pred) == sk_confusion(y, pred, labels=list(range(10)))).all()


def test_zero_probability_for_the_true_class_gives_a_finite_loss():
    probs = np.eye(10)[[1, 2, 3]]
    m = compute_metrics(probs, np.array([0, 2, 3]))
    assert m.loss == pytest.approx(-np.log(1e-12) / 3, rel=1e-6)
    assert m.worst_recall() == (0, 0.0)


# --- the typed record: reports/metrics.json byte for byte ----------------------------------------

COMMITTED = Path(__file__).parent.parent / "reports" / "metrics.json"


def test_the_record_writes_the_committed_metrics_file_byte_for_byte():
    """Every key, its order, value and formatting: read into the typed record and written back,
    the committed reports/metrics.json is the same bytes (the evaluate stage writes the record)."""
    text = COMMITTED.read_text()
    record = Evaluation.from_dict(json.loads(text))
    assert record.to_json() == text
    assert record.calibration is not None and record.ood is not None and record.robustness
    assert list(record.to_dict()) == [
        "accuracy", "loss", "macro_f1", "per_class", "calibration", "ood", "robustness"
    ]  # fmt: skip
    # without a section, no key for it; robustness left out on request (the cache keys it apart)
    assert "robustness" not in record.to_dict(robustness=False)
    bare = Evaluation(metrics=record.metrics)
    assert list(bare.to_dict()) == ["accuracy", "loss", "macro_f1", "per_class"]
    assert Evaluation.from_dict(bare.to_dict()) == bare


class Logits:
    """A model with logits and a temperature, as digits.model.inference.Classifier."""

    temperature, threshold = 0.5, 0.4

    def __init__(self, w):
        self.w = w

    def logits(self, x):
        return x @ self.w

    def probabilities(self, x):
        from digits.model.inference import calibrated

        return calibrated(self.logits(x), self.temperature)


def test_one_scorer_composes_the_record_for_evaluate_and_the_gate():
    from digits.model import calibration, ood
    from digits.model.inference import calibrated
    from digits.scoring.scorer import ProbabilitiesOnly, Suites, score

    rng = np.random.default_rng(0)
    x = rng.random((200, 784)).astype(np.float32)
    model = Logits(rng.normal(size=(784, 10)).astype(np.float32))
    y = model.logits(x).argmax(1)
    y[:20] = (y[:20] + 1) % 10  # 90% right
    scored = score(model, x, y, Suites())
    ev = scored.evaluation
    probs = calibrated(model.logits(x), model.temperature)
    assert ev.metrics == compute_metrics(probs, y) and ev.accuracy == 0.9
    assert ev.calibration == calibration.summary(model.logits(x), y, 0.5)
    assert ev.ood is None and ev.robustness is None  # not asked for
    assert (scored.correct == (probs.argmax(1) == y)).all()
    # a model known by its probabilities alone: the same metrics, the ECE alone
    alone = score(ProbabilitiesOnly(model.probabilities), x, y, Suites()).evaluation
    assert alone.metrics == ev.metrics and alone.calibration is not None
    assert alone.calibration.to_dict() == {"ece": ev.calibration.ece}  # type: ignore[union-attr]
    # the outlier suite, when asked for
    with_ood = score(model, x, y, Suites(outliers_per_kind=3)).evaluation
    assert with_ood.ood is not None and with_ood.ood.threshold == 0.4
    suite = score(model, x, y, Suites(outliers_per_kind=3)).suite_probs
    assert with_ood.ood == ood.measure(probs, suite, 0.4)
