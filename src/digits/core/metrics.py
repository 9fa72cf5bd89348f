"""Classification metrics from class probabilities, shared by `evaluate` (which writes them)
and `gate` (which re-scores registered models): one definition, so the two cannot disagree
about what "accuracy" or "loss" means.

Everything comes from the 10x10 confusion matrix, one `np.bincount`: the same numbers as
scikit-learn's precision/recall/F1 (checked in tests/test_metrics.py), without importing
scikit-learn (about a second) in the two stages that score models."""

from __future__ import annotations

import numpy as np

from digits.core.mnist import CLASSES

DIGITS = 6  # rounding of every reported number: stable bytes, far below any real difference


def compute_metrics(probs: np.ndarray, y: np.ndarray) -> dict:
    """Accuracy, cross-entropy, macro F1 and per-class precision/recall of (N, 10) probabilities.

    The loss is the mean of -log p(true class), with p clipped at 1e-12 so that a model giving a
    true class zero probability scores a large finite loss rather than infinity."""
    probs = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    pred = probs.argmax(1)
    cm = confusion_matrix(y, pred)
    hits = np.diag(cm).astype(np.float64)
    # zero_division=0, as scikit-learn: a class never predicted has precision 0
    precision = np.divide(hits, cm.sum(0), out=np.zeros(len(CLASSES)), where=cm.sum(0) > 0)
    recall = np.divide(hits, cm.sum(1), out=np.zeros(len(CLASSES)), where=cm.sum(1) > 0)
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros(len(CLASSES)), where=both > 0)
    true_p = np.clip(probs[np.arange(len(y)), y], 1e-12, None)
    return {
        "accuracy": round(float((pred == y).mean()), DIGITS),
        "loss": round(float(-np.log(true_p).mean()), DIGITS),
        "macro_f1": round(float(f1.mean()), DIGITS),
        "per_class": {
            str(c): {
                "precision": round(float(precision[c]), DIGITS),
                "recall": round(float(recall[c]), DIGITS),
            }
            for c in CLASSES
        },
    }


def confusion_matrix(y: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """cm[actual, predicted] = count, for the ten classes."""
    n = len(CLASSES)
    return np.bincount(np.asarray(y) * n + np.asarray(pred), minlength=n * n).reshape(n, n)


def worst_recall(metrics: dict) -> tuple[int, float]:
    """(digit, recall) of the class the model recognises worst."""
    digit, pc = min(metrics["per_class"].items(), key=lambda kv: kv[1]["recall"])
    return int(digit), pc["recall"]
