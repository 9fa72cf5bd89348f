"""Scores of registered versions, for the gate: each version at most once per run, from its
record in the registry (digits.scoring.cache) when the record's key matches and it holds every
section asked for, else scored afresh by the one scorer (digits.scoring.scorer) from the
version's files as the registry serves them; a fresh score's record is then due
(`to_cache`, written by the gate with its verdict)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from digits.scoring.cache import (
    CACHE_TAG,
    Score,
    cache_record,
    download_model,
    files_sha256,
    from_cache,
)
from digits.scoring.scorer import Model, ProbabilitiesOnly, Suites, score


class VersionScorer:
    """Scores registered versions of one model on one test set, measuring `suites`."""

    def __init__(self, client, name: str, test_data: Path, test_sha256: str, suites: Suites):
        from digits.data.preprocess import load_labels

        self.client, self.name, self.test_data = client, name, test_data
        self.y = load_labels(test_data, "test")
        self.test_sha256 = test_sha256
        self.suites = suites
        self.scores: dict[str, Score] = {}
        self.to_cache: dict[str, str] = {}  # version -> record to write (scored afresh)

    def score(self, version: str) -> Score:
        if version not in self.scores:
            self.scores[version] = self._score(version)
        return self.scores[version]

    def _usable(self, hit: Score | None) -> bool:
        """A cached score that holds what is asked for."""
        if hit is None:
            return False
        ev = hit.evaluation
        return (ev.ood is not None or not self.suites.outliers_per_kind) and (
            ev.robustness is not None or not self.suites.robustness
        )

    def _score(self, version: str) -> Score:
        with tempfile.TemporaryDirectory(prefix="digits-gate-") as tmp:
            local = download_model(self.name, version, tmp)
            sha = files_sha256(local)
            tags = self.client.get_model_version(self.name, version).tags
            hit = from_cache(tags.get(CACHE_TAG), version, sha, self.test_sha256, len(self.y))
            if hit is not None and self._usable(hit):
                return hit
            scored = score(load_version(local), self._images(), self.y, self.suites)
        new = Score(
            version=version,
            evaluation=scored.evaluation,
            correct=scored.correct,
            model_sha256=sha,
        )
        self.to_cache[version] = cache_record(new, self.test_sha256)
        return new

    def _images(self) -> np.ndarray:
        from digits.data.preprocess import load_arrays

        return load_arrays(self.test_data, "test")[0]


def load_version(local: Path) -> Model:
    """The version downloaded to `local`: its weights through digits.model.inference, or, for a
    version of an earlier format, the model loaded as users load it (pyfunc; it refuses
    nothing and has no logits)."""
    from digits.model.inference import Classifier, weights_in

    weights = weights_in(local)
    if weights is not None:
        return Classifier.from_file(weights)
    import mlflow.pyfunc

    model = mlflow.pyfunc.load_model(str(local))
    return ProbabilitiesOnly(lambda x: np.asarray(model.predict(np.asarray(x, np.float32))))
