"""Corrections through the pipeline (digits.monitor.stage, digits.monitor.gatecheck, the train
stage's hook): the hold-out fixed by content hash, training with `train.feedback.weight`
copies and nothing changed at 0, evaluate's reports with no feedback (no file: an empty set),
the set as DVC data (`dvc add` on export), the gate's check against the production champion
when it judges a candidate, and, on a real
registered champion in a real MLflow store: the version's reference logged into its run, the
gate's paired check on the hold-out, and `digits monitor` finding the reference there and
logging its run linked to the version."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from digits.monitor import reference, review, stage


def feedback_set(n: int, seed: int = 0) -> stage.FeedbackSet:
    import hashlib

    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, 784), dtype=np.uint8)
    sha = np.array([hashlib.sha256(r.tobytes()).hexdigest() for r in x], "U64")
    order = np.argsort(sha)
    y = rng.integers(-1, 10, n)
    return stage.FeedbackSet(x[order], y[order], sha[order])


def write(data: stage.FeedbackSet, path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        np.savez(f, x=data.x, y=data.y, sha256=data.sha256)


def test_the_holdout_is_fixed_by_each_examples_hash():
    big = feedback_set(400)
    held = big.held_out(0.3)
    assert 0.2 < held.mean() < 0.4
    part = big.part(np.arange(400) % 3 == 0)  # another export, a subset of this one
    np.testing.assert_array_equal(part.held_out(0.3), held[np.arange(400) % 3 == 0])
    assert not big.held_out(0.0).any()


def test_training_adds_weight_copies_of_the_examples_not_held_out(tmp_path, monkeypatch):
    import torch

    from digits.stages.train import add_feedback

    monkeypatch.chdir(tmp_path)
    data = feedback_set(100, seed=1)
    write(data, stage.FEEDBACK_DATA)
    base = [torch.zeros(10, 784), torch.zeros(10, dtype=torch.long), torch.ones(3, 784),
            torch.ones(3, dtype=torch.long)]  # fmt: skip
    fed, refused, sha = add_feedback(base, 3, 0.3)
    trained = ~data.held_out(0.3)
    digits = trained & (data.y >= 0)
    assert len(fed[0]) == len(fed[1]) == 10 + 3 * digits.sum()
    assert fed[2] is base[2] and fed[3] is base[3]  # validation untouched
    assert len(refused) == (trained & (data.y < 0)).sum()
    held_images = {r.tobytes() for r in data.x[data.held_out(0.3)]}
    seen = (fed[0][10:] * 255).round().to(torch.uint8).numpy()
    assert not held_images & {r.tobytes() for r in seen}  # never trained on
    assert len(sha) == 64


def test_no_feedback_leaves_a_report_of_its_own_and_logs_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    summary = stage.record_feedback(None, "", 0.3)  # no store touched: nothing to log
    assert summary == {"examples": 0, "holdout_size": 0, "accuracy": None}
    assert json.loads(stage.FEEDBACK_REPORT.read_text()) == summary
    assert not (tmp_path / "reports" / "metrics.json").exists()
    write(feedback_set(3), stage.FEEDBACK_DATA)
    assert len(stage.load_feedback()) == 3
    stage.FEEDBACK_DATA.write_bytes(b"not a zip")
    with pytest.raises(stage.FeedbackDataError, match="not a feedback set"):
        stage.load_feedback()


def test_the_feedback_set_is_dvc_data_and_none_is_an_empty_set(tmp_path, monkeypatch):
    """Git holds no feedback data, only the folder's README and .gitignore (and, once a set is
    exported, its .dvc file); the stages depend on the folder, and with no file they read an
    empty set: evaluate's report is the bytes of an empty export's, training is unchanged."""
    import subprocess

    import torch
    import yaml

    from digits.stages.train import add_feedback
    from helpers import ROOT

    tracked = subprocess.run(["git", "ls-files", "feedback"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.split()  # fmt: skip
    assert "feedback/examples.npz" not in tracked
    assert {"feedback/README.md", "feedback/.gitignore"} <= set(tracked)
    assert "/examples.npz" in (ROOT / "feedback/.gitignore").read_text().split()
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name in ("train", "evaluate", "gate"):
        assert "feedback" in stages[name]["deps"], name
        assert not any(d.startswith("feedback/") for d in stages[name]["deps"]), name

    monkeypatch.chdir(tmp_path)
    assert not stage.FEEDBACK_DATA.exists() and len(stage.load_feedback()) == 0
    missing = stage.record_feedback(None, "", 0.3)
    none_report = stage.FEEDBACK_REPORT.read_bytes()
    base = [torch.zeros(4, 784), torch.zeros(4, dtype=torch.long), torch.ones(2, 784),
            torch.ones(2, dtype=torch.long)]  # fmt: skip
    fed, refused, sha = add_feedback(base, 3, 0.3)
    assert len(fed[0]) == 4 and len(refused) == 0 and sha == ""
    assert review.export([], stage.FEEDBACK_DATA) == (0, True)  # an empty export
    assert stage.record_feedback(None, "", 0.3) == missing
    assert stage.FEEDBACK_REPORT.read_bytes() == none_report


def test_export_tracks_the_set_with_dvc(tmp_path, capsys):
    """`dvc add` on the export: git gets the .dvc file, the folder's .gitignore keeps the data
    out of git, and a second export of the same approvals changes neither."""
    import subprocess
    import sys

    from digits.monitor import feedback
    from helpers import git, init_git

    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "README.md").write_text("a project\n")
    root = init_git(tmp_path / "repo")
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True)
    git(root, "commit", "-qam", "dvc")
    out = root / "feedback" / "examples.npz"
    assert feedback.dvc_root(out) == root and feedback.dvc_root(tmp_path / "x.npz") is None
    write(feedback_set(5), out)
    dvc_file = feedback.track(out, root)
    assert dvc_file == out.with_name("examples.npz.dvc") and "md5:" in dvc_file.read_text()
    assert (out.parent / ".gitignore").read_text() == "/examples.npz\n"
    git(root, "add", "feedback")
    assert git(root, "diff", "--cached", "--name-only").split() == [
        "feedback/.gitignore",
        "feedback/examples.npz.dvc",
    ]
    git(root, "commit", "-qm", "feedback")
    feedback.track(out, root)
    assert git(root, "status", "--porcelain") == ""  # the same bytes: nothing to commit
    out.unlink()
    with pytest.raises(feedback.ExportError, match=r"^dvc add .*examples\.npz: .*run it again"):
        feedback.track(out, root)


def _perturbed(weights, out, seed: int = 0) -> None:
    """The weights with strong noise: a model much worse than the one it came from."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    with safe_open(str(weights), "numpy") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    rng = np.random.default_rng(seed)
    noisy = {k: (v + rng.normal(0, 3 * v.std() + 1e-3, v.shape)).astype(v.dtype)
             for k, v in tensors.items()}  # fmt: skip
    save_file(noisy, str(out), metadata=meta)


@pytest.mark.slow
def test_on_a_real_champion_reference_gate_and_monitor(
    champion, tmp_path, monkeypatch, capsys, request
):
    import mlflow
    from mlflow import MlflowClient

    from digits.cli import main
    from digits.data.preprocess import read_pair, split
    from digits.monitor import gatecheck
    from digits.serve import predlog
    from digits.tracking.store import open_store
    from helpers import ROOT, mnist_dir

    uri, name, version = champion["tracking_uri"], "mnist-mlp", champion["version"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # the gate's check downloads the champion through MLflow's fluent store, which another test
    # of this worker may have pointed elsewhere (the stage sets it: tracking.active_run)
    mlflow.set_tracking_uri(uri)
    request.addfinalizer(lambda: mlflow.set_tracking_uri(None))
    monkeypatch.chdir(tmp_path)
    x, y = read_pair(mnist_dir(), "train")
    _, val_x, _, _ = split(x, y, 5000, 42)
    (tmp_path / "data" / "processed").mkdir(parents=True)
    np.savez(tmp_path / "data/processed/train.npz", val_x=val_x)
    (tmp_path / "models").mkdir()
    shutil.copy(champion["weights"], tmp_path / "models/model.safetensors")
    client = MlflowClient(uri, uri)
    run_id = client.get_model_version(name, version).run_id
    ref = stage.record_reference(open_store("tests", uri), run_id)
    assert ref["pieces"] == 5000 and reference.FILE.read_text() == reference.dumps(ref)

    # the gate: no hold-out, no check; the champion against itself passes; a worse model fails
    assert gatecheck.check(name, version, 0.05, 0.3) is None
    tx, _ = read_pair(mnist_dir(), "t10k")
    said = champion["classifier"].answers(tx[:600].reshape(-1, 784) / np.float32(255))
    right = said.digit >= 0
    import hashlib

    sha = np.array([hashlib.sha256(r.tobytes()).hexdigest() for r in tx[:600]], "U64")
    order = np.argsort(sha)
    labelled = stage.FeedbackSet(tx[:600].reshape(-1, 784)[order], said.digit[order], sha[order])
    write(labelled.part(right[order]), stage.FEEDBACK_DATA)
    same = gatecheck.check(name, version, 0.05, 0.3)
    assert same is not None and same.passed and "b = 0, c = 0" in same.note
    _perturbed(champion["weights"], tmp_path / "models/model.safetensors")
    worse = gatecheck.check(name, version, 0.05, 0.3)
    assert worse is not None and not worse.passed, worse

    # digits monitor: the reference from the version's run; its run linked to the version
    eng = predlog.engine(f"sqlite:///{tmp_path / 'predictions.db'}")
    predlog.create(eng)
    model = {"name": name, "version": version, "uri": f"models:/{name}@champion"}
    now = predlog.now()
    # drawn from the whole test set: its halves are two populations of writers
    shown = tx.reshape(-1, 784)[np.random.default_rng(0).choice(len(tx), 400, replace=False)]
    ans = champion["classifier"].answers(shown / np.float32(255))
    entries = []
    for img, d, c in zip(shown, ans.digit.tolist(), ans.confidence.tolist(), strict=True):
        one = {"digit": None if d < 0 else d, "guess": d % 10, "confidence": c}
        record = {**one, "reading": "", "number": None, "digits": [one]}
        entries.append(predlog.Entry(predlog.new_id(), now, "app", model, record, img.tobytes()))
    predlog.write(eng, entries)
    code = main(["monitor", "--params", str(ROOT / "params.yaml"), "--json",
                 "--log-db", str(tmp_path / "predictions.db"),
                 "--report", str(tmp_path / "m.html")])  # fmt: skip
    said = capsys.readouterr()
    assert said.out.startswith("{"), said.err
    summary = json.loads(said.out)
    assert code == 0 and summary["alert"] is False, summary["reasons"]
    assert summary["window"]["pieces"] == 400
    assert summary["model"] == {"name": name, "version": version}
    run = client.get_run(summary["mlflow_run"])
    assert run.data.tags["registered_model"] == name and run.data.tags["model_version"] == version
    assert run.data.metrics["window/pieces"] == 400
    files = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert files == {"summary.json", "m.html"}
    tags = client.get_model_version(name, version).tags
    assert tags["monitor.last_run"] == run.info.run_id and tags["monitor.last_alert"] == "false"


def test_the_feedback_check_is_relative_and_stays_out_of_gate_json():
    """reports/gate.json is the same bytes in every store: the check against a store's
    champion is in the report, not in it."""
    from digits.gate.policy import Check
    from digits.gate.report import verdict_json
    from digits.monitor import gatecheck

    check = Check(gate=gatecheck.GATE, metric="p", value=0.001, threshold=0.05, op=">=")
    assert json.loads(verdict_json([check])) == {"passed": True, "gates": {}}


@pytest.mark.slow  # two versions registered through the evaluate stage (fake data: seconds)
def test_the_feedback_check_is_against_the_production_champion(tmp_path, monkeypatch):
    """With candidates kept apart (a team server's store), the version judged is a candidate
    and the production @champion may be no candidate's copy: the corrections are about what
    the service answered, so the check is against that champion all the same."""
    import hashlib
    import tempfile

    from mlflow import MlflowClient

    from digits.core.config import FeedbackParams
    from digits.core.files import MODEL, TEST_DATA
    from digits.data.preprocess import file_digest
    from digits.model.network import save_model
    from digits.monitor import gatecheck
    from digits.stages import evaluate, gate
    from digits.tracking import registry
    from gate_workspace import NAME, aliases, enter_workspace, hand_model, register
    from helpers import git

    root, params = enter_workspace(tmp_path, monkeypatch, {"min_accuracy": 0.85, "max_loss": 100.0,
                                                        "min_class_recall": 0.0})  # fmt: skip
    params = params.model_copy(update={"feedback": FeedbackParams(holdout_share=0.99)})
    client = MlflowClient()
    # corrections: the test images with their labels (the champion reads every one right)
    with np.load(TEST_DATA) as f:
        x, y = f["test_x"].reshape(-1, 784), f["test_y"].astype(np.int64)
    sha = np.array([hashlib.sha256(r.tobytes()).hexdigest() for r in x], "U64")
    _, first = np.unique(sha, return_index=True)  # sorted by hash, one per image
    corrections = stage.FeedbackSet(x[first], y[first], sha[first])
    write(corrections, stage.FEEDBACK_DATA)
    git(root, "add", str(stage.FEEDBACK_DATA))  # a clean run of main: it promotes
    git(root, "commit", "-qm", "corrections")
    served = register(params)  # right on every test image, in production
    gate.run(params)
    assert aliases(client) == {"champion": served}
    # evaluate logged the hold-out it scored into the version's run: the next gate's reference
    with tempfile.TemporaryDirectory() as tmp:
        kept = gatecheck.champions_holdout(NAME, served, tmp)
        held = corrections.part(corrections.held_out(0.99))
        assert kept is not None and kept.sha256.tolist() == held.sha256.tolist()
        np.testing.assert_array_equal(kept.y, held.y)
    candidates = registry.candidates_of(NAME)
    client.create_registered_model(candidates)  # from now on the pipeline registers there
    save_model(hand_model(wrong=60), MODEL, [11], 0.0)
    evaluate.run(params)
    judged = registry.version_of_model(client, candidates, file_digest(MODEL))
    assert judged is not None
    with pytest.raises(gate.GateFailed, match="feedback_not_worse_than_champion") as failed:
        gate.run(params)
    assert "min_accuracy" not in str(failed.value)  # every MNIST gate passed: these stopped it
    assert "feedback_not_worse_on_champions_holdout" in str(failed.value)
    assert f"vs champion v{served} " in (tmp_path / "project/reports/gate.md").read_text()
    assert client.get_model_version(candidates, judged).tags["validation_status"] == "rejected"
    assert aliases(client) == {"champion": served}
