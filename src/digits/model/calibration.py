"""Calibration: probabilities that mean what they say, and the measures of how far they do.

Temperature scaling (Guo et al. 2017): one scalar T divides the logits before the softmax,
fitted on the validation split after training by minimising the negative log-likelihood. It
changes no prediction (the argmax of logits / T is the argmax of the logits) and undoes the
under-confidence that label smoothing and outlier exposure teach. The expected calibration
error (ECE) over 15 equal-width confidence bins is the gap between confidence and accuracy,
averaged over the images. numpy only, deterministic: a golden-section search on log T."""

from __future__ import annotations

import math

import numpy as np

from digits.core.metrics import DIGITS, Calibration
from digits.model.inference import calibrated, softmax

BINS = 15
T_RANGE = (0.05, 20.0)  # the temperatures searched


def nll(logits: np.ndarray, y: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true labels under softmax(logits / T), in float64."""
    z = np.asarray(logits, np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-log_p[np.arange(len(y)), np.asarray(y)].mean())


def fit_temperature(logits: np.ndarray, y: np.ndarray, iterations: int = 60) -> float:
    """The T in T_RANGE minimising nll(logits / T): golden-section search on log T (the NLL of
    temperature-scaled logits is unimodal in T), to 6 significant digits."""
    lo, hi = (math.log(t) for t in T_RANGE)
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = nll(logits, y, math.exp(a)), nll(logits, y, math.exp(b))
    for _ in range(iterations):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = nll(logits, y, math.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = nll(logits, y, math.exp(b))
    return float(f"{math.exp((lo + hi) / 2):.6g}")


def reliability(probs: np.ndarray, y: np.ndarray, bins: int = BINS) -> list[dict]:
    """Per equal-width confidence bin: its range, image count, mean confidence and accuracy."""
    probs = np.asarray(probs, np.float64)
    confidence, pred = probs.max(axis=1), probs.argmax(axis=1)
    correct = pred == np.asarray(y)
    # bin k holds confidences in (k/bins, (k+1)/bins]; a confidence of exactly 0 goes in bin 0
    index = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    out = []
    for k in range(bins):
        member = index == k
        n = int(member.sum())
        out.append(
            {
                "low": k / bins,
                "high": (k + 1) / bins,
                "count": n,
                "confidence": float(confidence[member].mean()) if n else 0.0,
                "accuracy": float(correct[member].mean()) if n else 0.0,
            }
        )
    return out


def ece(probs: np.ndarray, y: np.ndarray, bins: int = BINS) -> float:
    """Expected calibration error: sum over bins of (share of images) x |accuracy - confidence|."""
    rows = reliability(probs, y, bins)
    total = sum(r["count"] for r in rows)
    return float(sum(r["count"] / total * abs(r["accuracy"] - r["confidence"]) for r in rows))


def summary(logits: np.ndarray, y: np.ndarray, temperature: float) -> Calibration:
    """ECE and NLL before (T = 1) and after temperature scaling, rounded for the report files."""
    before, after = softmax(logits), calibrated(logits, temperature)
    return Calibration(
        temperature=temperature,
        ece_before=round(ece(before, y), DIGITS),
        ece=round(ece(after, y), DIGITS),
        nll_before=round(nll(logits, y), DIGITS),
        nll=round(nll(logits, y, temperature), DIGITS),
    )


def of_probabilities(probs: np.ndarray, y: np.ndarray) -> Calibration:
    """The ECE alone, of a model known only by its probabilities (no logits, no temperature)."""
    return Calibration(ece=round(ece(probs, y), DIGITS))
