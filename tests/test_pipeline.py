"""The whole pipeline, for real: `dvc repro` in a fresh git repo, MNIST from a mirror served on
127.0.0.1, MLflow's default SQLite store, and the registered model loaded back with pyfunc."""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml

from helpers import (
    SHORT_RUN_GATES,
    SMALL_OUTLIERS,
    dvc,
    git,
    make_project,
    project_env,
    registered,
    served_probabilities,
    set_params,
)
from test_stage_deps import declared_code_deps

pytestmark = pytest.mark.slow
FIGURES = (
    "training_curves",
    "confusion_matrix",
    "misclassified",
    "robustness",
    "reliability",
    "ood",
)
EPOCHS = 3  # enough to learn MNIST well past chance; the default run is CI's own step


@pytest.fixture(scope="module")
def repro(tmp_path_factory, mnist_http):
    project = make_project(tmp_path_factory.mktemp("pipeline") / "project")
    # 3 epochs reach ~97%: relax the absolute gates so the short run is promoted
    set_params(
        project,
        **{
            "train.epochs": EPOCHS,
            "gates.min_accuracy": 0.95,
            "gates.min_class_recall": 0.9,
            "gates.max_loss": 0.5,
            **SHORT_RUN_GATES,
            **SMALL_OUTLIERS,
        },
    )
    git(project, "commit", "-qam", "short run")
    env = project_env(project, mnist_http)
    # Record which project files each stage process really loads (see LOAD_PROBE).
    probe = tmp_path_factory.mktemp("probe")
    (probe / "sitecustomize.py").write_text(LOAD_PROBE)
    loads = probe / "loads.jsonl"
    first = dvc(
        project,
        "repro",
        env={
            **env,
            "PYTHONPATH": f"{project / 'src'}{os.pathsep}{probe}",
            "DIGITS_LOAD_PROBE": str(loads),
        },
    )
    return project, env, first, loads


# Each stage process appends {script, files} at exit: the project's modules it had loaded.
LOAD_PROBE = """
import atexit, json, os, sys
@atexit.register
def _report():
    script = next((a for a in sys.orig_argv if a.startswith("pipeline/")), None)
    if script:
        files = sorted(m.__file__ for m in list(sys.modules.values())
                       if getattr(m, "__file__", None) and m.__name__.split(".")[0] == "digits")
        with open(os.environ["DIGITS_LOAD_PROBE"], "a") as f:
            f.write(json.dumps({"script": script, "files": [script, *files]}) + "\\n")
"""


def test_stages_load_only_their_deps(repro):
    """Every project file a stage process loaded is among that stage's deps in dvc.yaml."""
    project, _, _, loads = repro
    stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    rows = [json.loads(line) for line in loads.read_text().splitlines()]
    assert {Path(r["script"]).stem for r in rows} == set(stages)
    for row in rows:
        stage = Path(row["script"]).stem
        declared = {str(p) for p in declared_code_deps(stages[stage])}
        loaded = {
            str(Path(f).resolve().relative_to(project.resolve())) if Path(f).is_absolute() else f
            for f in row["files"]
        }
        missing = sorted(loaded - declared)
        assert not missing, f"stage {stage} loaded {missing}, not among its deps in dvc.yaml"


def test_editing_gate_code_reruns_only_the_gate(repro):
    """`dvc status` names the stages whose code changed: gate.py only the gate; model.py the
    stages that build, score or load models, never download or preprocess."""
    project, env, _, _ = repro

    def stale_after_editing(path: str) -> set[str]:
        target = project / path
        original = target.read_text()
        target.write_text(original + "\n# edited\n")
        try:
            status = json.loads(dvc(project, "status", "--json", env=env).stdout or "{}")
        finally:
            target.write_text(original)
        return set(status)

    assert stale_after_editing("src/digits/stages/gate.py") == {"gate"}
    assert stale_after_editing("src/digits/gate/promote.py") == set()  # a command, no stage
    # the torch network only trains; the stages after it score with digits.model.inference (numpy)
    assert stale_after_editing("src/digits/model/network.py") == {"train"}
    assert stale_after_editing("src/digits/model/inference.py") == {"train", "evaluate", "gate"}
    assert stale_after_editing("src/digits/data/preprocess.py") == {
        "preprocess",
        "train",
        "evaluate",
        "gate",
    }


def test_stages_write_their_outputs(repro):
    project, _, first, _ = repro
    for stage in ("download", "preprocess", "train", "evaluate", "gate"):
        assert f"Running stage '{stage}'" in first.stdout
    raw = sorted(p.name for p in (project / "data/raw").iterdir())
    assert raw == [
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
    ]
    with np.load(project / "data/processed/train.npz") as f:
        assert f["train_x"].shape == (55000, 784) and f["train_x"].dtype == np.uint8
        assert f["val_x"].shape == (5000, 784)
    metrics = json.loads((project / "reports/metrics.json").read_text())
    assert metrics["accuracy"] > 0.95
    assert set(metrics) >= {"accuracy", "loss", "macro_f1", "per_class"}
    assert set(metrics["per_class"]) == {str(d) for d in range(10)}
    history = (project / "reports/train_history.csv").read_text().splitlines()
    assert history[0].startswith("epoch,train_loss") and len(history) == 1 + EPOCHS
    for png in FIGURES:
        assert (project / f"reports/figures/{png}.png").read_bytes()[:4] == b"\x89PNG"
    assert len((project / "reports/predictions.csv").read_text().splitlines()) == 10001
    # DVC tracks the outputs: the lock file names each stage with hashes of its outs
    lock = (project / "dvc.lock").read_text()
    assert "models/model.safetensors" in lock and "md5:" in lock


def test_metrics_and_plots_are_visible_to_dvc(repro):
    project, env, _, _ = repro
    shown = json.loads(dvc(project, "metrics", "show", "--json", env=env).stdout)
    data = next(iter(shown.values()))["data"]
    assert data["reports/metrics.json"]["data"]["accuracy"] > 0.95
    plots = dvc(project, "plots", "show", "--json", env=env).stdout
    assert "reports/predictions.csv" in plots and "Accuracy per epoch" in plots


def test_mlflow_run_and_registered_model(repro):
    project, _, _, _ = repro
    info = registered(project)
    metrics = json.loads((project / "reports/metrics.json").read_text())
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    run = mlflow.get_run(info["run_id"])
    assert run.data.params["train.epochs"] == str(EPOCHS)
    assert run.data.metrics["test_accuracy"] == pytest.approx(metrics["accuracy"])
    assert run.data.tags["git_commit"] and len(run.data.tags["git_commit"]) == 40
    history = mlflow.MlflowClient().get_metric_history(info["run_id"], "val_accuracy")
    assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1))
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(info["run_id"], "figures")}
    assert artifacts == {f"figures/{n}.png" for n in FIGURES}
    # the artifact store is an absolute folder at the project root, not the run's cwd
    exp = mlflow.get_experiment(info["experiment_id"])
    assert exp.artifact_location == (project / "mlartifacts").as_uri()

    model = mlflow.pyfunc.load_model(f"models:/mnist-mlp/{info['version']}")
    with np.load(project / "data/processed/test.npz") as f:
        x, y = f["test_x"].astype(np.float32) / 255, f["test_y"]
    table = model.predict(x)
    probs = served_probabilities(table)
    assert probs.shape == (10000, 10)
    np.testing.assert_array_equal(table["guess"].to_numpy(), probs.argmax(1))
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)  # probabilities, not logits
    assert (probs.argmax(1) == y).mean() == pytest.approx(metrics["accuracy"], abs=1e-9)
    for n in (1, 3, 257):  # any batch size, not just the example's
        assert served_probabilities(model.predict(x[:n])).shape == (n, 10)

    # the score the evaluate stage recorded for the gate is what the registered model gives:
    # the same right/wrong bit on every image, the same metrics
    from dataclasses import asdict

    from digits.core.metrics import compute_metrics
    from digits.scoring.cache import CACHE_TAG, decode_correct

    version = mlflow.MlflowClient().get_model_version("mnist-mlp", info["version"])
    record = json.loads(version.tags[CACHE_TAG])
    assert record["by"] == "evaluate"
    np.testing.assert_array_equal(decode_correct(record["correct"], len(y)), probs.argmax(1) == y)
    headline = {k: v for k, v in record["metrics"].items() if k not in ("calibration", "ood")}
    assert headline == asdict(compute_metrics(probs, y))
    assert record["metrics"]["calibration"] == metrics["calibration"]
    assert record["robustness"] == metrics["robustness"]
    assert "scored by the evaluate stage" in (project / "reports/gate.md").read_text()


def test_second_repro_does_nothing(repro):
    project, env, _, _ = repro
    before = (project / "dvc.lock").read_text()
    again = dvc(project, "repro", env=env)
    assert "Running stage" not in again.stdout
    assert (project / "dvc.lock").read_text() == before


def test_forced_rerun_is_bit_identical(repro):
    """`dvc repro --force` retrains from scratch: same params, same machine -> the same model
    bytes, history and metrics (only the MLflow run and version are new)."""
    project, env, _, _ = repro
    files = [
        "models/model.safetensors",
        "reports/train_history.csv",
        "reports/metrics.json",
        "reports/predictions.csv",
        "data/processed/train.npz",
        "data/processed/test.npz",
    ]
    before = {f: (project / f).read_bytes() for f in files}
    version_before = registered(project)["version"]
    out = dvc(project, "repro", "--force", env=env).stdout
    assert "Running stage 'train'" in out
    for f in files:
        assert (project / f).read_bytes() == before[f], f"{f} changed on a forced rerun"
    version_after = registered(project)["version"]
    assert int(version_after) == int(version_before) + 1


def test_evaluate_param_reruns_only_evaluate(repro):
    project, env, _, _ = repro
    model_before = (project / "models/model.safetensors").read_bytes()
    set_params(project, **{"evaluate.misclassified_shown": 12})
    out = dvc(project, "repro", env=env).stdout
    assert "Running stage 'evaluate'" in out
    for stage in ("download", "preprocess", "train"):
        assert f"Running stage '{stage}'" not in out
    assert (project / "models/model.safetensors").read_bytes() == model_before


def test_bad_training_stops_at_the_gate(repro):
    """One epoch at lr 1.0 ruins the model: `dvc exp run` must stop at the gate, name the
    failing gates, record the rejection in the registry, and leave the champion alone."""
    project, env, _, _ = repro
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    champion = client.get_model_version_by_alias("mnist-mlp", "champion").version
    proc = dvc(
        project,
        "exp",
        "run",
        "-n",
        "bad-lr",
        "-S",
        "train.epochs=1",
        "-S",
        "train.lr=1.0",
        env=env,
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "Running stage 'gate'" in out and "digits gate: error: failed gates: min_accuracy" in out
    assert client.get_model_version_by_alias("mnist-mlp", "champion").version == champion
    newest = max(client.search_model_versions("name='mnist-mlp'"), key=lambda v: int(v.version))
    assert newest.tags["validation_status"] == "rejected"
    assert "min_accuracy" in newest.tags["validation_reasons"]
    run_ = mlflow.get_run(newest.tags["run_id"])
    assert run_.data.tags["dvc_exp_name"] == "bad-lr"
    assert run_.data.params["train.lr"] == "1.0"
