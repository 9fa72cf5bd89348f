"""A version's reference: what its answers and inputs look like on data it was not trained on
(the validation split), in the form `digits monitor` compares a window of the prediction log
with. The evaluate stage writes it (reports/reference.json, a DVC output) and logs it to the
version's run; the same bytes in every store: no wall clock, no paths, rounded numbers.

It keeps, compactly (a few KB, not the images):
- `digits`: how many validation pieces the version answers with each digit, `refused`: how
  many it calls "not a digit" (the refusal threshold is the model file's);
- `confidence`: the best digit's calibrated probability, binned at the reference's own
  deciles (edges and counts);
- `features`: each input feature of digits.monitor.features, binned the same way.
Binned counts, not the raw sample: enough for a two-sample chi-square test and the PSI, with
the reference's own sampling noise counted (digits.monitor.drift)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from digits.core.errors import DigitsError
from digits.monitor import features as feats

FORMAT = 1
BINS = 10  # decile bins of the reference: equal mass, so every bin has ~N/10 reference pieces
FILE = Path("reports/reference.json")
ARTIFACT = "reference"  # the folder of the version's run that holds reference.json


def _round(values: np.ndarray) -> list[float]:
    # 6 significant digits: stable across machines (BLAS' last bits do not show) and in JSON
    return [float(f"{v:.6g}") for v in np.asarray(values, np.float64)]


def binned(values: np.ndarray, bins: int = BINS) -> dict:
    """{"edges": inner edges at the values' quantiles (ties merged), "counts": per bin}."""
    v = np.asarray(values, np.float64)
    cuts = np.quantile(v, np.arange(1, bins) / bins) if v.size else np.zeros(0)
    edges = np.unique(np.asarray(_round(cuts), np.float64))
    return {"edges": edges.tolist(), "counts": counts_in(v, edges).tolist()}


def counts_in(values: np.ndarray, edges) -> np.ndarray:
    """How many values fall in each bin of `edges` (inner edges; a value on an edge goes up)."""
    edges = np.asarray(edges, np.float64)
    idx = np.searchsorted(edges, np.asarray(values, np.float64), side="right")
    return np.bincount(idx, minlength=len(edges) + 1).astype(np.int64)


def build(pixels: np.ndarray, digit: np.ndarray, confidence: np.ndarray) -> dict:
    """The reference of (N, 784) uint8 pieces and the version's answers to them: `digit`
    (-1 where refused) and `confidence` (the best digit's probability)."""
    digit = np.asarray(digit)
    table = feats.features(pixels)
    return {
        "format": FORMAT,
        "pieces": len(digit),
        "digits": np.bincount(digit[digit >= 0], minlength=10).astype(int).tolist(),
        "refused": int((digit < 0).sum()),
        "confidence": binned(confidence),
        "features": {name: binned(table[:, i]) for i, name in enumerate(feats.NAMES)},
    }


def of_classifier(classifier, pixels: np.ndarray) -> dict:
    """The reference of a digits.model.inference.Classifier on (N, 784) uint8 pieces: fed as
    the service feeds a logged piece (pixels / 255, float32)."""
    x = feats.as_images(pixels).reshape(-1, feats.PIXELS)
    said = classifier.answers(x.astype(np.float32) / np.float32(255))
    return build(x, said.digit, said.confidence)


def dumps(reference: dict) -> str:
    return json.dumps(reference, indent=1, sort_keys=True) + "\n"


class BadReference(DigitsError):
    """A reference file that cannot be read or is not one."""


def load(path: str | Path) -> dict:
    """A reference file, checked enough that the comparison cannot misread it."""
    try:
        ref = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise BadReference(f"reference {path}: cannot be read ({e})") from None
    missing = {"format", "pieces", "digits", "refused", "confidence", "features"} - set(ref)
    if ref.get("format") != FORMAT or missing:
        raise BadReference(
            f"reference {path}: expected a digits reference of format {FORMAT}"
            + (f" (missing {', '.join(sorted(missing))})" if missing else "")
        )
    return ref
