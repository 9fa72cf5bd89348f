"""The network (784-256-128-64-32-10, ReLU, logits out), the probability wrapper users see,
and the safetensors model file (self-describing, no pickle, clear errors for anything else)."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from digits.config import TrainParams
from digits.model import (
    ModelError,
    Probabilities,
    build_mlp,
    count_parameters,
    load_model,
    save_model,
)

SIZES = TrainParams().hidden_sizes  # the default in params.yaml


def test_default_architecture():
    assert SIZES == (256, 128, 64, 32)
    model = build_mlp(SIZES)
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
    assert kinds == [nn.Linear, nn.ReLU] * 4 + [nn.Linear]
    assert count_parameters(model) == sum(
        i * o + o for i, o in [(784, 256), (256, 128), (128, 64), (64, 32), (32, 10)]
    )


def test_dropout_layers():
    kinds = [type(m) for m in build_mlp((16, 8), dropout=0.2)]
    assert kinds == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]


def test_outputs_logits_and_wrapper_gives_probabilities():
    torch.manual_seed(0)
    model = build_mlp(SIZES).eval()
    x = torch.rand(16, 784)
    with torch.no_grad():
        logits = model(x)
        probs = Probabilities(model)(x)
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
        assert json.loads(f.metadata()["architecture"]) == {
            "hidden_sizes": [32, 16],
            "dropout": 0.25,
        }
    loaded = load_model(path)
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
    with pytest.raises(ModelError) as err:
        load_model(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: not a model written by digits"), msg


def test_missing_model_file(tmp_path):
    with pytest.raises(ModelError, match="model file not found"):
        load_model(tmp_path / "nope.safetensors")
