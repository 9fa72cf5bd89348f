"""The `evaluate` stage: the trained model on the test set (read here and nowhere before), its
calibration, the outlier suite (does it say "not a digit"?), the corruption suite, the figures,
and the MLflow run's test metrics and registered version.

Scoring runs the model as users run it (digits.model.inference, numpy): the probabilities scored
here are the ones the registered version serves. torch loads only for the corruption suite."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from digits.core.metrics import compute_metrics

if TYPE_CHECKING:
    from digits.core.config import Params


def run(params: Params) -> dict:
    """Model + test set -> metrics, predictions, figures, MLflow run and a new version."""
    from digits.core.files import FIGURES, HISTORY, METRICS, MODEL, PREDICTIONS, TEST_DATA
    from digits.core.reports import read_history, write_metrics, write_predictions
    from digits.data import outliers
    from digits.data.preprocess import file_digest, load_arrays
    from digits.model import calibration, ood
    from digits.model.inference import Classifier, calibrated, softmax
    from digits.scoring import figures
    from digits.scoring.robustness import corruption_accuracies
    from digits.tracking import runs as tracking

    model_sha256 = file_digest(MODEL)
    history = read_history(HISTORY)
    # the store first: a dead tracking server fails the stage now, not after the scoring
    with tracking.evaluation_run(params, model_sha256=model_sha256, history=history) as (
        store,
        run_id,
    ):
        classifier = Classifier.from_file(MODEL)
        x, y = load_arrays(TEST_DATA, "test")
        logits = classifier.logits(x)
        probs = calibrated(logits, classifier.temperature)
        pred = probs.argmax(1)
        metrics = compute_metrics(probs, y)
        metrics["calibration"] = calibration.summary(logits, y, classifier.temperature)
        suite = outliers.outlier_set("suite", params.evaluate.outliers_per_kind, x)
        suite_probs = {kind: classifier.probabilities(images) for kind, images in suite.items()}
        metrics["ood"] = ood.measure(probs, suite_probs, classifier.threshold)
        metrics["robustness"] = corruption_accuracies(classifier.probabilities, x, y)
        drawn = [
            figures.plot_history(history, FIGURES / "training_curves.png"),
            figures.plot_confusion(y, pred, FIGURES / "confusion_matrix.png"),
            figures.plot_misclassified(
                x, y, probs, params.evaluate.misclassified_shown, FIGURES / "misclassified.png"
            ),
            figures.plot_robustness(
                metrics["robustness"], metrics["accuracy"], FIGURES / "robustness.png"
            ),
            figures.plot_reliability(
                calibration.reliability(softmax(logits), y),
                calibration.reliability(probs, y),
                metrics["calibration"],
                FIGURES / "reliability.png",
            ),
            figures.plot_ood(probs, suite_probs, metrics["ood"], FIGURES / "ood.png"),
        ]
        write_predictions(PREDICTIONS, y.tolist(), pred.tolist())
        write_metrics(METRICS, metrics)
        cal, o, r = metrics["calibration"], metrics["ood"], metrics["robustness"]
        print(
            f"evaluate: test accuracy {metrics['accuracy']:.4f}, loss {metrics['loss']:.4f}, "
            f"macro F1 {metrics['macro_f1']:.4f}; ECE {cal['ece']:.4f} (T = "
            f"{cal['temperature']:.3g}; {cal['ece_before']:.4f} before); not a digit: FPR95 "
            f"{o['fpr95']:.4f}, AUROC {o['auroc']:.4f}, test digits refused "
            f"{o['refused_digits']:.4f}; corrupted: mean {r['mean']:.4f}, worst {r['worst']:.4f}"
        )
        test_sha256 = file_digest(TEST_DATA)
        tracking.log_evaluation(store, run_id, metrics, drawn, test_sha256, len(y))
        version = register(
            store,
            params,
            run_id,
            metrics=metrics,
            correct=pred == y,
            model_sha256=model_sha256,
            test_sha256=test_sha256,
        )
    print(f"evaluate: MLflow run {run_id}; registered {params.mlflow.registered_model} v{version}")
    return metrics


def register(
    store,
    params,
    run_id: str,
    *,
    metrics: dict,
    correct: np.ndarray,
    model_sha256: str,
    test_sha256: str,
) -> str:
    """Log the model into the run and register it as a new version, tagged with what it was
    made from and scored at: the score record (digits.scoring.cache) the gate reads instead of
    scoring it again, keyed by the version's files as the registry now serves them."""
    import tempfile

    from digits.core.files import MODEL
    from digits.scoring import cache as scores
    from digits.tracking import pyfunc as serving
    from digits.tracking import registry

    name = params.mlflow.registered_model
    with store.writing() as client:
        version = serving.log_and_register(Path(MODEL), name)
        serving.describe_registered_model(client, name)
        run = client.get_run(run_id)
        tags = {
            registry.MODEL_TAG: model_sha256,
            "data.test_sha256": test_sha256,
            "run_id": run_id,
            "run_name": run.info.run_name,
            "git_commit": run.data.tags.get("git_commit", ""),
            "dvc_exp_name": run.data.tags.get("dvc_exp_name", ""),
            "test_accuracy": str(metrics["accuracy"]),
        }
        for k, v in tags.items():
            client.set_model_version_tag(name, version, k, v)
        with tempfile.TemporaryDirectory(prefix="digits-evaluate-") as tmp:
            sha = scores.files_sha256(scores.download_model(name, version, tmp))
        plain = {k: v for k, v in metrics.items() if k != "robustness"}  # ood, calibration in
        score = scores.Score(
            version=version,
            metrics=plain,
            correct=np.asarray(correct, bool),
            model_sha256=sha,
            by="evaluate",
            robustness=metrics["robustness"],
        )
        client.set_model_version_tag(
            name, version, scores.CACHE_TAG, scores.cache_record(score, test_sha256)
        )
    return version
