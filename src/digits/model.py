"""The network, and how it is stored.

`build_mlp` returns logits: CrossEntropyLoss applies log-softmax itself, so a softmax before the
loss would be applied twice. Users see probabilities through `Probabilities`, the wrapper that is
logged to MLflow. Weights are saved as safetensors with the architecture in the header, so a
model file is self-describing and loading it runs no pickle."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from digits.errors import DigitsError
from digits.files import atomic_path
from digits.mnist import NUM_CLASSES, NUM_PIXELS


class ModelError(DigitsError):
    """A model file that is missing or was not written by `save_model`."""


def build_mlp(hidden_sizes: tuple[int, ...] | list[int], dropout: float = 0.0) -> nn.Sequential:
    """784 -> hidden... -> 10, ReLU (and optional dropout) between layers, logits out."""
    layers: list[nn.Module] = []
    sizes = [NUM_PIXELS, *hidden_sizes]
    for fan_in, fan_out in itertools.pairwise(sizes):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(sizes[-1], NUM_CLASSES))
    return nn.Sequential(*layers)


class Probabilities(nn.Module):
    """What a user calls: a (N, 784) float32 batch in [0, 1] -> (N, 10) class probabilities."""

    def __init__(self, logits_model: nn.Module):
        super().__init__()
        self.net = logits_model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(x), dim=1)


@torch.inference_mode()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 10000) -> torch.Tensor:
    """Logits for a whole split, in eval mode, a batch at a time (memory stays bounded)."""
    model.eval()
    return torch.cat([model(xb) for xb in x.split(batch_size)])


def save_model(model: nn.Sequential, path: str | Path, hidden_sizes, dropout: float) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"architecture": json.dumps({"hidden_sizes": list(hidden_sizes), "dropout": dropout})}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)


def load_model(path: str | Path) -> nn.Sequential:
    """Rebuild the network from a safetensors file written by save_model, in eval mode."""
    path = Path(path)
    try:
        state = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            arch = json.loads((f.metadata() or {})["architecture"])
    except FileNotFoundError:
        raise ModelError(f"{path}: model file not found") from None
    except (SafetensorError, KeyError, json.JSONDecodeError, OSError) as e:
        raise ModelError(f"{path}: not a model written by digits ({e})") from None
    try:
        model = build_mlp(arch["hidden_sizes"], arch["dropout"])
        model.load_state_dict(state)
    except (KeyError, TypeError, RuntimeError) as e:  # header and tensors disagree
        detail = " ".join(str(e).split())[:300]  # one line for the CLI
        raise ModelError(
            f"{path}: not a model written by digits (its weights do not match "
            f"the architecture in its header: {detail})"
        ) from None
    return model.eval()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
