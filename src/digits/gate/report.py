"""The gate's decision in words: the report (`reports/gate.md`, printed by the stage, attached
to the run) and the registered version's description in the MLflow UI. Both render one
`policy.Outcome`, so they cannot tell two stories. And the decision as data: the absolute
checks in `reports/gate.json`, the gate's DVC output."""

from __future__ import annotations

import json

from digits.gate.policy import RELATIVE, Check, Outcome, Verdict
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
    where, champion_version = o.where, o.contest.champion_version
    if o.verdict is Verdict.REJECTED:
        kept = f" (version {champion_version})." if champion_version else " (none)."
        gates = ", ".join(c.gate for c in o.failed)
        return (
            f"**REJECTED**: {len(o.failed)} gate(s) failed: {gates}. The champion is unchanged"
            + kept
        )
    if o.verdict is Verdict.ALREADY:
        return f"**APPROVED**: version {o.version} was already `@{CHAMPION}`."
    if o.verdict is Verdict.PROMOTED:
        was = (
            f"; version {champion_version} is `@{PREVIOUS}`."
            if champion_version
            else " (the first champion)."
        )
        return f"**APPROVED**: version {o.version} is now `@{CHAMPION}`{was}"
    if where.has_branch:
        why = f"this version would be promoted from {where.branch}, but {where.why_not}."
    else:
        why = f"{where.why_not}."
    if o.challenger == o.version:
        alias = f"It is `@{CHALLENGER}`, the best approved version not yet promoted."
    else:
        alias = f"`@{CHALLENGER}` stays on version {o.challenger}, which is more accurate."
    hand = f'A person can promote it: `digits promote {o.version} --reason "..."`.'
    return f"**APPROVED**, not promoted: {why} {alias} {hand}"


def report(o: Outcome, advisory: list[tuple[str, object, object]]) -> str:
    """The gate report, markdown. `advisory`: the workspace's own gates that differ from the
    applied ones (shown, not applied)."""
    c, where = o.contest, o.where
    new, champion, comparison, high = c.new, c.champion, c.comparison, c.high
    lines = [f"# Gate report: {o.name} version {o.version}", ""]
    lines.append(f"- thresholds: `gates` from {where.source}")
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
    elif c.champion_version == o.version:
        lines.append(f"- version {o.version} is the champion")
    else:
        lines.append("- champion: none yet")
    if high is not None:
        lines.append(
            f"- high-water mark: {high.accuracy:.4f}, version {high.version} "
            f"({_origin(high)}), the best any champion has scored on this test set"
        )
    lines += ["", "| gate | metric | value | threshold | result |", "|---|---|---|---|---|"]
    lines += [_row(check) for check in o.results]
    lines += ["", verdict(o)]
    if advisory and where.has_branch:
        lines += [
            "",
            "## Advisory: this workspace's own `gates` (not applied)",
            "",
            f"The gate judges by the thresholds committed on {where.branch}; a change to them "
            f"is a reviewed commit to {where.branch}.",
            "",
            f"| key | this workspace | applied ({where.branch}) |",
            "|---|---|---|",
            *(f"| {k} | {mine} | {theirs} |" for k, mine, theirs in advisory),
        ]
    return "\n".join(lines) + "\n"


def _row(c: Check) -> str:
    limit = f"{c.op} {c.threshold:{c.fmt}}" + (f" ({c.note})" if c.note else "")
    result = "pass" if c.passed else "FAIL"
    return f"| {c.gate} | {c.metric} | {c.value:{c.fmt}} | {limit} | {result} |"


def description(o: Outcome, run_id: str, experiment_id: str) -> str:
    """The registered version's description (markdown in the MLflow UI): why it exists and
    how it compares with the champion."""
    c, where = o.contest, o.where
    new, champion, comparison, high = c.new, c.champion, c.comparison, c.high
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
        gate = "REJECTED: " + "; ".join(check.reason() for check in o.failed) + "."
    elif o.verdict is Verdict.ALREADY:
        gate = f"APPROVED; already @{CHAMPION}."
    elif o.verdict is Verdict.PROMOTED:
        gate = f"APPROVED and promoted to @{CHAMPION} ({where.branch}@{where.commit[:7]})."
    else:
        branch = f"would be promoted from {where.branch}, but " if where.has_branch else ""
        gate = f"APPROVED, not promoted: {branch}{where.why_not}."
    out.append(f"Gate: {gate} Thresholds from {where.source}.")
    out.append(f"Run: [{run_id}](#/experiments/{experiment_id}/runs/{run_id})")
    return "\n\n".join(out)


def verdict_json(results: list[Check]) -> str:
    """The gate's DVC output (reports/gate.json): the absolute checks (value, threshold,
    passed), which depend on the model, the test data and the thresholds alone, so the file is
    the same bytes on every machine and in every store. Its being missing is what makes DVC run
    the gate in a fresh clone, whose store has never judged the model (the lock alone would
    skip it)."""
    gates = {
        c.gate: {"metric": c.metric, "value": round(c.value, 6), "threshold": c.threshold,
                 "op": c.op, "passed": c.passed}
        for c in results
        if c.gate not in RELATIVE
    }  # fmt: skip
    record = {"passed": all(g["passed"] for g in gates.values()), "gates": gates}
    return json.dumps(record, indent=2) + "\n"
