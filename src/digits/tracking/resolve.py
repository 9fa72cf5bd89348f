"""Which registered version a `models:/` URI names, asked of the store directly: milliseconds,
where importing MLflow alone takes more than a second of a command that only reads a picture.

- `models:/<name>@<alias>` and `models:/<name>/<version>` are resolved
  - in a SQLite store (`mlflow.db`): by reading its registry tables, read-only, with sqlite3.
    Those tables are MLflow's own, not an API: the store's schema revision (the one MLflow's
    migrations record in `alembic_version`) must be one of KNOWN_SCHEMAS, the revisions these
    queries were checked against; another one is said once on stderr and left to MLflow
    (tests/test_resolve.py fails when the installed MLflow creates a revision not listed);
  - at a tracking server: by one GET of its REST API (public; MLflow's own credentials and
    TLS settings, digits.tracking.store.server_get).
- The answer: the version, the sha256 of the weights it was registered from (the evaluate
  stage's `digits.model_sha256` tag) and where its artifacts are.
- Anything else returns None: another kind of URI, `@latest`, a registry schema this does not
  know, an MLflow workspace, a server that does not answer. The caller then goes through MLflow
  as before, so this is a shortcut and never a second opinion: an alias moved a moment ago is
  seen at once, and a name that does not exist gets MLflow's own error.

No MLflow import: the standard library and the project's own HTTP client."""

from __future__ import annotations

import contextlib
import re
import sqlite3
import sys
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from digits.core.settings import MLFLOW_WORKSPACE
from digits.tracking.registry import MODEL_TAG

_ALIAS = re.compile(r"models:/([^/@]+)@([^/@]+)")
_VERSION = re.compile(r"models:/([^/@]+)/(\d+)")
TIMEOUT = 10  # seconds for the server's answer; past it, MLflow's client takes over
DELETED = "Deleted_Internal"  # MLflow's mark on a deleted version (kept in the table)
# SQLite stores' schema revisions (alembic_version) whose registry tables the queries below
# were checked against: the one MLflow 3.17 creates. A new MLflow adding one: read its
# migrations for the tables below (model_versions, model_version_tags, registered_model_aliases),
# then add it here.
KNOWN_SCHEMAS = frozenset({"dc11669786a5"})
_told: set[tuple[str, str | None]] = set()  # (store, revision) said once per process


@dataclass(frozen=True)
class Version:
    """A registered version: its number, its weights' sha256 (None for a version without the
    tag) and its artifacts' location (a URI: file:///..., mlflow-artifacts:/..., s3://...)."""

    name: str
    version: str
    sha256: str | None
    artifacts: str

    def local_weights(self) -> Path | None:
        """The weights file in the version's artifacts, where they are a folder on this
        machine (a SQLite store's own mlartifacts/); else None."""
        url = urllib.parse.urlparse(self.artifacts)
        if url.scheme != "file" or url.netloc not in ("", "localhost"):
            return None
        folder = Path(urllib.request.url2pathname(url.path), "artifacts")
        found = sorted(folder.glob("*.safetensors"))
        return found[0] if len(found) == 1 else None


def parse(uri: str) -> tuple[str, str | None, str | None] | None:
    """(name, alias, version) of a registry URI, one of the two set; None for any other URI."""
    if m := _ALIAS.fullmatch(uri):
        # MLflow reads @latest as the newest version, not as an alias
        return None if m[2].lower() == "latest" else (m[1], m[2], None)
    if m := _VERSION.fullmatch(uri):
        return m[1], None, m[2]
    return None


def lookup(store: str, uri: str) -> Version | None:
    """The version `uri` names in `store` (a tracking URI), or None where only MLflow can say."""
    ref = parse(uri)
    if ref is None or MLFLOW_WORKSPACE.get():
        return None
    from digits.tracking.store import is_server, sqlite_path

    if (db := sqlite_path(store)) is not None:
        return _from_sqlite(db, *ref)
    if is_server(store):
        return _from_server(store.rstrip("/"), *ref)
    return None


_SQL = """
SELECT v.version, v.storage_location, t.value
FROM model_versions v
LEFT JOIN model_version_tags t
  ON t.workspace = v.workspace AND t.name = v.name AND t.version = v.version AND t.key = ?
WHERE v.workspace = 'default' AND v.name = ? AND v.version = ?
  AND v.status = 'READY' AND coalesce(v.current_stage, '') != ?
"""
_ALIAS_SQL = """
SELECT version FROM registered_model_aliases
WHERE workspace = 'default' AND name = ? AND alias = ?
"""


def schema(conn: sqlite3.Connection) -> str | None:
    """The store's schema revision, as MLflow's migrations record it (None: not recorded)."""
    try:
        row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
    except sqlite3.Error:
        return None
    return str(row[0]) if row else None


def _known(db: Path, revision: str | None) -> bool:
    """Whether the queries know this schema; if not, say so (once per store and revision)."""
    if revision in KNOWN_SCHEMAS:
        return True
    if (str(db), revision) not in _told:
        _told.add((str(db), revision))
        print(
            f"digits: warning: MLflow store {db} has schema revision {revision or '(none)'}, "
            "which digits.tracking.resolve does not know; asking MLflow instead (slower)",
            file=sys.stderr,
        )
    return False


def _from_sqlite(db: Path, name: str, alias: str | None, version: str | None) -> Version | None:
    if not db.is_file():
        return None
    try:
        # read-only: never creates, migrates or locks the store for writing
        conn = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=5)
        with contextlib.closing(conn):
            if not _known(db, schema(conn)):
                return None
            if alias is not None:
                row = conn.execute(_ALIAS_SQL, (name, alias)).fetchone()
                if row is None:
                    return None
                version = str(row[0])
            row = conn.execute(_SQL, (MODEL_TAG, name, int(version or 0), DELETED)).fetchone()
    except sqlite3.Error:
        return None
    if row is None or not row[1]:
        return None
    return Version(name, str(row[0]), row[2], row[1])


def _from_server(url: str, name: str, alias: str | None, version: str | None) -> Version | None:
    from digits.tracking.store import server_get

    if alias is not None:
        query = urllib.parse.urlencode({"name": name, "alias": alias})
        endpoint = f"{url}/api/2.0/mlflow/registered-models/alias?{query}"
    else:
        query = urllib.parse.urlencode({"name": name, "version": version})
        endpoint = f"{url}/api/2.0/mlflow/model-versions/get?{query}"
    try:
        answer = server_get(endpoint, TIMEOUT)
        if not answer.ok:
            return None
        mv = answer.json()["model_version"]
        tags = {t["key"]: t.get("value") for t in mv.get("tags", [])}
        where = mv.get("storage_location") or mv.get("source")
        if mv.get("status", "READY") != "READY" or not where:
            return None
        return Version(name, str(mv["version"]), tags.get(MODEL_TAG), where)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
