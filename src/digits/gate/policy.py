"""The metric gate's policy: which checks a new version must pass, and what the gate decided.
Pure functions of scores and thresholds: no store, no files, no model loading (digits.stages.gate
does the I/O; digits.gate.report puts the decision into words).

The new version must pass, by the thresholds committed on the promotion branch (each tightened
where the workspace asks for more; digits.gate.governance):
- the absolute gates: accuracy, loss, every digit's recall; the worst corruption when
  `gates.min_corruption_accuracy` is on;
- McNemar's exact test against the champion, paired on the same test images: rejected if it is
  significantly worse (one-sided, `gates.alpha`);
- the high-water mark: accuracy at least the best any champion has had on this test set, minus
  `gates.max_accuracy_drop`, so a chain of slightly worse versions cannot drift down."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

from digits.core.config import GateParams
from digits.core.metrics import worst_recall
from digits.scoring.cache import Score


@dataclass(frozen=True, kw_only=True)
class Check:
    gate: str
    metric: str
    value: float
    threshold: float
    op: str  # ">=" or "<="
    note: str = ""
    fmt: str = ".4f"

    @property
    def passed(self) -> bool:
        # rounding: a value equal to the threshold as printed passes
        v, t = round(self.value, 6), round(self.threshold, 6)
        return v >= t if self.op == ">=" else v <= t

    def reason(self) -> str:
        return (
            f"{self.gate}: {self.metric} {self.value:{self.fmt}} not {self.op} "
            f"{self.threshold:{self.fmt}}"
        )


def mcnemar_p(b: int, c: int) -> float:
    """One-sided exact McNemar p-value that the challenger is worse than the champion.

    b = images the champion gets right and the challenger wrong, c = the reverse. Under "equally
    good" each disagreement goes either way with probability 1/2, so p = P(X >= b) for
    X ~ Binomial(b + c, 1/2). Images both get right (or wrong) say nothing about which is
    better, which is why the paired test sees differences that two accuracies hide."""
    n = b + c
    if n == 0:
        return 1.0
    # the exact tail in integers (what scipy.stats.binomtest computes; importing scipy would
    # cost the gate a second): sum of C(n, k) for k >= b, over 2^n
    return sum(math.comb(n, k) for k in range(b, n + 1)) / 2**n


@dataclass(frozen=True, kw_only=True)
class Comparison:
    champion: str
    b: int  # champion right, challenger wrong
    c: int  # challenger right, champion wrong
    p: float


def compare(champion: Score, new: Score) -> Comparison:
    b = int((champion.correct & ~new.correct).sum())
    c = int((new.correct & ~champion.correct).sum())
    return Comparison(champion=champion.version, b=b, c=c, p=mcnemar_p(b, c))


def worst_corruption(robustness: dict) -> tuple[str, float]:
    """(name, accuracy) of the corruption a model handles worst (the first, on a tie)."""
    name = min(robustness["corruptions"], key=robustness["corruptions"].get)
    return name, robustness["corruptions"][name]


def checks(
    gates: GateParams, new: Score, *, comparison: Comparison | None, high: Score | None
) -> list[Check]:
    """The gates, in report order. With `gates.min_corruption_accuracy` on, `new.robustness`
    must be there (the gate scores it when the version's record lacks it)."""
    m = new.metrics
    worst_digit, worst = worst_recall(m)
    out = [
        Check(
            gate="min_accuracy",
            metric="accuracy",
            value=m["accuracy"],
            threshold=gates.min_accuracy,
            op=">=",
        ),
        Check(gate="max_loss", metric="loss", value=m["loss"], threshold=gates.max_loss, op="<="),
        Check(
            gate="min_class_recall",
            metric=f"recall of digit {worst_digit} (worst)",
            value=worst,
            threshold=gates.min_class_recall,
            op=">=",
        ),
    ]
    if comparison is not None:
        out.append(
            Check(
                gate="not_worse_than_champion",
                metric="McNemar one-sided p",
                value=comparison.p,
                threshold=gates.alpha,
                op=">=",
                note=f"vs champion v{comparison.champion}: b = {comparison.b}, c = {comparison.c}",
                fmt=".4g",
            )
        )
    if high is not None:
        out.append(
            Check(
                gate="max_accuracy_drop",
                metric="accuracy vs high-water mark",
                value=m["accuracy"],
                threshold=high.accuracy - gates.max_accuracy_drop,
                op=">=",
                note=f"high-water mark {high.accuracy:.4f} (v{high.version}), "
                f"drop allowed {gates.max_accuracy_drop}",
            )
        )
    if gates.max_ece < 1:
        out.append(
            Check(
                gate="max_ece",
                metric="expected calibration error (15 bins)",
                value=_needs(m, "calibration", "max_ece")["ece"],
                threshold=gates.max_ece,
                op="<=",
            )
        )
    if gates.max_ood_fpr95 < 1:
        o = _needs(m, "ood", "max_ood_fpr95")
        out.append(
            Check(
                gate="max_ood_fpr95",
                metric="non-digits accepted at 95% of test digits (FPR95)",
                value=o["fpr95"],
                threshold=gates.max_ood_fpr95,
                op="<=",
                note=f"AUROC {o['auroc']:.4f} over {o['outliers']} non-digits",
            )
        )
    if gates.max_refused_digits < 1:
        o = _needs(m, "ood", "max_refused_digits")
        out.append(
            Check(
                gate="max_refused_digits",
                metric="test digits refused as not a digit",
                value=o["refused_digits"],
                threshold=gates.max_refused_digits,
                op="<=",
                note=f"threshold {o['threshold']:.4g}",
            )
        )
    if gates.min_corruption_accuracy > 0:
        if new.robustness is None:
            raise ValueError(
                "checks: min_corruption_accuracy is on but the score has no robustness"
            )
        name, acc = worst_corruption(new.robustness)
        out.append(
            Check(
                gate="min_corruption_accuracy",
                metric=f"accuracy under {name} (worst corruption)",
                value=acc,
                threshold=gates.min_corruption_accuracy,
                op=">=",
                note=f"mean over {len(new.robustness['corruptions'])} corruptions: "
                f"{new.robustness['mean']:.4f}",
            )
        )
    return out


def _needs(metrics: dict, section: str, gate: str) -> dict:
    if section not in metrics:
        raise ValueError(f"checks: {gate} is on but the score has no {section} section")
    return metrics[section]


class Verdict(Enum):
    REJECTED = "rejected"  # a gate failed: the aliases stay
    ALREADY = "already"  # passed, and was the champion already
    PROMOTED = "promoted"  # passed, and is now the champion
    APPROVED = "approved"  # passed, not promoted (not a promotion run): maybe @challenger


@dataclass(frozen=True, kw_only=True)
class Outcome:
    """What the gate decided and did: everything the report and the version's description say."""

    name: str  # the registered model
    version: str
    new: Score
    results: list[Check]
    thresholds: str  # where the applied gates came from, e.g. "main@1a2b3c4:params.yaml"
    branch: str  # the promotion branch
    has_branch: bool  # it exists in git
    why_not: str  # why this run may not promote ("" when it may)
    commit: str  # HEAD's commit
    test_sha256: str
    champion: Score | None = None  # the champion compared with (None: none, or it is `new`)
    comparison: Comparison | None = None
    high: Score | None = None  # the high-water mark
    champion_version: str | None = None  # the champion when the gate ran
    challenger: str | None = None  # @challenger after the gate
    verdict: Verdict

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.results if not c.passed]


def decide(failed: bool, already: bool, may_promote: bool) -> Verdict:
    if failed:
        return Verdict.REJECTED
    if already:
        return Verdict.ALREADY
    return Verdict.PROMOTED if may_promote else Verdict.APPROVED
