"""The one scorer: a model on the test set -> its `Evaluation` (digits.core.metrics). The evaluate
stage calls it for the model it trained, the gate for any registered version whose cached score
does not do (digits.scoring.registered), so the two compose the record the same way; the score
cache's key covers this file (digits.scoring.cache.SCORER_MODULES).

What is measured beyond the metrics and the calibration is asked for (`Suites`): the evaluate
stage measures everything; the gate only what its gates read. torch loads only for the
corruption suite."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Protocol, TypeGuard

import numpy as np

from digits.core.metrics import Evaluation, compute_metrics


class Model(Protocol):
    """What the scorer runs: calibrated probabilities, the refusal threshold, and the logits
    and temperature where the model has them (digits.model.inference.Classifier does)."""

    @property
    def threshold(self) -> float: ...

    def probabilities(self, x: np.ndarray) -> np.ndarray: ...


class WithLogits(Model, Protocol):
    @property
    def temperature(self) -> float: ...

    def logits(self, x: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class Suites:
    """The measures beyond the metrics and the calibration: the outlier suite (its images per
    kind; 0 = not measured) and the corruption suite."""

    outliers_per_kind: int = 0
    robustness: bool = False


@dataclass(frozen=True, kw_only=True)
class Scored:
    """The record, and the arrays it was computed from (the evaluate stage draws them)."""

    evaluation: Evaluation
    labels: np.ndarray
    probs: np.ndarray  # calibrated, (N, 10)
    uncalibrated: np.ndarray | None  # softmax of the logits (T = 1), where the model has logits
    suite_probs: dict[str, np.ndarray] = field(default_factory=dict)  # per kind of outlier

    @property
    def correct(self) -> np.ndarray:
        """Per test image: the prediction was right (what the paired test compares)."""
        return self.probs.argmax(1) == self.labels


def score(model: Model, x: np.ndarray, y: np.ndarray, suites: Suites) -> Scored:
    """`model` on the test images `x` with labels `y`: metrics, calibration (the full summary
    where the model has logits, else the ECE), and the suites asked for."""
    from digits.model import calibration
    from digits.model.inference import calibrated, softmax

    uncalibrated = None
    if _has_logits(model):
        logits = model.logits(x)
        probs = calibrated(logits, model.temperature)
        uncalibrated = softmax(logits)
        calib = calibration.summary(logits, y, model.temperature)
    else:
        probs = np.asarray(model.probabilities(x))
        calib = calibration.of_probabilities(probs, y)
    evaluation = Evaluation(metrics=compute_metrics(probs, y), calibration=calib)
    suite_probs: dict[str, np.ndarray] = {}
    if suites.outliers_per_kind:
        from digits.data import outliers
        from digits.model import ood

        suite = outliers.outlier_set("suite", suites.outliers_per_kind, x)
        suite_probs = {kind: model.probabilities(images) for kind, images in suite.items()}
        evaluation = replace(evaluation, ood=ood.measure(probs, suite_probs, model.threshold))
    if suites.robustness:
        from digits.scoring.robustness import corruption_accuracies

        robustness = corruption_accuracies(model.probabilities, x, y)
        evaluation = replace(evaluation, robustness=robustness)
    return Scored(
        evaluation=evaluation,
        probs=probs,
        uncalibrated=uncalibrated,
        suite_probs=suite_probs,
        labels=np.asarray(y),
    )


def _has_logits(model: Model) -> TypeGuard[WithLogits]:
    return callable(getattr(model, "logits", None)) and hasattr(model, "temperature")


@dataclass(frozen=True)
class ProbabilitiesOnly:
    """A model known only by its probabilities (a version of an earlier format, loaded through
    pyfunc): it refuses nothing, and has no logits."""

    predict: Callable[[np.ndarray], np.ndarray]
    threshold: float = 0.0

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.predict(x))
