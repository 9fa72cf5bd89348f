"""MLflow: where the store is, and what one pipeline run records there.

Default store: `mlflow.db` (SQLite) and `mlartifacts/` at the repository root, as absolute
paths from DVC_ROOT, so runs from `dvc exp run --queue` (executed in temporary copies) land in
the same store that `mlflow ui` at the root shows. MLFLOW_TRACKING_URI overrides the store.

Writes to a SQLite store are serialised with a file lock beside the database: SQLite allows one
writer, MLflow's schema migration on a fresh file is not safe to run twice at once, and a model
version number is read-then-written. Parallel pipelines then queue for the lock, not fail."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from digits.errors import DigitsError
from digits.files import repo_root
from digits.model import Probabilities

# MLflow's HTTP client retries with backoff for minutes by default; a pipeline stage should
# fail fast with a clear message instead. Set in `connect()`, where the store is connected;
# a user's own setting wins.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}


class TrackingError(DigitsError):
    pass


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / 'mlflow.db'}"


def artifact_location() -> str:
    return (repo_root() / "mlartifacts").as_uri()


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


@contextlib.contextmanager
def store_lock(uri: str | None = None) -> Iterator[None]:
    """Exclusive access to a local SQLite store; nothing to do for a server."""
    db = _sqlite_path(uri or tracking_uri())
    if db is None:
        yield
        return
    from filelock import FileLock

    db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(db) + ".lock", timeout=600):
        yield


def _check_reachable(uri: str) -> None:
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10).close()
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise TrackingError(
            f"MLflow tracking server {uri} is unreachable ({reason}); the "
            "stage's inputs are kept, rerun once it is up"
        ) from None


def connect(experiment: str) -> str:
    """Point MLflow at the store, creating it and the experiment if needed; return its id."""
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    uri = tracking_uri()
    _check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    with store_lock(uri):
        try:
            exp = mlflow.get_experiment_by_name(experiment)
            if exp is None:
                return mlflow.create_experiment(experiment, artifact_location=artifact_location())
            return exp.experiment_id
        except mlflow.exceptions.MlflowException as e:
            raise TrackingError(f"MLflow store {uri}: {str(e).splitlines()[0]}") from None


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            cwd=repo_root(),
            timeout=10,
        )
    except OSError:
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def log_pipeline_run(
    params, metrics: dict, history: list[dict], figures: list[Path], model, example
) -> dict:
    """One MLflow run for this pipeline run: params, per-epoch metrics (step = epoch), test
    metrics, figures, tags, and the model (pt2) registered as a new version. Returns the ids,
    also written to reports/mlflow_run.json for the stages after this one."""
    import json

    from digits.config import flat_params
    from digits.data import file_digest
    from digits.files import MODEL, RUN_INFO, TEST_DATA, TRAIN_DATA, write_text

    experiment_id = connect(params.mlflow.experiment)
    uri = tracking_uri()
    name = params.mlflow.registered_model
    tags = {
        "dvc_exp_name": os.environ.get("DVC_EXP_NAME", ""),
        "git_commit": git_commit(),
        "data.train_sha256": file_digest(TRAIN_DATA),
        "data.test_sha256": file_digest(TEST_DATA),
    }
    now = int(time.time() * 1000)
    epoch_metrics = [
        Metric(k, float(v), now, int(row["epoch"]))
        for row in history
        for k, v in row.items()
        if k != "epoch"
    ]
    test_metrics = [
        Metric(f"test_{k}", float(v), now, 0) for k, v in metrics.items() if not isinstance(v, dict)
    ]
    test_metrics += [
        Metric(f"test_{m}_{c}", float(v), now, 0)
        for c, pc in metrics["per_class"].items()
        for m, v in pc.items()
    ]
    client = MlflowClient(uri)
    with store_lock(uri):
        try:
            run = client.create_run(
                experiment_id,
                run_name=tags["dvc_exp_name"] or None,
                tags={**tags, "mlflow.source.name": "dvc repro"},
            )
            run_id = run.info.run_id
            client.log_batch(
                run_id,
                params=[Param(k, str(v)) for k, v in flat_params(params).items()],
                tags=[RunTag(k, v) for k, v in tags.items()],
            )
            for i in range(0, len(epoch_metrics), 900):  # log_batch takes 1000 at most
                client.log_batch(run_id, metrics=epoch_metrics[i : i + 900])
            client.log_batch(run_id, metrics=test_metrics)
            for fig in figures:
                client.log_artifact(run_id, str(fig), "figures")
            client.log_artifact(run_id, str(MODEL), "weights")
            with mlflow.start_run(run_id=run_id):  # ends the run as FINISHED on exit
                info = mlflow.pytorch.log_model(
                    Probabilities(model).eval(),
                    name="model",
                    input_example=example.numpy(),
                    serialization_format="pt2",
                    registered_model_name=name,
                    await_registration_for=60,
                    pip_requirements=_pip_requirements(),
                )
            version = str(info.registered_model_version)
            for k, v in {
                **tags,
                "test_accuracy": str(metrics["accuracy"]),
                "run_id": run_id,
            }.items():
                client.set_model_version_tag(name, version, k, v)
        except mlflow.exceptions.MlflowException as e:
            raise TrackingError(f"MLflow store {uri}: {str(e).splitlines()[0]}") from None
    out = {
        "run_id": run_id,
        "experiment_id": experiment_id,
        "registered_model": name,
        "version": version,
        "model_uri": f"models:/{name}/{version}",
        "tracking_uri": uri,
    }
    write_text(RUN_INFO, json.dumps(out, indent=2) + "\n")
    print(f"evaluate: MLflow run {run_id}; registered {name} version {version}")
    return out


def _pip_requirements() -> list[str]:
    # Pin what loading the model needs, so MLflow need not infer it (slow: it imports and
    # re-runs the model in a subprocess).
    import torch

    return [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"]
