"""`digits predict`: a user's image files -> digits, with the model from the MLflow registry.

Each image is first made to look like an MNIST digit (digits.imaging), then run through the
model as the registered version serves it (digits.inference).

This module is imported by the CLI's handler only; mlflow loads inside `load_model`, and torch
not at all (digits.inference runs the model in numpy)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from digits.errors import DigitsError
from digits.imaging import ImageError, preprocess, read_image
from digits.mnist import NUM_CLASSES


def champion_uri(params_file: str | Path = "params.yaml") -> str:
    """`models:/<name>@champion`, the name from params.yaml's mlflow.registered_model (its
    default where there is no params.yaml here)."""
    from digits.config import MlflowParams, load_params

    path = Path(params_file)
    name = load_params(path).mlflow.registered_model if path.exists() else None
    return f"models:/{name or MlflowParams().registered_model}@champion"


def load_model(uri: str | None = None):
    """The model at `uri` (a registry URI, runs:/ URI or folder; default: the champion) in the
    configured store, ready to predict: its weights file read by digits.inference (no code
    from the registry runs), or, for a version of an earlier format, the pyfunc model.

    Returns an object with `probabilities((N, 784) float32) -> (N, 10)`."""
    import mlflow

    from digits.inference import weights_in
    from digits.store import client_defaults, first_line, sqlite_path, tracking_uri

    client_defaults()
    uri = uri or champion_uri()
    store = tracking_uri()
    db = sqlite_path(store)
    if uri.startswith("models:/") and db is not None and not db.exists():
        # MLflow would create an empty store there and then report that the model is missing.
        raise DigitsError(
            f"no MLflow store at {db}: train a model first (`dvc repro`), or set "
            "MLFLOW_TRACKING_URI to the store holding it"
        )
    mlflow.set_tracking_uri(store)
    try:
        local = Path(uri) if Path(uri).is_dir() else None
        if local is None:
            import tempfile

            tmp = tempfile.mkdtemp(prefix="digits-model-")
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp))
        weights = weights_in(local)
        if weights is not None:
            from digits.inference import Classifier

            return Classifier.from_file(weights)
        # suppress_warnings skips MLflow's check of the installed packages against the
        # model's requirements: seconds per start, and the project pins them
        return _Pyfunc(mlflow.pyfunc.load_model(str(local), suppress_warnings=True))
    except (mlflow.exceptions.MlflowException, OSError) as e:
        raise DigitsError(f"model {uri} in {store}: cannot load it ({first_line(e)})") from None


class _Pyfunc:
    """A pyfunc model (earlier versions' pt2) behind the same `probabilities` call."""

    def __init__(self, model):
        self.model = model

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.model.predict(x))


def probabilities(model, batch: np.ndarray) -> np.ndarray:
    """(N, 784) float32 -> (N, 10) class probabilities."""
    out = np.asarray(model.probabilities(np.ascontiguousarray(batch, dtype=np.float32)))
    if out.shape != (len(batch), NUM_CLASSES):
        raise DigitsError(f"the model returned shape {out.shape}, expected ({len(batch)}, 10)")
    return out


def main(args) -> int:
    """The `digits predict` handler: one line per image (or one JSON object with --json); an
    image that fails is reported on stderr by name, the others are still predicted."""
    model = load_model(args.model)
    failed = 0
    batch_size = 256  # print as we go for long lists, and keep memory flat
    for start in range(0, len(args.images), batch_size):
        names, rows = [], []
        for name in args.images[start : start + batch_size]:
            try:
                rows.append(preprocess(read_image(name), name))
                names.append(name)
            except ImageError as e:
                print(f"digits predict: error: {e}", file=sys.stderr)
                failed += 1
        if rows:
            for name, p in zip(names, probabilities(model, np.stack(rows)), strict=True):
                print(format_result(name, p, args.json))
    return 1 if failed else 0


def format_result(name: str, p: np.ndarray, as_json: bool) -> str:
    digit = int(np.argmax(p))
    if as_json:
        probs = [round(float(v), 6) for v in p]
        return json.dumps({"file": name, "digit": digit, "probabilities": probs})
    return f"{name}: {digit} ({float(p[digit]):.1%})"
