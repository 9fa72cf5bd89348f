"""`digits promote VERSION --reason TEXT`: a person makes an approved version `@champion`, and
the registry records who, when and why (digits.tracking.registry). The rules of who may promote what
are digits.gate.governance's; this command is the one way around the gate's own promotions, and no
pipeline stage imports it (editing it makes no stage stale)."""

from __future__ import annotations

from digits.core import provenance
from digits.core.config import load_params
from digits.core.errors import DigitsError
from digits.tracking import registry


class PromotionError(DigitsError):
    pass


def main(args) -> int:
    """`digits promote VERSION --reason TEXT`: make an approved version @champion by hand,
    recording who, when and why."""
    from digits.core.files import repo_root
    from digits.tracking.store import open_store

    reason = " ".join(args.reason.split())
    if not reason:
        raise PromotionError("--reason: expected a few words saying why (recorded on the version)")
    params = load_params(getattr(args, "params", "params.yaml"))
    name = params.mlflow.registered_model
    store = open_store(params.mlflow.experiment)
    from mlflow.exceptions import MlflowException

    try:
        v = store.client.get_model_version(name, args.version)
    except MlflowException:
        raise PromotionError(f"{name} version {args.version}: not found in {store.uri}") from None
    status = v.tags.get(registry.STATUS, "not gated")
    if status != registry.APPROVED:
        why = v.tags.get(registry.REASONS, "")
        raise PromotionError(
            f"{name} version {args.version} is {status}{f' ({why})' if why else ''}; only a "
            "version the gate approved can be promoted"
        )
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
