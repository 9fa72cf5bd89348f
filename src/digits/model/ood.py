"""Knowing when it does not know: the out-of-distribution score, the refusal threshold, and what
the evaluate stage measures on its outlier suite (digits.data.outliers).

The score is the calibrated maximum softmax probability (Hendrycks and Gimpel 2017), after
outlier exposure has taught the network to spread its probability over the ten digits for a
non-digit: the model refuses an image ("not a digit") when no digit gets at least the
threshold. The threshold is chosen on the validation digits, as the score below which a set
share of them falls (`train.outliers.refuse_val_share`), so the share of real digits refused
is a choice, not an accident of the suite. numpy only."""

from __future__ import annotations

import numpy as np

from digits.core.metrics import DIGITS, Refusal


def score(probs: np.ndarray) -> np.ndarray:
    """Each image's confidence that it is a digit: its largest probability."""
    return np.asarray(probs).max(axis=1)


def threshold_for(val_scores: np.ndarray, refuse_share: float) -> float:
    """The score below which `refuse_share` of the validation digits fall (rounded down to 6
    digits, so that the stored threshold refuses no more than that)."""
    t = float(np.quantile(np.asarray(val_scores, np.float64), refuse_share, method="lower"))
    return float(np.floor(t * 1e6) / 1e6)


def _ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given their mean rank (scipy.stats.rankdata's "average")."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    ranks = np.empty(len(values), np.float64)
    ranks[order] = np.arange(1, len(values) + 1)
    _, first, counts = np.unique(sorted_values, return_index=True, return_counts=True)
    for start, n in zip(first, counts, strict=True):
        if n > 1:
            ranks[order[start : start + n]] = start + (n + 1) / 2
    return ranks


def auroc(digits: np.ndarray, outliers: np.ndarray) -> float:
    """Area under the ROC curve of telling digits (positive) from outliers by the score: the
    chance that a random digit scores above a random outlier (ties count half)."""
    digits, outliers = np.asarray(digits, np.float64), np.asarray(outliers, np.float64)
    ranks = _ranks(np.concatenate([digits, outliers]))
    n_pos, n_neg = len(digits), len(outliers)
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def fpr_at_tpr(digits: np.ndarray, outliers: np.ndarray, tpr: float = 0.95) -> float:
    """False-positive rate at `tpr` true-positive rate: the share of outliers accepted at the
    threshold that accepts `tpr` of the digits (FPR95 at the default)."""
    t = np.quantile(np.asarray(digits, np.float64), 1 - tpr, method="lower")
    return float((np.asarray(outliers) >= t).mean())


def measure(digit_probs: np.ndarray, suite: dict[str, np.ndarray], threshold: float) -> Refusal:
    """What the evaluate stage reports: AUROC and FPR95 over the whole suite, the share of
    test digits the threshold refuses, and per kind the share of outliers it refuses."""
    digits = score(digit_probs)
    per_kind = {kind: score(p) for kind, p in suite.items()}
    everything = np.concatenate(list(per_kind.values()))
    return Refusal(
        threshold=threshold,
        auroc=round(auroc(digits, everything), DIGITS),
        fpr95=round(fpr_at_tpr(digits, everything), DIGITS),
        refused_digits=round(float((digits < threshold).mean()), DIGITS),
        refused_outliers=round(float((everything < threshold).mean()), DIGITS),
        refused={k: round(float((s < threshold).mean()), DIGITS) for k, s in per_kind.items()},
        outliers=len(everything),
    )
