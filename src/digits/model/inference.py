"""The trained model as users run it, in numpy alone: the weights file read without torch, the
forward pass with its products in `digits.core.blas`, then the calibrated softmax and the refusal.
What the evaluate stage scores, the gate re-scores, `digits predict` and the page answer with,
and the registered pyfunc serves: one code path, so what is served is what the gate scored.

A model file carries its calibration in its header: the temperature that divides the logits
(digits.model.calibration) and the refusal threshold (digits.model.ood): an image whose best digit
gets a calibrated probability below it is "not a digit". A file without one has temperature 1 and
threshold 0 (it refuses nothing).

The logits are bit-for-bit those of the torch network the trainer built (`digits.model.network`):
the same OpenBLAS calls on the same layouts, then the bias add and ReLU, which round exactly. No
torch import here (seconds): a command that only predicts starts in well under a second."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from digits.core import blas
from digits.core.errors import DigitsError
from digits.core.mnist import NUM_CLASSES, NUM_PIXELS

# the safetensors metadata key of a model file's header: {"architecture": ..., "calibration": ...}
HEADER_KEY = "digits"


class ModelError(DigitsError):
    """A model file that is missing or was not written by `digits.model.network.save_model`."""


@dataclass(frozen=True)
class ModelFile:
    """A model file's contents: the architecture in its header, and the weights by name."""

    hidden_sizes: tuple[int, ...]
    dropout: float
    tensors: dict[str, np.ndarray]  # "0.weight", "0.bias", "2.weight", ... (nn.Sequential)
    temperature: float = 1.0
    threshold: float = 0.0

    def layers(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """(weight (out, in), bias (out,)) of each linear layer, input to output."""
        indices = sorted({int(k.split(".")[0]) for k in self.tensors})
        return [(self.tensors[f"{i}.weight"], self.tensors[f"{i}.bias"]) for i in indices]


def read_model_file(path: str | Path) -> ModelFile:
    """Read a safetensors model file (no pickle) and check it is one `save_model` wrote."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file, safe_open

    path = Path(path)
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), "np") as f:
            meta = f.metadata() or {}
        if HEADER_KEY in meta:
            header = json.loads(meta[HEADER_KEY])
            arch, cal = header["architecture"], header.get("calibration", {})
        else:  # the files of earlier releases: a key each (uncalibrated before calibration)
            arch, cal = json.loads(meta["architecture"]), json.loads(meta.get("calibration", "{}"))
        hidden, dropout = tuple(int(s) for s in arch["hidden_sizes"]), float(arch["dropout"])
        temperature, threshold = float(cal.get("temperature", 1.0)), float(cal.get("threshold", 0))
        if not (temperature > 0 and 0 <= threshold <= 1):
            raise ValueError(f"calibration {cal}: expected temperature > 0, threshold in [0, 1]")
    except FileNotFoundError:
        raise ModelError(f"{path}: model file not found") from None
    except (SafetensorError, KeyError, TypeError, ValueError, OSError) as e:
        raise ModelError(f"{path}: not a model written by digits ({e})") from None
    model = ModelFile(hidden, dropout, tensors, temperature, threshold)
    sizes = [NUM_PIXELS, *hidden, NUM_CLASSES]
    try:
        shapes = [(w.shape, b.shape) for w, b in model.layers()]
    except (KeyError, ValueError):
        shapes = []
    want = [((b, a), (b,)) for a, b in itertools.pairwise(sizes)]
    if shapes != want or len(tensors) != 2 * len(want):
        raise ModelError(
            f"{path}: not a model written by digits (its weights do not match the architecture "
            f"in its header: {sizes})"
        )
    return model


def weights_in(model_dir: str | Path) -> Path | None:
    """The weights file inside a downloaded version's folder (digits.tracking.pyfunc logs it among
    the model's artifacts); None for a version of another format (the pt2 models of earlier
    releases)."""
    found = sorted((Path(model_dir) / "artifacts").glob("*.safetensors"))
    return found[0] if found else None


class Classifier:
    """The network in numpy: (N, 784) float32 in [0, 1] -> logits or probabilities (N, 10)."""

    def __init__(self, model: ModelFile):
        self.hidden_sizes = model.hidden_sizes
        self.temperature, self.threshold = model.temperature, model.threshold
        self._layers = [
            (np.ascontiguousarray(w, np.float32), np.ascontiguousarray(b, np.float32))
            for w, b in model.layers()
        ]

    @classmethod
    def from_file(cls, path: str | Path) -> Classifier:
        return cls(read_model_file(path))

    def logits(self, x: np.ndarray, batch_size: int = 10000) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != NUM_PIXELS:
            raise ModelError(f"input of shape {x.shape}, expected (N, {NUM_PIXELS}) float32")
        parts = [self._forward(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
        return np.concatenate(parts) if parts else np.zeros((0, NUM_CLASSES), np.float32)

    def _forward(self, h: np.ndarray) -> np.ndarray:
        last = len(self._layers) - 1
        for i, (w, b) in enumerate(self._layers):
            h = blas.matmul(h, w.T)  # w.T: the layout PortableLinear multiplies with
            h += b
            if i < last:
                np.maximum(h, 0.0, out=h)
        return h

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        """Calibrated probabilities of digits 0-9, (N, 10)."""
        return calibrated(self.logits(x), self.temperature)

    def answers(self, x: np.ndarray) -> Answers:
        return Answers.of(self.probabilities(x), self.threshold)


@dataclass(frozen=True)
class Answers:
    """What the model says of each image: the digit (-1: not a digit), its best guess, the
    guess's probability (the score the refusal compares with the threshold), and all ten."""

    digit: np.ndarray  # int64 (N,), -1 where refused
    guess: np.ndarray  # int64 (N,)
    confidence: np.ndarray  # float32 (N,)
    probabilities: np.ndarray  # float32 (N, 10)

    @classmethod
    def of(cls, probs: np.ndarray, threshold: float) -> Answers:
        guess = probs.argmax(axis=1).astype(np.int64)
        confidence = probs.max(axis=1)
        digit = np.where(confidence >= threshold, guess, -1)
        return cls(digit, guess, confidence, probs)


def calibrated(logits: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(logits / T), in float32: the probabilities a calibrated model gives."""
    return softmax(np.asarray(logits, np.float32) / np.float32(temperature))


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float32, shifted by the row maximum (no overflow)."""
    z = np.asarray(logits, dtype=np.float32)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
