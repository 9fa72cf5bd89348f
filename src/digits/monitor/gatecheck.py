"""The gate's hook for corrections: a version significantly worse than the champion on the
feedback hold-out (digits.monitor.stage) is refused, by the paired test the gate uses on
MNIST's test set (McNemar's exact one-sided test, `gates.alpha`). It is one more check beside
every MNIST gate, never instead of one: a flood of wrong labels may make the hold-out say
anything, but cannot make a version pass a gate on MNIST that it fails. No hold-out (no
approved corrections yet) or no champion: no check, and the gate's outputs stay as before.

The champion is the production model's `@champion`, the version in service, whichever model the
gate judges in: where a team server keeps candidates apart (digits.tracking.registry), the
version judged is a candidate, and the production champion may be a version no candidate was
copied from (registered before the candidates model, or promoted by hand); the corrections are
about what the service answered, so that is what the new version must not be worse than."""

from __future__ import annotations

import tempfile
from dataclasses import replace

import numpy as np

from digits.gate.policy import FEEDBACK_GATE, Check, Outcome, decide, mcnemar_p
from digits.monitor.stage import FeedbackSet, holdout_correct, load_feedback

GATE = FEEDBACK_GATE  # relative: not in reports/gate.json (its champion differs per store)


def _correct(model, data: FeedbackSet) -> np.ndarray:
    if hasattr(model, "answers"):
        return holdout_correct(model, data)
    probs = model.probabilities(data.x.astype(np.float32) / np.float32(255))
    return np.asarray(probs.argmax(1) == data.y, bool)  # a model that refuses nothing


def check(name: str, champion: str | None, alpha: float, share: float) -> Check | None:
    """The check of models/model.safetensors against version `champion` of model `name` on the
    hold-out."""
    from digits.core.files import MODEL
    from digits.model.inference import Classifier
    from digits.scoring.cache import download_model
    from digits.scoring.registered import load_version

    held = load_feedback()
    held = held.part(held.held_out(share))
    if champion is None or not len(held):
        return None
    new = holdout_correct(Classifier.from_file(MODEL), held)
    with tempfile.TemporaryDirectory(prefix="digits-gate-feedback-") as tmp:
        old = _correct(load_version(download_model(name, champion, tmp)), held)
    b, c = int((old & ~new).sum()), int((new & ~old).sum())
    return Check(
        gate=GATE,
        metric="McNemar one-sided p on the feedback hold-out",
        value=mcnemar_p(b, c),
        threshold=alpha,
        op=">=",
        note=f"vs champion v{champion} on {len(held)} held-out corrections: accuracy "
        f"{new.mean():.4f} vs {old.mean():.4f}; b = {b}, c = {c}",
        fmt=".4g",
    )


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
    """The outcome with the feedback check against `production`'s champion (`champion`, from
    `production_champion`) added, when there is one, and the verdict redone."""
    found = check(production, champion, alpha, share)
    if found is None:
        return outcome
    results = [*outcome.results, found]
    return replace(outcome, results=results,
                   verdict=decide(results, outcome.contest, outcome.where))  # fmt: skip
