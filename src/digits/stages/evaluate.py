"""The `evaluate` stage: the trained model on the test set (read here and nowhere before), its
calibration, the outlier suite (does it say "not a digit"?), the corruption suite, the figures,
and the MLflow run's test metrics and registered version.

Scoring runs the model as users run it (digits.model.inference, numpy), through the scorer the
gate uses too (digits.scoring.scorer): the probabilities scored here are the ones the
registered version serves. torch loads only for the corruption suite."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

    from digits.core.config import Params
    from digits.core.metrics import Evaluation
    from digits.core.reports import Epoch
    from digits.scoring.scorer import Scored
    from digits.tracking.store import Store


def run(params: Params) -> Evaluation:
    """Model + test set -> metrics, predictions, figures, MLflow run and a new version."""
    from digits.core.files import HISTORY, MODEL, TEST_DATA
    from digits.core.reports import read_history
    from digits.data.preprocess import file_digest, load_arrays
    from digits.monitor import stage as monitoring
    from digits.scoring import wild as outside_mnist
    from digits.tracking import registry
    from digits.tracking import runs as tracking

    model_sha256 = file_digest(MODEL)
    history = read_history(HISTORY)
    # the store first: a dead tracking server fails the stage now, not after the scoring
    with tracking.evaluation_run(params, model_sha256=model_sha256, history=history) as (
        store,
        run_id,
    ):
        x, y = load_arrays(TEST_DATA, "test")
        scored = score(params, x, y)
        drawn = draw(scored, x, history, params.evaluate.misclassified_shown)
        write_reports(scored)
        monitoring.record_reference(store, run_id)  # what `digits monitor` compares with
        monitoring.record_feedback(store, run_id, params.feedback.holdout_share)
        print(summary(scored.evaluation))
        test_sha256 = file_digest(TEST_DATA)
        tracking.log_evaluation(store, run_id, scored.evaluation, drawn, test_sha256, len(y))
        outside_mnist.run(store, run_id, (x, y))  # reports/wild.json, wild/... in the run
        with store.reading() as client:  # a team server's candidates model, else the model
            name = registry.registers_in(client, params.mlflow.registered_model)
        version = register(
            store, params, run_id, scored=scored, model_sha256=model_sha256,
            test_sha256=test_sha256, name=name,
        )  # fmt: skip
    print(f"evaluate: MLflow run {run_id}; registered {name} v{version}")
    return scored.evaluation


def score(params: Params, x: np.ndarray, y: np.ndarray) -> Scored:
    """The trained model, measured on everything: metrics, calibration, both suites."""
    from digits.core.files import MODEL
    from digits.model.inference import Classifier
    from digits.scoring.scorer import Suites
    from digits.scoring.scorer import score as score_model

    suites = Suites(outliers_per_kind=params.evaluate.outliers_per_kind, robustness=True)
    return score_model(Classifier.from_file(MODEL), x, y, suites)


def draw(scored: Scored, x: np.ndarray, history: Sequence[Epoch], shown: int) -> list[Path]:
    """The figures (reports/figures/), in the order the run lists them."""
    from digits.core.files import FIGURES
    from digits.model.calibration import reliability
    from digits.scoring import figures

    ev, y, probs = scored.evaluation, scored.labels, scored.probs
    assert ev.calibration and ev.ood and ev.robustness and scored.uncalibrated is not None
    return [
        figures.plot_history(list(history), FIGURES / "training_curves.png"),
        figures.plot_confusion(y, probs.argmax(1), FIGURES / "confusion_matrix.png"),
        figures.plot_misclassified(x, y, probs, shown, FIGURES / "misclassified.png"),
        figures.plot_robustness(ev.robustness, ev.accuracy, FIGURES / "robustness.png"),
        figures.plot_reliability(
            reliability(scored.uncalibrated, y),
            reliability(probs, y),
            ev.calibration,
            FIGURES / "reliability.png",
        ),
        figures.plot_ood(probs, scored.suite_probs, ev.ood, FIGURES / "ood.png"),
    ]


def write_reports(scored: Scored) -> None:
    """reports/metrics.json and reports/predictions.csv (DVC tracks both)."""
    from digits.core.files import METRICS, PREDICTIONS
    from digits.core.reports import write_metrics, write_predictions

    y = scored.labels
    write_predictions(PREDICTIONS, y.tolist(), scored.probs.argmax(1).tolist())
    write_metrics(METRICS, scored.evaluation)


def summary(ev: Evaluation) -> str:
    """The stage's one line of results."""
    m, cal, o, r = ev.metrics, ev.calibration, ev.ood, ev.robustness
    assert cal is not None and o is not None and r is not None
    return (
        f"evaluate: test accuracy {m.accuracy:.4f}, loss {m.loss:.4f}, "
        f"macro F1 {m.macro_f1:.4f}; ECE {cal.ece:.4f} (T = "
        f"{cal.temperature:.3g}; {cal.ece_before:.4f} before); not a digit: FPR95 "
        f"{o.fpr95:.4f}, AUROC {o.auroc:.4f}, test digits refused "
        f"{o.refused_digits:.4f}; corrupted: mean {r.mean:.4f}, worst {r.worst:.4f}"
    )


def register(
    store: Store,
    params: Params,
    run_id: str,
    *,
    scored: Scored,
    model_sha256: str,
    test_sha256: str,
    name: str | None = None,
) -> str:
    """Log the model into the run and register it as a new version of `name` (default: the
    registered model of params.yaml), tagged with what it was
    made from and scored at: the score record (digits.scoring.cache) the gate reads instead of
    scoring it again, keyed by the version's files as the registry now serves them.

    Only registering and tagging hold the store's write lock (digits.tracking.store): the model's
    upload and the download that keys its record do not. The lock is for the version number
    (read, then written) and the schema's creation; the few rows that logging the model writes
    wait on SQLite's own lock, as any MLflow client's do."""
    from digits.core.files import MODEL
    from digits.scoring import cache
    from digits.tracking import pyfunc

    name = name or params.mlflow.registered_model  # or its candidates model (a team server)
    model_uri = pyfunc.log_model(Path(MODEL), run_id)
    with store.writing() as client:
        version = pyfunc.register(model_uri, name)
        pyfunc.describe_registered_model(client, name)
        tags = version_tags(client, run_id, scored, model_sha256, test_sha256)
        for k, v in tags.items():
            client.set_model_version_tag(name, version, k, v)
    served = cache.Score(
        version=version,
        evaluation=scored.evaluation,
        correct=scored.correct,
        model_sha256=served_sha256(name, version),
        by="evaluate",
    )
    with store.writing() as client:
        client.set_model_version_tag(
            name, version, cache.CACHE_TAG, cache.cache_record(served, test_sha256)
        )
    return version


def version_tags(
    client, run_id: str, scored: Scored, model_sha256: str, test_sha256: str
) -> dict[str, str]:
    """What a version was made from: the model file, the test data, its run and commit."""
    from digits.tracking import registry

    run = client.get_run(run_id)
    return {
        registry.MODEL_TAG: model_sha256,
        "data.test_sha256": test_sha256,
        "run_id": run_id,
        "run_name": run.info.run_name,
        "git_commit": run.data.tags.get("git_commit", ""),
        "dvc_exp_name": run.data.tags.get("dvc_exp_name", ""),
        "test_accuracy": str(scored.evaluation.accuracy),
    }


def served_sha256(name: str, version: str) -> str:
    """The sha256 of the version's files as the registry serves them (the score cache's key)."""
    import tempfile

    from digits.scoring import cache

    with tempfile.TemporaryDirectory(prefix="digits-evaluate-") as tmp:
        return cache.files_sha256(cache.download_model(name, version, tmp))
