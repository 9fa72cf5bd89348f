"""Promotion governance (docs/gate.md): experiments, other branches and dirty
workspaces gate their versions but never move @champion; the thresholds are main's committed
ones; the champion cannot drift below its high-water mark; a person promotes with a reason.

Who-may-promote is checked on real git repositories (fast); the scenarios on a real SQLite
registry with hand-set models of exact accuracy (gate_workspace.py), and once through a real
`dvc exp run`."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from digits.cli import main as cli
from digits.core.config import ConfigError, GateParams, parse_params
from digits.core.files import GATE_REPORT
from digits.core.metrics import (
    Calibration,
    ClassScores,
    Evaluation,
    Metrics,
    Refusal,
    Robustness,
)
from digits.gate import governance, policy, report
from digits.scoring.cache import Score
from digits.stages import gate
from gate_workspace import (
    NAME,
    aliases,
    enter_workspace,
    make_repo,
    register,
    workspace_params,
    write_params,
)
from helpers import dvc, git

GATES = {"min_accuracy": 0.9, "max_loss": 100.0, "min_class_recall": 0.0}  # main's
GOLDEN = Path(__file__).parent / "golden"  # the gate's words for fixed inputs


def score(version: str, accuracy: float, correct, loss: float = 0.1, **sections) -> Score:
    """A version's score with these numbers (digit 7 recognised worst, at 0.93)."""
    import numpy as np

    per_class = {str(d): ClassScores(precision=0.99, recall=0.99 - d / 1000) for d in range(10)}
    per_class["7"] = ClassScores(precision=0.97, recall=0.93)
    metrics = Metrics(accuracy=accuracy, loss=loss, macro_f1=accuracy - 0.001, per_class=per_class)
    return Score(
        version=version,
        evaluation=Evaluation(metrics=metrics, **sections),
        correct=np.asarray(correct, bool),
        model_sha256="",
    )


# --- McNemar ------------------------------------------------------------------------------------


def test_mcnemar_p_matches_a_hand_computed_binomial_tail():
    # b = 8 of 10 disagreements against the challenger: P(X >= 8), X ~ Binomial(10, 1/2)
    # = (C(10,8) + C(10,9) + C(10,10)) / 2^10 = (45 + 10 + 1) / 1024
    assert policy.mcnemar_p(8, 2) == pytest.approx(56 / 1024, rel=1e-12)
    assert policy.mcnemar_p(9, 1) == pytest.approx(11 / 1024, rel=1e-12)  # below alpha 0.05
    assert policy.mcnemar_p(3, 0) == pytest.approx(1 / 8, rel=1e-12)
    assert policy.mcnemar_p(0, 5) == 1.0  # the challenger is never worse
    # and scipy's binomtest agrees on counts like a real gate's (hundreds of disagreements)
    from scipy.stats import binomtest

    for b, c in [(120, 95), (300, 250), (61, 40), (1, 1)]:
        want = binomtest(b, b + c, 0.5, alternative="greater").pvalue
        assert policy.mcnemar_p(b, c) == pytest.approx(want, rel=1e-9)
    assert policy.mcnemar_p(0, 0) == 1.0  # no disagreement, no evidence
    tail = sum(math.comb(45, k) for k in range(30, 46)) / 2**45
    assert policy.mcnemar_p(30, 15) == pytest.approx(tail, rel=1e-9)


def test_mcnemar_counts_only_the_images_where_the_models_disagree():
    champion = score("1", 0.67, [1, 1, 1, 0, 0, 1])
    new = score("2", 0.5, [1, 0, 0, 1, 0, 1])
    c = policy.compare(champion, new)
    assert (c.b, c.c) == (2, 1) and c.p == pytest.approx(policy.mcnemar_p(2, 1))


# --- the checks, the verdict and its words: pure functions --------------------------------------

STRICT = GateParams(min_accuracy=0.9, max_loss=0.2, min_class_recall=0.95,
                    max_accuracy_drop=0.002, min_corruption_accuracy=0.9, max_ece=0.01,
                    max_ood_fpr95=0.05, max_refused_digits=0.01, alpha=0.05)  # fmt: skip
SECTIONS = {
    "calibration": Calibration(temperature=0.53, ece_before=0.09, ece=0.0126, nll_before=0.12,
                               nll=0.031),
    "ood": Refusal(threshold=0.586286, auroc=0.992126, fpr95=0.027333, refused_digits=0.012,
                   refused_outliers=0.87, refused={"letters": 0.85, "noise": 1.0}, outliers=1000),
    "robustness": Robustness(mean=0.9, worst=0.85,
                             corruptions={"blur": 0.95, "rotate": 0.85, "thin": 0.9}),
}  # fmt: skip


def where(**kw) -> governance.Context:
    base: dict = {"branch": "main", "gates": STRICT, "source": "main@1a2b3c4:params.yaml",
                  "may_promote": True, "commit": "1a2b3c4d5e6f7", "has_branch": True}  # fmt: skip
    return governance.Context(**{**base, **kw})


def golden(name: str) -> str:
    return (GOLDEN / name).read_text()


def test_the_gate_words_every_check_as_it_always_has():
    """tests/golden/ was written by the gate before its checks became a table (the 16-field
    Outcome, decide(bool, bool, bool)): the same inputs give the same bytes."""
    import numpy as np

    rng = np.random.default_rng(0)
    base = rng.random(2000) < 0.98
    new_c = base.copy()
    new_c[np.flatnonzero(base)[:12]] = False  # b = 12
    new_c[np.flatnonzero(~base)[:3]] = True  # c = 3
    new = score("7", round(float(new_c.mean()), 6), new_c, **SECTIONS)
    champion = score("5", round(float(base.mean()), 6), base, loss=0.09)
    champion.cached, champion.by = True, "evaluate"
    high = score("3", 0.985, base, loss=0.08)
    high.cached = True
    contest = policy.Contest.of(new, "5", champion, high)
    o = replace(policy.judge("mnist-mlp", contest, where(), "ab" * 32), challenger="6")
    assert o.verdict is policy.Verdict.REJECTED
    assert report.report(o, [("min_accuracy", 0.5, 0.9)]) == golden("rejected.md")
    assert report.verdict_json(o.results) == golden("rejected.json")
    assert report.description(o, "r1d", "12") == golden("rejected.txt")

    loose = GateParams(min_accuracy=0.9, max_loss=0.2, min_class_recall=0.9)
    good = score("8", 0.99, base, loss=0.05)
    experiment = where(gates=loose, may_promote=False, why_not="this is DVC experiment `seed1`")
    for challenger, name in (("8", "approved"), ("6", "approved-other")):
        contest = policy.Contest.of(good, None, None, None)
        judged = policy.judge("mnist-mlp", contest, experiment, "cd" * 32)
        o = replace(judged, challenger=challenger)
        assert o.verdict is policy.Verdict.APPROVED
        assert report.report(o, [("max_loss", 1.0, 0.2)]) == golden(f"{name}.md")
        assert report.description(o, "r2", "12") == golden(f"{name}.txt")
    assert report.verdict_json(o.results) == golden("approved.json")

    plain = where(gates=loose, source="this folder's params.yaml", has_branch=False, commit="")
    for champion_version, name, verdict in (
        ("8", "already", policy.Verdict.ALREADY),
        (None, "promoted", policy.Verdict.PROMOTED),
    ):
        contest = policy.Contest.of(good, champion_version, None, None)
        o = policy.judge("mnist-mlp", contest, plain, "cd" * 32)
        assert o.verdict is verdict
        assert report.report(o, []) == golden(f"{name}.md")
        assert report.description(o, "r3", "12") == golden(f"{name}.txt")


def test_a_gate_reads_only_what_it_is_on_for():
    # what the gate must have scored: nothing beyond metrics and calibration by default
    assert policy.suites(GateParams(), 500) == policy.Suites()
    assert policy.suites(GateParams(max_refused_digits=0.5), 500).outliers_per_kind == 500
    assert policy.suites(GateParams(max_ood_fpr95=0.5), 500).outliers_per_kind == 500
    assert policy.suites(GateParams(min_corruption_accuracy=0.5), 500) == policy.Suites(
        robustness=True
    )
    # the default gates: the absolute three; a gate on whose section is missing says so
    bare = score("1", 0.99, [1, 1])
    assert [c.gate for c in policy.checks(GateParams(), bare, comparison=None, high=None)] == [
        "min_accuracy",
        "max_loss",
        "min_class_recall",
    ]
    with pytest.raises(ValueError, match="max_ece is on but the score has no calibration"):
        policy.checks(GateParams(max_ece=0.1), bare, comparison=None, high=None)
    with pytest.raises(ValueError, match=r"min_corruption_accuracy is on but .* no robustness"):
        policy.checks(GateParams(min_corruption_accuracy=0.1), bare, comparison=None, high=None)


def test_the_verdict_follows_the_checks_the_champion_and_the_branch():
    new = score("2", 0.99, [1, 1])
    gates = GateParams(min_class_recall=0.9)
    passing = policy.checks(gates, new, comparison=None, high=None)
    failing = policy.checks(GateParams(), new, comparison=None, high=None)  # digit 7's recall
    first, again = policy.Contest.of(new, None, None, None), policy.Contest.of(new, "2", None, None)
    V = policy.Verdict
    assert policy.decide(failing, again, where()) is V.REJECTED
    assert policy.decide(passing, again, where()) is V.ALREADY
    assert policy.decide(passing, first, where()) is V.PROMOTED
    assert policy.decide(passing, first, where(may_promote=False, why_not="x")) is V.APPROVED


# --- who may promote: real git repositories ------------------------------------------------------


@pytest.fixture
def repo(tmp_path, monkeypatch):
    root = make_repo(tmp_path / "repo", GATES)
    monkeypatch.chdir(root)
    for var in ("DVC_ROOT", "DVC_EXP_NAME"):
        monkeypatch.delenv(var, raising=False)
    return root


def test_clean_main_promotes_whatever_the_pipeline_wrote(repo):
    # what a `dvc repro` leaves: outputs, dvc.lock, and the .gitignore files DVC writes
    for path in ("data/raw/a.gz", "reports/metrics.json", "reports/figures/x.png", "dvc.lock"):
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        (repo / path).write_text("x")
    (repo / "reports/.gitignore").write_text("/figures\n")
    ctx = governance.context(workspace_params(repo), repo)
    assert ctx.may_promote and ctx.why_not == "" and ctx.has_branch
    assert ctx.source.startswith("main@") and ctx.gates.min_accuracy == 0.9
    assert ctx.commit == git(repo, "rev-parse", "HEAD")


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (lambda r: write_params(r, {**GATES, "min_accuracy": 0.1}), "params.yaml"),
        (lambda r: (r / "dvc.yaml").write_text("stages: {}\n"), "dvc.yaml"),
        (lambda r: (r / "helper.py").write_text("x = 1\n"), "helper.py"),  # untracked code
        (lambda r: (r / "src").mkdir() or (r / "src/a.py").write_text(""), "src/a.py"),
        (lambda r: git(r, "mv", "dvc.yaml", "stages.yaml"), "dvc.yaml, stages.yaml"),  # staged
    ],
)
def test_uncommitted_changes_are_not_a_promotion_run(repo, change, named):
    change(repo)
    ctx = governance.context(workspace_params(repo), repo)
    assert not ctx.may_promote
    assert (
        ctx.why_not.startswith("the workspace has uncommitted changes: ") and named in ctx.why_not
    )
    assert ctx.gates.min_accuracy == 0.9  # main's committed value, whatever the workspace says


def test_experiments_are_not_promotion_runs(repo, monkeypatch, tmp_path):
    monkeypatch.setenv("DVC_EXP_NAME", "seed1")
    ctx = governance.context(workspace_params(repo), repo)
    assert not ctx.may_promote and ctx.why_not == "this is DVC experiment `seed1`"
    # a queued experiment runs in a temporary copy; DVC_ROOT names the parent repository
    monkeypatch.delenv("DVC_EXP_NAME")
    monkeypatch.setenv("DVC_ROOT", str(repo))
    monkeypatch.chdir(tmp_path)
    ctx = governance.context(workspace_params(repo), repo)
    assert not ctx.may_promote and "temporary copy" in ctx.why_not


def test_other_branches_and_detached_heads_judge_by_main(repo):
    git(repo, "checkout", "-q", "-b", "loose")
    write_params(repo, {**GATES, "min_accuracy": 0.1, "promotion_branch": "loose"})
    git(repo, "commit", "-qam", "loosen")
    git(repo, "checkout", "-q", "main")
    git(repo, "checkout", "-q", "-b", "feature")
    # `-S gates.promotion_branch=loose -S gates.min_accuracy=0.1`: the workspace's params
    write_params(repo, {**GATES, "min_accuracy": 0.1, "promotion_branch": "loose"})
    ctx = governance.context(workspace_params(repo), repo)
    # HEAD's commit names the promotion branch: main, not the workspace's `loose`
    assert ctx.branch == "main" and ctx.gates.min_accuracy == 0.9
    assert ctx.why_not == "HEAD is on branch `feature`, not `main`"
    git(repo, "checkout", "-q", "params.yaml")
    git(repo, "checkout", "-q", "--detach", "main")
    ctx = governance.context(workspace_params(repo), repo)
    assert not ctx.may_promote and ctx.why_not == "HEAD is detached (not on `main`)"


def test_a_pull_request_checkout_reads_origin_main(repo, tmp_path):
    # CI's checkout of a pull request: a detached commit, main only as origin/main
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
    git(clone, "checkout", "-q", "--detach")
    git(clone, "branch", "-q", "-D", "main")
    ctx = governance.context(workspace_params(clone), clone)
    assert ctx.has_branch and not ctx.may_promote and ctx.gates.min_accuracy == 0.9


def test_without_a_promotion_branch_nothing_is_promoted(tmp_path, monkeypatch):
    plain = tmp_path / "plain"
    plain.mkdir()
    write_params(plain, GATES)
    monkeypatch.chdir(plain)
    ctx = governance.context(workspace_params(plain), plain)
    assert not ctx.has_branch and not ctx.may_promote
    assert ctx.why_not == (
        f"{plain} is not in a git repository, so there is no promotion branch `main` to "
        "promote from"
    )

    other = make_repo(tmp_path / "other", GATES)
    git(other, "branch", "-q", "-m", "main", "trunk")
    ctx = governance.context(workspace_params(other), other)
    assert not ctx.has_branch and not ctx.may_promote
    assert "has no branch `main`" in ctx.why_not


def test_bad_thresholds_on_main_stop_the_gate(repo):
    write_params(repo, {**GATES, "alpha": 2.0})
    git(repo, "commit", "-qam", "a bad alpha")
    with pytest.raises(ConfigError, match=r"^main:params.yaml: gates.alpha: input should be less"):
        governance.context(parse_params({"gates": GATES}), repo)


# --- scenarios on a real registry ---------------------------------------------------------------


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    return enter_workspace(tmp_path, monkeypatch, GATES)


def promote_cli(version: str, reason: str, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = cli(["promote", version, "--reason", reason])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.slow
def test_experiments_propose_challengers_and_a_person_promotes(workspace, monkeypatch, capsys):
    _, params = workspace
    client = MlflowClient()
    v1 = register(params, wrong=2)
    gate.run(params)  # main: the first champion
    assert aliases(client) == {"champion": v1}

    monkeypatch.setenv("DVC_EXP_NAME", "seed1")
    v2 = register(params, wrong=1)  # passes every gate, better than the champion
    gate.run(params)
    assert aliases(client) == {"champion": v1, "challenger": v2}
    mv = client.get_model_version(NAME, v2)
    assert mv.tags["validation_status"] == "approved" and "promoted_at" not in mv.tags
    report = GATE_REPORT.read_text()
    assert "would be promoted from main, but this is DVC experiment `seed1`" in report
    assert "It is `@challenger`" in report
    assert "would be promoted from main" in mv.description

    v3 = register(params)  # the best yet: takes @challenger
    gate.run(params)
    v4 = register(params, wrong=2)  # approved, but @challenger stays on the better one
    gate.run(params)
    assert aliases(client) == {"champion": v1, "challenger": v3}
    assert f"`@challenger` stays on version {v3}" in GATE_REPORT.read_text()

    # a person promotes the challenger, with a reason
    monkeypatch.delenv("DVC_EXP_NAME")
    rc, out, _ = promote_cli(v3, "seed 1 generalises better (review #12)", capsys)
    assert rc == 0
    assert out.strip() == (
        f"mnist-mlp version {v3} is now @champion (version {v1} is now @previous); "
        "by Ada <ada@example.com>: seed 1 generalises better (review #12)"
    )
    assert aliases(client) == {"champion": v3, "previous": v1, "challenger": v2}
    tags = client.get_model_version(NAME, v3).tags
    assert tags["promotion_reason"] == "seed 1 generalises better (review #12)"
    assert tags["promoted_by"] == "Ada <ada@example.com>"
    assert tags["promoted_via"] == "digits promote" and tags["promoted_at"].endswith("+00:00")
    assert "Promoted to @champion by Ada" in client.get_model_version(NAME, v3).description
    assert v4 not in aliases(client).values()

    # what a person cannot do: promote without a reason, or a version the gate did not approve
    rc, _, err = promote_cli(v2, "  ", capsys)
    assert rc == 1 and err.startswith("digits promote: error: --reason: expected")
    v5 = register(params, variant="garbage")
    with pytest.raises(gate.GateFailed):
        gate.run(params)
    rc, _, err = promote_cli(v5, "I like it", capsys)
    assert rc == 1
    assert err.startswith(
        f"digits promote: error: mnist-mlp version {v5} is rejected (min_accuracy"
    )
    rc, _, err = promote_cli("99", "no such version", capsys)
    assert rc == 1 and "mnist-mlp version 99: not found in sqlite:///" in err
    assert aliases(client) == {"champion": v3, "previous": v1, "challenger": v2}


@pytest.mark.slow
def test_an_experiment_cannot_loosen_the_gates(workspace, monkeypatch):
    root, _ = workspace
    client = MlflowClient()
    # `dvc exp run -S gates.min_accuracy=0.5 ...`: the experiment's own params say 0.5
    monkeypatch.setenv("DVC_EXP_NAME", "loose")
    write_params(root, {**GATES, "min_accuracy": 0.5, "max_accuracy_drop": 0.5})
    params = workspace_params(root)
    v1 = register(params, wrong=300)  # 85%: passes 0.5, not main's 0.9
    with pytest.raises(gate.GateFailed, match=r"min_accuracy: accuracy 0.8500 not >= 0.9000"):
        gate.run(params)
    assert client.get_model_version(NAME, v1).tags["validation_status"] == "rejected"
    assert aliases(client) == {}
    report = GATE_REPORT.read_text()
    assert "## Advisory: this workspace's own `gates` (not applied)" in report
    assert (
        "| min_accuracy | 0.5 | 0.9 |" in report and "| max_accuracy_drop | 0.5 | 0.002 |" in report
    )


@pytest.mark.slow
def test_an_experiment_may_tighten_the_gates(workspace, monkeypatch):
    """`make accurate` asks `-S gates.min_corruption_accuracy=0.95` of its own model: a stricter
    threshold than main's applies; a looser one beside it still does not."""
    root, _ = workspace
    client = MlflowClient()
    monkeypatch.setenv("DVC_EXP_NAME", "strict")
    write_params(root, {**GATES, "min_accuracy": 0.999, "max_loss": 1000.0})
    params = workspace_params(root)
    v1 = register(params, wrong=30)  # 98.5%: passes main's 0.9, not this experiment's 0.999
    with pytest.raises(gate.GateFailed, match=r"min_accuracy: accuracy 0.9850 not >= 0.9990"):
        gate.run(params)
    assert client.get_model_version(NAME, v1).tags["validation_status"] == "rejected"
    report = GATE_REPORT.read_text()
    assert "tightened by this workspace: min_accuracy 0.999" in report
    assert "| max_loss | 1000.0 |" in report  # looser: listed as advisory, not applied
    assert "| min_accuracy |" in report and "| min_accuracy | 0.999 |" not in report
    thresholds = client.get_model_version(NAME, v1).tags["gate.thresholds"]
    assert thresholds.endswith("tightened by this workspace: min_accuracy 0.999")


@pytest.mark.slow
def test_the_champion_cannot_drift_below_its_high_water_mark(workspace, capsys):
    """Each version 0.15 points worse than the last: the old rule (vs the current champion
    only) would approve every one; the high-water mark stops the second."""
    _, params = workspace
    client = MlflowClient()
    drop = params.gates.max_accuracy_drop  # 0.002: 0.2 points
    accuracy, versions, failure = {}, [], ""
    for wrong in (0, 3, 6):  # 100%, 99.85%, 99.70%
        versions.append(v := register(params, wrong=wrong))
        accuracy[v] = 1 - wrong / 2000
        try:
            gate.run(params)
        except gate.GateFailed as e:
            failure = str(e)
    v1, v2, v3 = versions
    assert accuracy[v3] >= accuracy[v2] - drop  # within the drop of the champion it faced
    assert aliases(client) == {"champion": v2, "previous": v1}
    assert failure.startswith("failed gates: max_accuracy_drop: accuracy vs high-water mark")
    assert "not_worse_than_champion" not in failure  # 3 images: not significant on its own
    report = GATE_REPORT.read_text()
    assert f"- high-water mark: 1.0000, version {v1}" in report
    assert "b = 3 (champion right" in report and "c = 0 (version" in report
    rc, _, err = promote_cli(v3, "close enough", capsys)
    assert rc == 1 and "is rejected (max_accuracy_drop" in err
    assert aliases(client) == {"champion": v2, "previous": v1}


# --- through DVC itself -------------------------------------------------------------------------


GATE_ONLY = """\
stages:
  gate:
    cmd: python -m digits.cli gate
    deps: [models/model.safetensors]
    params: [gates]
"""


@pytest.mark.slow
def test_dvc_exp_run_never_moves_the_champion(workspace):
    """`dvc exp run` of a gate-only pipeline (the stages before it are this test's Python):
    DVC sets DVC_EXP_NAME, and `-S` loosens the workspace's gates. A weak version is rejected
    by main's gates; a good one is approved and becomes @challenger, not @champion."""
    root, params = workspace
    client = MlflowClient()
    (root / "dvc.yaml").write_text(GATE_ONLY)
    with open(root / ".gitignore", "a") as f:
        f.write("/data/\n/models/\n/reports/\n")
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True)
    git(root, "add", "-A")
    git(root, "commit", "-qm", "a gate-only pipeline")
    v1 = register(params)
    gate.run(params)  # on clean main
    assert aliases(client) == {"champion": v1}

    env = {
        "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"],
        "MLFLOW_TRACKING_URI": os.environ["MLFLOW_TRACKING_URI"],
        "DVC_NO_ANALYTICS": "1",
        "OMP_NUM_THREADS": "1",
    }
    v2 = register(params, wrong=300)  # 85%
    loose = ["-S", "gates.min_accuracy=0.5", "-S", "gates.max_accuracy_drop=0.5"]
    weak = dvc(root, "exp", "run", "-n", "loose", *loose, env=env, check=False)
    assert weak.returncode != 0
    assert "digits gate: error: failed gates: min_accuracy" in weak.stdout + weak.stderr
    assert client.get_model_version(NAME, v2).tags["validation_status"] == "rejected"
    assert aliases(client) == {"champion": v1}

    git(root, "checkout", "-q", "params.yaml")
    v3 = register(params)
    dvc(root, "exp", "run", "-n", "good", env=env)
    assert aliases(client) == {"champion": v1, "challenger": v3}
    assert "this is DVC experiment `good`" in (root / "reports/gate.md").read_text()
