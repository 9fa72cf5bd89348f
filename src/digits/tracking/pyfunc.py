"""The registered model: how the evaluate stage packages a trained model for its users, and
registers it as a new version.

A version is an MLflow pyfunc in the "models from code" form: the code file
`digits/tracking/mlflow_model.py` with the few library modules it runs (`inference` and what it
imports, copied into the model's `code/` folder), and the weights file as an artifact. Loading it
runs that code over the weights, in numpy: no pickle, no torch, no exporter. `digits predict` and
the gate read the weights artifact with the installed `digits.model.inference` instead (no code
from the registry runs); both paths are the same code, so what is served is what the gate scored."""

from __future__ import annotations

import shutil
import tempfile
import warnings
from importlib import metadata
from pathlib import Path

import numpy as np

from digits.core.mnist import COLS, NUM_CLASSES, NUM_PIXELS, ROWS

CODE_FILE = Path(__file__).with_name("mlflow_model.py")
# what mlflow_model.py imports, and what those import (tests/test_tracking.py checks the list)
SERVED_MODULES = (
    "__init__.py",
    "core/__init__.py",
    "core/errors.py",
    "core/mnist.py",
    "core/numerics.py",
    "core/blas.py",
    "model/__init__.py",
    "model/inference.py",
)
WEIGHTS_ARTIFACT = "weights"  # the name of the weights file among the model's artifacts
REQUIREMENTS = ("mlflow", "numpy", "pandas", "safetensors", "threadpoolctl")
PROBABILITIES = [f"p{d}" for d in range(NUM_CLASSES)]

DESCRIPTION = (
    f"MNIST digit classifier (a multilayer perceptron, calibrated, that says when an image is"
    f" not a digit). Input: float32 array (N, {NUM_PIXELS}), N images of {ROWS}x{COLS} pixels"
    f" flattened row by row, ink 1.0 on background 0.0 (pixel values in [0, 1]). Output: a"
    f" table of N rows with the columns `digit` (0-9, or null when the image is not a digit),"
    f" `guess` (the most likely digit, also for a refused image), `confidence` (the calibrated"
    f" probability of the guess; below the version's threshold it is not a digit) and"
    f" `p0`..`p9` (the calibrated probabilities of digits 0-9; each row sums to 1). Served by"
    f' `mlflow models serve`: POST {{"inputs": [[784 numbers], ...]}} to /invocations, get'
    f' {{"predictions": [{{"digit": 7, "guess": 7, "confidence": 0.99, "p0": ...'
    f" }}, ...]}}. Use the version with the alias @champion:"
    f" `mlflow.pyfunc.load_model('models:/<name>@champion').predict(x)`."
)


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    outputs: list[ColSpec | TensorSpec] = [
        ColSpec("long", "digit", required=False),  # null: not a digit
        ColSpec("long", "guess"),
        ColSpec("float", "confidence"),
        *(ColSpec("float", p) for p in PROBABILITIES),
    ]
    # the input unnamed: a named tensor would reach predict() as a dict {name: array}
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, NUM_PIXELS))]),
        outputs=Schema(outputs),
    )


def requirements() -> list[str]:
    """Pinned: what loading the model needs, at the versions that wrote it."""
    return [f"{name}=={metadata.version(name)}" for name in REQUIREMENTS]


def log_model(weights: Path, run_id: str) -> str:
    """Log the model of `weights` into run `run_id` (uploading its files); returns its URI,
    `models:/<model id>`, for `register`. Nothing here reads MLflow's "active run" or
    "active experiment": the model goes to the run's experiment, from any thread."""
    import mlflow
    from mlflow.models import Model

    package = Path(__file__).parent.parent  # src/digits
    with tempfile.TemporaryDirectory(prefix="digits-model-") as tmp:
        code = Path(tmp) / "digits"
        code.mkdir()
        for module in SERVED_MODULES:
            (code / module).parent.mkdir(exist_ok=True)
            shutil.copy2(package / module, code / module)
        run = mlflow.MlflowClient().get_run(run_id)
        # created here, not by Model.log, which would file it under the active experiment (or
        # the Default one) whatever run it names; with the run's params, as Model.log does
        logged = mlflow.initialize_logged_model(
            name="model",
            source_run_id=run_id,
            params=dict(run.data.params),
            experiment_id=run.info.experiment_id,
        )
        with warnings.catch_warnings():  # type hints and input examples: we give a signature
            warnings.simplefilter("ignore", UserWarning)
            # Model.log: what mlflow.pyfunc.log_model calls, with the run named, not "active"
            info = Model.log(
                artifact_path=None,  # deprecated by MLflow for `name`, and still required
                name="model",
                flavor=mlflow.pyfunc,
                run_id=run_id,
                model_id=logged.model_id,
                python_model=str(CODE_FILE),
                artifacts={WEIGHTS_ARTIFACT: str(weights)},
                code_paths=[str(code)],
                signature=signature(),
                pip_requirements=requirements(),
            )
    return str(info.model_uri)


def register(model_uri: str, name: str) -> str:
    """A new version of `name` from a logged model; returns the version. Under the store's
    write lock: the version number is read, then written."""
    import mlflow

    return str(mlflow.register_model(model_uri, name, await_registration_for=60).version)


def log_and_register(weights: Path, name: str, run_id: str) -> str:
    """`log_model`, then `register` (for a caller with no lock to mind); returns the version."""
    return register(log_model(weights, run_id), name)


def describe_registered_model(client, name: str) -> None:
    """Say what the model takes and returns: once, and again when this project's own words
    change (a description written in the UI is kept)."""
    current = client.get_registered_model(name).description or ""
    ours = not current or current.startswith(DESCRIPTION.split(" (")[0])
    if ours and current != DESCRIPTION:
        client.update_registered_model(name, description=DESCRIPTION)
