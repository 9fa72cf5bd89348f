"""Classification metrics from class probabilities, shared by `evaluate` (which writes them)
and `gate` (which re-scores registered models): one definition, so the two cannot disagree
about what "accuracy" or "loss" means."""

from __future__ import annotations

import numpy as np

from digits.mnist import CLASSES

DIGITS = 6  # rounding of every reported number: stable bytes, far below any real difference


def compute_metrics(probs: np.ndarray, y: np.ndarray) -> dict:
    """Accuracy, cross-entropy, macro F1 and per-class precision/recall of (N, 10) probabilities.

    The loss is the mean of -log p(true class), with p clipped at 1e-12 so that a model giving a
    true class zero probability scores a large finite loss rather than infinity."""
    from sklearn.metrics import precision_recall_fscore_support

    probs = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    pred = probs.argmax(1)
    precision, recall, f1, _ = precision_recall_fscore_support(
        y, pred, labels=list(CLASSES), zero_division=0
    )
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


def worst_recall(metrics: dict) -> tuple[int, float]:
    """(digit, recall) of the class the model recognises worst."""
    digit, pc = min(metrics["per_class"].items(), key=lambda kv: kv[1]["recall"])
    return int(digit), pc["recall"]
