"""A window of answers against a version's reference: one test per quantity, Bonferroni across
them, and an effect-size floor, so that a big window does not alert on a difference too small
to matter (MNIST's test writers differ a little from its training writers: a window of 10,000
clean test digits would otherwise "drift").

Why scipy and not Evidently: Evidently is not installed here, and its drift presets pick a
test per column from the raw reference sample, which a version would have to carry (the
validation images or 5,000 feature rows in every store). The tests below need only the
reference's binned counts (a few KB, digits.monitor.reference), count the reference's own
sampling noise (two-sample tests, not goodness of fit against the reference as if exact), run
on 100,000 pieces in milliseconds, and say exactly what was tested.

- prediction drift: the shares of the ten digits among accepted pieces, chi-square test of
  the 2 x 10 table (reference, window);
- confidence: the best digit's probability in the reference's decile bins, chi-square 2 x k;
- refusal rate: two-proportion z-test (two-sided), with an absolute-change floor;
- input drift: each feature of digits.monitor.features in its reference decile bins,
  chi-square 2 x k;
- effect: the population stability index (PSI) of the binned shares; a test alerts only when
  p < alpha / (number of tests) and PSI >= min_psi (refusal: |change| >= max_refusal_change)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from digits.monitor import features as feats
from digits.monitor.reference import counts_in

EPS = 1e-4  # share floor inside the PSI's log: an empty bin is not an infinite shift


@dataclass(frozen=True)
class Check:
    kind: str  # "prediction", "confidence", "refusal", "input"
    name: str
    p: float
    effect: float  # PSI, or the refusal rate's change
    threshold: float  # the effect floor it was held to
    reference: list[float]  # shares (or rate) of the reference
    window: list[float]  # and of the window
    drifted: bool = False

    def reason(self) -> str:
        what = "change" if self.kind == "refusal" else "PSI"
        return f"{self.kind} drift: {self.name} ({what} {self.effect:+.3g}, p = {self.p:.2g})"


def psi(ref_counts: np.ndarray, win_counts: np.ndarray) -> float:
    r = np.maximum(ref_counts / max(ref_counts.sum(), 1), EPS)
    w = np.maximum(win_counts / max(win_counts.sum(), 1), EPS)
    return float(((w - r) * np.log(w / r)).sum())


def two_sample(ref_counts, win_counts) -> float:
    """p of the chi-square test of homogeneity of a 2 x k table (empty columns left out)."""
    from scipy.stats import chi2_contingency

    table = np.array([ref_counts, win_counts], np.float64)
    table = table[:, table.sum(0) > 0]
    if table.shape[1] < 2 or (table.sum(1) == 0).any():
        return 1.0
    return float(chi2_contingency(table, correction=False).pvalue)


def two_proportions(k1: int, n1: int, k2: int, n2: int) -> float:
    """Two-sided p of the z-test of equal proportions k1/n1 and k2/n2 (pooled variance)."""
    from scipy.stats import norm

    pooled = (k1 + k2) / (n1 + n2)
    se = np.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0:
        return 1.0
    return float(2 * norm.sf(abs(k2 / n2 - k1 / n1) / se))


def _shares(counts) -> list[float]:
    c = np.asarray(counts, np.float64)
    return [round(float(v), 6) for v in c / max(c.sum(), 1)]


def compare(reference: dict, digit, confidence, pixels, settings) -> list[Check]:
    """Every check of a window: `digit` (-1 refused), `confidence` and (N, 784) uint8 `pixels`
    of its pieces, against `reference`; `settings`: the `monitor:` params."""
    digit = np.asarray(digit)
    checks: list[Check] = []

    def binned(kind: str, name: str, ref: dict, values: np.ndarray) -> None:
        rc, wc = np.asarray(ref["counts"]), counts_in(values, ref["edges"])
        checks.append(
            Check(
                kind,
                name,
                two_sample(rc, wc),
                psi(rc, wc),
                settings.min_psi,
                _shares(rc),
                _shares(wc),
            )
        )

    rd = np.asarray(reference["digits"])
    wd = np.bincount(digit[digit >= 0], minlength=10)
    checks.append(
        Check(
            "prediction",
            "digit shares",
            two_sample(rd, wd),
            psi(rd, wd),
            settings.min_psi,
            _shares(rd),
            _shares(wd),
        )
    )
    binned("confidence", "confidence", reference["confidence"], np.asarray(confidence))
    n_ref, k_ref = int(reference["pieces"]), int(reference["refused"])
    n, k = len(digit), int((digit < 0).sum())
    checks.append(
        Check(
            "refusal",
            "refusal rate",
            two_proportions(k_ref, n_ref, k, n),
            k / n - k_ref / n_ref,
            settings.max_refusal_change,
            [round(k_ref / n_ref, 6)],
            [round(k / n, 6)],
        )
    )
    table = feats.features(pixels)
    for i, name in enumerate(feats.NAMES):
        binned("input", name, reference["features"][name], table[:, i])
    level = settings.alpha / len(checks)  # Bonferroni: the family-wise false-alarm rate
    return [
        Check(**{**asdict(c), "drifted": c.p < level and abs(c.effect) >= c.threshold})
        for c in checks
    ]
