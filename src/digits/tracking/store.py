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

`open_store(experiment)` is what the stages, `digits promote` and `digits sweep` use: a
connected client (MlflowClient of that URI) whose `writing()` block holds the lock and turns
MLflow's exceptions into one line naming the store. Connecting changes no global state: the
store is handed to whatever uses it. MLflow's fluent API (mlflow.start_run, log_model,
mlflow.artifacts) takes its store from a process-wide setting instead; `Store.make_current()`
is the one place that sets it, for the run a stage keeps active (digits.tracking.runs)."""

from __future__ import annotations

import base64
import contextlib
import re
import ssl
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from digits.core import http, settings
from digits.core.errors import DigitsError, first_line
from digits.core.files import repo_root

# MLflow's client settings that every entry point sets (digits.core.settings.client_defaults)
HTTP_DEFAULTS = settings.MLFLOW_CLIENT_DEFAULTS
REACH_TIMEOUT = 10  # seconds for the /health probe of a tracking server


class StoreError(DigitsError):
    pass


def tracking_uri() -> str:
    return settings.MLFLOW_TRACKING_URI.get() or f"sqlite:///{repo_root() / 'mlflow.db'}"


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
        raise StoreError(refused(uri, e) or f"MLflow store {uri}: {first_line(e)}") from None


def refused(uri: str, e: Exception) -> str | None:
    """The one line for a server's 401 (no login, or a wrong one) or 403 (the login's role may
    not do this), else None. MLflow's client puts the status in its message (a copy of a model
    version wraps it in an error of its own)."""
    found = re.search(r"failed with error code (40[13]) != 200", str(e))
    status = int(found[1]) if found else getattr(e, "get_http_status_code", lambda: None)()
    user = settings.MLFLOW_TRACKING_USERNAME.get()
    if status == 401 and not (user or settings.MLFLOW_TRACKING_TOKEN.get()):
        return (
            f"MLflow tracking server {uri} wants a login: set MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD"
        )
    if status == 401:  # the same answer whether the user exists or not
        return (
            f"MLflow tracking server {uri} refused the login{f' of {user}' if user else ''}: "
            "check MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or the token)"
        )
    if status == 403:
        where = re.search(r"endpoint (/\S+)", str(e))
        return (
            f"MLflow tracking server {uri}: {user or 'this login'} may not do this (403 "
            f"Permission denied{f' at {where[1]}' if where else ''}); the server decides by role, "
            "and only the release identity may change the production model "
            "(docs/team.md#logins-and-roles)"
        )
    return None


def ssl_context() -> ssl.SSLContext:
    """TLS as MLflow's own client does it: MLFLOW_TRACKING_SERVER_CERT_PATH names a private
    CA bundle (e.g. a reverse proxy's own CA), MLFLOW_TRACKING_INSECURE_TLS=true skips checks."""
    if settings.MLFLOW_TRACKING_INSECURE_TLS.get():
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    ca = settings.MLFLOW_TRACKING_SERVER_CERT_PATH.get() or settings.REQUESTS_CA_BUNDLE.get()
    return ssl.create_default_context(cafile=ca)


def auth_headers() -> dict[str, str]:
    """The credentials MLflow's client would send (MLFLOW_TRACKING_TOKEN, else
    MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD)."""
    if token := settings.MLFLOW_TRACKING_TOKEN.get():
        return {"Authorization": f"Bearer {token}"}
    user = settings.MLFLOW_TRACKING_USERNAME.get()
    password = settings.MLFLOW_TRACKING_PASSWORD.get()
    if user and password:
        pair = base64.b64encode(f"{user}:{password}".encode()).decode()
        return {"Authorization": f"Basic {pair}"}
    return {}


def server_get(url: str, timeout: float) -> http.Response:
    """GET `url` of a tracking server as MLflow's client connects: its TLS settings and
    credentials. OSError when no answer came."""
    context = ssl_context() if url.startswith("https://") else None
    return http.get(url, timeout=timeout, headers=auth_headers(), context=context)


def check_reachable(uri: str) -> None:
    """Fail in seconds, naming the server, where MLflow's client would retry for minutes."""
    if not is_server(uri):
        return
    try:
        answer = server_get(uri.rstrip("/") + "/health", REACH_TIMEOUT)
    except OSError as e:
        reason = getattr(e, "reason", e)
        raise StoreError(
            f"MLflow tracking server {uri} is unreachable ({reason}); the "
            "stage's inputs are kept, rerun once it is up"
        ) from None
    # 401, 403: up, behind a login (MLflow's client sends the credentials)
    if not answer.ok and answer.status not in (401, 403):
        raise StoreError(
            f"MLflow tracking server {uri} answered {answer.status} {answer.reason} at /health;"
            " the stage's inputs are kept, rerun once it is up"
        )


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

    def make_current(self) -> None:
        """Point MLflow's fluent API (mlflow.start_run, mlflow.pyfunc.log_model,
        mlflow.artifacts) at this store: it reads a process-wide setting, not a client. The
        project's one call of mlflow.set_tracking_uri, made where a run becomes active
        (digits.tracking.runs.active_run); everything else takes the store's client."""
        import mlflow

        mlflow.set_tracking_uri(self.uri)


def open_store(experiment: str, uri: str | None = None) -> Store:
    """The store at `uri` (default: the configured one, `tracking_uri()`) connected, the
    experiment created there if needed and checked to take this pipeline's runs."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    uri = uri or tracking_uri()
    check_reachable(uri)
    with store_lock(uri):  # a client's first call creates (migrates) a fresh SQLite store
        try:
            client = MlflowClient(tracking_uri=uri, registry_uri=uri)
            exp = client.get_experiment_by_name(experiment) or _create_experiment(
                client, experiment, uri
            )
        except MlflowException as e:  # 401, 403: a server behind MLflow's basic-auth app
            raise StoreError(refused(uri, e) or f"MLflow store {uri}: {first_line(e)}") from None
    _check_experiment(exp, uri)
    return Store(uri, client, exp.experiment_id)


def _create_experiment(client, name: str, uri: str):
    from mlflow.exceptions import MlflowException

    try:
        client.create_experiment(name, artifact_location=artifact_location(uri))
    except MlflowException as e:
        # on a server, another client (a teammate, a parallel queued experiment) may have
        # created it since we looked: use theirs
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    return client.get_experiment_by_name(name)


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
