"""Every environment variable the project reads, declared once: its name, default, type and
what it does. docs/settings.md lists them (tests/test_config.py checks the two agree, and that
no module reads the environment but through here).

Each is read when asked (`MNIST_TIMEOUT.get()`), never at import: a parent process or a test
may change the environment between two reads, and a bad value stops only what uses it, with one
line naming the variable and what was expected (SettingsError). An empty value counts as unset.

Standard library only, and no class built at import: this module is loaded by every process,
`digits predict` included, whose start-up is a third of a second (pydantic-settings cost 40-80
ms of it, measured).

Not here: what the project *sets* for libraries that read it themselves (numerics.PINS,
MLFLOW_CLIENT_DEFAULTS below, ...) and what only MLflow reads (MLFLOW_HTTP_REQUEST_*, ...); and
the reproducibility switches that digits.core.numerics and digits.core.blas read themselves
(DIGITS_PORTABLE_NUMERICS, OPENBLAS_NUM_THREADS, OPENBLAS_CORETYPE): those two modules are
shipped in every registered model (digits.tracking.pyfunc.SERVED_MODULES), which runs with its
own few pinned requirements, so they import nothing of the project's but each other and errors.
docs/settings.md lists them all."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Generic, TypeVar

from digits.core.errors import DigitsError

T = TypeVar("T")


class SettingsError(DigitsError):
    """A bad environment variable; str() is the one-line message shown to the user."""


@dataclass(frozen=True)
class Var(Generic[T]):
    """An environment variable: `get()` is its value, parsed, or the default when unset."""

    name: str
    default: T
    doc: str
    parse: Callable[[str], T] | None = None  # None: the text as it is

    def get(self, environ: Mapping[str, str] | None = None) -> T:
        raw = (os.environ if environ is None else environ).get(self.name, "")
        if raw == "":
            return self.default
        if self.parse is None:
            return raw  # type: ignore[return-value]  # a Var without parse is a Var[str | None]
        try:
            return self.parse(raw)
        except ValueError as e:
            raise SettingsError(f"{self.name}: {e}, got {raw!r}") from None


def _positive(kind: Callable[[str], T], what: str) -> Callable[[str], T]:
    def parse(raw: str) -> T:
        try:
            value = kind(raw)
        except ValueError:
            raise ValueError(f"expected a {what}") from None
        if not value > 0:  # type: ignore[operator]
            raise ValueError(f"expected a positive {what}")
        return value

    return parse


seconds = _positive(float, "number of seconds")
count = _positive(int, "whole number")

# --- what DVC tells a stage it runs ------------------------------------------------------------

DVC_ROOT: Var[str | None] = Var(
    "DVC_ROOT",
    None,
    "The repository root (for a queued experiment, the parent repository, not its temporary "
    "copy); unset: the nearest folder up from the working directory with a dvc.yaml.",
)
DVC_EXP_NAME: Var[str | None] = Var(
    "DVC_EXP_NAME",
    None,
    "The DVC experiment this run belongs to: its MLflow run's name and tags; an experiment "
    "never promotes.",
)
DVC_EXP_BASELINE_REV: Var[str | None] = Var(
    "DVC_EXP_BASELINE_REV", None, "The commit a DVC experiment started from (a run tag)."
)

# --- the download stage ------------------------------------------------------------------------

MNIST_MIRROR: Var[str | None] = Var(
    "MNIST_MIRROR",
    None,
    "Comma-separated mirrors tried in order, each an http(s) URL or a local folder; unset: the "
    "official MNIST mirrors (torchvision's list).",
)
MNIST_TIMEOUT: Var[float] = Var(
    "MNIST_TIMEOUT", 30.0, "Seconds without a byte before a mirror counts as stalled.", seconds
)

# --- the MLflow store: MLflow's own client variables, which the project reads too -------------

MLFLOW_TRACKING_URI: Var[str | None] = Var(
    "MLFLOW_TRACKING_URI",
    None,
    "The MLflow store or tracking server; unset: sqlite `mlflow.db` at the repository root.",
)
MLFLOW_TRACKING_TOKEN: Var[str | None] = Var(
    "MLFLOW_TRACKING_TOKEN", None, "A bearer token for the tracking server."
)
MLFLOW_TRACKING_USERNAME: Var[str | None] = Var(
    "MLFLOW_TRACKING_USERNAME", None, "The login of a server behind MLflow's basic-auth app."
)
MLFLOW_TRACKING_PASSWORD: Var[str | None] = Var(
    "MLFLOW_TRACKING_PASSWORD", None, "Its password (with MLFLOW_TRACKING_USERNAME)."
)
MLFLOW_TRACKING_INSECURE_TLS: Var[bool] = Var(
    "MLFLOW_TRACKING_INSECURE_TLS",
    False,
    "`true` skips the check of the server's TLS certificate.",
    lambda raw: raw.lower() == "true",
)
MLFLOW_TRACKING_SERVER_CERT_PATH: Var[str | None] = Var(
    "MLFLOW_TRACKING_SERVER_CERT_PATH",
    None,
    "A CA bundle for the server's certificate (e.g. a reverse proxy's own CA).",
)
REQUESTS_CA_BUNDLE: Var[str | None] = Var(
    "REQUESTS_CA_BUNDLE",
    None,
    "The CA bundle where MLFLOW_TRACKING_SERVER_CERT_PATH is unset (as MLflow's client does).",
)
MLFLOW_WORKSPACE: Var[str | None] = Var(
    "MLFLOW_WORKSPACE",
    None,
    "An MLflow workspace: registry look-ups then go through MLflow (no fast path).",
)

# --- `digits sweep` and the trials it runs ----------------------------------------------------

DIGITS_SWEEP_HEARTBEAT: Var[int] = Var(
    "DIGITS_SWEEP_HEARTBEAT", 10, "Seconds between a running trial's heartbeats.", count
)
DIGITS_SWEEP_GRACE: Var[int] = Var(
    "DIGITS_SWEEP_GRACE",
    30,
    "Seconds of silence after which a trial is failed (its worker died).",
    count,
)
DIGITS_SWEEP: Var[str | None] = Var(
    "DIGITS_SWEEP",
    None,
    "Set by `digits sweep` for a trial's train stage: JSON naming the study's parent run, the "
    "study, the trial and the worker (the run's parent and tags).",
)

# --- `digits predict` and `digits app` --------------------------------------------------------

XDG_CACHE_HOME: Var[str | None] = Var(
    "XDG_CACHE_HOME",
    None,
    "Where downloaded models are kept (digits/models under it); unset: ~/.cache.",
)
DIGITS_PREDICTION_LOG: Var[str | None] = Var(
    "DIGITS_PREDICTION_LOG",
    None,
    "The prediction log when `--log-db` names none: a SQLAlchemy URL (the team's PostgreSQL,"
    " so every replica logs to one place) or a SQLite file; unset: predictions.db beside a"
    " SQLite store, else $XDG_DATA_HOME/digits/predictions.db.",
)
XDG_DATA_HOME: Var[str | None] = Var(
    "XDG_DATA_HOME",
    None,
    "Where the prediction log of a tracking server's user goes (digits/ under it) when neither"
    " --log-db nor DIGITS_PREDICTION_LOG names one; unset: ~/.local/share.",
)

# --- `digits server`: its logins (docs/team.md) -----------------------------------------------

MLFLOW_AUTH_ADMIN_PASSWORD: Var[str | None] = Var(
    "MLFLOW_AUTH_ADMIN_PASSWORD",
    None,
    "The password of the team server's admin (MLflow's own name for it): `digits server` "
    "creates the admin with it on a fresh auth database, and `digits server user add` logs in "
    "with it. Or --admin-password-file. No default: logins on and no password stop the server.",
)
DIGITS_NEW_USER_PASSWORD: Var[str | None] = Var(
    "DIGITS_NEW_USER_PASSWORD",
    None,
    "The password `digits server user add` gives the new user (else --password-file, else a "
    "prompt); at least 12 characters.",
)

# every variable above, by concern (docs/settings.md has a section for each)
GROUPS: dict[str, tuple[Var, ...]] = {
    "DVC": (DVC_ROOT, DVC_EXP_NAME, DVC_EXP_BASELINE_REV),
    "The download stage": (MNIST_MIRROR, MNIST_TIMEOUT),
    "The MLflow store": (
        MLFLOW_TRACKING_URI,
        MLFLOW_TRACKING_TOKEN,
        MLFLOW_TRACKING_USERNAME,
        MLFLOW_TRACKING_PASSWORD,
        MLFLOW_TRACKING_INSECURE_TLS,
        MLFLOW_TRACKING_SERVER_CERT_PATH,
        REQUESTS_CA_BUNDLE,
        MLFLOW_WORKSPACE,
    ),
    "`digits sweep`": (DIGITS_SWEEP_HEARTBEAT, DIGITS_SWEEP_GRACE, DIGITS_SWEEP),
    "`digits server`": (MLFLOW_AUTH_ADMIN_PASSWORD, DIGITS_NEW_USER_PASSWORD),
    "`digits predict` and `digits app`": (XDG_CACHE_HOME, DIGITS_PREDICTION_LOG, XDG_DATA_HOME),
}

# What the project sets for MLflow's client, which reads these from the environment only: its
# HTTP client retries with backoff for minutes by default, where a command should fail fast
# with a clear message; and a stage's log is for people, with no progress bars for the few
# small files a model has. Set by `client_defaults()` at each entry point (digits.cli.main,
# digits.stages.runner.run_stage), as numerics.pin sets the math libraries' pins.
MLFLOW_CLIENT_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


def client_defaults(environ: MutableMapping[str, str] | None = None) -> None:
    """Set MLFLOW_CLIENT_DEFAULTS in the environment (or `environ`); a user's own value wins.
    Before the first MLflow call; child processes (DVC's stages, the app's workers) inherit
    them."""
    env = os.environ if environ is None else environ
    for key, value in MLFLOW_CLIENT_DEFAULTS.items():
        env.setdefault(key, value)
