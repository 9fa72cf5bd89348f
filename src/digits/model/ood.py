"""Knowing when it does not know: the out-of-distribution score, the refusal threshold, and what
the evaluate stage measures on its outlier suite (digits.data.outliers).

The score is the calibrated maximum softmax probability (Hendrycks and Gimpel 2017), after
outlier exposure has taught the network to spread its probability over the ten digits for a
non-digit: the model refuses an image ("not a digit") when no digit gets at least the
threshold. The threshold is chosen on the validation digits, as the score below which a set
share of them falls (`train.outliers.refuse_val_share`), so the share of real digits refused
is a choice, not an accident of the suite. numpy only."""

from __future__ import annotations

import functools

import numpy as np

from digits.core.metrics import DIGITS, Refusal


def score(probs: np.ndarray) -> np.ndarray:
    """Each image's confidence that it is a digit: its largest probability."""
    return np.asarray(probs).max(axis=1)


def energy(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """The negative free energy, T * logsumexp(logits / T) (Liu et al. 2020): a digit score
    that keeps the logits' scale, which the softmax throws away. Higher: more a digit."""
    z = np.asarray(logits, np.float64) / temperature
    top = z.max(axis=1)
    return temperature * (top + np.log(np.exp(z - top[:, None]).sum(axis=1)))


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


def measure_wild(
    digit_sets: dict[str, tuple[np.ndarray, np.ndarray]],
    other_sets: dict[str, np.ndarray],
    threshold: float,
) -> dict:
    """The out-of-MNIST sets (digits.data.wild) at the model's threshold. `digit_sets`:
    {name: (probs, labels)}, `other_sets`: {name: probs} of non-digits. Per digit set the shares
    read right (accepted, right digit), refused and misread (accepted, wrong digit); per
    non-digit set the share refused; pooled: the same over all digits and all non-digits, the
    worst digit set's read and refused shares (what the gate judges), and the AUROC of telling
    the wild digits from the wild non-digits by the score."""
    r = functools.partial(round, ndigits=DIGITS)
    digits: dict[str, dict] = {}
    pooled_scores, pooled_right = [], []
    for name, (probs, labels) in digit_sets.items():
        s = score(probs)
        accepted, right = s >= threshold, np.asarray(probs).argmax(1) == np.asarray(labels)
        digits[name] = {
            "read": r(float((accepted & right).mean())),
            "refused": r(float((~accepted).mean())),
            "misread": r(float((accepted & ~right).mean())),
            "images": len(s),
        }
        pooled_scores.append(s)
        pooled_right.append(right)
    d_scores, d_right = np.concatenate(pooled_scores), np.concatenate(pooled_right)
    o_scores = {name: score(p) for name, p in other_sets.items()}
    o_all = np.concatenate(list(o_scores.values()))
    accepted = d_scores >= threshold
    return {
        "threshold": threshold,
        "digits": {
            "read": r(float((accepted & d_right).mean())),
            "refused": r(float((~accepted).mean())),
            "misread": r(float((accepted & ~d_right).mean())),
            "images": len(d_scores),
            "worst_read": min(v["read"] for v in digits.values()),
            "worst_refused": max(v["refused"] for v in digits.values()),
            "sets": digits,
        },
        "non_digits": {
            "refused": r(float((o_all < threshold).mean())),
            "images": len(o_all),
            "worst_refused": min(r(float((s < threshold).mean())) for s in o_scores.values()),
            "sets": {
                name: {"refused": r(float((s < threshold).mean())), "images": len(s)}
                for name, s in o_scores.items()
            },
        },
        "auroc": r(auroc(d_scores, o_all)),
    }
