"""MLflow tracking under faults: a tracking server that is down stops `evaluate` fast with a
message naming it and costs no retraining; two pipelines writing one fresh SQLite store at
once both land (no lost run or model version, no "database is locked").

And what a run says about itself: a name from its DVC experiment or its branch and commit, a
description of its params against the promotion branch's, the three data splits as inputs,
the training's start, time, speed and numeric environment, metric names that group."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers import (
    ROOT,
    dvc,
    init_git,
    make_project,
    make_trained_project,
    project_env,
    run,
    set_params,
)

ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # see test_train.py


def closed_port_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"


# --- a tracking server that is down, in a real `dvc repro` -----------------------------------
# (`dvc repro evaluate`: stages after evaluate, if any, are not this test's business)


@pytest.mark.slow
def test_unreachable_server_fails_fast_and_retry_reruns_only_evaluate(tmp_path, mnist_http):
    project = make_project(tmp_path / "project")
    set_params(project, **{"train.epochs": 1})
    env = {**project_env(project, mnist_http), **ONE_THREAD}
    down = closed_port_url()
    bad_env = {**env, "MLFLOW_TRACKING_URI": down}

    first = dvc(project, "repro", "evaluate", env=bad_env, check=False)
    out = first.stdout + first.stderr
    assert first.returncode != 0
    for stage in ("download", "preprocess", "train", "evaluate"):
        assert f"Running stage '{stage}'" in first.stdout
    assert f"digits evaluate: error: MLflow tracking server {down} is unreachable" in out
    assert "Traceback" not in out
    model = project / "models/model.safetensors"
    assert model.exists()  # train's output survives evaluate's failure
    trained = model.read_bytes()
    assert not (project / "reports/mlflow_run.json").exists()

    # again while still down: only evaluate runs, and it gives up quickly
    t0 = time.monotonic()
    second = dvc(project, "repro", "evaluate", env=bad_env, check=False)
    elapsed = time.monotonic() - t0
    assert second.returncode != 0
    assert f"MLflow tracking server {down} is unreachable" in second.stdout + second.stderr
    assert elapsed < 30, f"took {elapsed:.1f}s to report an unreachable server"
    assert "Running stage 'train'" not in second.stdout

    # the store is back (the project's default SQLite store): only evaluate reruns
    retry = dvc(project, "repro", "evaluate", env=env)
    assert "Running stage 'evaluate'" in retry.stdout
    for stage in ("download", "preprocess", "train"):
        assert f"Running stage '{stage}'" not in retry.stdout
    assert model.read_bytes() == trained
    info = json.loads((project / "reports/mlflow_run.json").read_text())
    assert info["version"] == "1"
    assert info["tracking_uri"] == f"sqlite:///{project / 'mlflow.db'}"
    status = dvc(project, "status", "evaluate", env=env).stdout
    assert "changed" not in status  # up to date through evaluate


# --- two pipelines, one fresh SQLite store ---------------------------------------------------


@pytest.fixture(scope="module")
def evaluate_ready(tmp_path_factory) -> Path:
    """A project folder where the evaluate stage can run: fake data, a model trained on it."""
    return make_trained_project(tmp_path_factory.mktemp("evaluate") / "project")


@pytest.mark.slow
def test_two_pipelines_share_a_fresh_sqlite_store(tmp_path, evaluate_ready):
    from mlflow import MlflowClient

    store = tmp_path / "shared" / "mlflow.db"  # neither the file nor its folder exists yet
    uri = f"sqlite:///{store}"
    clones = []
    for name in ("a", "b"):
        clone = tmp_path / name
        shutil.copytree(evaluate_ready, clone)
        clones.append(clone)
    env = {**os.environ, **ONE_THREAD, "MLFLOW_TRACKING_URI": uri}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "digits.cli", "evaluate"],
            cwd=c,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for c in clones
    ]  # started together: both find no store, both want to create it
    results = [(p.wait(timeout=600), *p.communicate()) for p in procs]
    for rc, out, err in results:
        assert rc == 0, f"--- stdout\n{out[-3000:]}\n--- stderr\n{err[-3000:]}"
        assert "database is locked" not in out + err
        assert "evaluate: MLflow run" in out

    infos = [json.loads((c / "reports/mlflow_run.json").read_text()) for c in clones]
    assert sorted(i["version"] for i in infos) == ["1", "2"]
    assert infos[0]["run_id"] != infos[1]["run_id"]
    assert {i["tracking_uri"] for i in infos} == {uri}

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.get_experiment_by_name("mnist")
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.info.run_id for r in runs) == sorted(i["run_id"] for i in infos)
    assert {r.info.status for r in runs} == {"FINISHED"}
    for r in runs:  # every run complete: params, per-epoch and test metrics
        assert r.data.params["train.epochs"] == "2"
        assert "test_accuracy" in r.data.metrics
        assert [m.step for m in client.get_metric_history(r.info.run_id, "val_loss")] == [1, 2]
    versions = client.search_model_versions("name='mnist-mlp'")
    assert sorted(str(v.version) for v in versions) == ["1", "2"]
    by_version = {str(v.version): v for v in versions}
    for i in infos:
        v = by_version[i["version"]]
        assert v.run_id == i["run_id"] and v.tags["run_id"] == i["run_id"]
        assert v.status == "READY"


@pytest.mark.slow
def test_hung_server_fails_within_30_seconds(tmp_path, evaluate_ready):
    # a server that accepts connections and never answers (the kernel completes the TCP
    # handshake for a listening socket nobody accepts from)
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(16)
    uri = f"http://127.0.0.1:{hung.getsockname()[1]}"
    clone = tmp_path / "project"
    shutil.copytree(evaluate_ready, clone)
    env = {**os.environ, **ONE_THREAD, "MLFLOW_TRACKING_URI": uri}
    try:
        t0 = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "digits.cli", "evaluate"],
            cwd=clone,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        elapsed = time.monotonic() - t0
    finally:
        hung.close()
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(
        f"digits evaluate: error: MLflow tracking server {uri} is unreachable (timed out)"
    ), proc.stderr
    assert "Traceback" not in proc.stderr
    assert elapsed < 30, f"took {elapsed:.1f}s"
    assert not (clone / "reports/mlflow_run.json").exists()
    # the inputs are kept for the rerun
    assert (clone / "models/model.safetensors").read_bytes() == (
        evaluate_ready / "models/model.safetensors"
    ).read_bytes()


# --- what a run says about itself: where it came from, its data, its training ----------------


def git(repo: Path, *args: str) -> str:
    return run(["git", *args], repo).stdout.strip()


@pytest.fixture
def small_repo(tmp_path, monkeypatch) -> Path:
    """A git repository with the project's dvc.yaml and .gitignore and a small params.yaml."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy2(ROOT / name, repo / name)
    (repo / "params.yaml").write_text(yaml.safe_dump({"train": {"lr": 0.005, "epochs": 25}}))
    for var in ("DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "DVC_ROOT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(repo)
    return init_git(repo)


def test_run_name_and_description_follow_git(small_repo, monkeypatch):
    from digits.config import load_params
    from digits.tracking import run_description, run_name, run_origin

    repo = small_repo
    first = git(repo, "rev-parse", "HEAD")[:7]
    origin = run_origin(repo)
    assert run_name(origin) == f"main@{first}"
    text = run_description(origin, load_params(repo / "params.yaml"), repo)
    assert f"Commit `main@{first}`" in text
    assert "Params: as on the promotion branch `main`." in text

    # what the pipeline writes itself does not make the workspace dirty
    (repo / "dvc.lock").write_text("schema: '2.0'\n")
    (repo / "reports").mkdir()
    (repo / "reports/metrics.json").write_text("{}\n")
    assert run_name(run_origin(repo)) == f"main@{first}"

    # a branch with a committed change of train.lr, then an uncommitted change of epochs
    git(repo, "checkout", "-qb", "idea")
    set_params(repo, **{"train.lr": 0.001})
    git(repo, "commit", "-qam", "lower lr")
    second = git(repo, "rev-parse", "HEAD")[:7]
    set_params(repo, **{"train.epochs": 3})
    origin = run_origin(repo)
    assert origin.changed == ("params.yaml",)
    assert run_name(origin) == f"idea@{second}-dirty"
    text = run_description(origin, load_params(repo / "params.yaml"), repo)
    assert "Run with uncommitted changes to `params.yaml`." in text
    assert "Params that differ from the promotion branch `main`:" in text
    assert "| `train.epochs` | 3 | 25 |" in text
    assert "| `train.lr` | 0.001 | 0.005 |" in text
    assert "`train.batch_size`" not in text  # equal on both sides
    assert "```diff" in text and "-  epochs: 25" in text and "+  epochs: 3" in text
    assert "-  lr: 0.001" not in text  # the diff is against HEAD, not main

    # a DVC experiment is named after itself
    monkeypatch.setenv("DVC_EXP_NAME", "bushy-lamb")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", git(repo, "rev-parse", "HEAD"))
    origin = run_origin(repo)
    assert run_name(origin) == "bushy-lamb"
    text = run_description(origin, load_params(repo / "params.yaml"), repo)
    assert f"DVC experiment `bushy-lamb` (baseline commit `{second}`)." in text


def test_without_git_runs_get_plain_names(small_repo, tmp_path, monkeypatch):
    from digits.config import parse_params
    from digits.tracking import run_description, run_name, run_origin

    outside = tmp_path / "not-a-repo"
    outside.mkdir()
    origin = run_origin(outside)
    assert run_name(origin) is None  # MLflow picks its own
    assert "Not run from a git repository" in run_description(origin, parse_params({}), outside)

    empty = tmp_path / "no-programs"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))  # git is not installed
    origin = run_origin(small_repo)
    assert origin.commit == "" and run_name(origin) is None


def test_metric_names_group_by_prefix():
    from digits.tracking import evaluation_metrics

    metrics = {
        "accuracy": 0.9,
        "loss": 0.3,
        "macro_f1": 0.89,
        "per_class": {str(d): {"precision": 0.9, "recall": 0.8 + d / 100} for d in range(10)},
    }
    logged = {m.key: m.value for m in evaluation_metrics(metrics, 0)}
    assert {"test_accuracy", "test_loss", "test_macro_f1"} <= logged.keys()
    assert logged["test_class/3/recall"] == pytest.approx(0.83)
    assert len([k for k in logged if k.startswith("test_class/")]) == 20
    assert len(logged) == 23  # nothing else: no robustness section, no flat per-class names

    metrics["robustness"] = {"mean": 0.7, "worst": 0.4, "corruptions": {"blur": 0.8, "thin": 0.4}}
    logged = {m.key: m.value for m in evaluation_metrics(metrics, 0)}
    assert logged["robustness/mean"] == 0.7 and logged["robustness/worst"] == 0.4
    assert logged["robustness/blur"] == 0.8 and logged["robustness/thin"] == 0.4
    assert len(logged) == 27


@pytest.mark.slow
def test_run_records_origin_datasets_and_training(tmp_path, evaluate_ready):
    from mlflow import MlflowClient

    from digits.data import file_digest
    from digits.mnist import RESOURCES

    project = tmp_path / "project"
    shutil.copytree(evaluate_ready, project)
    init_git(project)
    commit = git(project, "rev-parse", "HEAD")
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    env = {**ONE_THREAD, "MLFLOW_TRACKING_URI": uri, "DVC_EXP_NAME": "", "DVC_ROOT": ""}
    run([sys.executable, "-m", "digits.cli", "evaluate"], project, env=env)

    ids = json.loads((project / "reports/mlflow_run.json").read_text())
    trained = json.loads((project / "models/train_info.json").read_text())
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    r = client.get_run(ids["run_id"])
    # named after its origin, which the evaluate stage's own outputs do not make dirty
    assert r.info.run_name == f"main@{commit[:7]}"
    assert r.data.tags["git_dirty"] == "false"
    assert r.data.tags["mlflow.source.git.commit"] == commit
    assert f"Commit `main@{commit[:7]}` ({commit})" in r.data.tags["mlflow.note.content"]
    # the whole pipeline: started when training started; its time, speed and environment
    assert r.info.start_time == int(trained["started_at"] * 1000)
    assert r.info.end_time > r.info.start_time + trained["seconds"] * 1000
    assert r.data.metrics["training/seconds"] == round(trained["seconds"], 2)
    assert r.data.metrics["training/samples_per_second"] == pytest.approx(
        trained["samples_per_second"]
    )
    assert trained["samples_per_second"] == pytest.approx(
        500 * 2 / trained["seconds"], rel=0.01
    )  # 500 training images (600 less 100 for validation), 2 epochs
    assert r.data.tags["device"] == "cpu"
    for key, value in trained["numerics"].items():
        assert key.startswith("numerics.") and r.data.tags[key] == value
    assert r.data.tags["numerics.torch"]
    # metrics: headline, grouped per class, per epoch
    assert {"test_accuracy", "test_loss", "test_macro_f1", "test_class/7/recall"} <= set(
        r.data.metrics
    )
    assert not [k for k in r.data.metrics if k.startswith(("test_precision", "test_recall"))]
    assert [m.step for m in client.get_metric_history(r.info.run_id, "val_loss")] == [1, 2]

    # the three splits as inputs: name, digest of the processed file, source, shape, context
    inputs = {i.tags[0].value: i.dataset for i in r.inputs.dataset_inputs}
    assert set(inputs) == {"training", "validation", "testing"}
    train_sha = file_digest(project / "data/processed/train.npz")
    test_sha = file_digest(project / "data/processed/test.npz")
    expected = {
        "training": ("mnist-train", train_sha, 500, "train-"),
        "validation": ("mnist-val", train_sha, 100, "train-"),
        "testing": ("mnist-test", test_sha, 100, "t10k-"),
    }
    for context, (name, sha, rows, prefix) in expected.items():
        ds = inputs[context]
        assert (ds.name, ds.digest) == (name, sha[:8])
        profile = json.loads(ds.profile)
        assert profile["num_rows"] == rows and profile["sha256"] == sha
        assert profile["features_shape"] == [rows, 784]
        source = json.loads(ds.source)
        assert ds.source_type == "http" and source["url"].startswith("https://")
        assert source["files"] == {f: md5 for f, md5 in RESOURCES if f.startswith(prefix)}
        assert "mlflow_tensorspec" in json.loads(ds.schema)

    # the experiment is a model-training one; the registered model says what it takes
    exp = client.get_experiment(r.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    description = client.get_registered_model("mnist-mlp").description
    assert "(N, 784)" in description and "[0, 1]" in description and "(N, 10)" in description
    version = client.get_model_version("mnist-mlp", ids["version"])
    assert version.tags["run_name"] == r.info.run_name
