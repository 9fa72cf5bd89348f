"""PostgreSQL and team MLflow servers for tests: a throwaway cluster (Debian's `postgresql`,
run as an unprivileged user when the tests run as root, loopback only, deleted after) and
`digits server` processes on it. Without PostgreSQL a test is skipped with the apt-get line
that installs it, except in CI, where it fails (helpers.missing)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from helpers import missing

PG_HINT = "install Debian's PostgreSQL: apt-get install postgresql"


def local_postgres():
    """A started LocalPostgres (stop it, or use it as a context manager), or skip/fail."""
    from digits.team.server import LocalPostgres, find_pg_bindir

    if find_pg_bindir() is None:
        missing("PostgreSQL is not installed (no initdb in /usr/lib/postgresql/*/bin)", PG_HINT)
    return LocalPostgres()


def query(pg, database: str, sql: str) -> list[tuple]:
    """Rows of `sql` run straight on the cluster (not through MLflow)."""
    import psycopg

    with psycopg.connect(
        host="127.0.0.1", port=pg.port, user="mlflow", password=pg.password, dbname=database
    ) as conn:
        return conn.execute(sql).fetchall()


class TeamServer:
    """`digits server` on a backend URI and an artifact folder, at a fixed port so that a
    stopped server can come back at the same URL. Its output goes to `log`. Without logins
    (`--no-auth`) unless `options` says otherwise (tests/test_team_auth.py: logins on)."""

    def __init__(
        self,
        backend_uri: str,
        artifacts: Path,
        env: dict,
        log: Path,
        port: int,
        options: tuple[str, ...] = ("--no-auth",),
    ):
        self.backend_uri, self.artifacts, self.env, self.log = backend_uri, artifacts, env, log
        self.port, self.options = port, options
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 240) -> TeamServer:
        if self.proc is not None and self.proc.poll() is None:
            return self  # already running
        cmd = [
            sys.executable, "-m", "digits.cli", "server",
            "--backend-store-uri", self.backend_uri,
            "--artifacts-destination", str(self.artifacts),
            "--port", str(self.port),
            "--workers", "1",
            *self.options,
        ]  # fmt: skip
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(
                cmd, env={**os.environ, **self.env}, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"digits server exited {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        raise AssertionError(f"no answer on {self.url} within {timeout}s:\n{self.tail()}")

    def stop(self) -> int:
        """SIGTERM, as a person or systemd stops it; return its exit status."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text()[-n:] if self.log.exists() else ""
