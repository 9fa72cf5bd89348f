"""Not a digit: the generated non-digits (every kind, seeded, the training set and the suite
never sharing a font or a seed), the threshold chosen on validation digits, and the suite's
AUROC and FPR95 against a hand computation."""

from __future__ import annotations

import numpy as np
import pytest

from digits.data import outliers
from digits.model import ood


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.random((50, 784), dtype=np.float32)


@pytest.mark.parametrize("kind", outliers.KINDS)
def test_every_kind_is_mnist_shaped_and_seeded(kind, digits):
    a = outliers.generate(kind, 12, "suite", digits)
    assert a.shape == (12, 784) and a.dtype == np.float32
    assert a.min() >= 0 and a.max() <= 1
    assert np.array_equal(a, outliers.generate(kind, 12, "suite", digits))  # the same bytes
    assert not np.array_equal(a, outliers.generate(kind, 12, "suite", digits, seed=1))
    if kind != "blank":
        assert (a.reshape(12, -1).max(1) > 0.2).all()  # something is there
        assert not np.array_equal(a, outliers.generate(kind, 12, "train", digits))


def test_the_training_set_and_the_suite_never_share_a_font():
    assert not set(outliers.TRAIN_FONTS) & set(outliers.SUITE_FONTS)
    for name in (*outliers.TRAIN_FONTS, *outliers.SUITE_FONTS):
        assert (outliers.font_dir() / name).is_file(), name
    # no glyph that reads as a digit in some hands
    assert not set("OoIli") & set(outliers.LETTERS)
    assert not set("-_|/\\'`.,!") & set(outliers.SYMBOLS)


def test_inverted_digits_swap_ink_and_paper(digits):
    a = outliers.generate("inverted", 20, "suite", digits)
    rows = [np.flatnonzero((digits == 1 - row).all(1)) for row in a]
    assert all(len(r) for r in rows)  # each is 1 - one of the digits
    with pytest.raises(ValueError, match="needs digits"):
        outliers.generate("inverted", 3, "suite")


def test_threshold_refuses_its_share_of_validation_digits():
    rng = np.random.default_rng(1)
    val = rng.uniform(0.2, 1.0, 10000)
    t = ood.threshold_for(val, 0.02)
    assert (val < t).mean() <= 0.02 and (val < t + 0.001).mean() > 0.018
    assert ood.threshold_for(val, 0.0) <= val.min()


def test_auroc_and_fpr95_against_a_hand_computation():
    digits = np.array([0.9, 0.8, 0.7, 0.6])
    others = np.array([0.5, 0.65, 0.95])
    # pairs where the digit scores higher: 0.9 > 0.5, 0.65; 0.8 > 2; 0.7 > 2; 0.6 > 0.5: 7 of 12
    assert ood.auroc(digits, others) == pytest.approx(7 / 12)
    assert ood.auroc(np.array([0.5]), np.array([0.5])) == 0.5  # a tie counts half
    # 95% of 4 digits: the lowest, 0.6, is the threshold; 0.65 and 0.95 pass it
    assert ood.fpr_at_tpr(digits, others) == pytest.approx(2 / 3)
    from scipy import stats as scipy_stats  # a dependency (pyproject.toml): never skipped

    rng = np.random.default_rng(2)
    pos, neg = rng.normal(1, 1, 300).round(1), rng.normal(0, 1, 200).round(1)  # many ties
    u = scipy_stats.mannwhitneyu(pos, neg).statistic
    assert ood.auroc(pos, neg) == pytest.approx(u / (300 * 200))


def test_measure_reports_every_kind():
    digit_probs = np.eye(10)[np.arange(100) % 10] * 0.9 + 0.01
    suite = {"letters": np.full((30, 10), 0.1), "noise": np.eye(10)[np.arange(30) % 10]}
    m = ood.measure(digit_probs, suite, threshold=0.5)
    assert m.refused == {"letters": 1.0, "noise": 0.0}
    assert m.refused_digits == 0.0 and m.outliers == 60
    assert m.refused_outliers == 0.5 and 0 < m.auroc < 1
