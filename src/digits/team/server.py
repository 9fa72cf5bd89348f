"""`digits server`: the team's MLflow tracking server.

One `mlflow server` process that every client (developers, CI, DVC queue workers) talks to over
HTTP: runs, metrics and the model registry live in PostgreSQL, and artifacts are *proxied*: the
server writes them to `--artifacts-destination` (a folder, or an object store such as
s3://bucket/path) and clients see `mlflow-artifacts:/...` URIs, so no client needs access to the
storage itself. It binds 127.0.0.1 unless told otherwise; put TLS and the outside world in front
of it with a reverse proxy (docs/team.md). Logins are on unless `--no-auth` (loopback only):
MLflow's basic-auth app, users and permissions in the same PostgreSQL (digits.team.auth), and
`digits server user add` (digits.team.users).

Without `--backend-store-uri` it runs a throwaway PostgreSQL cluster (Debian's `postgresql`
package) in a temp folder, deleted when the server stops: for trying the setup and for tests.
PostgreSQL refuses to run as root, so as root the cluster runs as the `postgres` user (or
`nobody`). The tests use `LocalPostgres` from here too."""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from digits.core import http
from digits.core.errors import DigitsError, redact, sigterm_raises
from digits.core.net import is_loopback
from digits.team import auth

PG_HINT = "install PostgreSQL (apt-get install postgresql) or pass --backend-store-uri"
PG_USER = "mlflow"  # the superuser of a throwaway cluster, and MLflow's database user in it


class ServerError(DigitsError):
    pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def find_pg_bindir() -> Path | None:
    """Folder of initdb/pg_ctl: Debian keeps them off PATH in /usr/lib/postgresql/<major>/bin
    (the newest major wins); elsewhere they are on PATH."""
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0,
    )
    found = versions[-1] if versions else shutil.which("initdb")
    return Path(found).parent if found else None


def _unprivileged_user() -> pwd.struct_passwd:
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise ServerError("running as root, and neither user postgres nor nobody exists to run it")


class LocalPostgres:
    """A throwaway PostgreSQL cluster on 127.0.0.1 (a free port), with its data, log and unix
    socket in one temp folder that `stop()` deletes. Password auth over TCP (random password,
    in `env` as PGPASSWORD for clients), no TCP listener beyond loopback. fsync is off: the
    data is thrown away anyway."""

    def __init__(self) -> None:
        bindir = find_pg_bindir()
        if bindir is None:
            raise ServerError(f"PostgreSQL is not installed (no initdb found); {PG_HINT}")
        self.bindir: Path = bindir
        self.password = secrets.token_urlsafe(18)
        self.port = 0
        self.root: Path | None = None
        self._owner = _unprivileged_user() if os.geteuid() == 0 else None

    @property
    def env(self) -> dict[str, str]:
        """What a client process needs in its environment to log in (libpq reads PGPASSWORD)."""
        return {"PGPASSWORD": self.password}

    def _run(self, *cmd: str, as_owner: bool = True) -> None:
        argv = [str(self.bindir / cmd[0]), *cmd[1:]]
        if as_owner and self._owner is not None:  # initdb and postgres refuse to run as root
            argv = ["runuser", "-u", self._owner.pw_name, "--", *argv]
        proc = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, **self.env, "LC_ALL": "C"},
        )
        if proc.returncode != 0:
            last = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-1]
            raise ServerError(f"PostgreSQL: {cmd[0]} exited {proc.returncode}: {last}")

    def start(self) -> LocalPostgres:
        # Under the system temp dir, not a caller's folder: the cluster's user must be able to
        # reach it, and a path like /tmp/pytest-of-root/... is closed to others.
        self.root = Path(tempfile.mkdtemp(prefix="digits-pg-"))
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self._owner is not None:
            for p in (self.root, pwfile):
                os.chown(p, self._owner.pw_uid, self._owner.pw_gid)
        self._run(
            "initdb",
            "-D", str(self.root / "data"),
            "-U", PG_USER,
            f"--pwfile={pwfile}",
            "--auth-local=trust",  # the socket is in self.root, mode 0700: owner and root only
            "--auth-host=scram-sha-256",
            "-E", "UTF8",
            "--no-locale",
        )  # fmt: skip
        pwfile.unlink()
        self.port = free_port()
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        self._run(
            "pg_ctl", "-D", str(self.root / "data"), "-l", str(self.root / "postgres.log"),
            "-o", options, "-w", "-t", "60", "start",
        )  # fmt: skip
        return self

    def create_database(self, name: str) -> str:
        """Create database `name`; return its SQLAlchemy URI for MLflow (psycopg v3 driver),
        without the password (clients take it from `env`)."""
        self._run(
            "createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", PG_USER, name,
            as_owner=False,
        )  # fmt: skip
        return self.uri(name)

    def uri(self, database: str) -> str:
        return f"postgresql+psycopg://{PG_USER}@127.0.0.1:{self.port}/{database}"

    def stop(self) -> None:
        if self.root is None:
            return
        with contextlib.suppress(ServerError, subprocess.TimeoutExpired):
            self._run("pg_ctl", "-D", str(self.root / "data"), "-m", "fast", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)
        self.root = None

    def __enter__(self) -> LocalPostgres:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


def mlflow_server_command(
    backend_uri: str, artifacts: str, host: str, port: int, workers: int, extra: list[str]
) -> list[str]:
    """`mlflow server` with proxied artifacts: no --default-artifact-root, so new experiments
    get `mlflow-artifacts:/` and clients upload and download through this server."""
    return [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", backend_uri,
        "--artifacts-destination", artifacts,
        "--host", host,
        "--port", str(port),
        "--workers", str(workers),
        *extra,
    ]  # fmt: skip


def wait_until_healthy(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    """Poll GET /health until it answers 200; fail if the server exits first or takes too long
    (a fresh database runs all of MLflow's schema migrations first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerError(
                f"mlflow server exited with status {proc.returncode} before answering on "
                f"{url} (its output is above)"
            )
        with contextlib.suppress(OSError):  # not listening yet
            if http.get(url + "/health", timeout=5).status == 200:
                return
        time.sleep(0.5)
    raise ServerError(f"mlflow server did not answer on {url}/health within {timeout:.0f}s")


class _Stopped(BaseException):
    """SIGTERM arrived: a requested stop, like Ctrl-C."""


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group (uvicorn and its workers), SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def main(args) -> int:
    """Run the team server until it exits or is stopped (Ctrl-C, SIGTERM: exit status 0);
    `digits server user ...` manages its logins instead (digits.team.users)."""
    extra = [a for a in args.mlflow_args if a != "--"]
    if args.mlflow_args[:1] == ["user"]:
        from digits.team import users

        return users.main(args.mlflow_args[1:])
    try:
        with sigterm_raises(_Stopped):  # so `finally` blocks stop the server and the cluster
            return serve(args, extra)
    except (KeyboardInterrupt, _Stopped):
        return 0


NO_AUTH_WARNING = (
    "digits server: WARNING: logins are OFF (--no-auth): anyone who reaches {url} may read, "
    "change or delete any run and move @champion. For one person's machine only."
)


def _logins(args, extra: list[str]) -> str | None:
    """The admin's password with logins on (the default), None with --no-auth; refuse what
    would leave the server open or take the choice from `digits server`."""
    if any(a == "--app-name" or a.startswith("--app-name=") for a in extra):
        raise ServerError(
            "--app-name: logins are set by digits server itself (MLflow's basic-auth app; "
            "--no-auth turns them off), not by an option after --"
        )
    if getattr(args, "no_auth", False):
        if not is_loopback(args.host):
            raise ServerError(
                f"--no-auth with --host {args.host}: a server without logins may only listen on "
                "a loopback address (127.0.0.1, ::1); drop --no-auth to reach it from elsewhere"
            )
        return None
    cache = getattr(args, "auth_cache_seconds", auth.AUTH_CACHE_SECONDS)
    if cache < 0:
        raise ServerError(f"--auth-cache-seconds {cache}: expected 0 (check every request) or more")
    return auth.admin_password(getattr(args, "admin_password_file", None))


def serve(args, extra: list[str]) -> int:
    password = _logins(args, extra)  # before anything starts: a missing secret stops it here
    with contextlib.ExitStack() as stack:
        # MLflow's job runner (a second process, for GenAI scoring jobs) has nothing to do
        # for this project; MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true brings it back.
        env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
        auth_db = getattr(args, "auth_database_uri", None)
        if args.backend_store_uri:
            backend = args.backend_store_uri
            if not args.artifacts_destination:
                raise ServerError(
                    "--artifacts-destination is required with --backend-store-uri: the folder "
                    "or object store (s3://bucket/path) where the server keeps artifacts"
                )
            artifacts = args.artifacts_destination
        else:
            pg = stack.enter_context(LocalPostgres())
            backend = pg.create_database("mlflow")
            if password is not None and not auth_db:
                auth_db = pg.create_database("mlflow_auth")  # users and permissions
            env.update(pg.env)
            artifacts = args.artifacts_destination or stack.enter_context(
                tempfile.TemporaryDirectory(prefix="digits-artifacts-")
            )
            print(f"digits server: throwaway PostgreSQL cluster in {pg.root} (deleted on exit)")
        if "://" not in artifacts:
            artifacts = str(Path(artifacts).resolve())
        port = args.port or free_port(args.host)
        # bound to every interface, it still answers on loopback: check and print that
        local = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host
        url = f"http://[{local}]:{port}" if ":" in local else f"http://{local}:{port}"
        if password is not None:
            private = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="digits-auth-")))
            cache = getattr(args, "auth_cache_seconds", auth.AUTH_CACHE_SECONDS)
            config = auth.write_config(private, auth_db or backend, cache)
            env = auth.server_env(env, config, password)
            extra = ["--app-name", "basic-auth", *extra]
        else:
            print(NO_AUTH_WARNING.format(url=url), file=sys.stderr, flush=True)
        cmd = mlflow_server_command(backend, artifacts, args.host, port, args.workers, extra)
        # its own process group, so stopping it reaches uvicorn's workers too
        proc = subprocess.Popen(cmd, env=env, start_new_session=True)
        try:
            wait_until_healthy(url, proc)
            logins = "logins OFF"
            if password is not None:
                experiment = getattr(args, "experiment", None) or auth.DEFAULT_EXPERIMENT
                model = getattr(args, "model", None) or auth.DEFAULT_MODEL
                with auth.logged_in(auth.ADMIN, password):
                    auth.ensure_protected(url, experiment, model)
                logins = (
                    f"logins on, users in {redact(auth_db or backend)}; add them with "
                    "`digits server user add NAME --role reader|developer|release`"
                )
            print(
                f"digits server: MLflow tracking server on {url} "
                f"(backend {redact(backend)}, artifacts {artifacts})\n  {logins}\n"
                f"  export MLFLOW_TRACKING_URI={url}",
                flush=True,
            )
            return proc.wait()
        finally:
            _stop(proc)
