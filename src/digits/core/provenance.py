"""Where a pipeline run came from, as git tells it: one runner for every git command, and the
facts built on it (commit, branch, uncommitted files, the promotion branch's params, who is
promoting). Read in the repository DVC runs us for (DVC_ROOT: for a queued experiment the
parent repository, not its temporary copy).

Imports only the standard library and PyYAML: the gate and `digits promote` read git without
loading MLflow's run logging, and tracking reads it without loading the gate."""

from __future__ import annotations

import getpass
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml

from digits.core.errors import DigitsError
from digits.core.settings import DVC_EXP_BASELINE_REV, DVC_EXP_NAME

GIT_TIMEOUT = 30  # seconds: a git that hangs (a lock, a network filesystem) fails the command


class ProvenanceError(DigitsError):
    pass


def git(root: Path, *args: str) -> subprocess.CompletedProcess | None:
    """Run git in `root`; None when git itself is not installed. A git that does not answer
    within GIT_TIMEOUT seconds is an error naming the command."""
    try:
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, timeout=GIT_TIMEOUT
        )
    except OSError:
        return None
    except subprocess.TimeoutExpired:
        raise ProvenanceError(
            f"`git {' '.join(args)}` in {root} did not answer within {GIT_TIMEOUT} s"
        ) from None


def git_out(root: Path, *args: str) -> str | None:
    """stdout of a git command, stripped; None when git is missing or the command fails."""
    proc = git(root, *args)
    return proc.stdout.strip() if proc is not None and proc.returncode == 0 else None


def is_repository(root: Path) -> bool:
    return git_out(root, "rev-parse", "--is-inside-work-tree") == "true"


def head_commit(root: Path) -> str:
    """HEAD's full commit, "" outside git (or before the first commit)."""
    return git_out(root, "rev-parse", "HEAD") or ""


def head_branch(root: Path) -> str:
    """The branch HEAD is on, "" on a detached HEAD or outside git."""
    return git_out(root, "symbolic-ref", "--quiet", "--short", "HEAD") or ""


def short(root: Path, ref: str) -> str:
    return git_out(root, "rev-parse", "--short", f"{ref}^{{commit}}") or ""


def branch_ref(root: Path, branch: str) -> str | None:
    """A branch's ref: local, else origin's (a CI checkout of a pull request has only a
    detached merge commit and the fetched `origin/<branch>`)."""
    for ref in (f"refs/heads/{branch}", f"refs/remotes/origin/{branch}"):
        if git_out(root, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"):
            return ref
    return None


def committed_params(root: Path, ref: str) -> dict | None:
    """params.yaml as committed at `ref`, parsed as YAML; None when it has none."""
    proc = git(root, "show", f"{ref}:params.yaml")
    if proc is None or proc.returncode != 0:
        return None
    try:
        raw = yaml.safe_load(proc.stdout)
    except yaml.YAMLError as e:
        raise ProvenanceError(
            f"{ref}:params.yaml: not valid YAML: {str(e).splitlines()[0]}"
        ) from None
    return raw if isinstance(raw, dict) else {}


def params_diff(root: Path) -> str:
    """`git diff HEAD -- params.yaml` (the uncommitted change to the params), "" if none."""
    return git_out(root, "diff", "HEAD", "--", "params.yaml") or ""


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
    top = git_out(root, "rev-parse", "--show-toplevel")
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


def who(root: Path) -> str:
    """The person at the keyboard: git's user.name <user.email>, else the OS user."""
    name, email = git_out(root, "config", "user.name"), git_out(root, "config", "user.email")
    if name:
        return f"{name} <{email}>" if email else name
    return getpass.getuser()


@dataclass(frozen=True, kw_only=True)
class Origin:
    """Where a pipeline run came from: its commit, branch, uncommitted changes, experiment."""

    commit: str = ""  # HEAD, "" outside git
    branch: str = ""  # "" on a detached HEAD or outside git
    changed: tuple[str, ...] = ()  # uncommitted files, less the pipeline's own outputs
    experiment: str = ""  # DVC experiment name, "" for a plain `dvc repro`
    baseline: str = ""  # the experiment's baseline commit

    @property
    def label(self) -> str:
        """`main@1a2b3c4`, `1a2b3c4` on a detached HEAD, "" outside git."""
        short_commit = self.commit[:7]
        return f"{self.branch}@{short_commit}" if self.branch and short_commit else short_commit

    @property
    def run_name(self) -> str | None:
        """The DVC experiment's name, else `<branch>@<short commit>` (`-dirty` with uncommitted
        changes); None outside git (MLflow then picks a random name)."""
        if self.experiment:
            return self.experiment
        if not self.label:
            return None
        return self.label + ("-dirty" if self.changed else "")


def run_origin(root: Path) -> Origin:
    """The Origin of a run in `root` (outside git: an empty one, but for the experiment)."""
    experiment = DVC_EXP_NAME.get() or ""
    commit = head_commit(root)
    if not commit:
        return Origin(experiment=experiment)
    changed: tuple[str, ...] = ()
    if not experiment:  # an experiment's workspace is its own commit (a DVC exp ref)
        changed = tuple(uncommitted(root) or ())
    return Origin(
        commit=commit,
        branch=head_branch(root),
        changed=changed,
        experiment=experiment,
        baseline=(DVC_EXP_BASELINE_REV.get() or "") if experiment else "",
    )
