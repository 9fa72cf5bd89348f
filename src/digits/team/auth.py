"""Logins on the team server: MLflow's basic-auth app, its secrets, and what it protects.

`digits server` runs `mlflow server --app-name basic-auth` unless told `--no-auth` (refused
off loopback). Its settings go to MLflow in an ini file written 0600 in a private temp folder
(MLFLOW_AUTH_CONFIG_PATH) and its environment, never on a command line: `ps` and
/proc/*/cmdline show every user a process's arguments. The admin's password comes from
MLFLOW_AUTH_ADMIN_PASSWORD or a file only its owner can read, never a default. Users and
permissions live in the team's PostgreSQL (the ini's database_uri).

Who may do what is then the server's decision (docs/team.md): every logged-in user reads
(default_permission READ); anonymous requests get 401. The production model (`mnist-mlp`)
and its candidates model (`mnist-mlp-candidates`) are created by the admin at start, so no
one else owns them by creating them first; the roles of digits.team.users give MANAGE on the
production model to the release identity only (docs/team.md has the table)."""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path

from digits.core import settings
from digits.core.errors import DigitsError, first_line
from digits.tracking.registry import candidates_of

ADMIN = "admin"  # the admin's login, as MLflow's basic_auth.ini names it
# MLflow checks a login's password hash (a deliberately slow KDF, tens of ms) on every request,
# and a client sends hundreds per pipeline run: measured, a one-epoch pipeline on a server with
# logins spent minutes in it. For this long a worker trusts a login it has checked
# (MLflow's auth_cache_ttl_seconds). The price: a password changed or a user removed on one
# uvicorn worker is still accepted by the others for at most this long (docs/team.md).
AUTH_CACHE_SECONDS = 60
MIN_PASSWORD = 12  # MLflow's own rule (mlflow.utils.validation._validate_password)
DEFAULT_EXPERIMENT, DEFAULT_MODEL = "mnist", "mnist-mlp"  # params.yaml's mlflow section


class AuthError(DigitsError):
    pass


def read_secret_file(path: str, what: str) -> str:
    """The first line of a file only its owner (this user) can read: a file that others may
    read, or owned by someone else, is refused, as ssh refuses a private key others can read.
    `-` reads standard input (a pipe from a secret manager)."""
    import sys

    if path == "-":
        text = sys.stdin.readline()
    else:
        try:
            info = os.stat(path)
        except OSError as e:
            raise AuthError(f"{what} {path}: {e.strerror}") from None
        if info.st_mode & 0o077:
            raise AuthError(
                f"{what} {path} may be read by others (mode {stat.filemode(info.st_mode)}); "
                f"expected a file only its owner can read: chmod 600 {path}"
            )
        if info.st_uid != os.geteuid():
            raise AuthError(f"{what} {path} belongs to another user; expected one of your own")
        with open(path) as f:
            text = f.readline()
    secret = text.rstrip("\r\n")
    check_password(secret, what)
    return secret


def check_password(secret: str, what: str) -> None:
    if len(secret) < MIN_PASSWORD:  # never show the secret, not even its length
        raise AuthError(f"{what}: expected at least {MIN_PASSWORD} characters")


def admin_password(password_file: str | None) -> str:
    """The admin's password: --admin-password-file, else MLFLOW_AUTH_ADMIN_PASSWORD."""
    if password_file:
        return read_secret_file(password_file, "--admin-password-file")
    secret = settings.MLFLOW_AUTH_ADMIN_PASSWORD.get()
    if secret is None:
        raise AuthError(
            "logins are on and the admin has no password: set MLFLOW_AUTH_ADMIN_PASSWORD or "
            "pass --admin-password-file FILE (mode 600), at least "
            f"{MIN_PASSWORD} characters; or --no-auth (loopback only) to run without logins"
        )
    check_password(secret, settings.MLFLOW_AUTH_ADMIN_PASSWORD.name)
    return secret


def write_config(folder: Path, database_uri: str, cache_seconds: int = AUTH_CACHE_SECONDS) -> Path:
    """MLflow's auth ini, created 0600 (never readable by others, not even for an instant) in
    `folder`, private to this user (a mkdtemp folder, 0700). The database URI may hold the
    database's password; `%` doubled, as configparser reads it. `cache_seconds`: how long a
    worker trusts a login it has checked (MLflow's auth_cache_ttl_seconds; 0: never)."""
    if cache_seconds < 0:
        raise AuthError(f"--auth-cache-seconds {cache_seconds}: expected 0 (off) or more")
    path = folder / "basic_auth.ini"
    text = (
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = {database_uri.replace('%', '%%')}\n"
        f"admin_username = {ADMIN}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        f"auth_cache_ttl_seconds = {cache_seconds}\n"
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


def server_env(env: dict[str, str], config: Path, password: str) -> dict[str, str]:
    """`mlflow server`'s environment with logins on: the ini; the admin's password, exact (an
    ini would strip its spaces), where only this user and root can read it (/proc/PID/environ
    is the owner's, unlike the command line); and a random key for the auth app's CSRF tokens
    (the same in every worker; a restart only logs browsers out)."""
    out = {k: v for k, v in env.items() if not k.startswith("MLFLOW_AUTH_ADMIN_")}
    out["MLFLOW_AUTH_CONFIG_PATH"] = str(config)
    out["MLFLOW_AUTH_ADMIN_PASSWORD"] = password
    out["MLFLOW_FLASK_SERVER_SECRET_KEY"] = secrets.token_urlsafe(32)
    return out


@contextlib.contextmanager
def logged_in(user: str, password: str) -> Iterator[None]:
    """MLflow's clients read their credentials from the environment only: set them for the
    block, and put back what was there."""
    keys = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
    saved = {k: os.environ.pop(k, None) for k in keys}
    os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = (
        user,
        password,
    )
    try:
        yield
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None)
            if v is not None:
                os.environ[k] = v


def ensure_protected(url: str, experiment: str, model: str) -> str:
    """Create (as the logged-in admin) the experiment, the production model and its candidates
    model where missing: whoever creates one owns it (MANAGE), so the admin does it first.
    Returns the experiment's id."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(url, registry_uri=url)

    def create(make) -> None:  # a `user add` at the server's start may be making it too
        try:
            make()
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise

    try:
        if client.get_experiment_by_name(experiment) is None:
            create(lambda: client.create_experiment(experiment))
        for name, description in (
            (model, "production: only the release identity moves its aliases"),
            (candidates_of(model), f"every version the pipeline registers; promoting one "
             f"copies it to {model}"),
        ):  # fmt: skip
            if not client.search_registered_models(f"name='{name}'"):
                create(
                    lambda n=name, d=description: client.create_registered_model(n, description=d)
                )
        exp = client.get_experiment_by_name(experiment)
        if exp is None or exp.lifecycle_stage == "deleted":
            raise AuthError(
                f"experiment {experiment} on {url} is deleted; restore it (mlflow experiments "
                "restore) or name another with --experiment"
            )
        exp_id = exp.experiment_id
    except MlflowException as e:
        if e.get_http_status_code() == 401:
            raise AuthError(
                f"MLflow tracking server {url} refused the admin's login: check "
                "MLFLOW_AUTH_ADMIN_PASSWORD or --admin-password-file"
            ) from None
        raise AuthError(f"MLflow tracking server {url}: {first_line(e)}") from None
    return str(exp_id)
