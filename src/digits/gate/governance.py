"""Promotion governance: who may move `@champion`, and by whose thresholds (what the gate
asks before it acts; the `digits promote` command is digits.gate.promote, which no stage imports).

Anyone may register and gate a version (experiments, other branches, a dirty workspace), but
only two things move the production aliases `@champion` / `@previous`:

- the gate in a pipeline run on a clean, committed state of the promotion branch
  (`gates.promotion_branch`, `main` by default), not inside a DVC experiment;
- a person, with `digits promote VERSION --reason TEXT` (recorded as tags: who, when, why).

Elsewhere a version that passes gets `@challenger` when it is the best approved version not yet
promoted, and the gate report says it "would be promoted from main". The gate judges by the
`gates` committed on the promotion branch (read from git), so `dvc exp run -S gates.x=...`
cannot loosen them; it may tighten them (`tighten`): an experiment can ask more of its own
model, never less. A looser value is shown in the report as advisory only."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from digits.core import provenance
from digits.core.config import GateParams, Params, parse_params
from digits.core.errors import DigitsError
from digits.core.settings import DVC_EXP_NAME, DVC_ROOT


class GovernanceError(DigitsError):
    pass


@dataclass(frozen=True, kw_only=True)
class Context:
    """Where this gate runs, for promotion: the thresholds that judge, and whether it may
    move @champion (`why_not` says why not, in words for the report)."""

    branch: str  # the promotion branch
    gates: GateParams  # the thresholds applied: as committed on the promotion branch
    source: str  # where `gates` came from, e.g. "main@1a2b3c4:params.yaml"
    may_promote: bool = False
    why_not: str = ""  # "" when may_promote
    commit: str = ""  # HEAD's commit, "" outside git
    has_branch: bool = False  # the promotion branch exists in git


def committed_gates(raw: dict, source: str) -> GateParams:
    # Only the gates section is judged: the rest of that commit's params may belong to a newer
    # or older version of the code, which is not this gate's business.
    return parse_params({"gates": raw.get("gates") or {}}, source).gates


def _not_promotion_run(root: Path, branch: str) -> str:
    """Why this run may not promote ("" when it may)."""
    if exp := DVC_EXP_NAME.get():
        return f"this is DVC experiment `{exp}`"
    dvc_root = DVC_ROOT.get()
    if dvc_root and Path(dvc_root).resolve() != Path.cwd().resolve():
        return "it runs in a temporary copy of the repository (a queued DVC experiment)"
    head = provenance.head_branch(root)
    if not head:
        return f"HEAD is detached (not on `{branch}`)"
    if head != branch:
        return f"HEAD is on branch `{head}`, not `{branch}`"
    changed = provenance.uncommitted(root)
    if changed is None:
        return "git cannot tell whether the workspace is clean"
    if changed:
        more = f" (and {len(changed) - 3} more)" if len(changed) > 3 else ""
        return "the workspace has uncommitted changes: " + ", ".join(changed[:3]) + more
    return ""


def context(params: Params, root: Path | None = None) -> Context:
    """Who is running the gate, and by whose thresholds it judges."""
    from digits.core.files import repo_root

    root = root or repo_root()
    branch = params.gates.promotion_branch
    if not provenance.is_repository(root):
        return Context(
            branch=branch,
            gates=params.gates,
            source="this folder's params.yaml",
            why_not=f"{root} is not in a git repository, so there is no promotion branch "
            f"`{branch}` to promote from",
        )
    commit = provenance.head_commit(root)
    # The branch is HEAD's committed setting: `-S gates.promotion_branch=...` cannot move it.
    head_raw = provenance.committed_params(root, "HEAD") if commit else None
    if head_raw is not None:  # HEAD's value, or the default: never the workspace's
        head = head_raw.get("gates") or {}
        only = {k: v for k, v in head.items() if k == "promotion_branch"}
        branch = committed_gates({"gates": only}, "HEAD:params.yaml").promotion_branch
    ref = provenance.branch_ref(root, branch)
    if ref is None:
        return Context(
            branch=branch,
            gates=params.gates,
            source="this workspace's params.yaml",
            why_not=f"this git repository has no branch `{branch}` (the promotion branch) to "
            "promote from or to read thresholds from",
            commit=commit,
        )
    raw = provenance.committed_params(root, ref)
    if raw is None:
        raise GovernanceError(f"{branch}:params.yaml: not in git; the gate reads its thresholds")
    why = _not_promotion_run(root, branch)
    return Context(
        branch=branch,
        gates=committed_gates(raw, f"{branch}:params.yaml"),
        source=f"{branch}@{provenance.short(root, ref)}:params.yaml",
        may_promote=not why,
        why_not=why,
        commit=commit,
        has_branch=True,
    )


# which way each threshold is stricter
STRICTER = {
    "min_accuracy": max,
    "max_loss": min,
    "min_class_recall": max,
    "max_accuracy_drop": min,
    "min_corruption_accuracy": max,
    "max_ece": min,
    "max_ood_fpr95": min,
    "max_refused_digits": min,
    "min_wild_read": max,
    "max_wild_refused": min,
    "min_wild_refused_non_digits": max,
    "alpha": max,  # passes when p >= alpha: a larger alpha rejects more
}


def tighten(ctx: Context, workspace: GateParams) -> Context:
    """`ctx` with each threshold the workspace sets stricter than the promotion branch taken
    from the workspace (say `make accurate`'s `-S gates.min_corruption_accuracy=0.95`), and
    its source saying so. Looser values are not applied (`advisory` lists them)."""
    applied, mine = ctx.gates.model_dump(), workspace.model_dump()
    taken = []
    for key, stricter in STRICTER.items():
        value = stricter(applied[key], mine[key])
        if value != applied[key]:
            applied[key] = value
            taken.append(f"{key} {value}")
    if not taken:
        return ctx
    source = f"{ctx.source}, tightened by this workspace: {', '.join(taken)}"
    return replace(ctx, gates=GateParams(**applied), source=source)


def advisory(workspace: GateParams, applied: GateParams) -> list[tuple[str, object, object]]:
    """(key, workspace value, applied value) for every gate the workspace sets differently."""
    mine, theirs = workspace.model_dump(), applied.model_dump()
    return [(k, mine[k], theirs[k]) for k in mine if mine[k] != theirs[k]]
