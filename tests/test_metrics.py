"""The metric definitions shared by evaluate and gate agree with scikit-learn's."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix as sk_confusion
from sklearn.metrics import f1_score, precision_recall_fscore_support

from digits.core.metrics import compute_metrics, confusion_matrix, worst_recall


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
    assert m["accuracy"] == round(float((pred == y).mean()), 6)
    f1 = f1_score(y, pred, labels=list(range(10)), average="macro", zero_division=0)
    assert m["macro_f1"] == pytest.approx(f1, abs=1e-6)
    for c in range(10):
        assert m["per_class"][str(c)]["precision"] == pytest.approx(precision[c], abs=1e-6)
        assert m["per_class"][str(c)]["recall"] == pytest.approx(recall[c], abs=1e-6)
    expected_loss = -np.log(np.clip(probs[np.arange(500), y], 1e-12, None)).mean()
    assert m["loss"] == pytest.approx(expected_loss, abs=1e-6)
    assert (confusion_matrix(y, pred) == sk_confusion(y, pred, labels=list(range(10)))).all()


def test_zero_probability_for_the_true_class_gives_a_finite_loss():
    probs = np.eye(10)[[1, 2, 3]]
    m = compute_metrics(probs, np.array([0, 2, 3]))
    assert m["loss"] == pytest.approx(-np.log(1e-12) / 3, rel=1e-6)
    assert worst_recall(m) == (0, 0.0)
