"""A version's evaluation, typed: the classification metrics computed here from class
probabilities, and the records of the other measures (calibration, the outlier suite's refusal
figures, the corruption suite), one dataclass each, composed into one `Evaluation` by
digits.scoring.scorer. The evaluate stage writes it (reports/metrics.json), the tracking code
logs it to MLflow, the score cache keeps it in the registry, and the gate judges it: one
definition, so none of them can disagree about what "accuracy" means or where it is kept.

`Evaluation.to_dict()` is the JSON of reports/metrics.json, key for key and in the same order
(fields are declared in that order); a section that was not measured is left out. The records
are built with values already rounded to DIGITS, so the file's bytes are stable.

Everything in `Metrics` comes from the 10x10 confusion matrix, one `np.bincount`: the same
numbers as scikit-learn's precision/recall/F1 (checked in tests/test_metrics.py), without
importing scikit-learn (about a second) in the two stages that score models."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from digits.core.mnist import CLASSES

DIGITS = 6  # rounding of every reported number: stable bytes, far below any real difference


@dataclass(frozen=True, kw_only=True)
class ClassScores:
    precision: float
    recall: float


@dataclass(frozen=True, kw_only=True)
class Metrics:
    """Accuracy, cross-entropy, macro F1 and per-class precision/recall on the test set."""

    accuracy: float
    loss: float
    macro_f1: float
    per_class: dict[str, ClassScores]  # "0".."9" (JSON keys are strings)

    def worst_recall(self) -> tuple[int, float]:
        """(digit, recall) of the class the model recognises worst (the first, on a tie)."""
        digit, scores = min(self.per_class.items(), key=lambda kv: kv[1].recall)
        return int(digit), scores.recall

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Metrics:
        return cls(
            accuracy=d["accuracy"],
            loss=d["loss"],
            macro_f1=d["macro_f1"],
            per_class={k: ClassScores(**v) for k, v in d["per_class"].items()},
        )


@dataclass(frozen=True, kw_only=True)
class Calibration:
    """digits.model.calibration.summary: ECE and NLL before (T = 1) and after temperature
    scaling. A version scored only from its probabilities (an earlier format, served through
    pyfunc) has the ECE alone: the other fields need its logits."""

    temperature: float | None = None
    ece_before: float | None = None
    ece: float
    nll_before: float | None = None
    nll: float | None = None

    def to_dict(self) -> dict[str, float]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True, kw_only=True)
class Refusal:
    """digits.model.ood.measure: how the refusal threshold ("not a digit") does on the outlier
    suite (AUROC, FPR95, the shares refused, per kind) and on the test digits."""

    threshold: float
    auroc: float
    fpr95: float
    refused_digits: float
    refused_outliers: float
    refused: dict[str, float]  # per kind of outlier
    outliers: int  # images in the suite


@dataclass(frozen=True, kw_only=True)
class Robustness:
    """digits.scoring.robustness.corruption_accuracies: accuracy on each corrupted copy of the
    test set, their mean and the worst."""

    mean: float
    worst: float
    corruptions: dict[str, float]

    def worst_corruption(self) -> tuple[str, float]:
        """(name, accuracy) of the corruption the model handles worst (the first, on a tie)."""
        name = min(self.corruptions, key=self.corruptions.__getitem__)
        return name, self.corruptions[name]


# the sections beside the metrics, by their key in the JSON, and their records
SECTIONS: dict[str, type] = {
    "calibration": Calibration,
    "ood": Refusal,
    "robustness": Robustness,
}


@dataclass(frozen=True, kw_only=True)
class Evaluation:
    """A version's evaluation on the test set: its metrics, and the sections measured."""

    metrics: Metrics
    calibration: Calibration | None = None
    ood: Refusal | None = None
    robustness: Robustness | None = None

    @property
    def accuracy(self) -> float:
        return self.metrics.accuracy

    def to_dict(self, *, robustness: bool = True) -> dict[str, Any]:
        """The JSON form (reports/metrics.json): the metrics' keys, then each section measured
        (`robustness=False` leaves that one out: the score cache keys it apart)."""
        out: dict[str, Any] = asdict(self.metrics)
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "metrics" or value is None or (f.name == "robustness" and not robustness):
                continue
            out[f.name] = value.to_dict() if isinstance(value, Calibration) else asdict(value)
        return out

    def to_json(self) -> str:
        """reports/metrics.json's bytes."""
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any], robustness: dict | None = None) -> Evaluation:
        """The record of `to_dict`'s JSON (`robustness`: that section, when kept apart)."""
        raw = {**d, "robustness": robustness} if robustness is not None else d
        sections = {k: record(**raw[k]) for k, record in SECTIONS.items() if raw.get(k)}
        return cls(metrics=Metrics.from_dict(d), **sections)


def compute_metrics(probs: np.ndarray, y: np.ndarray) -> Metrics:
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
    return Metrics(
        accuracy=round(float((pred == y).mean()), DIGITS),
        loss=round(float(-np.log(true_p).mean()), DIGITS),
        macro_f1=round(float(f1.mean()), DIGITS),
        per_class={
            str(c): ClassScores(
                precision=round(float(precision[c]), DIGITS),
                recall=round(float(recall[c]), DIGITS),
            )
            for c in CLASSES
        },
    )


def confusion_matrix(y: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """cm[actual, predicted] = count, for the ten classes."""
    n = len(CLASSES)
    return np.bincount(np.asarray(y) * n + np.asarray(pred), minlength=n * n).reshape(n, n)
