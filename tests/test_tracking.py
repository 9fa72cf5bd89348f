"""MLflow tracking under faults: a tracking server that is down stops `evaluate` fast with a
message naming it and costs no retraining; two pipelines writing one fresh SQLite store at
once both land (no lost run or model version, no "database is locked")."""

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

from helpers import dvc, make_fake_mnist, make_project, project_env, set_params

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
    import torch

    from digits.config import parse_params
    from digits.data import load_split, preprocess
    from digits.model import save_model
    from digits.reports import write_history
    from digits.train import train

    root = tmp_path_factory.mktemp("evaluate") / "project"
    raw = make_fake_mnist(root.parent / "raw")
    (root / "dvc.yaml").parent.mkdir(parents=True)
    (root / "dvc.yaml").write_text("stages: {}\n")
    (root / "params.yaml").write_text(
        yaml.safe_dump(
            {
                "data": {"val_size": 100},
                "train": {"epochs": 2, "batch_size": 32, "device": "cpu"},
                "evaluate": {"misclassified_shown": 6},
            }
        )
    )
    preprocess(
        raw,
        root / "data/processed/train.npz",
        root / "data/processed/test.npz",
        root / "reports/data.json",
        val_size=100,
        seed=0,
    )
    p = parse_params(yaml.safe_load((root / "params.yaml").read_text())).train
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = train(
            p, *load_split(root / "data/processed/train.npz", "train", "val"), progress=False
        )
    finally:
        torch.set_num_threads(threads)
    save_model(result.model, root / "models/model.safetensors", p.hidden_sizes, p.dropout)
    write_history(root / "reports/train_history.csv", result.history)
    return root


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
