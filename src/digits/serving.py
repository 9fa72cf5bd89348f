"""The registered model: how the evaluate stage packages a trained model for its users, and
registers it as a new version.

A version is an MLflow pyfunc in the "models from code" form: the code file
`digits/mlflow_model.py` with the few library modules it runs (`inference` and what it imports,
copied into the model's `code/` folder), and the weights file as an artifact. Loading it runs
that code over the weights, in numpy: no pickle, no torch, no exporter. `digits predict` and
the gate read the weights artifact with the installed `digits.inference` instead (no code from
the registry runs); both paths are the same code, so what is served is what the gate scored."""

from __future__ import annotations

import shutil
import tempfile
import warnings
from importlib import metadata
from pathlib import Path

import numpy as np

from digits.mnist import COLS, NUM_CLASSES, NUM_PIXELS, ROWS

CODE_FILE = Path(__file__).with_name("mlflow_model.py")
# what mlflow_model.py imports, and what those import (tests/test_serving.py checks the list)
SERVED_MODULES = ("__init__.py", "errors.py", "mnist.py", "numerics.py", "blas.py", "inference.py")
WEIGHTS_ARTIFACT = "weights"  # the name of the weights file among the model's artifacts
REQUIREMENTS = ("mlflow", "numpy", "safetensors", "threadpoolctl")

DESCRIPTION = (
    f"MNIST digit classifier (a multilayer perceptron). Input: float32 array (N, {NUM_PIXELS}),"
    f" N images of {ROWS}x{COLS} pixels flattened row by row, ink 1.0 on background 0.0 (pixel"
    f" values in [0, 1]). Output: float32 array (N, {NUM_CLASSES}), the probabilities of digits"
    f" 0-9 (each row sums to 1; the prediction is its argmax). Use the version with the alias"
    f" @champion: `mlflow.pyfunc.load_model('models:/<name>@champion').predict(x)`."
)


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    # unnamed: a named tensor would reach predict() as a dict {name: array}
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, NUM_PIXELS))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, NUM_CLASSES))]),
    )


def requirements() -> list[str]:
    """Pinned: what loading the model needs, at the versions that wrote it."""
    return [f"{name}=={metadata.version(name)}" for name in REQUIREMENTS]


def log_and_register(weights: Path, name: str) -> str:
    """Log the model of `weights` into the active run and register it as a new version of
    `name`; returns the version."""
    import mlflow

    package = Path(__file__).parent
    with tempfile.TemporaryDirectory(prefix="digits-model-") as tmp:
        code = Path(tmp) / "digits"
        code.mkdir()
        for module in SERVED_MODULES:
            shutil.copy2(package / module, code / module)
        with warnings.catch_warnings():  # type hints and input examples: we give a signature
            warnings.simplefilter("ignore", UserWarning)
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(CODE_FILE),
                artifacts={WEIGHTS_ARTIFACT: str(weights)},
                code_paths=[str(code)],
                signature=signature(),
                pip_requirements=requirements(),
                registered_model_name=name,
                await_registration_for=60,
            )
    return str(info.registered_model_version)


def describe_registered_model(client, name: str) -> None:
    """Say what the model takes and returns (once: a description written in the UI is kept)."""
    if not client.get_registered_model(name).description:
        client.update_registered_model(name, description=DESCRIPTION)
