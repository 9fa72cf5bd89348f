"""The pipeline's MLflow run, across its stages: the train stage opens it when training starts
(params, provenance, data, numerics; status RUNNING) and logs every epoch as it ends, with
MLflow's system metrics (CPU, memory, GPU where there is one) sampled while it trains; the
evaluate stage reopens it for the test metrics, figures and the registered model; the gate
reopens it for its verdict. Each stage ends it FINISHED, FAILED when the stage fails, KILLED
on Ctrl+C or SIGTERM. A training resumed from its checkpoint after a SIGKILL continues the same
run (the checkpoint names it) and logs only the epochs the run lacks.

The stages find the run in the store, not in a file DVC tracks (a run id there would change
dvc.lock on every run): the train stage tags it with the sha256 of the model file it wrote
and this workspace's name; evaluate looks for that pair. When the model came from DVC's cache
or a remote (trained elsewhere), evaluate makes a complete run of its own (params, history,
test metrics, model) tagged with the id of the run where the training happened, if the store
has it. The gate finds the version registered for the model file, and through it the run."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from digits.core import provenance
from digits.core.config import Params, flat_params
from digits.core.errors import sigterm_raises
from digits.core.files import repo_root
from digits.core.metrics import Evaluation
from digits.core.reports import Epoch
from digits.core.settings import DIGITS_SWEEP
from digits.tracking import lineage, registry
from digits.tracking.store import Store, open_store

TAG_MODEL = registry.MODEL_TAG  # the model file a run trained (train) or scored (evaluate)
TAG_WORKSPACE = "digits.workspace"  # host:path of the workspace whose train stage made the run
TAG_EVALUATED = "digits.evaluated"  # "true" once evaluate has added the test metrics
TAG_TRAINED_IN = "digits.training_run_id"  # set when the training happened in another run
# MLflow's experiment-kind tag (values from its UI: "custom_model_development" is "Machine
# learning"; without the tag the UI may take an experiment for a GenAI one and open on traces)
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
SYSTEM_METRICS_INTERVAL = "5"  # seconds between samples (MLflow's default: 10)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that the run ends KILLED, as Ctrl+C does."""


@dataclass(frozen=True, kw_only=True)
class TrainingData:
    sha256: str  # of data/processed/train.npz (train and validation splits)
    train_rows: int
    val_rows: int


def numerics_tags() -> dict[str, str]:
    """The numeric environment, as tags: enough to explain why two runs differ."""
    import torch

    from digits.core import blas, numerics

    mkl = ""
    if torch.backends.mkl.is_available():
        for line in torch.__config__.show().splitlines():
            if "Math Kernel Library" in line:
                mkl = line.split("Library Version", 1)[-1].strip(" :")
                break
    pins = [f"{k}={os.environ[k]}" for k in numerics.PINS if k in os.environ]
    return {
        "numerics.torch": torch.__version__,
        "numerics.mkl": mkl,
        "numerics.openblas": blas.describe(),
        "numerics.matmul": "openblas" if blas.portable() else "torch",
        "numerics.cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "numerics.threads": str(torch.get_num_threads()),
        "numerics.pins": ",".join(pins) or "off",
    }


def workspace_id() -> str:
    return f"{socket.gethostname()}:{repo_root()}"


@contextlib.contextmanager
def active_run(
    store: Store, run_id: str | None = None, *, system_metrics: bool = False, **create: Any
) -> Iterator[str]:
    """An MLflow run active in this process: `run_id` reopened (status RUNNING again), or a
    new one made with `create` (run_name, tags). It ends FINISHED, FAILED when the block
    raises, KILLED on Ctrl+C or SIGTERM."""
    import mlflow

    store.make_current()  # the fluent API's store: the run's, its model's, its artifacts'
    with store.writing():
        run = mlflow.start_run(
            run_id=run_id,
            experiment_id=None if run_id else store.experiment_id,
            log_system_metrics=system_metrics or None,
            **({} if run_id else create),
        )
    status = "FINISHED"
    try:
        with sigterm_raises(Terminated):
            yield run.info.run_id
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        with store.writing():
            mlflow.end_run(status)


def _mark_training_experiment(store: Store) -> None:
    """Tag the experiment as model training (once: a kind set in the UI is kept)."""
    key, value = EXPERIMENT_KIND
    with store.writing() as client:
        if key not in client.get_experiment(store.experiment_id).tags:
            client.set_experiment_tag(store.experiment_id, key, value)


# JSON that `digits sweep` hands a trial's train stage: its MLflow parent run and tags. It lives
# here, not in sweep.py, so that the stages do not depend on the sweep's code.
SWEEP_ENV = DIGITS_SWEEP.name


def sweep_tags() -> dict[str, str]:
    """A `digits sweep` trial's run (the sweep hands it SWEEP_ENV): a child of the study's
    parent run, tagged with the study, the trial's number and the worker that ran it."""
    raw = DIGITS_SWEEP.get()
    if not raw:
        return {}
    trial = json.loads(raw)
    return {
        "mlflow.parentRunId": trial["parent"],
        "digits.sweep.study": trial["study"],
        "digits.sweep.trial": str(trial["trial"]),
        "digits.sweep.worker": trial["worker"],
    }


def _new_run(params: Params, extra_tags: dict[str, str]) -> dict[str, Any]:
    """start_run's arguments for a new run of this pipeline: name, provenance tags, description."""
    root = repo_root()
    origin = provenance.run_origin(root)
    tags = {
        **lineage.run_tags(origin),
        "mlflow.note.content": lineage.description(origin, params, root),
        **sweep_tags(),
        **extra_tags,
    }
    return {"run_name": origin.run_name, "tags": tags}


def _log_params(client, run_id: str, params: Params) -> None:
    from mlflow.entities import Param

    client.log_batch(run_id, params=[Param(k, str(v)) for k, v in flat_params(params).items()])


def _run_exists(store: Store, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        store.client.get_run(run_id)
    except MlflowException:
        return False
    return True


# --- the train stage ------------------------------------------------------------------------


class LiveRun:
    """The training run, while the model trains."""

    def __init__(self, store: Store, run_id: str):
        self.store, self.run_id = store, run_id
        self.logging_seconds = 0.0  # what logging the epochs cost the training

    def log_epoch(self, row: Epoch) -> None:
        """One epoch's metrics, step = epoch, stamped now (as the epoch ends)."""
        from mlflow.entities import Metric

        t0 = time.perf_counter()
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, row.epoch) for k, v in row.metrics().items()]
        with self.store.writing() as client:
            client.log_batch(self.run_id, metrics=metrics)
        self.logging_seconds += time.perf_counter() - t0

    def log_epochs(self, rows: Sequence[Epoch]) -> None:
        """The rows the run has not logged yet (after a resume: a kill may have cut the last
        epoch's logging short); none twice."""
        with self.store.reading() as client:
            logged = client.get_metric_history(self.run_id, "val_accuracy")
        done = max((m.step for m in logged), default=0)
        for row in rows:
            if row.epoch > done:
                self.log_epoch(row)

    def trained(self, result, *, device, model_sha256: str, calibration: dict) -> None:
        """What the training took, its calibration, and which model file it wrote (evaluate
        looks for it)."""
        import torch

        name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
        with self.store.writing() as client:
            client.log_metric(self.run_id, "training/seconds", round(result.seconds, 3))
            client.log_metric(self.run_id, "training/samples_per_second", result.samples_per_second)
            client.log_metric(self.run_id, "training/resumed_from_epoch", result.resumed_from_epoch)
            client.log_metric(self.run_id, "training/logging_seconds", self.logging_seconds)
            client.log_metric(self.run_id, "calibration/temperature", calibration["temperature"])
            client.log_metric(self.run_id, "ood/threshold", calibration["threshold"])
            client.set_tag(
                self.run_id, "device", f"{device.type} ({name})" if name else device.type
            )
            client.set_tag(self.run_id, TAG_MODEL, model_sha256)


@contextlib.contextmanager
def training_run(params: Params, data: TrainingData, resume_run: str = "") -> Iterator[LiveRun]:
    """The run of a training, open while the block trains: `resume_run` (from a checkpoint)
    continued, else a new one. A tracking server that is down fails here, before any epoch."""
    os.environ.setdefault("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", SYSTEM_METRICS_INTERVAL)
    store = open_store(params.mlflow.experiment)
    _mark_training_experiment(store)
    run_id = resume_run if resume_run and _run_exists(store, resume_run) else None
    extra = {TAG_WORKSPACE: workspace_id(), "data.train_sha256": data.sha256, **numerics_tags()}
    create = {} if run_id else _new_run(params, extra)
    with active_run(store, run_id, system_metrics=True, **create) as rid:
        if run_id is None:
            with store.writing() as client:
                _log_params(client, rid, params)
                inputs = lineage.training_inputs(data.sha256, data.train_rows, data.val_rows)
                client.log_inputs(rid, inputs)
        yield LiveRun(store, rid)


# --- the evaluate stage ---------------------------------------------------------------------


def evaluation_metrics(evaluation: Evaluation) -> dict[str, float]:
    """Headline metrics as `test_<name>`; per-class ones as `test_class/<digit>/<metric>`, the
    calibration's as `calibration/...`, the outlier suite's as `ood/...` (`ood/refused/<kind>`)
    and the corruption suite's as `robustness/...`, so MLflow groups them by prefix."""
    m, cal, ood, robust = (
        evaluation.metrics,
        evaluation.calibration,
        evaluation.ood,
        evaluation.robustness,
    )
    out = {"test_accuracy": m.accuracy, "test_loss": m.loss, "test_macro_f1": m.macro_f1}
    for digit, scores in m.per_class.items():
        out.update({f"test_class/{digit}/{k}": v for k, v in asdict(scores).items()})
    if cal is not None:
        out.update({f"calibration/{k}": v for k, v in cal.to_dict().items()})
    if ood is not None:
        out.update({f"ood/{k}": v for k, v in asdict(ood).items() if not isinstance(v, dict)})
        out.update({f"ood/refused/{k}": v for k, v in ood.refused.items()})
    if robust is not None:
        out.update({"robustness/mean": robust.mean, "robustness/worst": robust.worst})
        out.update({f"robustness/{k}": v for k, v in robust.corruptions.items()})
    return {k: float(v) for k, v in out.items()}


def find_training(store: Store, model_sha256: str):
    """(this workspace's training run of that model file, not yet evaluated; else None),
    (the newest run anywhere in the experiment that trained it; else None)."""
    with store.reading() as client:
        runs = client.search_runs(
            [store.experiment_id],
            filter_string=f"tags.`{TAG_MODEL}` = '{model_sha256}'",
            order_by=["attributes.start_time DESC"],
            max_results=50,
        )
    trained = [r for r in runs if TAG_TRAINED_IN not in r.data.tags]  # a training happened
    here = workspace_id()
    own = next(
        (
            r
            for r in trained
            if r.data.tags.get(TAG_WORKSPACE) == here and TAG_EVALUATED not in r.data.tags
        ),
        None,
    )
    return own, (trained[0] if trained else None)


@contextlib.contextmanager
def evaluation_run(
    params: Params, *, model_sha256: str, history: Sequence[Epoch]
) -> Iterator[tuple[Store, str]]:
    """The run that gets the test metrics: the training run of this model in this workspace,
    reopened; else (the model came from DVC's cache or a remote) a complete new run, with the
    params and the training history, linked to the run where the training happened."""
    from mlflow.entities import Metric

    store = open_store(params.mlflow.experiment)
    _mark_training_experiment(store)
    own, anywhere = find_training(store, model_sha256)
    if own is not None:
        with active_run(store, own.info.run_id) as rid:
            yield store, rid
        return
    link = anywhere.info.run_id if anywhere is not None else "(not in this store)"
    create = _new_run(params, {TAG_TRAINED_IN: link, TAG_MODEL: model_sha256})
    with active_run(store, **create) as rid:
        with store.writing() as client:
            _log_params(client, rid, params)
            now = int(time.time() * 1000)
            rows = [Metric(k, v, now, h.epoch) for h in history for k, v in h.metrics().items()]
            for i in range(0, len(rows), 900):  # log_batch takes 1000 at most
                client.log_batch(rid, metrics=rows[i : i + 900])
        yield store, rid


def log_evaluation(
    store: Store,
    run_id: str,
    evaluation: Evaluation,
    figures: Sequence,
    test_sha256: str,
    test_rows: int,
) -> None:
    """The test metrics, the test set as an input, and the figures, into the run."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    rows = [Metric(k, v, now, 0) for k, v in evaluation_metrics(evaluation).items()]
    with store.writing() as client:
        for i in range(0, len(rows), 900):
            client.log_batch(run_id, metrics=rows[i : i + 900])
        client.log_inputs(run_id, [lineage.test_input(test_sha256, test_rows)])
        client.set_tag(run_id, "data.test_sha256", test_sha256)
        for fig in figures:
            client.log_artifact(run_id, str(fig), "figures")
        client.set_tag(run_id, TAG_EVALUATED, "true")


# --- the gate -------------------------------------------------------------------------------


def log_gate(
    store: Store, run_id: str, *, passed: bool, verdict: str, thresholds: str, report: Path
) -> None:
    """The gate's verdict on the run that registered the version: `gate/passed` (1 or 0),
    the verdict and thresholds as tags, the report as an artifact."""
    with store.writing() as client:
        client.log_metric(run_id, "gate/passed", 1.0 if passed else 0.0)
        client.set_tag(run_id, "gate.verdict", verdict)
        client.set_tag(run_id, "gate.thresholds", thresholds)
        client.log_artifact(run_id, str(report))
