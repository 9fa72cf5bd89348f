"""Promotion governance: who may move `@champion`, and by whose thresholds.

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

import datetime as dt
import getpass
import os
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from digits.config import GateParams, Params, parse_params
from digits.errors import DigitsError

CHAMPION, PREVIOUS, CHALLENGER = "champion", "previous", "challenger"
# version tags written when a version becomes champion: the record of who promoted it and why,
# and the set of versions that have ever been champion (the high-water mark's candidates)
PROMOTED_AT, PROMOTED_BY, PROMOTED_VIA = "promoted_at", "promoted_by", "promoted_via"
PROMOTION_REASON = "promotion_reason"
STATUS, APPROVED = "validation_status", "approved"


class PromotionError(DigitsError):
    pass


@dataclass(frozen=True)
class Context:
    """Where this gate runs, for promotion: the thresholds that judge, and whether it may
    move @champion (`why_not` says why not, in words for the report)."""

    branch: str  # the promotion branch
    gates: GateParams  # the thresholds applied: as committed on the promotion branch
    source: str  # where `gates` came from, e.g. "main@1a2b3c4:params.yaml"
    may_promote: bool
    why_not: str  # "" when may_promote
    commit: str  # HEAD's commit, "" outside git
    has_branch: bool  # the promotion branch exists in git


def git(root: Path, *args: str) -> subprocess.CompletedProcess | None:
    """Run git in `root`; None when git itself is not installed."""
    try:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)
    except OSError:
        return None


def _out(root: Path, *args: str) -> str | None:
    proc = git(root, *args)
    return proc.stdout.strip() if proc is not None and proc.returncode == 0 else None


def committed_params(root: Path, ref: str) -> dict | None:
    """params.yaml as committed at `ref`, parsed as YAML; None when it has none."""
    proc = git(root, "show", f"{ref}:params.yaml")
    if proc is None or proc.returncode != 0:
        return None
    try:
        raw = yaml.safe_load(proc.stdout)
    except yaml.YAMLError as e:
        raise PromotionError(
            f"{ref}:params.yaml: not valid YAML: {str(e).splitlines()[0]}"
        ) from None
    return raw if isinstance(raw, dict) else {}


def committed_gates(raw: dict, source: str) -> GateParams:
    # Only the gates section is judged: the rest of that commit's params may belong to a newer
    # or older version of the code, which is not this gate's business.
    return parse_params({"gates": raw.get("gates") or {}}, source).gates


def branch_ref(root: Path, branch: str) -> str | None:
    """The promotion branch's ref: local, else origin's (a CI checkout of a pull request has
    only a detached merge commit and the fetched `origin/<branch>`)."""
    for ref in (f"refs/heads/{branch}", f"refs/remotes/origin/{branch}"):
        if _out(root, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"):
            return ref
    return None


def dvc_outputs(root: Path) -> set[str]:
    """Paths the pipeline writes (outs, metrics, plots of every stage in dvc.yaml), and
    dvc.lock: changing them is the pipeline's own work, not an uncommitted change to it."""
    try:
        stages = (yaml.safe_load((root / "dvc.yaml").read_text()) or {}).get("stages") or {}
    except (OSError, yaml.YAMLError):
        return {"dvc.lock"}
    out = {"dvc.lock"}
    for stage in stages.values():
        for key in ("outs", "metrics", "plots"):
            for entry in (stage or {}).get(key) or []:
                out.add(next(iter(entry)) if isinstance(entry, dict) else str(entry))
    return {p.rstrip("/") for p in out}


def uncommitted(root: Path) -> list[str] | None:
    """Files that differ from HEAD (modified, staged, deleted or untracked; ignored files are
    not listed), less the pipeline's own outputs and the .gitignore files DVC writes beside
    them. None when git cannot tell."""
    top = _out(root, "rev-parse", "--show-toplevel")
    proc = git(root, "status", "--porcelain=v1", "-z", "--untracked-files=all")
    if top is None or proc is None or proc.returncode != 0:
        return None
    outputs = dvc_outputs(root)
    parents = {str(Path(p).parent) for p in outputs}
    fields = proc.stdout.split("\0")
    paths, i = [], 0
    while i < len(fields):
        entry = fields[i]
        i += 1
        if len(entry) < 4:
            continue
        paths.append(entry[3:])
        if "R" in entry[:2] or "C" in entry[:2]:  # a rename or copy: then the old path
            paths.append(fields[i])
            i += 1
    changed, root = [], root.resolve()
    for path in paths:
        rel = os.path.relpath(Path(top).resolve() / path, root)
        own = any(rel == o or rel.startswith(o + "/") for o in outputs)
        dvc_ignore = Path(rel).name == ".gitignore" and str(Path(rel).parent) in parents
        if not (own or dvc_ignore):
            changed.append(rel)
    return sorted(set(changed))


def _not_promotion_run(root: Path, branch: str) -> str:
    """Why this run may not promote ("" when it may)."""
    exp = os.environ.get("DVC_EXP_NAME")
    if exp:
        return f"this is DVC experiment `{exp}`"
    dvc_root = os.environ.get("DVC_ROOT")
    if dvc_root and Path(dvc_root).resolve() != Path.cwd().resolve():
        return "it runs in a temporary copy of the repository (a queued DVC experiment)"
    head = _out(root, "symbolic-ref", "--quiet", "--short", "HEAD")
    if not head:
        return f"HEAD is detached (not on `{branch}`)"
    if head != branch:
        return f"HEAD is on branch `{head}`, not `{branch}`"
    changed = uncommitted(root)
    if changed is None:
        return "git cannot tell whether the workspace is clean"
    if changed:
        more = f" (and {len(changed) - 3} more)" if len(changed) > 3 else ""
        return "the workspace has uncommitted changes: " + ", ".join(changed[:3]) + more
    return ""


def context(params: Params, root: Path | None = None) -> Context:
    """Who is running the gate, and by whose thresholds it judges."""
    from digits.files import repo_root

    root = root or repo_root()
    if _out(root, "rev-parse", "--is-inside-work-tree") != "true":
        return Context(
            params.gates.promotion_branch,
            params.gates,
            "this folder's params.yaml",
            False,
            f"{root} is not in a git repository, so there is no promotion branch "
            f"`{params.gates.promotion_branch}` to promote from",
            "",
            False,
        )
    commit = _out(root, "rev-parse", "HEAD") or ""
    # The branch is HEAD's committed setting: `-S gates.promotion_branch=...` cannot move it.
    head_raw = committed_params(root, "HEAD") if commit else None
    branch = params.gates.promotion_branch
    if head_raw is not None:  # HEAD's value, or the default: never the workspace's
        head = head_raw.get("gates") or {}
        only = {k: v for k, v in head.items() if k == "promotion_branch"}
        branch = committed_gates({"gates": only}, "HEAD:params.yaml").promotion_branch
    ref = branch_ref(root, branch)
    if ref is None:
        return Context(
            branch,
            params.gates,
            "this workspace's params.yaml",
            False,
            f"this git repository has no branch `{branch}` (the promotion branch) to "
            "promote from or to read thresholds from",
            commit,
            False,
        )
    raw = committed_params(root, ref)
    if raw is None:
        raise PromotionError(f"{branch}:params.yaml: not in git; the gate reads its thresholds")
    sha = _out(root, "rev-parse", "--short", f"{ref}^{{commit}}")
    gates = committed_gates(raw, f"{branch}:params.yaml")
    why = _not_promotion_run(root, branch)
    return Context(branch, gates, f"{branch}@{sha}:params.yaml", not why, why, commit, True)


# which way each threshold is stricter
STRICTER = {
    "min_accuracy": max,
    "max_loss": min,
    "min_class_recall": max,
    "max_accuracy_drop": min,
    "min_corruption_accuracy": max,
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


# --- the registry: aliases and the promotion record --------------------------------------------


def versions(client, name: str) -> list:
    return list(client.search_model_versions(f"name='{name}'"))


def alias_version(client, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def ever_champions(client, name: str) -> list[str]:
    """Versions that have been @champion: tagged when promoted, plus today's @champion and
    @previous (registries from before the tag was written)."""
    out = {str(v.version) for v in versions(client, name) if PROMOTED_AT in v.tags}
    out |= {v for a in (CHAMPION, PREVIOUS) if (v := alias_version(client, name, a))}
    return sorted(out, key=int)


def record_promotion(client, name: str, version: str, by: str, reason: str, via: str) -> str | None:
    """Move @champion to `version` and @previous to the champion it replaces; tag who, when,
    why and how. Returns the replaced champion's version (None if there was none). The caller
    holds the store lock and has checked that `version` is not the champion already."""
    old = alias_version(client, name, CHAMPION)
    if old is not None:
        client.set_registered_model_alias(name, PREVIOUS, old)
    client.set_registered_model_alias(name, CHAMPION, version)
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    record = {PROMOTED_AT: now, PROMOTED_BY: by, PROMOTION_REASON: reason, PROMOTED_VIA: via}
    for key, value in record.items():
        client.set_model_version_tag(name, version, key, value)
    return old


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
    newest), or remove it when there is none. The caller holds the store lock."""
    candidates = [
        v
        for v in versions(client, name)
        if v.tags.get(STATUS) == APPROVED and PROMOTED_AT not in v.tags
    ]
    best = max(candidates, key=lambda v: (accuracy_of(v), int(v.version)), default=None)
    current = alias_version(client, name, CHALLENGER)
    if best is None:
        if current is not None:
            client.delete_registered_model_alias(name, CHALLENGER)
        return None
    if current != str(best.version):
        client.set_registered_model_alias(name, CHALLENGER, str(best.version))
    return str(best.version)


def who() -> str:
    """The person running `digits promote`: git's user.name <user.email>, else the OS user."""
    from digits.files import repo_root

    root = repo_root()
    name, email = _out(root, "config", "user.name"), _out(root, "config", "user.email")
    if name:
        return f"{name} <{email}>" if email else name
    return getpass.getuser()


# --- `digits promote VERSION --reason TEXT` -----------------------------------------------------


def main(args) -> int:
    """Make an approved version @champion by hand, recording who, when and why."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from digits import tracking
    from digits.config import load_params

    reason = " ".join(args.reason.split())
    if not reason:
        raise PromotionError("--reason: expected a few words saying why (recorded on the version)")
    params = load_params(getattr(args, "params", "params.yaml"))
    name = params.mlflow.registered_model
    tracking.connect(params.mlflow.experiment)
    uri = tracking.tracking_uri()
    client = MlflowClient(uri)
    try:
        v = client.get_model_version(name, args.version)
    except MlflowException:
        raise PromotionError(f"{name} version {args.version}: not found in {uri}") from None
    status = v.tags.get(STATUS, "not gated")
    if status != APPROVED:
        why = v.tags.get("validation_reasons", "")
        raise PromotionError(
            f"{name} version {args.version} is {status}{f' ({why})' if why else ''}; only a "
            "version the gate approved can be promoted"
        )
    version = str(v.version)
    if alias_version(client, name, CHAMPION) == version:
        print(f"{name} version {version} is @{CHAMPION} already: nothing to do")
        return 0
    by = who()
    try:
        with tracking.store_lock(uri):
            old = record_promotion(client, name, version, by, reason, "digits promote")
            note = f"Promoted to @{CHAMPION} by {by}: {reason}"
            desc = (v.description or "").rstrip()
            client.update_model_version(name, version, (desc + "\n\n" + note).strip())
            update_challenger(client, name)
    except MlflowException as e:
        raise PromotionError(f"MLflow store {uri}: {str(e).splitlines()[0]}") from None
    was = f"version {old} is now @{PREVIOUS}" if old else "the first champion"
    print(f"{name} version {version} is now @{CHAMPION} ({was}); by {by}: {reason}")
    return 0
