"""The `gate` stage: may the version just registered replace `@champion`?

It judges the newest version registered from the model file the pipeline trained (evaluate
tagged it with the file's sha256), by the policy in digits.gate.policy, with the thresholds that
digits.gate.governance says apply. Every version's score comes from its record in the registry
(digits.scoring.cache) when the record's key matches: the sha256 of the model's files as downloaded
now, of the test data, and of the metric code. The evaluate stage writes the new version's
record as it registers it; a version without a matching record (or without a section its
gates read) is scored here by the same scorer, from its weights artifact
(digits.scoring.registered), and its record written. So a pipeline run loads no torch.

The steps: the version judged (`judged_version`), the versions it is compared with
(`compete`), the verdict (digits.gate.policy.judge), the registry's tags and aliases
(`record`), the reports (`write_reports`) and the run's verdict (digits.tracking.runs).

Only a promotion-branch run moves `@champion`/`@previous`; elsewhere a version that passes is
approved and may become `@challenger`. Every version gets a description saying why, and the
verdict goes into the run that registered it (metric `gate/passed`, the report as an artifact).
The report also goes to `reports/gate.md` (for CI and people; not tracked by DVC: it names
registry versions, which differ between stores)."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from digits.core.errors import DigitsError
from digits.gate import governance
from digits.gate.policy import RELATIVE, Contest, Outcome, Verdict, judge, reads_wild, suites
from digits.scoring.cache import CACHE_TAG
from digits.scoring.registered import VersionScorer
from digits.scoring.wild import read as read_wild
from digits.tracking import registry

if TYPE_CHECKING:
    from digits.core.config import Params
    from digits.tracking.store import Store


class GateFailed(DigitsError):
    """Raised after the report is written, when at least one gate failed."""


class GateError(DigitsError):
    """The gate could not judge (no version to judge, a model that cannot be scored)."""


def run(params: Params) -> Outcome:
    """The `gate` stage / `digits gate` command. Raises GateFailed (exit 1) on any failure."""
    from digits.core.files import GATE_REPORT, MODEL, TEST_DATA
    from digits.data.preprocess import file_digest
    from digits.monitor.gatecheck import production_champion, with_feedback
    from digits.tracking import runs as tracking
    from digits.tracking.store import open_store

    production = params.mlflow.registered_model
    where = governance.tighten(governance.context(params), params.gates)
    wild = read_wild() if reads_wild(where.gates) else None  # before any scoring: it may be missing
    store = open_store(params.mlflow.experiment)
    with store.reading() as client:  # a team server's candidates model, else `production`
        name = registry.registers_in(client, production)
    test_sha256 = file_digest(TEST_DATA)
    version, run_id = judged_version(store, name, file_digest(MODEL))
    with tracking.active_run(store, run_id):  # a crash from here on marks the run FAILED
        with store.reading() as client:
            scorer = VersionScorer(
                client,
                name,
                TEST_DATA,
                test_sha256,
                suites(where.gates, params.evaluate.outliers_per_kind),
            )
            contest = compete(client, scorer, name, version, production)
            # the feedback hold-out's check is against the version in service
            served = production_champion(client, production, name, version)
        outcome = judge(name, contest, where, test_sha256, wild)
        # and the feedback hold-out, when there is one (digits.monitor.gatecheck)
        outcome = with_feedback(
            outcome, where.gates.alpha, params.feedback.holdout_share, production, served
        )
        outcome = record(store, scorer, outcome, run_id, production)
        text = write_reports(outcome, governance.advisory(params.gates, where.gates))
        model_card(store, params, outcome, run_id)
        tracking.log_gate(
            store,
            run_id,
            passed=not outcome.failed,
            verdict=outcome.verdict.value,
            thresholds=where.source,
            report=GATE_REPORT,
        )
    print(text)
    if outcome.failed:
        raise GateFailed("failed gates: " + "; ".join(c.reason() for c in outcome.failed))
    return outcome


def judged_version(store: Store, name: str, model_sha256: str) -> tuple[str, str]:
    """(the newest version registered from the model file the pipeline trained, the run that
    registered it)."""
    from digits.core.files import MODEL

    with store.reading() as client:
        version = registry.version_of_model(client, name, model_sha256)
        if version is None:
            raise GateError(
                f"{name}: no version registered from {MODEL} (sha256 {model_sha256[:12]}) in "
                f"{store.uri}; the evaluate stage registers it (dvc repro evaluate)"
            )
        return version, client.get_model_version(name, version).run_id


def compete(
    client, scorer: VersionScorer, name: str, version: str, production: str | None = None
) -> Contest:
    """The version's score, and the scores it is compared with: @champion's (when another
    version holds it) and the high-water mark (the most accurate champion there has been).
    With candidates apart (`name` is `production`'s candidates model) the production model's
    champions are judged as the candidates they were copied from."""
    production = production or name
    champion_version = _champion(client, name, production)
    new = scorer.score(version)
    champion = None
    if champion_version is not None and champion_version != version:
        champion = scorer.score(champion_version)
    ever = [
        registry.as_judged(client, production, name, v)
        for v in registry.ever_champions(client, production)
    ]
    past = [scorer.score(v) for v in ever if v is not None and v != version]
    high = max(past, key=lambda s: (s.accuracy, -int(s.version)), default=None)
    return Contest.of(new, champion_version, champion, high)


def write_reports(outcome: Outcome, advisory: list[tuple[str, object, object]]) -> str:
    """reports/gate.md (returned, to print) and reports/gate.json, the gate's DVC output."""
    from digits.core.files import GATE_REPORT, GATE_VERDICT, write_text
    from digits.gate import report

    text = report.report(outcome, advisory)
    write_text(GATE_REPORT, text)
    write_text(GATE_VERDICT, report.verdict_json(outcome.results))
    return text


def model_card(store: Store, params: Params, o: Outcome, run_id: str) -> None:
    """reports/model_card.md (digits.scoring.card) with the absolute checks as judged, into the
    run that registered the version and under the description `record` wrote."""
    from digits.core.files import METRICS
    from digits.scoring import card
    from digits.scoring.wild import WILD_METRICS

    missing = [str(p) for p in (METRICS, WILD_METRICS) if not p.exists()]
    if missing:  # `digits gate` outside a pipeline run: the gate's verdict stands without it
        print(f"gate: no model card: {', '.join(missing)} missing (the evaluate stage writes it)")
        return
    absolute = [c for c in o.results if c.gate not in RELATIVE]
    card.make(params, absolute, branch=o.where.branch)
    card.attach(store, o.name, o.version, run_id)


def _champion(client, name: str, production: str) -> str | None:
    current = registry.alias_version(client, production, registry.CHAMPION)
    return registry.as_judged(client, production, name, current)


def record(
    store: Store, scorer: VersionScorer, o: Outcome, run_id: str, production: str | None = None
) -> Outcome:
    """Write the verdict to the registry: score records, the version's status tags, the
    aliases it moves, its description. Returns the outcome with @challenger as it now is.
    Promoting a candidate (candidates apart) copies it into `production` and crowns the copy:
    on a team server only the release identity may (digits.tracking.store says so, a 403)."""
    from digits.gate import report

    name, version, where = o.name, o.version, o.where
    production = production or name
    with store.writing() as client:
        now = _champion(client, name, production)
        if now != o.contest.champion_version:
            raise GateError(
                f"{name}: @{registry.CHAMPION} moved from version {o.contest.champion_version} "
                f"to {now} while the gate ran; run it again to compare with the new champion"
            )
        for v, rec in scorer.to_cache.items():
            client.set_model_version_tag(name, v, CACHE_TAG, rec)
        tag = lambda k, val: client.set_model_version_tag(name, version, k, val)  # noqa: E731
        tag("gate.accuracy", str(o.contest.new.accuracy))
        tag("gate.thresholds", where.source)
        tag(registry.STATUS, registry.REJECTED if o.failed else registry.APPROVED)
        if o.failed:
            tag(registry.REASONS, "; ".join(c.reason() for c in o.failed))
        elif registry.REASONS in client.get_model_version(name, version).tags:
            client.delete_model_version_tag(name, version, registry.REASONS)
        if o.verdict is Verdict.PROMOTED:
            crowned = version
            if production != name:
                crowned = registry.copy_to_production(client, production, version)
            registry.record_promotion(
                client,
                production,
                crowned,
                by=f"gate: pipeline run on {where.branch}@{where.commit[:7]}",
                reason="passed the gate on a clean run of the promotion branch",
                via="gate",
            )
        o = replace(o, challenger=registry.update_challenger(client, name))
        text = report.description(o, run_id, store.experiment_id)
        client.update_model_version(name, version, text)
    return o
