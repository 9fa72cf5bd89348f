"""Every environment variable the project reads, declared once: its name, type, default and
what it does. docs/settings.md lists them (tests/test_config.py checks the two agree, and that
no module reads the environment but through here).

One class per concern, read when asked (`Mnist.read()`), never at import: a parent process or a
test may change the environment between two reads, and a bad value stops only what uses its
group, with one line naming the variable and what was expected (SettingsError). An empty value
counts as unset.

Not here: what the project *sets* for libraries that read it themselves (numerics.PINS,
MLFLOW_CLIENT_DEFAULTS below, ...) and what only MLflow reads (MLFLOW_HTTP_REQUEST_*, ...); and
the reproducibility switches that digits.core.numerics and digits.core.blas read themselves
(DIGITS_PORTABLE_NUMERICS, OPENBLAS_NUM_THREADS, OPENBLAS_CORETYPE): those two modules are
shipped in every registered model (digits.tracking.pyfunc.SERVED_MODULES), which runs with its
own few pinned requirements, so they import nothing of the project but each other and errors.
docs/settings.md lists them all."""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from typing import Annotated, Any, Self

from pydantic import BeforeValidator, Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from digits.core.errors import DigitsError


class SettingsError(DigitsError):
    """A bad environment variable; str() is the one-line message shown to the user."""


def _positive(what: str, kind: type[float] | type[int]):
    """A before-validator: the variable as a positive `kind`, else the project's message."""

    def check(raw: Any) -> float | int:
        try:
            value = kind(raw)
        except (TypeError, ValueError):
            raise ValueError(f"expected a {what}") from None
        if value <= 0:
            raise ValueError(f"expected a positive {what}")
        return value

    return BeforeValidator(check)


Seconds = Annotated[float, _positive("number of seconds", float)]
Count = Annotated[int, _positive("whole number", int)]


class _Settings(BaseSettings):
    # the names are the variables' own (validation_alias), matched exactly
    model_config = SettingsConfigDict(
        case_sensitive=True, env_ignore_empty=True, extra="ignore", frozen=True
    )

    @classmethod
    def read(cls, environ: Mapping[str, str] | None = None) -> Self:
        """The group's variables from the environment (or from `environ`, a mapping)."""
        try:
            if environ is None:
                return cls()
            # the mapping alone (keyword arguments would be merged with the environment's)
            given = {f.validation_alias: f.default for f in cls.model_fields.values()}
            given.update({k: v for k, v in environ.items() if k in given and v != ""})
            return cls.model_validate(given)
        except ValidationError as e:
            err = e.errors()[0]
            name = ".".join(str(p) for p in err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            said = f"{name}: {msg[0].lower()}{msg[1:]}, got {err['input']!r}"
            raise SettingsError(said) from None


def _var(name: str, default: Any, doc: str) -> Any:
    """A field read from the variable `name`, exactly."""
    return Field(default, validation_alias=name, description=doc)


class Dvc(_Settings):
    """What DVC tells a stage it runs."""

    root: str | None = _var(
        "DVC_ROOT",
        None,
        "The repository root (for a queued experiment, the parent repository, not its temporary "
        "copy); unset: the nearest folder up from the working directory with a dvc.yaml.",
    )
    exp_name: str = _var(
        "DVC_EXP_NAME",
        "",
        "The DVC experiment this run belongs to: its MLflow run's name and tags; an experiment "
        "never promotes.",
    )
    exp_baseline_rev: str = _var(
        "DVC_EXP_BASELINE_REV", "", "The commit a DVC experiment started from (a run tag)."
    )


class Mnist(_Settings):
    """The download stage."""

    mirror: str = _var(
        "MNIST_MIRROR",
        "",
        "Comma-separated mirrors tried in order, each an http(s) URL or a local folder; unset: "
        "the official MNIST mirrors (torchvision's list).",
    )
    timeout: Seconds = _var(
        "MNIST_TIMEOUT", 30.0, "Seconds without a byte before a mirror counts as stalled."
    )


class Mlflow(_Settings):
    """The MLflow client's variables that the project reads too: MLflow reads them itself, and
    digits.tracking.resolve and the /health probe send the same credentials and TLS settings."""

    tracking_uri: str | None = _var(
        "MLFLOW_TRACKING_URI",
        None,
        "The MLflow store or tracking server; unset: sqlite `mlflow.db` at the repository root.",
    )
    token: SecretStr | None = _var(
        "MLFLOW_TRACKING_TOKEN", None, "A bearer token for the tracking server."
    )
    username: str | None = _var(
        "MLFLOW_TRACKING_USERNAME", None, "The login of a server behind MLflow's basic-auth app."
    )
    password: SecretStr | None = _var(
        "MLFLOW_TRACKING_PASSWORD", None, "Its password (with MLFLOW_TRACKING_USERNAME)."
    )
    insecure_tls: str = _var(
        "MLFLOW_TRACKING_INSECURE_TLS",
        "false",
        "`true` skips the check of the server's TLS certificate.",
    )
    server_cert_path: str | None = _var(
        "MLFLOW_TRACKING_SERVER_CERT_PATH",
        None,
        "A CA bundle for the server's certificate (e.g. a reverse proxy's own CA).",
    )
    ca_bundle: str | None = _var(
        "REQUESTS_CA_BUNDLE",
        None,
        "The CA bundle where MLFLOW_TRACKING_SERVER_CERT_PATH is unset (as requests does).",
    )
    workspace: str | None = _var(
        "MLFLOW_WORKSPACE",
        None,
        "An MLflow workspace: registry look-ups then go through MLflow (no fast path).",
    )

    @property
    def skip_tls_check(self) -> bool:
        return self.insecure_tls.lower() == "true"

    @property
    def ca_file(self) -> str | None:
        return self.server_cert_path or self.ca_bundle


class Sweep(_Settings):
    """`digits sweep` and the trials it runs."""

    heartbeat: Count = _var(
        "DIGITS_SWEEP_HEARTBEAT", 10, "Seconds between a running trial's heartbeats."
    )
    grace: Count = _var(
        "DIGITS_SWEEP_GRACE",
        30,
        "Seconds of silence after which a trial is failed (its worker died).",
    )
    trial: str | None = _var(
        "DIGITS_SWEEP",
        None,
        "Set by `digits sweep` for a trial's train stage: JSON naming the study's parent run, "
        "the study, the trial and the worker (the run's parent and tags).",
    )


class Serve(_Settings):
    """`digits predict` and `digits app`."""

    cache_home: str | None = _var(
        "XDG_CACHE_HOME",
        None,
        "Where downloaded models are kept (digits/models under it); unset: ~/.cache.",
    )
    app_model: str | None = _var(
        "DIGITS_APP_MODEL",
        None,
        "Set by `digits app` for its worker processes: the version the parent loaded.",
    )
    app_model_shown: str | None = _var(
        "DIGITS_APP_MODEL_SHOWN",
        None,
        "Set by `digits app` for its workers: the model URI as the user gave it.",
    )


GROUPS: tuple[type[_Settings], ...] = (Dvc, Mnist, Mlflow, Sweep, Serve)


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
