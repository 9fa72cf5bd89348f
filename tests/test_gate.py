"""Champion/challenger promotion against a real SQLite model registry.

Models are trained for real on a tiny synthetic data set; a "crippled" variant never predicts
digit 9, so its accuracy is about 10 points lower while every other gate can still pass."""

from __future__ import annotations

import json
import shutil

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from digits import evaluate, gate
from digits.config import parse_params
from digits.data import preprocess
from digits.files import DATA_SUMMARY, GATE_REPORT, MODEL, RUN_INFO, TEST_DATA, TRAIN_DATA
from digits.model import build_mlp, save_model
from digits.train import run as train_run
from helpers import make_fake_mnist

NAME = "mnist-mlp"
GOOD = "good.safetensors"


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A project folder with fake data, its own SQLite registry, and a trained model."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")  # marks the root for repo_root()
    monkeypatch.delenv("DVC_ROOT", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)  # a URI set by an earlier test would win over the env
    raw = make_fake_mnist(tmp_path / "data/raw", n_train=1000, n_test=500)
    preprocess(raw, TRAIN_DATA, TEST_DATA, DATA_SUMMARY, val_size=100, seed=0)
    params = parse_params(
        {
            "train": {"epochs": 4, "batch_size": 32, "hidden_sizes": [32, 16], "lr": 0.01},
            "evaluate": {"misclassified_shown": 6},
            # absolute gates the crippled model (~90%) passes, so only the drop gate can stop it
            "gates": {
                "min_accuracy": 0.85,
                "max_loss": 100.0,
                "min_class_recall": 0.0,
                "max_accuracy_drop": 0.002,
            },
        }
    )
    train_run(params)
    shutil.copy(MODEL, GOOD)
    return tmp_path, params


def register(params, variant: str) -> str:
    """Register the trained model ('good'), or a variant of it, as a new version."""
    from digits.model import load_model

    model = load_model(GOOD)
    if variant == "crippled":  # never predicts 9
        with torch.no_grad():
            model[-1].bias[9] = -1e4
    elif variant == "garbage":  # untrained weights
        torch.manual_seed(1)
        model = build_mlp(params.train.hidden_sizes)
    save_model(model, MODEL, params.train.hidden_sizes, 0.0)
    evaluate.run(params)
    return json.loads(RUN_INFO.read_text())["version"]


def aliases(client) -> dict:
    return {k: str(v) for k, v in client.get_registered_model(NAME).aliases.items()}


def test_promotion_sequence(workspace):
    _, params = workspace
    client = MlflowClient()

    # 1. no champion yet: the first version passing the absolute gates becomes champion
    v1 = register(params, "crippled")
    gate.run(params)
    assert aliases(client) == {"champion": v1}
    assert client.get_model_version(NAME, v1).tags["validation_status"] == "approved"
    assert "the first champion" in GATE_REPORT.read_text()

    # 2. a better one takes over; the old champion becomes previous
    v2 = register(params, "good")
    gate.run(params)
    assert aliases(client) == {"champion": v2, "previous": v1}
    report = GATE_REPORT.read_text()
    assert "max_accuracy_drop" in report and f"champion v{v1}" in report

    # 3. worse than the champion by more than the allowed drop: rejected, champion unchanged
    v3 = register(params, "crippled")
    with pytest.raises(gate.GateFailed, match="max_accuracy_drop"):
        gate.run(params)
    assert aliases(client) == {"champion": v2, "previous": v1}
    tags = client.get_model_version(NAME, v3).tags
    assert tags["validation_status"] == "rejected"
    assert "max_accuracy_drop" in tags["validation_reasons"]
    assert "REJECTED" in GATE_REPORT.read_text()

    # 4. below an absolute gate: rejected with the gate named
    v4 = register(params, "garbage")
    with pytest.raises(gate.GateFailed, match="min_accuracy"):
        gate.run(params)
    assert aliases(client) == {"champion": v2, "previous": v1}
    assert "min_accuracy" in client.get_model_version(NAME, v4).tags["validation_reasons"]

    # every version carries its provenance tags
    for v in (v1, v2, v3, v4):
        tags = client.get_model_version(NAME, v).tags
        assert {"git_commit", "test_accuracy", "data.train_sha256", "data.test_sha256"} <= set(tags)

    # the champion alias is what predict and serving load
    import mlflow.pyfunc
    import numpy as np

    with np.load(TEST_DATA) as f:
        x = f["test_x"][:5].astype(np.float32) / 255
    assert mlflow.pyfunc.load_model(f"models:/{NAME}@champion").predict(x).shape == (5, 10)


def test_first_version_failing_absolute_gate_leaves_no_champion(workspace):
    _, params = workspace
    client = MlflowClient()
    v1 = register(params, "garbage")
    with pytest.raises(gate.GateFailed):
        gate.run(params)
    assert aliases(client) == {}
    assert client.get_model_version(NAME, v1).tags["validation_status"] == "rejected"


def test_gate_command_exits_nonzero_naming_gates(workspace, capsys):
    _, params = workspace
    import yaml

    from digits.stage import run_stage

    register(params, "garbage")
    (workspace[0] / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json")))
    capsys.readouterr()  # drop what registering printed
    assert run_stage("gate") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("digits gate: error: failed gates: min_accuracy")
