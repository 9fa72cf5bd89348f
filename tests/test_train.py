"""Training on the tiny fake data set: reproducible to the byte, learns, refuses any checkpoint
that is not this run's (no pickle is ever loaded), and resumes after a real SIGKILL to exactly
the model an uninterrupted run gives, continuing the same MLflow run."""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from digits.core.config import TrainParams, parse_params
from digits.core.files import file_digest
from digits.core.reports import HISTORY_FIELDS, read_history, write_history
from digits.data.preprocess import load_split, preprocess
from digits.model.checkpoint import Checkpoint, CheckpointError, fingerprint
from digits.model.checkpoint import load as load_checkpoint
from digits.model.network import save_model
from digits.stages.train import train
from helpers import make_fake_mnist, run

# Two processes train at once here: with two OpenBLAS threads each, their spinning threads
# fight over the two cores and small batches train 10-100x slower. One thread each keeps these
# tests fast and is just as exact (both processes run the same kernels on the same threads).
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
# and each stage process logs to its own project's store (mlflow.db at its root), whatever an
# earlier test left in this process's environment (mlflow.set_tracking_uri sets the variable)
STAGE_ENV = {**ONE_THREAD, "MLFLOW_TRACKING_URI": ""}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def processed(tmp_path_factory) -> Path:
    """data/processed/train.npz (+ test.npz) made by the real preprocess from fake raw files."""
    root = tmp_path_factory.mktemp("data")
    raw = make_fake_mnist(root / "raw", n_train=1100, n_test=100)
    out = root / "processed"
    preprocess(raw, out / "train.npz", out / "test.npz", root / "data.json", val_size=100, seed=0)
    return out


@pytest.fixture(scope="module")
def tensors(processed):
    return load_split(processed / "train.npz", "train", "val")


def params(**kw) -> TrainParams:
    base = {"epochs": 3, "batch_size": 32, "device": "cpu", "hidden_sizes": [64, 32]}
    return parse_params({"train": {**base, **kw}}).train


def no_seconds(history):
    return [{k: v for k, v in row.as_dict().items() if k != "seconds"} for row in history]


def test_same_params_same_bytes(tmp_path, tensors):
    p = params()
    a = train(p, tensors, progress=False)
    b = train(p, tensors, progress=False)
    save_model(a.model, tmp_path / "a.safetensors", p.hidden_sizes, p.dropout)
    save_model(b.model, tmp_path / "b.safetensors", p.hidden_sizes, p.dropout)
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert no_seconds(a.history) == no_seconds(b.history)
    assert [h.epoch for h in a.history] == [1, 2, 3]
    # and the seed matters: another seed, other weights
    c = train(params(seed=1), tensors, progress=False)
    save_model(c.model, tmp_path / "c.safetensors", p.hidden_sizes, p.dropout)
    assert (tmp_path / "c.safetensors").read_bytes() != (tmp_path / "a.safetensors").read_bytes()


def test_loss_decreases_and_model_learns(tensors):
    result = train(params(epochs=4, label_smoothing=0.0), tensors, progress=False)
    h = result.history
    assert h[-1].train_loss < 0.5 * h[0].train_loss
    assert h[-1].val_loss < h[0].val_loss
    assert h[-1].val_accuracy > 0.9  # the fake digits are easy; chance is 0.1
    assert not result.model.training and next(result.model.parameters()).device.type == "cpu"
    # the LR schedule ran: one-cycle ends far below its peak
    assert h[-1].lr < 0.01 * params().lr


def test_history_file_roundtrip(tmp_path, tensors):
    result = train(params(epochs=2), tensors, progress=False)
    path = tmp_path / "reports/train_history.csv"
    write_history(path, result.history)
    header = path.read_text().splitlines()[0]
    assert header == ",".join(HISTORY_FIELDS)
    assert header.startswith("epoch,train_loss,train_accuracy,val_loss,val_accuracy,lr")
    back = read_history(path)
    assert [r.epoch for r in back] == [1, 2]
    for got, want in zip(back, result.history, strict=True):
        assert got.val_accuracy == pytest.approx(want.val_accuracy, rel=1e-5)
    assert "seconds" not in header  # wall clock stays out of the committed file


def test_in_process_resume_matches(tmp_path, tensors):
    p = params(epochs=3)
    ckpt = Checkpoint(tmp_path / "ckpt.safetensors", "run-a", run_id="r1")
    full = train(p, tensors, checkpoint=ckpt, progress=False)
    # a checkpoint after each epoch but the last: epoch 2 is what is there now
    state = load_checkpoint(ckpt.path, "run-a")
    assert state.epoch == 2 and len(state.history) == 2 and state.run_id == "r1"
    again = train(p, tensors, checkpoint=ckpt, progress=False)
    assert again.resumed_from_epoch == 2
    for (k, v), (k2, v2) in zip(
        full.model.state_dict().items(), again.model.state_dict().items(), strict=True
    ):
        assert k == k2 and torch.equal(v, v2), k
    assert no_seconds(again.history) == no_seconds(full.history)


# --- checkpoints that must be refused --------------------------------------------------------


class Payload:
    """Unpickling this runs code: it writes a marker file. Nothing may unpickle a checkpoint."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def _raw_pickle(path: Path, marker: Path) -> None:
    path.write_bytes(
        pickle.dumps({"fingerprint": "run-a", "epoch": 1, "x": Payload(marker)}, protocol=2)
    )


def _torch_saved(path: Path, marker: Path) -> None:
    torch.save({"fingerprint": "run-a", "epoch": 1, "model": Payload(marker)}, path)


@pytest.mark.parametrize("plant", [_raw_pickle, _torch_saved])
def test_malicious_checkpoint_is_refused(tmp_path, tensors, plant):
    # the payload is live: plain pickle runs it (control)
    control = tmp_path / "control-marker"
    plant(tmp_path / "control.pt", control)
    if plant is _raw_pickle:
        pickle.loads((tmp_path / "control.pt").read_bytes())
    else:
        torch.load(tmp_path / "control.pt", weights_only=False)
    assert control.read_text() == "pwned"

    marker = tmp_path / "marker"
    ckpt = Checkpoint(tmp_path / "ckpt.safetensors", "run-a")
    plant(ckpt.path, marker)
    with pytest.raises(CheckpointError) as err:
        train(params(epochs=1), tensors, checkpoint=ckpt, progress=False)
    msg = str(err.value)
    assert msg.startswith(f"{ckpt.path}: not a training checkpoint")
    assert msg.endswith("delete it to start over") and "\n" not in msg
    assert not marker.exists()


def test_truncated_checkpoint_is_refused(tmp_path, tensors):
    p = params(epochs=2)
    ckpt = Checkpoint(tmp_path / "ckpt.safetensors", "run-a")
    train(p, tensors, checkpoint=ckpt, progress=False)
    data = ckpt.path.read_bytes()
    ckpt.path.write_bytes(data[: len(data) // 2])  # e.g. a full disk
    with pytest.raises(CheckpointError, match=r"not a training checkpoint"):
        train(p, tensors, checkpoint=ckpt, progress=False)


def test_other_runs_checkpoint_is_refused(tmp_path, tensors):
    p = params(epochs=2)
    path = tmp_path / "ckpt.safetensors"
    train(p, tensors, checkpoint=Checkpoint(path, "run-a"), progress=False)
    assert path.exists()
    with pytest.raises(CheckpointError, match="belongs to another run"):
        train(p, tensors, checkpoint=Checkpoint(path, "run-b"), progress=False)
    # a safetensors file that is not a checkpoint at all is refused too
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(3)}, str(path))
    with pytest.raises(CheckpointError, match="not a training checkpoint"):
        train(p, tensors, checkpoint=Checkpoint(path, "run-a"), progress=False)


def test_fingerprint_covers_params_and_data():
    p = params()
    assert fingerprint(p, "d1") == fingerprint(params(), "d1")
    assert fingerprint(p, "d1") != fingerprint(p, "d2")
    assert fingerprint(p, "d1") != fingerprint(params(lr=0.001), "d1")
    assert fingerprint(p, "d1") != fingerprint(params(augment={"enabled": True}), "d1")


# --- the stage as a process: refusal and resume after SIGKILL --------------------------------


def make_stage_dir(root: Path, processed: Path, train_params: dict) -> Path:
    """What the train stage needs: a project root (dvc.yaml), params.yaml, processed data."""
    import yaml

    root.mkdir(parents=True)
    (root / "dvc.yaml").write_text("stages: {}\n")
    (root / "params.yaml").write_text(
        yaml.safe_dump({"data": {"val_size": 100}, "train": {"device": "cpu", **train_params}})
    )
    (root / "data/processed").mkdir(parents=True)
    shutil.copy2(processed / "train.npz", root / "data/processed/train.npz")
    return root


def ckpt_key(root: Path) -> str:
    from digits.core.config import load_params

    p = load_params(root / "params.yaml").train
    return fingerprint(p, file_digest(root / "data/processed/train.npz"))


def stage_checkpoint(root: Path) -> Path:
    run_id = ckpt_key(root)
    return root / ".checkpoints" / f"train-{run_id[:16]}.safetensors"


@pytest.mark.slow
def test_stage_refuses_planted_checkpoint(tmp_path, processed):
    root = make_stage_dir(tmp_path / "proj", processed, {"epochs": 1, "batch_size": 64})
    ckpt = stage_checkpoint(root)  # exactly where the stage will look
    ckpt.parent.mkdir()
    marker = tmp_path / "marker"
    _torch_saved(ckpt, marker)
    proc = run(
        [sys.executable, "-m", "digits.cli", "train"],
        root,
        env=STAGE_ENV,
        check=False,
        timeout=300,
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert sum("error" in line for line in lines) == 1, proc.stderr
    assert lines[-1].startswith(f"digits train: error: {ckpt}: not a training checkpoint")
    assert not marker.exists()
    assert not (root / "models").exists()
    assert ckpt.exists()  # left for the user to inspect and delete


EPOCHS = 16


@pytest.mark.slow
def test_resume_after_sigkill_is_exact(tmp_path, processed):
    # 1000 images in batches of 4: 250 steps an epoch, long enough to be killed mid-run
    train_params = {"epochs": EPOCHS, "batch_size": 4, "hidden_sizes": [64, 32]}
    ref = make_stage_dir(tmp_path / "reference", processed, train_params)
    victim = make_stage_dir(tmp_path / "victim", processed, train_params)
    env = {**os.environ, **STAGE_ENV}
    cmd = [sys.executable, "-m", "digits.cli", "train"]
    with open(tmp_path / "ref.log", "w") as ref_log, open(tmp_path / "victim.log", "w") as vlog:
        reference = subprocess.Popen(
            cmd, cwd=ref, env=env, stdout=ref_log, stderr=subprocess.STDOUT
        )
        proc = subprocess.Popen(cmd, cwd=victim, env=env, stdout=vlog, stderr=subprocess.STDOUT)
        try:
            ckpt = stage_checkpoint(victim)
            deadline = time.monotonic() + 300
            while not ckpt.exists():  # the first epoch is done and saved
                assert proc.poll() is None, (tmp_path / "victim.log").read_text()
                assert time.monotonic() < deadline, "no checkpoint appeared"
                time.sleep(0.005)
            os.kill(proc.pid, signal.SIGKILL)
            assert proc.wait(timeout=60) == -signal.SIGKILL
        finally:
            proc.kill()
            proc.wait()

        # killed mid-run: a checkpoint of a finished epoch, no model, no temp files
        assert not (victim / "models").exists()
        state = load_checkpoint(ckpt, ckpt_key(victim))
        epoch = state.epoch
        assert 1 <= epoch < EPOCHS and state.run_id  # the MLflow run it logs to
        assert os.listdir(ckpt.parent) == [ckpt.name]

        resumed = run(cmd, victim, env=STAGE_ENV, timeout=600)
        assert reference.wait(timeout=600) == 0, (tmp_path / "ref.log").read_text()

    assert f"train: resuming from {ckpt} after epoch {epoch}" in resumed.stdout
    assert f"epoch {epoch:3d}/{EPOCHS}" not in resumed.stdout  # done epochs are not redone
    assert f"epoch {EPOCHS:3d}/{EPOCHS}" in resumed.stdout
    model = "models/model.safetensors"
    assert (victim / model).read_bytes() == (ref / model).read_bytes()
    history = "reports/train_history.csv"
    assert no_seconds(read_history(victim / history)) == no_seconds(read_history(ref / history))
    assert len(read_history(victim / history)) == EPOCHS
    for root in (ref, victim):
        assert os.listdir(root / ".checkpoints") == []  # nothing left to resume by mistake

    # the resumed training continued the killed run: one run, every epoch logged once
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{victim / 'mlflow.db'}")
    (only,) = client.search_runs([client.get_experiment_by_name("mnist").experiment_id])
    assert only.info.run_id == state.run_id and only.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(only.info.run_id, "val_accuracy")]
    assert steps == list(range(1, EPOCHS + 1))
