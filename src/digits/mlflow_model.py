"""The file MLflow logs with every registered version and runs when the version is loaded
(`mlflow.pyfunc.load_model`, `mlflow models serve`): MLflow's "models from code", so nothing
is pickled. It serves `digits.inference` (copied into the model's `code/` folder by
digits.serving) over the version's own weights file.

Not a library module: importing it registers the model with MLflow (`set_model`)."""

from __future__ import annotations

import numpy as np
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel

from digits.inference import Classifier


class DigitsModel(PythonModel):
    """(N, 784) float32 images in [0, 1] -> (N, 10) float32 probabilities of digits 0-9."""

    def load_context(self, context) -> None:
        self.classifier = Classifier.from_file(context.artifacts["weights"])

    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:
        return self.classifier.probabilities(np.asarray(model_input, dtype=np.float32))


set_model(DigitsModel())
