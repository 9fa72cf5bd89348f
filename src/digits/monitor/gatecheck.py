"""The gate's hook for corrections: a version significantly worse than the champion on the
feedback hold-out (digits.monitor.stage) is refused, by the paired test the gate uses on
MNIST's test set (McNemar's exact one-sided test, `gates.alpha`). It is one more check beside
every MNIST gate, never instead of one: a flood of wrong labels may make the hold-out say
anything, but cannot make a version pass a gate on MNIST that it fails. No hold-out (no
approved corrections yet) or no champion: no check, and the gate's outputs stay as before.

A second check guards against labels forced into the set past review: the hold-out can only
vouch for the set it is part of, and a flood of wrong labels for a style MNIST does not have
leaves it unable to tell, or even makes it favour the poisoned version (the MNIST gates do not
see it either: measured in tests/test_loop_retrain.py, docs/production-loop.md). So the version
must also not be significantly worse than the champion on the hold-out the champion was judged
on, with the labels it had then (the evaluate stage logs it into the version's run,
`feedback/holdout.npz`): a new export can add corrections, but not overrule those already in
service. A champion made without a hold-out has none, and then this check is left out.

The champion is the production model's `@champion`, the version in service, whichever model the
gate judges in: where a team server keeps candidates apart (digits.tracking.registry), the
version judged is a candidate, and the production champion may be a version no candidate was
copied from (registered before the candidates model, or promoted by hand); the corrections are
about what the service answered, so that is what the new version must not be worse than."""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from digits.gate.policy import FEEDBACK_GATE, FEEDBACK_KEPT_GATE, Check, Outcome, decide, mcnemar_p
from digits.monitor.stage import (
    HOLDOUT_DIR,
    HOLDOUT_FILE,
    FeedbackSet,
    holdout_correct,
    load_feedback,
)

GATE = FEEDBACK_GATE  # relative: not in reports/gate.json (its champion differs per store)
KEPT_GATE = FEEDBACK_KEPT_GATE


def _correct(model, data: FeedbackSet) -> np.ndarray:
    if hasattr(model, "answers"):
        return holdout_correct(model, data)
    probs = model.probabilities(data.x.astype(np.float32) / np.float32(255))
    return np.asarray(probs.argmax(1) == data.y, bool)  # a model that refuses nothing


def _paired(gate: str, what: str, new: np.ndarray, old: np.ndarray, champion: str, alpha: float):
    b, c = int((old & ~new).sum()), int((new & ~old).sum())
    return Check(
        gate=gate,
        metric=f"McNemar one-sided p on {what}",
        value=mcnemar_p(b, c),
        threshold=alpha,
        op=">=",
        note=f"vs champion v{champion} on {len(new)} held-out corrections: accuracy "
        f"{new.mean():.4f} vs {old.mean():.4f}; b = {b}, c = {c}",
        fmt=".4g",
    )


def champions_holdout(name: str, champion: str, dst: str) -> FeedbackSet | None:
    """The hold-out version `champion` of `name` was judged on (its run's artifact), or None."""
    import mlflow

    client = mlflow.MlflowClient()
    run_id = client.get_model_version(name, champion).run_id
    if not run_id:
        return None
    logged = {a.path for a in client.list_artifacts(run_id, HOLDOUT_DIR)}
    if f"{HOLDOUT_DIR}/{HOLDOUT_FILE}" not in logged:
        return None
    local = mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path=f"{HOLDOUT_DIR}/{HOLDOUT_FILE}", dst_path=dst
    )
    return load_feedback(Path(local))


def checks(name: str, champion: str | None, alpha: float, share: float) -> list[Check]:
    """The checks of models/model.safetensors against version `champion` of model `name`: on
    this feedback set's hold-out, and on the hold-out the champion was judged on."""
    from digits.core.files import MODEL
    from digits.model.inference import Classifier
    from digits.scoring.cache import download_model
    from digits.scoring.registered import load_version

    held = load_feedback()
    held = held.part(held.held_out(share))
    if champion is None:
        return []
    out = []
    with tempfile.TemporaryDirectory(prefix="digits-gate-feedback-") as tmp:
        kept = champions_holdout(name, champion, tmp)
        if not len(held) and (kept is None or not len(kept)):
            return []
        new_model = Classifier.from_file(MODEL)
        old_model = load_version(download_model(name, champion, tmp))
        if len(held):
            new, old = holdout_correct(new_model, held), _correct(old_model, held)
            out.append(_paired(GATE, "the feedback hold-out", new, old, champion, alpha))
        if kept is not None and len(kept):
            new, old = holdout_correct(new_model, kept), _correct(old_model, kept)
            out.append(_paired(KEPT_GATE, "the champion's hold-out", new, old, champion, alpha))
    return out


def check(name: str, champion: str | None, alpha: float, share: float) -> Check | None:
    """The check on this feedback set's hold-out alone (None: no hold-out, or no champion)."""
    return next((c for c in checks(name, champion, alpha, share) if c.gate == GATE), None)


def production_champion(client, production: str, judged: str, version: str) -> str | None:
    """The production model's @champion, None when there is none or it is the version judged
    (`version` of model `judged`, itself or the candidate the champion was copied from)."""
    from digits.tracking import registry

    champion = registry.alias_version(client, production, registry.CHAMPION)
    if champion is None or registry.as_judged(client, production, judged, champion) == version:
        return None
    return champion


def with_feedback(
    outcome: Outcome, alpha: float, share: float, production: str, champion: str | None
) -> Outcome:
    """The outcome with the feedback checks against `production`'s champion (`champion`, from
    `production_champion`) added, when there are any, and the verdict redone."""
    found = checks(production, champion, alpha, share)
    if not found:
        return outcome
    results = [*outcome.results, *found]
    return replace(outcome, results=results,
                   verdict=decide(results, outcome.contest, outcome.where))  # fmt: skip
