"""The model registry's aliases and promotion record: which version is `@champion`,
`@previous` and `@challenger`, who promoted a version, when and why, and which versions were
ever champion (the high-water mark's candidates). Each function takes an MlflowClient; the
caller holds the store's write lock (digits.tracking.store) around those that write.

What each version scored is its score record, beside this in digits.scoring.cache."""

from __future__ import annotations

import datetime as dt

CHAMPION, PREVIOUS, CHALLENGER = "champion", "previous", "challenger"
# version tags written when a version becomes champion: the record of who promoted it and why
PROMOTED_AT, PROMOTED_BY, PROMOTED_VIA = "promoted_at", "promoted_by", "promoted_via"
PROMOTION_REASON = "promotion_reason"
# the champion a version replaced when it was promoted ("" for the first): the chain that
# `digits promote --rollback` walks back
PROMOTED_OVER = "promoted_over"
# on a version `digits promote --rollback` took @champion from: who, when and why
ROLLED_BACK_AT, ROLLED_BACK_BY, ROLLBACK_REASON = (
    "rolled_back_at",
    "rolled_back_by",
    "rollback_reason",
)
STATUS, APPROVED, REJECTED = "validation_status", "approved", "rejected"
# A team server with logins (`digits server`) keeps every version the pipeline registers in
# `<name>-candidates`, and the production model `<name>` only the release identity may change;
# promoting copies a candidate in (copy_model_version: its tags and run kept), tagged with
# where it came from, and the candidate with where it went.
CANDIDATES_SUFFIX = "-candidates"
COPIED_FROM, PROMOTED_AS = "digits.copied_from", "digits.promoted_as"
REASONS = "validation_reasons"
MODEL_TAG = "digits.model_sha256"  # the weights file a version was registered from


def versions(client, name: str) -> list:
    return list(client.search_model_versions(f"name='{name}'"))


def alias_version(client, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def version_of_model(client, name: str, model_sha256: str) -> str | None:
    """The newest version registered from the weights file with that sha256 (what the gate
    judges after evaluate registered it), None if there is none."""
    found = [
        int(v.version) for v in versions(client, name) if v.tags.get(MODEL_TAG) == model_sha256
    ]
    return str(max(found)) if found else None


def ever_champions(client, name: str) -> list[str]:
    """Versions that have been @champion: tagged when promoted, plus today's @champion and
    @previous (registries from before the tag was written)."""
    out = {str(v.version) for v in versions(client, name) if PROMOTED_AT in v.tags}
    out |= {v for a in (CHAMPION, PREVIOUS) if (v := alias_version(client, name, a))}
    return sorted(out, key=int)


def record_promotion(
    client, name: str, version: str, *, by: str, reason: str, via: str
) -> str | None:
    """Move @champion to `version` and @previous to the champion it replaces; tag who, when,
    why and how. Returns the replaced champion's version (None if there was none). The caller
    has checked that `version` is not the champion already."""
    old = alias_version(client, name, CHAMPION)
    if old is not None:
        client.set_registered_model_alias(name, PREVIOUS, old)
    client.set_registered_model_alias(name, CHAMPION, version)
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    record = {PROMOTED_AT: now, PROMOTED_BY: by, PROMOTION_REASON: reason, PROMOTED_VIA: via}
    record[PROMOTED_OVER] = old or ""
    for key, value in record.items():
        client.set_model_version_tag(name, version, key, value)
    return old


def champion_before(client, name: str) -> tuple[str | None, str | None]:
    """(@champion, the champion before it): the version the current champion replaced when
    it was promoted (its PROMOTED_OVER tag); for a champion promoted before that tag was
    written, the version promoted last before it (PROMOTED_AT), else @previous."""
    current = alias_version(client, name, CHAMPION)
    if current is None:
        return None, None
    tags = client.get_model_version(name, current).tags
    if PROMOTED_OVER in tags:
        return current, tags[PROMOTED_OVER] or None
    when = tags.get(PROMOTED_AT)
    earlier = [
        v
        for v in versions(client, name)
        if PROMOTED_AT in v.tags
        and str(v.version) != current
        and (when is None or v.tags[PROMOTED_AT] <= when)
        and not v.tags.get(ROLLED_BACK_AT, "") >= v.tags[PROMOTED_AT]  # taken back since
    ]
    if earlier:
        best = max(earlier, key=lambda v: (v.tags[PROMOTED_AT], int(v.version)))
        return current, str(best.version)
    return current, alias_version(client, name, PREVIOUS)


def record_rollback(client, name: str, current: str, back: str, *, by: str, reason: str) -> None:
    """Move @champion from `current` back to `back` (the champion before it) and @previous to
    `current`; tag both. `back` keeps the record of the champion it replaced itself, so a second
    rollback goes one further back rather than undoing the first."""
    kept = client.get_model_version(name, back).tags.get(PROMOTED_OVER)
    record_promotion(client, name, back, by=by, reason=reason, via="digits promote --rollback")
    if kept is not None:
        client.set_model_version_tag(name, back, PROMOTED_OVER, kept)
    else:  # a champion from before the tag: its own predecessor is not known
        client.delete_model_version_tag(name, back, PROMOTED_OVER)
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    for key, value in {ROLLED_BACK_AT: now, ROLLED_BACK_BY: by, ROLLBACK_REASON: reason}.items():
        client.set_model_version_tag(name, current, key, value)


def accuracy_of(v) -> float:
    """A version's test accuracy as its tags record it (the gate's fresh score, else the one
    evaluate logged); -1 when unknown."""
    for key in ("gate.accuracy", "test_accuracy"):
        try:
            return float(v.tags[key])
        except (KeyError, ValueError):
            continue
    return -1.0


def update_challenger(client, name: str) -> str | None:
    """Point @challenger at the best approved version never promoted (most accurate, then
    newest), or remove it when there is none."""
    candidates = [
        v
        for v in versions(client, name)
        if v.tags.get(STATUS) == APPROVED and PROMOTED_AT not in v.tags
        and PROMOTED_AS not in v.tags  # a candidate copied into production was promoted
    ]  # fmt: skip
    best = max(candidates, key=lambda v: (accuracy_of(v), int(v.version)), default=None)
    current = alias_version(client, name, CHALLENGER)
    if best is None:
        if current is not None:
            client.delete_registered_model_alias(name, CHALLENGER)
        return None
    if current != str(best.version):
        client.set_registered_model_alias(name, CHALLENGER, str(best.version))
    return str(best.version)


def candidates_of(name: str) -> str:
    return name + CANDIDATES_SUFFIX


def has_candidates(client, name: str) -> bool:
    """Whether the store keeps candidates apart from the production model `name` (a team
    server set up by `digits server`, which creates both); a local store does not."""
    return bool(client.search_registered_models(f"name='{candidates_of(name)}'"))


def copy_to_production(client, name: str, candidate: str) -> str:
    """The production model's version holding candidate version `candidate`: the one copied
    from it before, else a new copy. Returns its version."""
    source = candidates_of(name)
    origin = f"{source}/{candidate}"
    for v in versions(client, name):
        if v.tags.get(COPIED_FROM) == origin:
            return str(v.version)
    copied = str(client.copy_model_version(f"models:/{origin}", name).version)
    client.set_model_version_tag(name, copied, COPIED_FROM, origin)
    client.set_model_version_tag(source, candidate, PROMOTED_AS, f"{name}/{copied}")
    return copied


def registers_in(client, name: str) -> str:
    """The model the pipeline registers its versions in and the gate judges: the candidates
    model where the store keeps one apart (a team server), else the production model `name`."""
    return candidates_of(name) if has_candidates(client, name) else name


def as_judged(client, production: str, judged: str, version: str | None) -> str | None:
    """A version of the production model as the judged model numbers it: itself when they are
    one model, else the candidate it was copied from (None for one that was not)."""
    if version is None or judged == production:
        return version
    source, _, number = (
        client.get_model_version(production, version).tags.get(COPIED_FROM, "").rpartition("/")
    )
    return number if source == judged else None
