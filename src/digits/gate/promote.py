"""`digits promote VERSION --reason TEXT`: a person makes an approved version `@champion`, and
the registry records who, when and why (digits.tracking.registry). `digits promote --rollback
--reason TEXT` puts back the champion before the current one (the one it replaced when it was
promoted), under the same rules: a reason, an approved version, the store's write lock. The
rules of who may promote what are digits.gate.governance's; this command is the one way around
the gate's own promotions, and no pipeline stage imports it (editing it makes no stage stale).

On a team server that keeps candidates apart (`<name>-candidates`, digits.tracking.registry),
VERSION is the candidate's: it is copied into the production model (once) and that copy
becomes `@champion`; the server lets only the release identity do either (docs/team.md)."""

from __future__ import annotations

from digits.core import provenance
from digits.core.config import load_params
from digits.core.errors import DigitsError
from digits.tracking import registry


class PromotionError(DigitsError):
    pass


def main(args) -> int:
    """`digits promote VERSION --reason TEXT`: make an approved version @champion by hand,
    recording who, when and why; `--rollback` instead of VERSION: the champion before."""
    from digits.core.files import repo_root
    from digits.tracking.store import open_store

    rollback = getattr(args, "rollback", False)
    if rollback == (args.version is not None):
        raise PromotionError(
            "expected a VERSION to promote, or --rollback (the champion before the current "
            "one), not both"
            if rollback
            else "expected a VERSION to promote, or --rollback"
        )
    reason = " ".join(args.reason.split())
    if not reason:
        raise PromotionError("--reason: expected a few words saying why (recorded on the version)")
    params = load_params(getattr(args, "params", "params.yaml"))
    name = params.mlflow.registered_model
    store = open_store(params.mlflow.experiment)
    if rollback:
        return _rollback(store, name, reason, provenance.who(repo_root()))
    with store.reading() as client:
        separate = registry.has_candidates(client, name)
    if separate:  # a team server: VERSION is a candidate's, copied into production to promote
        v = _approved(store, registry.candidates_of(name), args.version)
        with store.writing() as client:
            version = registry.copy_to_production(client, name, str(v.version))
            v = client.get_model_version(name, version)
        print(f"{registry.candidates_of(name)} version {args.version} is {name} version {version}")
    else:
        v = _approved(store, name, args.version)
    version = str(v.version)
    if registry.alias_version(store.client, name, registry.CHAMPION) == version:
        print(f"{name} version {version} is @{registry.CHAMPION} already: nothing to do")
        return 0
    by = provenance.who(repo_root())
    with store.writing() as client:
        old = registry.record_promotion(
            client, name, version, by=by, reason=reason, via="digits promote"
        )
        note = f"Promoted to @{registry.CHAMPION} by {by}: {reason}"
        desc = (v.description or "").rstrip()
        client.update_model_version(name, version, (desc + "\n\n" + note).strip())
        registry.update_challenger(client, name)
    was = f"version {old} is now @{registry.PREVIOUS}" if old else "the first champion"
    print(f"{name} version {version} is now @{registry.CHAMPION} ({was}); by {by}: {reason}")
    return 0


def _approved(store, name: str, version: str):
    """The registered version, which the gate must have approved."""
    from mlflow.exceptions import MlflowException

    try:
        v = store.client.get_model_version(name, version)
    except MlflowException:
        raise PromotionError(f"{name} version {version}: not found in {store.uri}") from None
    status = v.tags.get(registry.STATUS, "not gated")
    if status != registry.APPROVED:
        why = v.tags.get(registry.REASONS, "")
        raise PromotionError(
            f"{name} version {version} is {status}{f' ({why})' if why else ''}; only a "
            "version the gate approved can be promoted"
        )
    return v


def _rollback(store, name: str, reason: str, by: str) -> int:
    """Put back the champion the current one replaced; say from which version to which."""
    current, back = registry.champion_before(store.client, name)
    if current is None:
        raise PromotionError(
            f"{name} has no @{registry.CHAMPION} in {store.uri}: nothing to roll back"
        )
    if back is None:
        raise PromotionError(
            f"{name} version {current} was the first @{registry.CHAMPION}: there is no champion "
            "before it to roll back to"
        )
    v = _approved(store, name, back)
    with store.writing() as client:
        # the champion may have moved while we looked: roll back what is champion now
        if registry.alias_version(client, name, registry.CHAMPION) != current:
            raise PromotionError(
                f"{name} @{registry.CHAMPION} moved while rolling back; run the command again"
            )
        registry.record_rollback(client, name, current, back, by=by, reason=reason)
        note = (
            f"Put back as @{registry.CHAMPION} (rollback from version {current}) by {by}: {reason}"
        )
        desc = (v.description or "").rstrip()
        client.update_model_version(name, back, (desc + "\n\n" + note).strip())
        registry.update_challenger(client, name)
    print(
        f"{name}: @{registry.CHAMPION} rolled back from version {current} to version {back} "
        f"(version {current} is now @{registry.PREVIOUS}); by {by}: {reason}"
    )
    return 0
