"""The file MLflow logs with every registered version and runs when the version is loaded
(`mlflow.pyfunc.load_model`, `mlflow models serve`): MLflow's "models from code", so nothing
is pickled. It serves `digits.model.inference` (copied into the model's `code/` folder by
digits.tracking.pyfunc) over the version's own weights file.

Not a library module: importing it registers the model with MLflow (`set_model`)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel

from digits.model.inference import Classifier


class DigitsModel(PythonModel):
    """(N, 784) float32 images in [0, 1] -> a table of N rows: `digit` (0-9, or null: not a
    digit), `guess` (the most likely digit), `confidence` (its calibrated probability, which
    the refusal compares with the model's threshold) and `p0`..`p9` (all ten probabilities)."""

    def load_context(self, context) -> None:
        self.classifier = Classifier.from_file(context.artifacts["weights"])

    def predict(self, context, model_input: np.ndarray, params=None) -> pd.DataFrame:
        said = self.classifier.answers(np.asarray(model_input, dtype=np.float32))
        digit = pd.array(np.where(said.digit >= 0, said.digit, 0), dtype="Int64")
        digit[said.digit < 0] = pd.NA
        table = {"digit": digit, "guess": said.guess, "confidence": said.confidence}
        table.update({f"p{d}": said.probabilities[:, d] for d in range(10)})
        return pd.DataFrame(table)


set_model(DigitsModel())
