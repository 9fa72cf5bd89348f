"""The `gate` stage: may the version just registered replace `@champion`?

It judges the newest version registered from the model file the pipeline trained (evaluate
tagged it with the file's sha256), by the policy in digits.gate.policy, with the thresholds that
digits.gate.governance says apply. Every version's score comes from its record in the registry
(digits.scoring.cache) when the record's key matches: the sha256 of the model's files as downloaded
now, of the test data, and of the metric code. The evaluate stage writes the new version's
record as it registers it; a version without a matching record is scored here, from its
weights artifact (digits.model.inference), and its record written. So a pipeline run loads no torch.

Only a promotion-branch run moves `@champion`/`@previous`; elsewhere a version that passes is
approved and may become `@challenger`. Every version gets a description saying why, and the
verdict goes into the run that registered it (metric `gate/passed`, the report as an artifact).
The report also goes to `reports/gate.md` (for CI and people; not tracked by DVC: it names
registry versions, which differ between stores)."""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from digits.core.errors import DigitsError
from digits.core.metrics import DIGITS, compute_metrics
from digits.gate import governance
from digits.gate.policy import Outcome, Verdict, checks, compare, decide
from digits.model.calibration import ece
from digits.scoring.cache import (
    CACHE_TAG,
    Score,
    cache_record,
    download_model,
    files_sha256,
    from_cache,
)
from digits.tracking import registry

if TYPE_CHECKING:
    from digits.core.config import Params


class GateFailed(DigitsError):
    """Raised after the report is written, when at least one gate failed."""


class GateError(DigitsError):
    """The gate could not judge (no version to judge, a model that cannot be scored)."""


class Scorer:
    """Scores registered versions of one model on one test set, each at most once per run:
    from its record when the key matches, else from its files (and then the record is due)."""

    def __init__(
        self,
        client,
        name: str,
        test_data: Path,
        test_sha256: str,
        *,
        robustness: bool = False,
        outliers_per_kind: int = 0,
    ):
        from digits.data.preprocess import load_labels

        self.client, self.name, self.test_data = client, name, test_data
        self.y = load_labels(test_data, "test")
        self.test_sha256 = test_sha256
        self.robustness = robustness  # score the corruption suite where a record lacks it
        self.outliers_per_kind = outliers_per_kind  # and the outlier suite (0: not needed)
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
            robust_ok = hit is not None and (hit.robustness is not None or not self.robustness)
            if robust_ok and ("ood" in hit.metrics or not self.outliers_per_kind):
                return hit
            predict, threshold = self._predictor(local)
            x = self._images()
            probs = predict(x)
            metrics = compute_metrics(probs, self.y)
            metrics["calibration"] = {"ece": round(ece(probs, self.y), DIGITS)}
            if self.outliers_per_kind:
                from digits.data import outliers
                from digits.model import ood

                suite = outliers.outlier_set("suite", self.outliers_per_kind, x)
                suite_probs = {kind: predict(images) for kind, images in suite.items()}
                metrics["ood"] = ood.measure(probs, suite_probs, threshold)
            robustness = None
            if self.robustness:
                from digits.scoring.robustness import corruption_accuracies

                robustness = corruption_accuracies(predict, x, self.y)
        score = Score(
            version=version,
            metrics=metrics,
            correct=probs.argmax(1) == self.y,
            model_sha256=sha,
            robustness=robustness,
        )
        self.to_cache[version] = cache_record(score, self.test_sha256)
        return score

    def _images(self) -> np.ndarray:
        from digits.data.preprocess import load_arrays

        return load_arrays(self.test_data, "test")[0]

    @staticmethod
    def _predictor(local: Path):
        """(probabilities of the version in `local`, its refusal threshold): its weights through
        digits.model.inference, or, for a version of an earlier format, the model loaded as users
        load it (pyfunc; it refuses nothing)."""
        from digits.model.inference import weights_in

        weights = weights_in(local)
        if weights is not None:
            from digits.model.inference import Classifier

            classifier = Classifier.from_file(weights)
            return classifier.probabilities, classifier.threshold
        import mlflow.pyfunc

        model = mlflow.pyfunc.load_model(str(local))
        return (lambda x: np.asarray(model.predict(np.asarray(x, np.float32)))), 0.0


def run(params: Params) -> Outcome:
    """The `gate` stage / `digits gate` command. Raises GateFailed (exit 1) on any failure."""
    from digits.core.files import GATE_REPORT, GATE_VERDICT, MODEL, TEST_DATA, write_text
    from digits.data.preprocess import file_digest
    from digits.gate import report as gate_report
    from digits.tracking import runs as tracking
    from digits.tracking.store import open_store

    name = params.mlflow.registered_model
    ctx = governance.tighten(governance.context(params), params.gates)
    store = open_store(params.mlflow.experiment)
    model_sha256, test_sha256 = file_digest(MODEL), file_digest(TEST_DATA)
    with store.reading() as client:
        version = registry.version_of_model(client, name, model_sha256)
        if version is None:
            raise GateError(
                f"{name}: no version registered from {MODEL} (sha256 {model_sha256[:12]}) in "
                f"{store.uri}; the evaluate stage registers it (dvc repro evaluate)"
            )
        run_id = client.get_model_version(name, version).run_id

    with tracking.active_run(store, run_id):  # a crash from here on marks the run FAILED
        with store.reading() as client:
            g = ctx.gates
            scorer = Scorer(
                client,
                name,
                TEST_DATA,
                test_sha256,
                robustness=g.min_corruption_accuracy > 0,
                outliers_per_kind=(
                    params.evaluate.outliers_per_kind
                    if min(g.max_ood_fpr95, g.max_refused_digits) < 1
                    else 0
                ),
            )
            champ = registry.alias_version(client, name, registry.CHAMPION)
            new = scorer.score(version)
            champion = scorer.score(champ) if champ not in (None, version) else None
            comparison = compare(champion, new) if champion is not None else None
            past = [scorer.score(v) for v in registry.ever_champions(client, name) if v != version]
            high = max(past, key=lambda s: (s.accuracy, -int(s.version)), default=None)
        results = checks(ctx.gates, new, comparison=comparison, high=high)
        outcome = Outcome(
            name=name,
            version=version,
            new=new,
            results=results,
            thresholds=ctx.source,
            branch=ctx.branch,
            has_branch=ctx.has_branch,
            why_not=ctx.why_not,
            commit=ctx.commit,
            test_sha256=test_sha256,
            champion=champion,
            comparison=comparison,
            high=high,
            champion_version=champ,
            verdict=decide(
                bool([c for c in results if not c.passed]), champ == version, ctx.may_promote
            ),
        )
        outcome = _record(store, ctx, scorer, outcome, run_id)
        text = gate_report.report(outcome, governance.advisory(params.gates, ctx.gates))
        write_text(GATE_REPORT, text)
        write_text(GATE_VERDICT, verdict_json(results))
        tracking.log_gate(store, run_id, outcome, GATE_REPORT)
    print(text)
    if outcome.failed:
        raise GateFailed("failed gates: " + "; ".join(c.reason() for c in outcome.failed))
    return outcome


# the checks that compare with other versions of this store (@champion, the high-water mark)
RELATIVE = frozenset({"not_worse_than_champion", "max_accuracy_drop"})


def verdict_json(results) -> str:
    """The gate's DVC output: the absolute checks (value, threshold, passed), which depend on
    the model, the test data and the thresholds alone, so the file is the same bytes on every
    machine and in every store. Its being missing is what makes DVC run the gate in a fresh
    clone, whose store has never judged the model (the lock alone would skip it)."""
    import json

    gates = {
        c.gate: {"metric": c.metric, "value": round(c.value, 6), "threshold": c.threshold,
                 "op": c.op, "passed": c.passed}
        for c in results
        if c.gate not in RELATIVE
    }  # fmt: skip
    record = {"passed": all(g["passed"] for g in gates.values()), "gates": gates}
    return json.dumps(record, indent=2) + "\n"


def _record(store, ctx, scorer: Scorer, o: Outcome, run_id: str) -> Outcome:
    """Write the verdict to the registry: score records, the version's status tags, the
    aliases it moves, its description. Returns the outcome with @challenger as it now is."""
    from digits.gate import report as gate_report

    name, version = o.name, o.version
    with store.writing() as client:
        now = registry.alias_version(client, name, registry.CHAMPION)
        if now != o.champion_version:
            raise GateError(
                f"{name}: @{registry.CHAMPION} moved from version {o.champion_version} to {now} "
                "while the gate ran; run it again to compare with the new champion"
            )
        for v, record in scorer.to_cache.items():
            client.set_model_version_tag(name, v, CACHE_TAG, record)
        tag = lambda k, val: client.set_model_version_tag(name, version, k, val)  # noqa: E731
        tag("gate.accuracy", str(o.new.accuracy))
        tag("gate.thresholds", ctx.source)
        tag(registry.STATUS, registry.REJECTED if o.failed else registry.APPROVED)
        if o.failed:
            tag(registry.REASONS, "; ".join(c.reason() for c in o.failed))
        elif registry.REASONS in client.get_model_version(name, version).tags:
            client.delete_model_version_tag(name, version, registry.REASONS)
        if o.verdict is Verdict.PROMOTED:
            registry.record_promotion(
                client,
                name,
                version,
                by=f"gate: pipeline run on {ctx.branch}@{ctx.commit[:7]}",
                reason="passed the gate on a clean run of the promotion branch",
                via="gate",
            )
        o = replace(o, challenger=registry.update_challenger(client, name))
        client.update_model_version(
            name, version, gate_report.description(o, run_id, store.experiment_id)
        )
    return o
