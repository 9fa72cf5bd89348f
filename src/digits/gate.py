"""The metric gate: may the version just registered replace `@champion`?

The new version (the one the evaluate stage registered) must pass, by the thresholds committed
on the promotion branch (`promote.context`), each tightened where the workspace asks for more
(`promote.tighten`; never loosened):

- the absolute gates (accuracy, loss, every digit's recall; the worst corruption when
  `gates.min_corruption_accuracy` is on);
- McNemar's exact test against the champion, paired on the same test images: rejected if it is
  significantly worse (one-sided, `gates.alpha`);
- the high-water mark: accuracy at least the best any champion has had on this test set, minus
  `gates.max_accuracy_drop`, so a chain of slightly worse versions cannot drift down.

Every version's score comes from its record in the registry (`digits.scores`) when the record's
key matches: the sha256 of the model's files as downloaded now, of the test data, and of the
metric code. The evaluate stage writes the new version's record as it registers it; a version
without a matching record is loaded through pyfunc, scored here and its record written. So a
pipeline run loads no model at all, and imports no torch. Only a promotion-branch run moves
`@champion`/`@previous`; elsewhere a version that passes is approved and may become
`@challenger`. Every version gets a description saying why."""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from digits import promote
from digits.errors import DigitsError
from digits.metrics import compute_metrics, worst_recall
from digits.promote import CHALLENGER, CHAMPION, PREVIOUS
from digits.scores import (
    CACHE_TAG,
    Score,
    cache_record,
    download_model,
    files_sha256,
    from_cache,
)


class GateFailed(DigitsError):
    """Raised after the report is written, when at least one gate failed."""


class GateError(DigitsError):
    """The gate could not judge (registry unreachable, a model that cannot be scored)."""


@dataclass
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


# --- McNemar's exact test -----------------------------------------------------------------------


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


@dataclass
class Comparison:
    champion: str
    b: int  # champion right, challenger wrong
    c: int  # challenger right, champion wrong
    p: float


def compare(champion: Score, new: Score) -> Comparison:
    b = int((champion.correct & ~new.correct).sum())
    c = int((new.correct & ~champion.correct).sum())
    return Comparison(champion.version, b, c, mcnemar_p(b, c))


# --- scoring registered versions -------------------------------------------------------------


class Scorer:
    """Scores registered versions of one model on one test set, each at most once per run:
    from its record when the key matches, else through pyfunc (and then the record is due)."""

    def __init__(self, client, name: str, test_data: Path, test_sha256: str):
        from digits.data import load_labels

        self.client, self.name, self.test_data = client, name, test_data
        self.y = load_labels(test_data, "test")
        self.test_sha256 = test_sha256
        self.scores: dict[str, Score] = {}
        self.to_cache: dict[str, str] = {}  # version -> record to write (scored afresh)

    def score(self, version: str) -> Score:
        if version not in self.scores:
            self.scores[version] = self._score(version)
        return self.scores[version]

    def _score(self, version: str) -> Score:
        with tempfile.TemporaryDirectory(prefix="digits-gate-") as tmp:
            local = download_model(self.name, version, tmp)
            sha = files_sha256(local)
            tags = self.client.get_model_version(self.name, version).tags
            hit = from_cache(tags.get(CACHE_TAG), version, sha, self.test_sha256, len(self.y))
            if hit is not None:
                return hit
            probs = self._predict(local)
        score = Score(
            version, compute_metrics(probs, self.y), probs.argmax(1) == self.y, sha, False
        )
        self.to_cache[version] = cache_record(score, self.test_sha256)
        return score

    def _predict(self, local: Path) -> np.ndarray:
        """Probabilities of the model in `local`, loaded as users load it (pyfunc)."""
        import mlflow.pyfunc

        from digits.data import load_split

        x, _ = load_split(self.test_data, "test")
        return np.asarray(mlflow.pyfunc.load_model(str(local)).predict(x.numpy()))


# --- the checks, the verdict, the report ------------------------------------------------------


def checks(
    gates,
    new: dict,
    comparison: Comparison | None,
    high: Score | None,
    robustness: dict | None = None,
) -> list[Check]:
    """The gates, in report order. `robustness`: the new version's corruption accuracies from
    its record; None scores them through pyfunc, when min_corruption_accuracy asks for them."""
    worst_digit, worst = worst_recall(new)
    out = [
        Check("min_accuracy", "accuracy", new["accuracy"], gates.min_accuracy, ">="),
        Check("max_loss", "loss", new["loss"], gates.max_loss, "<="),
        Check(
            "min_class_recall",
            f"recall of digit {worst_digit} (worst)",
            worst,
            gates.min_class_recall,
            ">=",
        ),
    ]
    if comparison is not None:
        out.append(
            Check(
                "not_worse_than_champion",
                "McNemar one-sided p",
                comparison.p,
                gates.alpha,
                ">=",
                f"vs champion v{comparison.champion}: b = {comparison.b}, c = {comparison.c}",
                fmt=".4g",
            )
        )
    if high is not None:
        out.append(
            Check(
                "max_accuracy_drop",
                "accuracy vs high-water mark",
                new["accuracy"],
                high.accuracy - gates.max_accuracy_drop,
                ">=",
                f"high-water mark {high.accuracy:.4f} (v{high.version}), "
                f"drop allowed {gates.max_accuracy_drop}",
            )
        )
    if gates.min_corruption_accuracy > 0:  # scores 12 corrupted test sets: only when asked
        from digits.robustness import registered_version_accuracies, worst_corruption

        corrupted = robustness or registered_version_accuracies()  # else through pyfunc
        name, acc = worst_corruption(corrupted)
        out.append(
            Check(
                "min_corruption_accuracy",
                f"accuracy under {name} (worst corruption)",
                acc,
                gates.min_corruption_accuracy,
                ">=",
                f"mean over {len(corrupted['corruptions'])} corruptions: {corrupted['mean']:.4f}",
            )
        )
    return out


@dataclass
class Outcome:
    """What the gate decided and did, for the report and the version's description."""

    name: str
    version: str
    results: list[Check]
    ctx: promote.Context
    champion: str | None  # the champion when the gate ran (None: there was none)
    already: bool  # the version was the champion already
    promoted: bool
    challenger: str | None

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.results if not c.passed]


def verdict(o: Outcome) -> str:
    """One paragraph: what happened to the aliases, and why."""
    if o.failed:
        kept = f" (version {o.champion})." if o.champion else " (none)."
        return (
            f"**REJECTED**: {len(o.failed)} gate(s) failed: "
            + ", ".join(c.gate for c in o.failed)
            + ". The champion is unchanged"
            + kept
        )
    if o.already:
        return f"**APPROVED**: version {o.version} was already `@{CHAMPION}`."
    if o.promoted:
        was = (
            f"; version {o.champion} is `@{PREVIOUS}`." if o.champion else " (the first champion)."
        )
        return f"**APPROVED**: version {o.version} is now `@{CHAMPION}`{was}"
    if o.ctx.has_branch:
        why = f"this version would be promoted from {o.ctx.branch}, but {o.ctx.why_not}."
    else:
        why = f"{o.ctx.why_not}."
    if o.challenger == o.version:
        alias = f"It is `@{CHALLENGER}`, the best approved version not yet promoted."
    else:
        alias = f"`@{CHALLENGER}` stays on version {o.challenger}, which is more accurate."
    hand = f'A person can promote it: `digits promote {o.version} --reason "..."`.'
    return f"**APPROVED**, not promoted: {why} {alias} {hand}"


def report(
    o: Outcome,
    new: Score,
    champion: Score | None,
    comparison: Comparison | None,
    high: Score | None,
    workspace_gates,
    test_sha256: str,
) -> str:
    def origin(s: Score) -> str:
        if not s.cached:
            return "scored now"
        if s.by == "evaluate":
            return "scored by the evaluate stage that registered it, same model files sha256"
        return "cached score: same model, test data and metric code sha256"

    lines = [f"# Gate report: {o.name} version {o.version}", ""]
    lines.append(f"- thresholds: `gates` from {o.ctx.source}")
    lines.append(f"- test set: {len(new.correct)} images, sha256 {test_sha256[:12]}")
    lines.append(f"- version {o.version}: accuracy {new.accuracy:.4f} ({origin(new)})")
    if champion is not None and comparison is not None:
        lines.append(
            f"- champion: version {champion.version}, accuracy {champion.accuracy:.4f} "
            f"({origin(champion)})"
        )
        lines.append(
            f"- paired on the same images, they disagree on {comparison.b + comparison.c}: "
            f"b = {comparison.b} (champion right, version {o.version} wrong), "
            f"c = {comparison.c} (version {o.version} right, champion wrong); "
            f"McNemar exact one-sided p = {comparison.p:.4g}"
        )
    elif o.already:
        lines.append(f"- version {o.version} is the champion")
    else:
        lines.append("- champion: none yet")
    if high is not None:
        lines.append(
            f"- high-water mark: {high.accuracy:.4f}, version {high.version} "
            f"({origin(high)}), the best any champion has scored on this test set"
        )
    lines += ["", "| gate | metric | value | threshold | result |", "|---|---|---|---|---|"]
    for c in o.results:
        limit = f"{c.op} {c.threshold:{c.fmt}}" + (f" ({c.note})" if c.note else "")
        lines.append(
            f"| {c.gate} | {c.metric} | {c.value:{c.fmt}} | {limit} | "
            f"{'pass' if c.passed else 'FAIL'} |"
        )
    lines += ["", verdict(o)]
    differ = promote.advisory(workspace_gates, o.ctx.gates)
    if differ and o.ctx.has_branch:
        lines += [
            "",
            "## Advisory: this workspace's own `gates` (not applied)",
            "",
            f"The gate judges by the thresholds committed on {o.ctx.branch}; a change to them "
            f"is a reviewed commit to {o.ctx.branch}.",
            "",
            f"| key | this workspace | applied ({o.ctx.branch}) |",
            "|---|---|---|",
            *(f"| {k} | {mine} | {theirs} |" for k, mine, theirs in differ),
        ]
    return "\n".join(lines) + "\n"


def describe(o: Outcome, new: Score, comparison, champion, high, info: dict) -> str:
    """The registered version's description (markdown in the MLflow UI): why it exists and
    how it compares with the champion."""
    out = [f"Test accuracy **{new.accuracy:.2%}**, scored by the gate."]
    if comparison is not None:
        delta = 100 * (new.accuracy - champion.accuracy)
        out.append(
            f"Compared with champion version {champion.version} ({champion.accuracy:.2%}): "
            f"{delta:+.2f} points; disagreements b = {comparison.b}, c = {comparison.c}, "
            f"McNemar p = {comparison.p:.3g}."
        )
    elif not o.already:
        out.append("No champion to compare with.")
    if high is not None:
        out.append(f"High-water mark {high.accuracy:.2%} (version {high.version}).")
    if o.failed:
        gate = "REJECTED: " + "; ".join(c.reason() for c in o.failed) + "."
    elif o.already:
        gate = f"APPROVED; already @{CHAMPION}."
    elif o.promoted:
        gate = f"APPROVED and promoted to @{CHAMPION} ({o.ctx.branch}@{o.ctx.commit[:7]})."
    else:
        where = f"would be promoted from {o.ctx.branch}, but " if o.ctx.has_branch else ""
        gate = f"APPROVED, not promoted: {where}{o.ctx.why_not}."
    out.append(f"Gate: {gate} Thresholds from {o.ctx.source}.")
    run_id, exp = info.get("run_id", ""), info.get("experiment_id", "")
    out.append(f"Run: [{run_id}](#/experiments/{exp}/runs/{run_id})")
    return "\n\n".join(out)


# --- the stage ----------------------------------------------------------------------------------


def run(params) -> list[Check]:
    """The `gate` stage / `digits gate` command. Raises GateFailed (exit 1) on any failure."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from digits import tracking
    from digits.data import file_digest
    from digits.files import GATE_REPORT, RUN_INFO, TEST_DATA, write_text

    info = json.loads(Path(RUN_INFO).read_text())
    name, version = info["registered_model"], str(info["version"])
    ctx = promote.tighten(promote.context(params), params.gates)
    tracking.connect(params.mlflow.experiment)
    uri = tracking.tracking_uri()
    client = MlflowClient(uri)
    test_sha256 = file_digest(TEST_DATA)
    scorer = Scorer(client, name, TEST_DATA, test_sha256)

    try:
        champ = promote.alias_version(client, name, CHAMPION)
        already = champ == version
        new = scorer.score(version)
        champion = scorer.score(champ) if champ is not None and not already else None
        comparison = compare(champion, new) if champion is not None else None
        past = [scorer.score(v) for v in promote.ever_champions(client, name) if v != version]
        high = max(past, key=lambda s: (s.accuracy, -int(s.version)), default=None)

        results = checks(ctx.gates, new.metrics, comparison, high, new.robustness)
        failed = [c for c in results if not c.passed]
        with tracking.store_lock(uri):
            now = promote.alias_version(client, name, CHAMPION)
            if now != champ:
                raise GateError(
                    f"{name}: @{CHAMPION} moved from version {champ} to {now} while the gate "
                    "ran; run it again to compare with the new champion"
                )
            for v, record in scorer.to_cache.items():
                client.set_model_version_tag(name, v, CACHE_TAG, record)
            tag = lambda k, val: client.set_model_version_tag(name, version, k, val)  # noqa: E731
            tag("gate.accuracy", str(new.accuracy))
            tag("gate.thresholds", ctx.source)
            tag(promote.STATUS, "rejected" if failed else promote.APPROVED)
            if failed:
                tag("validation_reasons", "; ".join(c.reason() for c in failed))
            elif "validation_reasons" in client.get_model_version(name, version).tags:
                client.delete_model_version_tag(name, version, "validation_reasons")
            promoted = not failed and not already and ctx.may_promote
            if promoted:
                promote.record_promotion(
                    client,
                    name,
                    version,
                    by=f"gate: pipeline run on {ctx.branch}@{ctx.commit[:7]}",
                    reason="passed the gate on a clean run of the promotion branch",
                    via="gate",
                )
            outcome = Outcome(
                name,
                version,
                results,
                ctx,
                champ,
                already,
                promoted,
                promote.update_challenger(client, name),
            )
            client.update_model_version(
                name, version, describe(outcome, new, comparison, champion, high, info)
            )
    except MlflowException as e:
        raise GateError(f"MLflow store {uri}: {str(e).splitlines()[0]}") from None

    text = report(outcome, new, champion, comparison, high, params.gates, test_sha256)
    write_text(GATE_REPORT, text)
    print(text)
    if failed:
        raise GateFailed("failed gates: " + "; ".join(c.reason() for c in failed))
    return results
