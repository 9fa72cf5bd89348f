"""The network (784-256-128-64-32-10, ReLU, logits out), its portable layers (products in numpy's
OpenBLAS), the probability wrapper, the safetensors model file (self-describing, no pickle,
clear errors for anything else) and the torch-free model users run (digits.model.inference)."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from digits.core.config import TrainParams
from digits.model.inference import Classifier, ModelError, read_model_file, softmax
from digits.model.network import PortableLinear, build_mlp, predict_logits, save_model

SIZES = TrainParams().hidden_sizes  # the default in params.yaml


def load_torch(path) -> nn.Sequential:
    """The torch network of a model file, in eval mode: the architecture and tensors as
    digits.model.inference reads (and checks) them, in the trainer's network."""
    model_file = read_model_file(path)
    model = build_mlp(model_file.hidden_sizes, model_file.dropout)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in model_file.tensors.items()})
    return model.eval()


def test_default_architecture():
    assert SIZES == (256, 128, 64, 32)
    model = build_mlp(SIZES)  # the tests run pinned, as the pipeline does: portable layers
    linears = [m for m in model if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (784, 256),
        (256, 128),
        (128, 64),
        (64, 32),
        (32, 10),
    ]
    # Linear, ReLU, Linear, ReLU, ... Linear: ReLU between layers, nothing after the last
    kinds = [type(m) for m in model]
    assert kinds == [PortableLinear, nn.ReLU] * 4 + [PortableLinear]
    assert [type(m) for m in build_mlp(SIZES, portable=False)] == [nn.Linear, nn.ReLU] * 4 + [
        nn.Linear
    ]
    assert sum(p.numel() for p in model.parameters()) == sum(
        i * o + o for i, o in [(784, 256), (256, 128), (128, 64), (64, 32), (32, 10)]
    )


def test_dropout_layers():
    kinds = [type(m) for m in build_mlp((16, 8), dropout=0.2, portable=False)]
    assert kinds == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]


def test_portable_layers_compute_what_nn_linear_computes():
    """Forward and every gradient through OpenBLAS agree with torch's own products (to float32
    rounding: another library sums in another order)."""
    torch.manual_seed(0)
    portable, plain = build_mlp((32, 16), portable=True), build_mlp((32, 16), portable=False)
    plain.load_state_dict(portable.state_dict())
    x, y = torch.rand(50, 784), torch.randint(0, 10, (50,))
    grads = []
    for model in (portable, plain):
        model.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert all(g.abs().sum() > 0 for g in grads[0])  # every parameter got a gradient


def test_numpy_inference_is_bit_for_bit_the_torch_network(tmp_path):
    """What evaluate scores and users get (numpy) equals what the trainer's network computes."""
    torch.manual_seed(3)
    model = build_mlp(SIZES).eval()
    path = tmp_path / "m.safetensors"
    save_model(model, path, SIZES, 0.0)
    x = torch.rand(300, 784)
    classifier = Classifier.from_file(path)
    logits = classifier.logits(x.numpy())
    assert logits.dtype == np.float32
    assert np.array_equal(logits, predict_logits(model, x).numpy())
    probs = classifier.probabilities(x.numpy())
    np.testing.assert_allclose(probs, torch.softmax(torch.from_numpy(logits), 1), atol=1e-6)
    assert np.array_equal(probs.argmax(1), logits.argmax(1))
    np.testing.assert_allclose(softmax(np.array([[1000.0, 0.0]])), [[1.0, 0.0]])  # no overflow


def test_outputs_logits_and_the_users_model_gives_probabilities(tmp_path):
    torch.manual_seed(0)
    model = build_mlp(SIZES).eval()
    path = tmp_path / "m.safetensors"
    save_model(model, path, SIZES, 0.0)
    x = torch.rand(16, 784)
    with torch.no_grad():
        logits = model(x)
    probs = torch.from_numpy(Classifier.from_file(path).probabilities(x.numpy()))
    assert logits.shape == probs.shape == (16, 10)
    assert (logits < 0).any()  # not probabilities
    assert not torch.allclose(logits.sum(1), torch.ones(16), atol=1e-3)
    assert (probs >= 0).all() and (probs <= 1).all()
    torch.testing.assert_close(probs.sum(1), torch.ones(16))
    torch.testing.assert_close(probs, torch.softmax(logits, 1))
    assert torch.equal(probs.argmax(1), logits.argmax(1))


def test_save_load_roundtrip(tmp_path):
    torch.manual_seed(1)
    model = build_mlp((32, 16), dropout=0.25)
    path = tmp_path / "models/model.safetensors"
    save_model(model, path, (32, 16), 0.25)
    assert [p.name for p in path.parent.iterdir()] == ["model.safetensors"]  # no temp left
    with safe_open(str(path), "pt") as f:
        assert json.loads(f.metadata()["digits"]) == {
            "architecture": {"hidden_sizes": [32, 16], "dropout": 0.25}
        }
    loaded = load_torch(path)
    assert not loaded.training  # eval mode: dropout off
    assert [type(m) for m in loaded] == [type(m) for m in model]
    x = torch.rand(64, 784)
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    # saving the loaded model again gives the same bytes
    again = tmp_path / "again.safetensors"
    save_model(loaded, again, (32, 16), 0.25)
    assert again.read_bytes() == path.read_bytes()


def _pickle_file(path):
    torch.save(build_mlp((8,)), path)  # a whole pickled module, the classic .pt


def _pickled_state_dict(path):
    torch.save(build_mlp((8,)).state_dict(), path)


def _plain_pickle(path):
    path.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))


def _empty(path):
    path.write_bytes(b"")


def _text(path):
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 12\n")


def _truncated(path):
    save_model(build_mlp((8,)), path, (8,), 0.0)
    path.write_bytes(path.read_bytes()[:-100])


def _foreign_safetensors(path):  # valid safetensors, not ours: no architecture header
    save_file({"w": torch.zeros(3)}, str(path))


def _mismatched_weights(path):  # our header, but the tensors of another network
    save_file(
        build_mlp((16,)).state_dict(),
        str(path),
        metadata={"architecture": json.dumps({"hidden_sizes": [8], "dropout": 0.0})},
    )


BAD_MODELS = [
    _pickle_file,
    _pickled_state_dict,
    _plain_pickle,
    _empty,
    _text,
    _truncated,
    _foreign_safetensors,
    _mismatched_weights,
]


@pytest.mark.parametrize("plant", BAD_MODELS, ids=[f.__name__[1:] for f in BAD_MODELS])
def test_bad_model_file_is_a_clear_value_error(tmp_path, plant):
    path = tmp_path / "model.safetensors"
    plant(path)
    for load in (read_model_file, Classifier.from_file):  # the file's reader, and the model's
        with pytest.raises(ModelError) as err:
            load(path)
        msg = str(err.value)
        assert msg.startswith(f"{path}: not a model written by digits"), msg


def test_missing_model_file(tmp_path):
    with pytest.raises(ModelError, match="model file not found"):
        read_model_file(tmp_path / "nope.safetensors")


SAVE_IN_A_PROCESS = """
import sys, torch
from digits.model.network import build_mlp, save_model
torch.manual_seed(0)
cal = {"score": "max_probability", "temperature": 0.5, "threshold": 0.6}
save_model(build_mlp((8,)), sys.argv[1], (8,), 0.0, cal)
"""


def test_the_same_model_is_the_same_file_in_every_process(tmp_path):
    """safetensors writes its metadata map in a per-process random order: a header of two keys
    made two files of one model, one run in two (and DVC reran every stage after train)."""
    import subprocess
    import sys

    files = [tmp_path / f"{i}.safetensors" for i in range(8)]  # two keys: 1 in 128 all alike
    for f in files:
        subprocess.run([sys.executable, "-c", SAVE_IN_A_PROCESS, str(f)], check=True)
    assert len({f.read_bytes() for f in files}) == 1
    m = read_model_file(files[0])
    assert (m.temperature, m.threshold) == (0.5, 0.6)


def test_a_file_of_an_earlier_release_still_loads(tmp_path):
    """Registered versions written before the header held the calibration: architecture only."""
    model = build_mlp((16,))
    path = tmp_path / "old.safetensors"
    meta = {"architecture": json.dumps({"hidden_sizes": [16], "dropout": 0.0})}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata=meta)
    m = read_model_file(path)
    assert m.hidden_sizes == (16,) and (m.temperature, m.threshold) == (1.0, 0.0)
