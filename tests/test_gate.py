"""The gate against a real SQLite model registry, on a clean commit of `main` (a promotion run):
champion/challenger promotion, the paired test and the high-water mark, the cached scores, the
descriptions, and the exit status. The models have hand-set weights with exact accuracies
(gate_workspace.py); the governance scenarios (experiments, branches, `digits promote`) are in
test_governance.py."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from digits.core.files import GATE_REPORT, TEST_DATA
from digits.stages import gate
from gate_workspace import N_TEST, NAME, aliases, enter_workspace, heldout_set, register
from helpers import ROOT, served_probabilities

# absolute gates the crippled model (~90%: never predicts 9) passes, so only the comparisons
# with the champion can stop it
GATES = {"min_accuracy": 0.85, "max_loss": 100.0, "min_class_recall": 0.0}


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    return enter_workspace(tmp_path, monkeypatch, GATES)


def line(report: str, start: str) -> str:
    return next(x for x in report.splitlines() if x.startswith(start))


def test_a_score_record_reads_back_only_under_its_key():
    import numpy as np

    from digits.core.metrics import Evaluation
    from digits.scoring import cache

    full = Evaluation.from_dict(json.loads((ROOT / "reports/metrics.json").read_text()))
    correct = np.arange(10000) >= 87  # 9913 right: the committed accuracy, 0.9913
    score = cache.Score(version="3", evaluation=full, correct=correct, model_sha256="m")
    text = cache.cache_record(score, "t")
    back = cache.from_cache(text, "3", "m", "t", 10000)
    assert back is not None and back.cached and back.evaluation == full
    assert (back.correct == correct).all()
    # another model's files, other test data, another length: not this record
    assert cache.from_cache(text, "3", "other", "t", 10000) is None
    assert cache.from_cache(text, "3", "m", "other", 10000) is None
    assert cache.from_cache(text, "3", "m", "t", 9999) is None
    # corruption accuracies of other code are left out, the rest kept
    stale = json.dumps({**json.loads(text), "robustness_sha256": "0" * 64})
    old = cache.from_cache(stale, "3", "m", "t", 10000)
    assert old is not None and old.evaluation == replace(full, robustness=None)
    # a record of another shape is no record
    for metrics in ([], {**full.to_dict(), "per_class": [1]}, {"accuracy": 0.9913}):
        odd = json.dumps({**json.loads(text), "metrics": metrics})
        assert cache.from_cache(odd, "3", "m", "t", 10000) is None
    # the scorer's own code is in the key: the composing module, not only the measures
    assert "scoring/scorer.py" in cache.SCORER_MODULES


@pytest.mark.slow  # four versions registered through the evaluate stage
def test_promotion_sequence(workspace):
    _, params = workspace
    client = MlflowClient()

    # 1. no champion yet: the first version passing the absolute gates becomes champion
    v1 = register(params, variant="crippled")
    gate.run(params)
    assert aliases(client) == {"champion": v1}
    v = client.get_model_version(NAME, v1)
    assert v.tags["validation_status"] == "approved"
    assert v.tags["promoted_by"].startswith("gate: pipeline run on main@")
    report = GATE_REPORT.read_text()
    assert "the first champion" in report and "champion: none yet" in report
    assert "- thresholds: `gates` from main@" in report

    # 2. a better one takes over; the old champion becomes previous
    v2 = register(params)
    gate.run(params)
    assert aliases(client) == {"champion": v2, "previous": v1}
    report = GATE_REPORT.read_text()
    # the nines the crippled champion misses, and no image the other way round
    nines = int((heldout_set()[1] == 9).sum())
    crippled = 1 - nines / N_TEST
    assert "b = 0 (champion right" in report and f"c = {nines} (version" in report
    assert f"high-water mark: {crippled:.4f}, version {v1}" in report
    desc = client.get_model_version(NAME, v2).description
    points = 100 * (1 - crippled)
    assert f"Compared with champion version {v1} ({crippled:.2%}): +{points:.2f} points" in desc
    assert "Gate: APPROVED and promoted to @champion" in desc

    # 3. worse than the champion: significantly (McNemar) and below the high-water mark
    v3 = register(params, variant="crippled")
    with pytest.raises(gate.GateFailed, match="not_worse_than_champion") as failed:
        gate.run(params)
    assert "max_accuracy_drop" in str(failed.value)
    assert aliases(client) == {"champion": v2, "previous": v1}
    tags = client.get_model_version(NAME, v3).tags
    assert tags["validation_status"] == "rejected"
    assert "not_worse_than_champion" in tags["validation_reasons"]
    report = GATE_REPORT.read_text()
    assert "REJECTED" in report and f"b = {nines}" in report
    assert "Gate: REJECTED" in client.get_model_version(NAME, v3).description

    # 4. below an absolute gate: rejected with the gate named
    v4 = register(params, variant="garbage")
    with pytest.raises(gate.GateFailed, match="min_accuracy"):
        gate.run(params)
    assert aliases(client) == {"champion": v2, "previous": v1}
    assert "min_accuracy" in client.get_model_version(NAME, v4).tags["validation_reasons"]

    # every version carries its provenance, its score and a description linking its run
    for v in (v1, v2, v3, v4):
        mv = client.get_model_version(NAME, v)
        assert {"git_commit", "test_accuracy", "data.test_sha256", "gate.score"} <= set(mv.tags)
        run_id = mv.tags["run_id"]
        exp = client.get_run(run_id).info.experiment_id
        assert f"(#/experiments/{exp}/runs/{run_id})" in mv.description

    # the champion alias is what predict and serving load
    import numpy as np

    with np.load(TEST_DATA) as f:
        x = f["test_x"][:5].astype(np.float32) / 255
    table = mlflow.pyfunc.load_model(f"models:/{NAME}@champion").predict(x)
    assert served_probabilities(table).shape == (5, 10) and len(table["digit"]) == 5


@pytest.mark.slow  # six versions registered through the evaluate stage
def test_scores_come_from_the_record_only_when_its_key_matches(workspace):
    _, params = workspace
    client = MlflowClient()
    # the evaluate stage records the score of the version it registers: the gate loads nothing
    v1 = register(params, wrong=3)
    record = json.loads(client.get_model_version(NAME, v1).tags["gate.score"])
    assert record["metrics"]["accuracy"] == 0.9985 and record["n"] == 2000
    assert record["by"] == "evaluate" and set(record["robustness"]["corruptions"]) > {"blur"}
    gate.run(params)
    assert "accuracy 0.9985 (scored by the evaluate stage" in line(
        GATE_REPORT.read_text(), f"- version {v1}:"
    )

    register(params)  # the champion's score is reused: same model files, data and metric code
    gate.run(params)
    champion = line(GATE_REPORT.read_text(), "- champion:")
    assert f"version {v1}, accuracy 0.9985 (scored by the evaluate stage" in champion
    assert "b = 0" in GATE_REPORT.read_text() and "c = 3" in GATE_REPORT.read_text()

    # a record made on other test data, of other model files, or that contradicts itself
    # is not used: the champion is scored again through pyfunc and its record rewritten
    for field, value in (
        ("test_sha256", "0" * 64),
        ("model_sha256", "0" * 64),
        ("metrics", {**record["metrics"], "accuracy": 0.5}),
    ):
        champ = aliases(client)["champion"]
        good = json.loads(client.get_model_version(NAME, champ).tags["gate.score"])
        client.set_model_version_tag(NAME, champ, "gate.score", json.dumps({**good, field: value}))
        register(params)
        gate.run(params)
        champion = line(GATE_REPORT.read_text(), "- champion:")
        assert f"version {champ}, accuracy 1.0000 (scored now)" in champion, field
        again = json.loads(client.get_model_version(NAME, champ).tags["gate.score"])
        assert again["by"] == "gate" and "robustness" not in again
        for key in ("model_sha256", "test_sha256", "scorer_sha256", "correct"):
            assert again[key] == good[key], (field, key)
        # the gate scores with the evaluate stage's scorer: the same record, less what these
        # gates do not read (the outlier suite, the corruptions), which is not redone
        rescored, recorded = again["metrics"], good["metrics"]
        assert "ood" not in rescored and "ood" in recorded
        assert rescored == {k: v for k, v in recorded.items() if k != "ood"}, field

    # a new version without a record (say, registered by hand) is scored by the gate
    v = register(params)
    client.delete_model_version_tag(NAME, v, "gate.score")
    gate.run(params)
    assert "accuracy 1.0000 (scored now)" in line(GATE_REPORT.read_text(), f"- version {v}:")
    assert json.loads(client.get_model_version(NAME, v).tags["gate.score"])["by"] == "gate"


@pytest.mark.slow
def test_first_version_failing_absolute_gate_leaves_no_champion(workspace):
    _, params = workspace
    client = MlflowClient()
    v1 = register(params, variant="garbage")
    with pytest.raises(gate.GateFailed):
        gate.run(params)
    assert aliases(client) == {}
    assert client.get_model_version(NAME, v1).tags["validation_status"] == "rejected"


@pytest.mark.slow
def test_outside_git_a_passing_version_is_approved_but_not_promoted(workspace):
    root, params = workspace
    shutil.rmtree(root / ".git")  # a plain folder: no promotion branch
    client = MlflowClient()
    v1 = register(params)
    gate.run(params)
    assert aliases(client) == {"challenger": v1}
    assert client.get_model_version(NAME, v1).tags["validation_status"] == "approved"
    report = GATE_REPORT.read_text()
    assert "- thresholds: `gates` from this folder's params.yaml" in report
    assert f"**APPROVED**, not promoted: {root} is not in a git repository" in report


@pytest.mark.slow
def test_gate_command_exits_nonzero_naming_gates(workspace, capsys):
    _, params = workspace
    from digits.stages.runner import run_stage

    register(params, variant="garbage")
    capsys.readouterr()  # drop what registering printed
    assert run_stage("gate") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("digits gate: error: failed gates: min_accuracy")


@pytest.mark.slow
def test_evaluate_uploads_the_model_outside_the_stores_write_lock(workspace):
    """Registering holds the store's write lock (the version number is read, then written); the
    model's upload does not. With the lock held elsewhere, the model's files reach the artifact
    store, and the version is registered only once the lock is let go. And the model goes to
    the run it names, from a thread with no active MLflow run: into the run's experiment's
    artifacts, not the Default experiment's `mlruns/`."""
    import threading
    import time

    from digits.core.files import HISTORY, MODEL
    from digits.core.reports import read_history
    from digits.data.preprocess import file_digest, load_arrays
    from digits.model.network import save_model
    from digits.stages import evaluate
    from digits.tracking import runs
    from digits.tracking.store import store_lock
    from gate_workspace import hand_model

    root, params = workspace
    save_model(hand_model(), MODEL, [11], 0.0)
    x, y = load_arrays(TEST_DATA, "test")
    scored = evaluate.score(params, x, y)
    sha = file_digest(MODEL)
    done: list[str] = []
    with runs.evaluation_run(params, model_sha256=sha, history=read_history(HISTORY)) as (
        store,
        run_id,
    ):

        def register():
            done.append(evaluate.register(store, params, run_id, scored=scored,
                                          model_sha256=sha, test_sha256="t"))  # fmt: skip

        thread = threading.Thread(target=register)
        with store_lock(store.uri):
            thread.start()
            artifacts = root / "mlartifacts"
            deadline = time.monotonic() + 300  # a bound on a hang, not on speed
            while not list(artifacts.rglob("*.safetensors")) and time.monotonic() < deadline:
                assert thread.is_alive(), "register ended while the lock was held"
                time.sleep(0.05)
            assert list(artifacts.rglob("*.safetensors")), "the model was not uploaded"
            assert not done and thread.is_alive()  # the version waits for the lock
        thread.join()
    assert done and aliases(MlflowClient()) == {} and not (root / "mlruns").exists()
    assert MlflowClient().get_model_version(NAME, done[0]).tags["gate.score"]
