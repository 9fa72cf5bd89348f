"""The MLflow store: where it is, how to connect, and how its errors reach the user.

Default store: `mlflow.db` (SQLite) and `mlartifacts/` at the repository root, as absolute
paths from DVC_ROOT, so runs from `dvc exp run --queue` (executed in temporary copies) land in
the same store that `mlflow ui` at the root shows. MLFLOW_TRACKING_URI overrides the store.

A team's tracking server (an http(s) MLFLOW_TRACKING_URI, see `digits server`) keeps the
artifacts too: experiments are created there without an artifact location, so the server picks
its own (`mlflow-artifacts:/`, proxied to its --artifacts-destination) and every teammate can
load the models. A client-local folder there would hold files no one else can read.

Writes to a SQLite store are serialised with a file lock beside the database: SQLite allows one
writer, MLflow's schema migration on a fresh file is not safe to run twice at once, and a model
version number is read-then-written. Parallel pipelines then queue for the lock, not fail.

`open_store(experiment)` is what the stages, `digits promote` and `digits predict` use: a
connected client whose `writing()` block holds the lock and turns MLflow's exceptions into one
line naming the store."""

from __future__ import annotations

import contextlib
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from digits.core.errors import DigitsError, first_line
from digits.core.files import repo_root

# MLflow's HTTP client retries with backoff for minutes by default; a pipeline stage should
# fail fast with a clear message instead. Set in `open_store()`; a user's own setting wins.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
    # a stage's log is for people: no progress bars for the few small files a model has
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}
REACH_TIMEOUT = 10  # seconds for the /health probe of a tracking server


class StoreError(DigitsError):
    pass


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / 'mlflow.db'}"


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI, else None."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def artifact_location(uri: str | None = None) -> str | None:
    """Where a new experiment keeps its artifacts: the server's choice (None) on a tracking
    server, else `mlartifacts/` at the repository root of this machine."""
    if is_server(uri or tracking_uri()):
        return None
    return (repo_root() / "mlartifacts").as_uri()


@contextlib.contextmanager
def store_lock(uri: str | None = None) -> Iterator[None]:
    """Exclusive access to a local SQLite store. Nothing to do for a server: its database
    serialises writers, and MLflow retries a model version number that two clients took."""
    db = sqlite_path(uri or tracking_uri())
    if db is None:
        yield
        return
    from filelock import FileLock

    db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(db) + ".lock", timeout=600):
        yield


@contextlib.contextmanager
def translated(uri: str) -> Iterator[None]:
    """MLflow's exceptions as one StoreError line naming the store."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as e:
        raise StoreError(f"MLflow store {uri}: {first_line(e)}") from None


def _ssl_context():
    """TLS as MLflow's own client does it: MLFLOW_TRACKING_SERVER_CERT_PATH names a private
    CA bundle (e.g. a reverse proxy's own CA), MLFLOW_TRACKING_INSECURE_TLS=true skips checks."""
    import ssl

    if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
        return ssl._create_unverified_context()
    ca = os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or os.environ.get("REQUESTS_CA_BUNDLE")
    return ssl.create_default_context(cafile=ca or None)


def check_reachable(uri: str) -> None:
    """Fail in seconds, naming the server, where MLflow's client would retry for minutes."""
    if not is_server(uri):
        return
    url = uri.rstrip("/") + "/health"
    context = _ssl_context() if uri.startswith("https://") else None
    try:
        urllib.request.urlopen(url, timeout=REACH_TIMEOUT, context=context).close()
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):  # up, behind a login: MLflow's client sends the credentials
            return
        raise StoreError(
            f"MLflow tracking server {uri} answered {e.code} {e.reason} at /health; the "
            "stage's inputs are kept, rerun once it is up"
        ) from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise StoreError(
            f"MLflow tracking server {uri} is unreachable ({reason}); the "
            "stage's inputs are kept, rerun once it is up"
        ) from None


@dataclass
class Store:
    """A connected store: its URI, a client, and the experiment the pipeline logs to."""

    uri: str
    client: Any  # mlflow.tracking.MlflowClient (typed loosely: mlflow loads lazily)
    experiment_id: str

    @contextlib.contextmanager
    def writing(self) -> Iterator[Any]:
        """The client, with the store's write lock held and MLflow's errors translated."""
        with store_lock(self.uri), translated(self.uri):
            yield self.client

    @contextlib.contextmanager
    def reading(self) -> Iterator[Any]:
        """The client, with MLflow's errors translated (no lock: reads never conflict)."""
        with translated(self.uri):
            yield self.client


def client_defaults() -> None:
    """MLflow's client settings for this project's commands (HTTP_DEFAULTS); a user's own
    setting wins. Before the first MLflow call."""
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)


def open_store(experiment: str) -> Store:
    """Point MLflow at the store (creating it and the experiment if needed), check that the
    experiment can take this pipeline's runs, and return it connected."""
    import mlflow
    from mlflow.tracking import MlflowClient

    client_defaults()
    uri = tracking_uri()
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    with store_lock(uri):
        try:
            exp = mlflow.get_experiment_by_name(experiment) or _create_experiment(experiment, uri)
        except mlflow.exceptions.MlflowException as e:
            if "error code 401" in first_line(e):  # a server behind MLflow's basic-auth app
                raise StoreError(
                    f"MLflow tracking server {uri} wants a login: set MLFLOW_TRACKING_USERNAME "
                    "and MLFLOW_TRACKING_PASSWORD"
                ) from None
            raise StoreError(f"MLflow store {uri}: {first_line(e)}") from None
    _check_experiment(exp, uri)
    return Store(uri, MlflowClient(uri), exp.experiment_id)


def _create_experiment(name: str, uri: str):
    import mlflow

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
        raise StoreError(
            f"experiment '{exp.name}' in {uri} is deleted; restore it (mlflow experiments "
            f"restore --experiment-id {exp.experiment_id}) {fix}"
        )
    if is_server(uri) and urllib.parse.urlparse(exp.artifact_location).scheme in ("", "file"):
        raise StoreError(
            f"experiment '{exp.name}' on {uri} keeps its artifacts in {exp.artifact_location}, "
            "a folder on one client that teammates cannot read; rename it (mlflow experiments "
            f"rename --experiment-id {exp.experiment_id} --new-name {exp.name}-local) so the "
            f"next run creates it anew in the server's artifact store, {fix}"
        )
