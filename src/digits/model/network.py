"""The network, and how it is stored.

`build_mlp` returns logits: CrossEntropyLoss applies log-softmax itself, so a softmax before the
loss would be applied twice. Users see probabilities from the numpy model that a registered
version runs (`digits.model.inference.Classifier`), which also reads the model files back. Weights
are saved as safetensors with the architecture in the header, so a model file is
self-describing and loading it runs no pickle.

With the portable numerics on (the default, `digits.core.numerics`), the layers are
`PortableLinear`: an `nn.Linear` whose three matrix products (forward, and the input and weight
gradients) run in `digits.core.blas` on the CPU. Same parameters, same state dict: only where the
products run differs."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from digits.core import blas
from digits.core.files import atomic_path
from digits.core.mnist import NUM_CLASSES, NUM_PIXELS
from digits.model.inference import HEADER_KEY


class _BlasLinear(torch.autograd.Function):
    """y = x W^T + b with the products in digits.core.blas; the bias and its gradient in torch."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        out = torch.from_numpy(blas.matmul(x.detach().numpy(), weight.detach().numpy().T))
        return out.add_(bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        g = grad.detach().numpy()
        grad_x = None
        if ctx.needs_input_grad[0]:  # not for the first layer: its input is the data
            grad_x = torch.from_numpy(blas.matmul(g, weight.detach().numpy()))
        grad_w = torch.from_numpy(blas.matmul(g.T, x.detach().numpy()))
        return grad_x, grad_w, grad.sum(0)


class PortableLinear(nn.Linear):
    """nn.Linear whose products run in digits.core.blas on the CPU (elsewhere: torch's own)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or self.bias is None:
            return super().forward(x)
        return _BlasLinear.apply(x, self.weight, self.bias)


def build_mlp(
    hidden_sizes: tuple[int, ...] | list[int], dropout: float = 0.0, portable: bool | None = None
) -> nn.Sequential:
    """784 -> hidden... -> 10, ReLU (and optional dropout) between layers, logits out.

    `portable` (default: the numerics' setting) picks PortableLinear over nn.Linear."""
    linear = PortableLinear if (blas.portable() if portable is None else portable) else nn.Linear
    layers: list[nn.Module] = []
    sizes = [NUM_PIXELS, *hidden_sizes]
    for fan_in, fan_out in itertools.pairwise(sizes):
        layers += [linear(fan_in, fan_out), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
    layers.append(linear(sizes[-1], NUM_CLASSES))
    return nn.Sequential(*layers)


@torch.inference_mode()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 10000) -> torch.Tensor:
    """Logits for a whole split, in eval mode, a batch at a time (memory stays bounded)."""
    model.eval()
    return torch.cat([model(xb) for xb in x.split(batch_size)])


def save_model(
    model: nn.Sequential,
    path: str | Path,
    hidden_sizes,
    dropout: float,
    calibration: dict | None = None,
) -> None:
    """The weights, with the architecture (and the calibration: temperature and refusal
    threshold, see digits.model.inference) in the header."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    header: dict = {"architecture": {"hidden_sizes": list(hidden_sizes), "dropout": dropout}}
    if calibration is not None:
        header["calibration"] = calibration
    # one metadata key: safetensors writes its metadata map in a per-process random order, so
    # two keys would make the same model two different files (and DVC rerun everything after)
    meta = {HEADER_KEY: json.dumps(header, sort_keys=True)}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)
