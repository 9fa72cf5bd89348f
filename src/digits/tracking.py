"""MLflow: where the store is, and what one pipeline run records there.

Default store: `mlflow.db` (SQLite) and `mlartifacts/` at the repository root, as absolute
paths from DVC_ROOT, so runs from `dvc exp run --queue` (executed in temporary copies) land in
the same store that `mlflow ui` at the root shows. MLFLOW_TRACKING_URI overrides the store.

A team's tracking server (an http(s) MLFLOW_TRACKING_URI, see `digits server`) keeps the
artifacts too: experiments are created there without an artifact location, so the server picks
its own (`mlflow-artifacts:/`, proxied to its --artifacts-destination) and every teammate can
load the models. A client-local folder there would hold files no one else can read.

Writes to a SQLite store are serialised with a file lock beside the database: SQLite allows one
writer, MLflow's schema migration on a fresh file is not safe to run twice at once, and a model
version number is read-then-written. Parallel pipelines then queue for the lock, not fail."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
from mlflow.data.dataset import Dataset
from mlflow.data.http_dataset_source import HTTPDatasetSource
from mlflow.data.schema import TensorDatasetSchema
from mlflow.entities import DatasetInput, InputTag, Metric, Param
from mlflow.tracking import MlflowClient
from mlflow.types import Schema, TensorSpec
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from digits import scores
from digits.errors import DigitsError
from digits.files import repo_root
from digits.mnist import COLS, NUM_CLASSES, NUM_PIXELS, OFFICIAL_MIRRORS, RESOURCES, ROWS

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


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def artifact_location(uri: str | None = None) -> str | None:
    """Where a new experiment keeps its artifacts: the server's choice (None) on a tracking
    server, else `mlartifacts/` at the repository root of this machine."""
    if is_server(uri or tracking_uri()):
        return None
    return (repo_root() / "mlartifacts").as_uri()


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


@contextlib.contextmanager
def store_lock(uri: str | None = None) -> Iterator[None]:
    """Exclusive access to a local SQLite store. Nothing to do for a server: its database
    serialises writers, and MLflow retries a model version number that two clients took."""
    db = _sqlite_path(uri or tracking_uri())
    if db is None:
        yield
        return
    from filelock import FileLock

    db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(db) + ".lock", timeout=600):
        yield


def _ssl_context():
    """TLS as MLflow's own client does it: MLFLOW_TRACKING_SERVER_CERT_PATH names a private
    CA bundle (e.g. a reverse proxy's own CA), MLFLOW_TRACKING_INSECURE_TLS=true skips checks."""
    import ssl

    if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
        return ssl._create_unverified_context()
    ca = os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or os.environ.get("REQUESTS_CA_BUNDLE")
    return ssl.create_default_context(cafile=ca or None)


def _check_reachable(uri: str) -> None:
    """Fail in seconds, naming the server, where MLflow's client would retry for minutes."""
    if not is_server(uri):
        return
    url = uri.rstrip("/") + "/health"
    context = _ssl_context() if uri.startswith("https://") else None
    try:
        urllib.request.urlopen(url, timeout=10, context=context).close()
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):  # up, behind a login: MLflow's client sends the credentials
            return
        raise TrackingError(
            f"MLflow tracking server {uri} answered {e.code} {e.reason} at /health; the "
            "stage's inputs are kept, rerun once it is up"
        ) from None
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
            exp = mlflow.get_experiment_by_name(experiment) or _create_experiment(experiment, uri)
        except mlflow.exceptions.MlflowException as e:
            first = str(e).splitlines()[0]
            if "error code 401" in first:  # a server behind MLflow's basic-auth app
                raise TrackingError(
                    f"MLflow tracking server {uri} wants a login: set MLFLOW_TRACKING_USERNAME "
                    "and MLFLOW_TRACKING_PASSWORD"
                ) from None
            raise TrackingError(f"MLflow store {uri}: {first}") from None
    _check_experiment(exp, uri)
    return exp.experiment_id


def _create_experiment(name: str, uri: str):
    try:
        mlflow.create_experiment(name, artifact_location=artifact_location(uri))
    except mlflow.exceptions.MlflowException as e:
        # on a server, another client (a teammate, a parallel queued experiment) may have
        # created it since we looked: use theirs
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    return mlflow.get_experiment_by_name(name)


def _check_experiment(exp, uri: str) -> None:
    """Log only to an active experiment, and on a server only to one whose artifacts the
    server keeps: one made with a client's folder (file://...) would strand the models there."""
    fix = "or set mlflow.experiment in params.yaml to a new name"
    if exp.lifecycle_stage == "deleted":
        raise TrackingError(
            f"experiment '{exp.name}' in {uri} is deleted; restore it (mlflow experiments "
            f"restore --experiment-id {exp.experiment_id}) {fix}"
        )
    if is_server(uri) and urllib.parse.urlparse(exp.artifact_location).scheme in ("", "file"):
        raise TrackingError(
            f"experiment '{exp.name}' on {uri} keeps its artifacts in {exp.artifact_location}, "
            "a folder on one client that teammates cannot read; rename it (mlflow experiments "
            f"rename --experiment-id {exp.experiment_id} --new-name {exp.name}-local) so the "
            f"next run creates it anew in the server's artifact store, {fix}"
        )


# --- what a run records beyond its numbers: where it came from, its data, its training -----

# MLflow's experiment-kind tag (values from its UI: "custom_model_development" is "Machine
# learning"; without the tag the UI may take an experiment for a GenAI one and open on traces).
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")

# What the registered model takes and returns, for the registry's model page.
MODEL_DESCRIPTION = (
    f"MNIST digit classifier (a multilayer perceptron). Input: float32 array (N, {NUM_PIXELS}),"
    f" N images of {ROWS}x{COLS} pixels flattened row by row, ink 1.0 on background 0.0 (pixel"
    f" values in [0, 1]). Output: float32 array (N, {NUM_CLASSES}), the probabilities of digits"
    f" 0-9 (each row sums to 1; the prediction is its argmax). Use the version with the alias"
    f" @champion: `mlflow.pyfunc.load_model('models:/<name>@champion').predict(x)`."
)

GIT_OUTPUT_LINES = 60  # of a params.yaml diff quoted in a run's description
MAX_TAG_VALUE = 8000  # MLflow's limit on a tag's value (the description is a tag)


def git_commit() -> str:
    return _git_out(repo_root(), "rev-parse", "HEAD") or ""


def _git_out(root: Path, *args: str) -> str | None:
    """stdout of a git command in `root`; None when git is missing, fails or hangs."""
    try:
        proc = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


@dataclass(frozen=True)
class Origin:
    """Where a pipeline run came from: its commit, branch, uncommitted changes, experiment."""

    commit: str = ""  # HEAD, "" outside git
    branch: str = ""  # "" on a detached HEAD or outside git
    changed: tuple[str, ...] = ()  # uncommitted files, less the pipeline's own outputs
    experiment: str = ""  # DVC experiment name, "" for a plain `dvc repro`
    baseline: str = ""  # the experiment's baseline commit

    @property
    def label(self) -> str:
        """`main@1a2b3c4`, `1a2b3c4` on a detached HEAD, "" outside git."""
        short = self.commit[:7]
        return f"{self.branch}@{short}" if self.branch and short else short


def run_origin(root: Path | None = None) -> Origin:
    """Read from git in the repository DVC runs us for (DVC_ROOT: for a queued experiment the
    parent repository, not its temporary copy). Outside git: an empty Origin."""
    from digits.promote import uncommitted

    root = root or repo_root()
    experiment = os.environ.get("DVC_EXP_NAME", "")
    commit = _git_out(root, "rev-parse", "HEAD") or ""
    if not commit:
        return Origin(experiment=experiment)
    changed: tuple[str, ...] = ()
    if not experiment:  # an experiment's workspace is its own commit (a DVC exp ref)
        changed = tuple(uncommitted(root) or ())
    return Origin(
        commit=commit,
        branch=_git_out(root, "symbolic-ref", "--quiet", "--short", "HEAD") or "",
        changed=changed,
        experiment=experiment,
        baseline=os.environ.get("DVC_EXP_BASELINE_REV", "") if experiment else "",
    )


def run_name(origin: Origin) -> str | None:
    """The DVC experiment's name, else `<branch>@<short commit>` (`-dirty` with uncommitted
    changes); None outside git (MLflow then picks a random name)."""
    if origin.experiment:
        return origin.experiment
    if not origin.label:
        return None
    return origin.label + ("-dirty" if origin.changed else "")


def _flatten(d: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(_flatten(v, key))
        else:
            out[key] = list(v) if isinstance(v, tuple) else v
    return out


def params_differences(params, root: Path, ref: str) -> list[tuple[str, object, object]] | None:
    """(key, this run's value, value at `ref`) for every param that differs from params.yaml
    as committed at `ref`; None when `ref` has no params.yaml. Keys `ref` leaves out count at
    their defaults; a file this code cannot parse (another version's keys) is compared as is."""
    from digits.config import flat_params, parse_params
    from digits.promote import committed_params

    try:
        raw = committed_params(root, ref)
    except DigitsError:
        return None
    if raw is None:
        return None
    try:
        theirs = flat_params(parse_params(raw, f"{ref}:params.yaml"))
    except DigitsError:
        theirs = _flatten(raw)
    ours = flat_params(params)
    missing = "(absent)"
    return [
        (k, ours.get(k, missing), theirs.get(k, missing))
        for k in sorted(ours.keys() | theirs.keys())
        if ours.get(k, missing) != theirs.get(k, missing)
    ]


def _differences_table(diffs: list, ours: str, theirs: str) -> list[str]:
    lines = [f"| param | {ours} | {theirs} |", "| --- | --- | --- |"]
    return lines + [f"| `{k}` | {a} | {b} |" for k, a, b in diffs]


def run_description(origin: Origin, params, root: Path | None = None) -> str:
    """Markdown for the run page: where the run came from and how its params differ from
    the promotion branch's (and, when dirty, the uncommitted params.yaml diff)."""
    from digits.promote import branch_ref

    root = root or repo_root()
    if not origin.commit:
        return "Not run from a git repository: no commit to name."
    lines = []
    if origin.experiment:
        base = _git_out(root, "rev-parse", "--short", origin.baseline) if origin.baseline else ""
        lines.append(f"DVC experiment `{origin.experiment}` (baseline commit `{base or '?'}`).")
    else:
        lines.append(f"Commit `{origin.label}` ({origin.commit}).")
    if origin.changed:
        shown = ", ".join(f"`{p}`" for p in origin.changed[:10])
        more = f" and {len(origin.changed) - 10} more" if len(origin.changed) > 10 else ""
        lines.append(f"Run with uncommitted changes to {shown}{more}.")

    branch = params.gates.promotion_branch
    ref = branch_ref(root, branch)
    diffs = params_differences(params, root, ref) if ref else None
    lines.append("")
    if diffs is None:
        lines.append(f"No `params.yaml` on the promotion branch `{branch}` to compare with.")
    elif not diffs:
        lines.append(f"Params: as on the promotion branch `{branch}`.")
    else:
        lines.append(f"Params that differ from the promotion branch `{branch}`:")
        lines.append("")
        lines += _differences_table(diffs, "this run", branch)

    if "params.yaml" in origin.changed:
        diff = _git_out(root, "diff", "HEAD", "--", "params.yaml") or ""
        body = diff.splitlines()
        if len(body) > GIT_OUTPUT_LINES:
            body = [*body[:GIT_OUTPUT_LINES], "... (cut)"]
        lines += ["", "Uncommitted changes to `params.yaml` (`git diff HEAD`):", "", "```diff"]
        lines += [*body, "```"]
    return "\n".join(lines)


class MnistFiles(HTTPDatasetSource):
    """The official MNIST files a split was made from, with their MD5s (digits.mnist)."""

    def __init__(self, url: str, files: dict[str, str]):
        super().__init__(url)
        self.files = files

    def to_dict(self) -> dict:
        return {**super().to_dict(), "files": self.files}


class ProcessedSplit(Dataset):
    """A split of the processed data as an MLflow dataset, described without loading it: the
    digest is its file's sha256 (the first 8 hex digits, as short as MLflow's own digests so the
    runs table shows it whole; all 64 are in the profile), the source is the official files,
    shape and dtype are the schema and profile."""

    def __init__(self, name: str, sha256: str, prefix: str, rows: int):
        files = {f: md5 for f, md5 in RESOURCES if f.startswith(prefix + "-")}
        self.sha256, self.rows = sha256, rows
        super().__init__(MnistFiles(OFFICIAL_MIRRORS[0], files), name=name, digest=sha256[:8])

    def _compute_digest(self) -> str:  # the digest is always given
        return self.sha256[:8]

    @property
    def profile(self) -> dict:
        return {
            "num_rows": self.rows,
            "features_shape": [self.rows, NUM_PIXELS],
            "targets_shape": [self.rows],
            "sha256": self.sha256,
        }

    @property
    def schema(self) -> TensorDatasetSchema:
        images = TensorSpec(np.dtype(np.uint8), (-1, NUM_PIXELS), "images")
        labels = TensorSpec(np.dtype(np.uint8), (-1,), "labels")
        return TensorDatasetSchema(Schema([images]), Schema([labels]))

    def to_dict(self) -> dict:
        return {
            **super().to_dict(),
            "schema": json.dumps(self.schema.to_dict()),
            "profile": json.dumps(self.profile),
        }


def dataset_inputs(train: dict, test_sha256: str, test_rows: int) -> list[DatasetInput]:
    """Train, validation and test as the run's inputs: `train` is train_info.json's "data"."""
    splits = [
        (ProcessedSplit("mnist-train", train["sha256"], "train", train["train_rows"]), "training"),
        (ProcessedSplit("mnist-val", train["sha256"], "train", train["val_rows"]), "validation"),
        (ProcessedSplit("mnist-test", test_sha256, "t10k", test_rows), "testing"),
    ]
    return [
        DatasetInput(ds._to_mlflow_entity(), [InputTag(MLFLOW_DATASET_CONTEXT, context)])
        for ds, context in splits
    ]


def read_train_info() -> dict:
    """The train stage's record of the training (digits.train.train_info)."""
    from digits.files import TRAIN_INFO

    try:
        return json.loads(TRAIN_INFO.read_text())
    except FileNotFoundError:
        raise TrackingError(
            f"{TRAIN_INFO}: not found; the train stage writes it with the model (dvc repro train)"
        ) from None


def evaluation_metrics(metrics: dict, timestamp: int) -> list[Metric]:
    """Headline metrics as `test_<name>`; per-class ones as `test_class/<digit>/<metric>` and
    robustness (when evaluated) as `robustness/...`, so MLflow groups them by prefix."""
    out = {f"test_{k}": v for k, v in metrics.items() if not isinstance(v, dict)}
    for digit, per_class in metrics["per_class"].items():
        out.update({f"test_class/{digit}/{m}": v for m, v in per_class.items()})
    robustness = metrics.get("robustness") or {}
    out.update({f"robustness/{k}": v for k, v in robustness.items() if not isinstance(v, dict)})
    out.update({f"robustness/{k}": v for k, v in robustness.get("corruptions", {}).items()})
    return [Metric(k, float(v), timestamp, 0) for k, v in out.items()]


def epoch_metrics(history: list[dict], started_ms: int) -> list[Metric]:
    """Per-epoch metrics, step = epoch, timestamped at the end of their epoch."""
    out, t = [], float(started_ms)
    for row in history:
        t += float(row.get("seconds", 0.0)) * 1000
        out += [
            Metric(k, float(v), int(t), int(row["epoch"])) for k, v in row.items() if k != "epoch"
        ]
    return out


def _mark_training_experiment(client: MlflowClient, experiment_id: str) -> None:
    """Tag the experiment as model training (once: a kind set in the UI is kept)."""
    key, value = EXPERIMENT_KIND
    if key not in client.get_experiment(experiment_id).tags:
        client.set_experiment_tag(experiment_id, key, value)


def _describe_registered_model(client: MlflowClient, name: str) -> None:
    """Say what the model takes and returns (once: a description written in the UI is kept)."""
    if not client.get_registered_model(name).description:
        client.update_registered_model(name, description=MODEL_DESCRIPTION)


def log_pipeline_run(
    params,
    metrics: dict,
    history: list[dict],
    figures: list[Path],
    model,
    example,
    correct: np.ndarray,
) -> dict:
    """One MLflow run for this pipeline run, named after its origin (DVC experiment, or branch
    and commit) and started when its training started: params, the training's time, speed and
    numeric environment, per-epoch metrics (step = epoch), test metrics, the train, validation
    and test sets as inputs, figures, and the model (pt2) registered as a new version. Returns
    the ids, also written to reports/mlflow_run.json for the stages after this one.

    `correct` (per test image, from the same weights as `model`) and `metrics` become the new
    version's score record (digits.scores), which the gate reads instead of loading it."""
    from digits.config import flat_params
    from digits.data import file_digest
    from digits.files import MODEL, RUN_INFO, TEST_DATA, write_text
    from digits.model import Probabilities

    info = read_train_info()
    origin = run_origin()
    experiment_id = connect(params.mlflow.experiment)
    uri = tracking_uri()
    name = params.mlflow.registered_model
    test_sha256 = file_digest(TEST_DATA)
    with np.load(TEST_DATA, allow_pickle=False) as f:
        test_rows = len(f["test_y"])  # the labels only: 10 kB
    tags = {
        "dvc_exp_name": origin.experiment,
        "git_commit": origin.commit,
        "data.train_sha256": info["data"]["sha256"],
        "data.test_sha256": test_sha256,
    }
    git_tags = {"git_branch": origin.branch, "mlflow.source.git.commit": origin.commit}
    run_tags = {
        **tags,
        **{k: v for k, v in git_tags.items() if v},
        "git_dirty": str(bool(origin.changed)).lower(),
        "device": info["device"],
        **info["numerics"],
        "mlflow.source.name": "dvc repro",
        "mlflow.note.content": run_description(origin, params)[:MAX_TAG_VALUE],
    }
    started_ms = int(info["started_at"] * 1000)
    now = int(time.time() * 1000)
    training = [
        Metric("training/seconds", round(info["seconds"], 2), now, 0),  # readable in a table
        Metric("training/samples_per_second", float(info["samples_per_second"]), now, 0),
    ]
    per_epoch = epoch_metrics(history, started_ms)
    client = MlflowClient(uri)
    with store_lock(uri):
        try:
            _mark_training_experiment(client, experiment_id)
            run = client.create_run(
                experiment_id, start_time=started_ms, tags=run_tags, run_name=run_name(origin)
            )
            run_id = run.info.run_id
            client.log_batch(
                run_id, params=[Param(k, str(v)) for k, v in flat_params(params).items()]
            )
            for i in range(0, len(per_epoch), 900):  # log_batch takes 1000 at most
                client.log_batch(run_id, metrics=per_epoch[i : i + 900])
            client.log_batch(run_id, metrics=evaluation_metrics(metrics, now) + training)
            client.log_inputs(run_id, dataset_inputs(info["data"], test_sha256, test_rows))
            for fig in figures:
                client.log_artifact(run_id, str(fig), "figures")
            client.log_artifact(run_id, str(MODEL), "weights")
            with mlflow.start_run(run_id=run_id):  # ends the run as FINISHED on exit
                logged = mlflow.pytorch.log_model(
                    Probabilities(model).eval(),
                    name="model",
                    input_example=example.numpy(),
                    serialization_format="pt2",
                    registered_model_name=name,
                    await_registration_for=60,
                    pip_requirements=_pip_requirements(),
                )
            version = str(logged.registered_model_version)
            _describe_registered_model(client, name)
            version_tags = {
                **tags,
                "run_name": run.info.run_name,
                "test_accuracy": str(metrics["accuracy"]),
                "run_id": run_id,
            }
            for k, v in version_tags.items():
                client.set_model_version_tag(name, version, k, v)
            record = score_record(name, version, metrics, correct, test_sha256)
            client.set_model_version_tag(name, version, scores.CACHE_TAG, record)
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
    print(
        f"evaluate: MLflow run {run.info.run_name} ({run_id}); registered {name} version {version}"
    )
    return out


def score_record(name: str, version: str, metrics: dict, correct, test_sha256: str) -> str:
    """The version's score record, keyed by its files as the registry now serves them."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="digits-evaluate-") as tmp:
        sha = scores.files_sha256(scores.download_model(name, version, tmp))
    plain = {k: v for k, v in metrics.items() if k != "robustness"}
    score = scores.Score(
        version, plain, np.asarray(correct, bool), sha, False, "evaluate", metrics["robustness"]
    )
    return scores.cache_record(score, test_sha256)


def _pip_requirements() -> list[str]:
    # Pin what loading the model needs, so MLflow need not infer it (slow: it imports and
    # re-runs the model in a subprocess).
    import torch

    return [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"]
