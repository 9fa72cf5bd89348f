"""The gate's decision in words: the report (`reports/gate.md`, printed by the stage, attached
to the run) and the registered version's description in the MLflow UI. Both render one
`policy.Outcome`, so they cannot tell two stories."""

from __future__ import annotations

from digits.gate.policy import Outcome, Verdict
from digits.scoring.cache import Score
from digits.tracking.registry import CHALLENGER, CHAMPION, PREVIOUS


def _origin(s: Score) -> str:
    if not s.cached:
        return "scored now"
    if s.by == "evaluate":
        return "scored by the evaluate stage that registered it, same model files sha256"
    return "cached score: same model, test data and metric code sha256"


def verdict(o: Outcome) -> str:
    """One paragraph: what happened to the aliases, and why."""
    if o.verdict is Verdict.REJECTED:
        kept = f" (version {o.champion_version})." if o.champion_version else " (none)."
        gates = ", ".join(c.gate for c in o.failed)
        return (
            f"**REJECTED**: {len(o.failed)} gate(s) failed: {gates}. The champion is unchanged"
            + kept
        )
    if o.verdict is Verdict.ALREADY:
        return f"**APPROVED**: version {o.version} was already `@{CHAMPION}`."
    if o.verdict is Verdict.PROMOTED:
        was = (
            f"; version {o.champion_version} is `@{PREVIOUS}`."
            if o.champion_version
            else " (the first champion)."
        )
        return f"**APPROVED**: version {o.version} is now `@{CHAMPION}`{was}"
    if o.has_branch:
        why = f"this version would be promoted from {o.branch}, but {o.why_not}."
    else:
        why = f"{o.why_not}."
    if o.challenger == o.version:
        alias = f"It is `@{CHALLENGER}`, the best approved version not yet promoted."
    else:
        alias = f"`@{CHALLENGER}` stays on version {o.challenger}, which is more accurate."
    hand = f'A person can promote it: `digits promote {o.version} --reason "..."`.'
    return f"**APPROVED**, not promoted: {why} {alias} {hand}"


def report(o: Outcome, advisory: list[tuple[str, object, object]]) -> str:
    """The gate report, markdown. `advisory`: the workspace's own gates that differ from the
    applied ones (shown, not applied)."""
    new, champion, comparison, high = o.new, o.champion, o.comparison, o.high
    lines = [f"# Gate report: {o.name} version {o.version}", ""]
    lines.append(f"- thresholds: `gates` from {o.thresholds}")
    lines.append(f"- test set: {len(new.correct)} images, sha256 {o.test_sha256[:12]}")
    lines.append(f"- version {o.version}: accuracy {new.accuracy:.4f} ({_origin(new)})")
    if champion is not None and comparison is not None:
        lines.append(
            f"- champion: version {champion.version}, accuracy {champion.accuracy:.4f} "
            f"({_origin(champion)})"
        )
        lines.append(
            f"- paired on the same images, they disagree on {comparison.b + comparison.c}: "
            f"b = {comparison.b} (champion right, version {o.version} wrong), "
            f"c = {comparison.c} (version {o.version} right, champion wrong); "
            f"McNemar exact one-sided p = {comparison.p:.4g}"
        )
    elif o.champion_version == o.version:
        lines.append(f"- version {o.version} is the champion")
    else:
        lines.append("- champion: none yet")
    if high is not None:
        lines.append(
            f"- high-water mark: {high.accuracy:.4f}, version {high.version} "
            f"({_origin(high)}), the best any champion has scored on this test set"
        )
    lines += ["", "| gate | metric | value | threshold | result |", "|---|---|---|---|---|"]
    for c in o.results:
        limit = f"{c.op} {c.threshold:{c.fmt}}" + (f" ({c.note})" if c.note else "")
        result = "pass" if c.passed else "FAIL"
        lines.append(f"| {c.gate} | {c.metric} | {c.value:{c.fmt}} | {limit} | {result} |")
    lines += ["", verdict(o)]
    if advisory and o.has_branch:
        lines += [
            "",
            "## Advisory: this workspace's own `gates` (not applied)",
            "",
            f"The gate judges by the thresholds committed on {o.branch}; a change to them "
            f"is a reviewed commit to {o.branch}.",
            "",
            f"| key | this workspace | applied ({o.branch}) |",
            "|---|---|---|",
            *(f"| {k} | {mine} | {theirs} |" for k, mine, theirs in advisory),
        ]
    return "\n".join(lines) + "\n"


def description(o: Outcome, run_id: str, experiment_id: str) -> str:
    """The registered version's description (markdown in the MLflow UI): why it exists and
    how it compares with the champion."""
    new, champion, comparison, high = o.new, o.champion, o.comparison, o.high
    out = [f"Test accuracy **{new.accuracy:.2%}**, scored by the gate."]
    if champion is not None and comparison is not None:
        delta = 100 * (new.accuracy - champion.accuracy)
        out.append(
            f"Compared with champion version {champion.version} ({champion.accuracy:.2%}): "
            f"{delta:+.2f} points; disagreements b = {comparison.b}, c = {comparison.c}, "
            f"McNemar p = {comparison.p:.3g}."
        )
    elif o.verdict is not Verdict.ALREADY:
        out.append("No champion to compare with.")
    if high is not None:
        out.append(f"High-water mark {high.accuracy:.2%} (version {high.version}).")
    if o.verdict is Verdict.REJECTED:
        gate = "REJECTED: " + "; ".join(c.reason() for c in o.failed) + "."
    elif o.verdict is Verdict.ALREADY:
        gate = f"APPROVED; already @{CHAMPION}."
    elif o.verdict is Verdict.PROMOTED:
        gate = f"APPROVED and promoted to @{CHAMPION} ({o.branch}@{o.commit[:7]})."
    else:
        where = f"would be promoted from {o.branch}, but " if o.has_branch else ""
        gate = f"APPROVED, not promoted: {where}{o.why_not}."
    out.append(f"Gate: {gate} Thresholds from {o.thresholds}.")
    out.append(f"Run: [{run_id}](#/experiments/{experiment_id}/runs/{run_id})")
    return "\n\n".join(out)
