"""The metric gate's policy: which checks a new version must pass, and what the gate decided.
Pure functions of scores and thresholds: no store, no files, no model loading (digits.stages.gate
does the I/O; digits.gate.report puts the decision into words). The checks are a table (RULES):
each names the section of the version's record it reads, the value there, the comparison and
its threshold's key, so what a gate needs scored is known before anything is scored (`suites`).

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from operator import attrgetter
from typing import Any

from digits.core.config import GateParams
from digits.gate.governance import Context
from digits.scoring.cache import Score
from digits.scoring.scorer import Suites
from digits.scoring.wild import WildFigures


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


@dataclass(frozen=True, kw_only=True)
class HighWater:
    """What the high-water check reads: the new version's accuracy against the best any
    champion has had on this test set, less the drop allowed."""

    accuracy: float
    mark: float
    version: str  # whose mark it is
    drop: float

    @property
    def floor(self) -> float:
        return self.mark - self.drop


@dataclass(frozen=True, kw_only=True)
class Rule:
    """One gate, as data: what it reads, the value it takes there, how it compares with its
    threshold, and how the report names it."""

    gate: str  # the check's name in the report and gate.json; its threshold's key in `gates`
    reads: str  # a section of the new version's Evaluation, or one of RELATIVE_SECTIONS
    value: Callable[[Any], float]  # of that section
    op: str  # ">=" or "<="
    metric: str | Callable[[Any], str]  # what the report calls the value
    # a key in `gates` ("": the gate's own), or a function of the section
    threshold: str | Callable[[Any], float] = ""
    note: Callable[[Any], str] = lambda section: ""
    switchable: bool = False  # off at its loosest threshold (1 for "<=", 0 for ">=")
    fmt: str = ".4f"

    def on(self, gates: GateParams) -> bool:
        if not self.switchable:
            return True
        limit = getattr(gates, self.gate)
        return limit < 1 if self.op == "<=" else limit > 0

    def check(self, section: Any, gates: GateParams) -> Check:
        threshold = (
            self.threshold(section)
            if callable(self.threshold)
            else getattr(gates, self.threshold or self.gate)
        )
        return Check(
            gate=self.gate,
            metric=self.metric(section) if callable(self.metric) else self.metric,
            value=self.value(section),
            threshold=threshold,
            op=self.op,
            note=self.note(section),
            fmt=self.fmt,
        )


# sections that exist only against other versions of this store: a check on them is skipped
# when there is nothing to compare with (no champion, no past champion)
RELATIVE_SECTIONS = frozenset({"comparison", "high_water"})

# the gates, in report order
RULES: tuple[Rule, ...] = (
    Rule(gate="min_accuracy", reads="metrics", value=attrgetter("accuracy"), op=">=",
         metric="accuracy"),
    Rule(gate="max_loss", reads="metrics", value=attrgetter("loss"), op="<=", metric="loss"),
    Rule(gate="min_class_recall", reads="metrics", value=lambda m: m.worst_recall()[1], op=">=",
         metric=lambda m: f"recall of digit {m.worst_recall()[0]} (worst)"),
    Rule(gate="not_worse_than_champion", reads="comparison", value=attrgetter("p"), op=">=",
         threshold="alpha", metric="McNemar one-sided p", fmt=".4g",
         note=lambda c: f"vs champion v{c.champion}: b = {c.b}, c = {c.c}"),
    Rule(gate="max_accuracy_drop", reads="high_water", value=attrgetter("accuracy"), op=">=",
         threshold=attrgetter("floor"), metric="accuracy vs high-water mark",
         note=lambda h: f"high-water mark {h.mark:.4f} (v{h.version}), drop allowed {h.drop}"),
    Rule(gate="max_ece", reads="calibration", value=attrgetter("ece"), op="<=", switchable=True,
         metric="expected calibration error (15 bins)"),
    Rule(gate="max_ood_fpr95", reads="ood", value=attrgetter("fpr95"), op="<=", switchable=True,
         metric="non-digits accepted at 95% of test digits (FPR95)",
         note=lambda o: f"AUROC {o.auroc:.4f} over {o.outliers} non-digits"),
    Rule(gate="max_refused_digits", reads="ood", value=attrgetter("refused_digits"), op="<=",
         switchable=True, metric="test digits refused as not a digit",
         note=lambda o: f"threshold {o.threshold:.4g}"),
    Rule(gate="min_corruption_accuracy", reads="robustness", value=attrgetter("worst"), op=">=",
         switchable=True,
         metric=lambda r: f"accuracy under {r.worst_corruption()[0]} (worst corruption)",
         note=lambda r: f"mean over {len(r.corruptions)} corruptions: {r.mean:.4f}"),
    # outside MNIST (digits.scoring.wild, reports/wild.json)
    Rule(gate="min_wild_read", reads="wild", value=attrgetter("worst_read"), op=">=",
         switchable=True, metric=lambda w: f"{w.worst_read_set} digits read right (worst set)",
         note=lambda w: f"all wild digits: {w.digits_read:.4f}"),
    Rule(gate="max_wild_refused", reads="wild", value=attrgetter("worst_refused"), op="<=",
         switchable=True, metric=lambda w: f"{w.worst_refused_set} digits refused (worst set)"),
    Rule(gate="min_wild_refused_non_digits", reads="wild", value=attrgetter("non_digits_refused"),
         op=">=", switchable=True, metric="wild non-digits refused",
         note=lambda w: f"AUROC {w.auroc:.4f} over {w.non_digits} non-digits"),
)  # fmt: skip

# the checks on the feedback hold-out against @champion (digits.monitor.gatecheck adds them):
# on this set's hold-out, and on the hold-out the champion itself was judged on (its labels)
FEEDBACK_GATE = "feedback_not_worse_than_champion"
FEEDBACK_KEPT_GATE = "feedback_not_worse_on_champions_holdout"
# the checks that compare with other versions of this store (@champion, the high-water mark)
RELATIVE = frozenset(r.gate for r in RULES if r.reads in RELATIVE_SECTIONS) | {
    FEEDBACK_GATE,
    FEEDBACK_KEPT_GATE,
}


def reads_wild(gates: GateParams) -> bool:
    """Whether a gate on reads the out-of-MNIST figures (reports/wild.json)."""
    return any(r.reads == "wild" and r.on(gates) for r in RULES)


def suites(gates: GateParams, outliers_per_kind: int) -> Suites:
    """What a version's score must hold for these gates, beyond its metrics and calibration:
    the outlier suite where a gate on reads `ood`, the corruptions where one reads
    `robustness`. The gate scores a version whose record lacks them (and nothing more)."""
    read = {r.reads for r in RULES if r.on(gates)}
    return Suites(
        outliers_per_kind=outliers_per_kind if "ood" in read else 0,
        robustness="robustness" in read,
    )


def checks(
    gates: GateParams,
    new: Score,
    *,
    comparison: Comparison | None,
    high: Score | None,
    wild: WildFigures | None = None,
) -> list[Check]:
    """The gates on, in report order. A section a gate on reads must be in `new`'s record
    (`suites` says which: the gate scores them where the record lacks them); the `wild`
    figures are the evaluate stage's (reports/wild.json, `reads_wild` says when needed)."""
    ev = new.evaluation
    sections: dict[str, Any] = {
        "metrics": ev.metrics,
        "calibration": ev.calibration,
        "ood": ev.ood,
        "robustness": ev.robustness,
        "wild": wild,
        "comparison": comparison,
        "high_water": None
        if high is None
        else HighWater(
            accuracy=new.accuracy,
            mark=high.accuracy,
            version=high.version,
            drop=gates.max_accuracy_drop,
        ),
    }
    out = []
    for rule in RULES:
        section = sections[rule.reads]
        if not rule.on(gates) or (section is None and rule.reads in RELATIVE_SECTIONS):
            continue
        if section is None:
            raise ValueError(f"checks: {rule.gate} is on but the score has no {rule.reads} section")
        out.append(rule.check(section, gates))
    return out


class Verdict(Enum):
    REJECTED = "rejected"  # a gate failed: the aliases stay
    ALREADY = "already"  # passed, and was the champion already
    PROMOTED = "promoted"  # passed, and is now the champion
    APPROVED = "approved"  # passed, not promoted (not a promotion run): maybe @challenger


@dataclass(frozen=True, kw_only=True)
class Contest:
    """The version judged, and the versions it was compared with."""

    version: str
    new: Score
    champion_version: str | None = None  # @champion when the gate ran
    champion: Score | None = None  # the champion compared with (None: none, or it is `new`)
    comparison: Comparison | None = None
    high: Score | None = None  # the high-water mark

    @classmethod
    def of(cls, new: Score, champion_version: str | None, champion: Score | None,
           high: Score | None) -> Contest:  # fmt: skip
        comparison = compare(champion, new) if champion is not None else None
        return cls(version=new.version, new=new, champion_version=champion_version,
                   champion=champion, comparison=comparison, high=high)  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class Outcome:
    """What the gate decided and did: everything the report and the version's description say."""

    name: str  # the registered model
    contest: Contest
    results: list[Check]
    verdict: Verdict
    where: Context  # the thresholds applied, where they came from, who may promote
    test_sha256: str
    challenger: str | None = None  # @challenger after the gate

    @property
    def version(self) -> str:
        return self.contest.version

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.results if not c.passed]


def decide(results: Sequence[Check], contest: Contest, where: Context) -> Verdict:
    if any(not c.passed for c in results):
        return Verdict.REJECTED
    if contest.champion_version == contest.version:
        return Verdict.ALREADY
    return Verdict.PROMOTED if where.may_promote else Verdict.APPROVED


def judge(
    name: str, contest: Contest, where: Context, test_sha256: str, wild: WildFigures | None = None
) -> Outcome:
    """The checks by the thresholds `where` applies, and the verdict."""
    results = checks(
        where.gates, contest.new, comparison=contest.comparison, high=contest.high, wild=wild
    )
    return Outcome(
        name=name,
        contest=contest,
        results=results,
        verdict=decide(results, contest, where),
        where=where,
        test_sha256=test_sha256,
    )
