"""digits.tracking.resolve and digits.serve.model_cache: the store asked directly which version a
URI names must answer as MLflow does, at once after an alias moves or a version is deleted, and a
version's weights must be the bytes it was registered from. A real SQLite store with two real
versions."""

from __future__ import annotations

import contextlib
import http.server
import json
import shutil
import sqlite3
import threading
import urllib.parse
from typing import ClassVar

import numpy as np
import pytest

from digits.core.errors import DigitsError
from digits.data.preprocess import file_digest
from digits.serve import model_cache
from digits.tracking import resolve
from digits.tracking.registry import MODEL_TAG
from helpers import register

NAME = "resolve-me"


def perturbed(src, dest):
    """Another model: the champion's weights with the last bias moved (same header)."""
    from safetensors.numpy import load_file, safe_open, save_file

    tensors = load_file(str(src))
    with safe_open(str(src), "np") as f:
        meta = f.metadata()
    last = max(k for k in tensors if k.endswith(".bias"))
    tensors[last] = tensors[last] + np.arange(10, dtype=np.float32)
    save_file(tensors, str(dest), metadata=meta)
    return dest


@pytest.fixture
def two_versions(champion, tmp_path, monkeypatch):
    import mlflow

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)  # restored after the test
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    mlflow.set_tracking_uri(store)
    exp = mlflow.create_experiment("tests", artifact_location=(tmp_path / "mlartifacts").as_uri())
    files = [champion["weights"], perturbed(champion["weights"], tmp_path / "b.safetensors")]
    versions = [register(store, exp, w, NAME) for w in files]
    client = mlflow.MlflowClient(store)
    client.set_registered_model_alias(NAME, "champion", versions[0])
    yield {"store": store, "client": client, "files": files, "versions": versions}
    mlflow.set_tracking_uri(None)


@pytest.mark.slow
def test_the_store_answers_as_mlflow_does(two_versions):
    from digits.model.inference import Classifier
    from digits.serve.app import pinned
    from digits.serve.predict import load_model

    store, client, files = two_versions["store"], two_versions["client"], two_versions["files"]
    x = np.random.default_rng(0).random((5, 784), dtype=np.float32)

    def check(uri: str, version: str, weights) -> None:
        found = resolve.lookup(store, uri)
        assert found is not None and found.version == version, (uri, found)
        assert found.sha256 == file_digest(weights)
        assert found.local_weights().read_bytes() == weights.read_bytes()
        expected = Classifier.from_file(weights).probabilities(x)
        np.testing.assert_array_equal(load_model(uri).probabilities(x), expected)

    check(f"models:/{NAME}@champion", "1", files[0])
    check(f"models:/{NAME}/1", "1", files[0])
    check(f"models:/{NAME}/2", "2", files[1])

    # digits app's workers load the version the parent loaded, whatever the alias does next
    assert pinned(f"models:/{NAME}@champion") == f"models:/{NAME}/1"
    client.set_registered_model_alias(NAME, "champion", "2")  # seen at once
    check(f"models:/{NAME}@champion", "2", files[1])
    assert pinned(f"models:/{NAME}@champion") == f"models:/{NAME}/2"
    assert pinned("runs:/abc/model") == "runs:/abc/model"

    client.delete_model_version(NAME, "2")  # its alias goes with it: left to MLflow to say
    for uri in (f"models:/{NAME}@champion", f"models:/{NAME}/2"):
        assert resolve.lookup(store, uri) is None
        with pytest.raises(DigitsError, match=f"model {uri} in "):
            load_model(uri)
    for uri in (f"models:/{NAME}@latest", f"models:/no-such-{NAME}/1", "runs:/abc/model"):
        assert resolve.lookup(store, uri) is None, uri
    assert load_model(f"models:/{NAME}@latest").probabilities(x).shape == (5, 10)  # MLflow's


@pytest.mark.slow
def test_weights_changed_after_registration_are_refused(two_versions):
    from digits.serve.predict import load_model

    found = resolve.lookup(two_versions["store"], f"models:/{NAME}/1")
    found.local_weights().write_bytes(two_versions["files"][1].read_bytes())
    with pytest.raises(DigitsError) as e:
        load_model(f"models:/{NAME}/1")
    said = str(e.value)
    assert "\n" not in said and "changed after registration" in said, said
    assert "version 1" in said and found.sha256[:12] in said


def test_the_cache_answers_only_with_the_bytes_it_is_asked_for(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"some weights")
    digest = file_digest(weights)
    assert model_cache.get(digest) is None
    model_cache.keep(weights, digest)
    kept = model_cache.get(digest)
    assert kept is not None and kept.read_bytes() == b"some weights" and kept != weights
    kept.write_bytes(b"other bytes")  # no longer what its name says
    assert model_cache.get(digest) is None
    assert model_cache.get("../../etc/passwd") is None


@pytest.mark.slow
def test_a_registry_schema_it_does_not_know_is_said_once_and_left_to_mlflow(tmp_path, capsys):
    """The look-up reads MLflow's own tables: only in a store whose schema revision it was
    checked against (the one the installed MLflow creates); another one it says, once."""
    from mlflow import MlflowClient

    db = tmp_path / "mlflow.db"
    client = MlflowClient(f"sqlite:///{db}")
    client.create_registered_model(NAME)
    source = (tmp_path / "artifacts").as_uri()
    client.create_model_version(NAME, source=source, tags={MODEL_TAG: "ab" * 32})
    client.set_registered_model_alias(NAME, "champion", "1")
    uri = f"models:/{NAME}@champion"
    capsys.readouterr()

    found = resolve.lookup(f"sqlite:///{db}", uri)  # the schema this MLflow makes: known
    assert found == resolve.Version(NAME, "1", "ab" * 32, source)
    assert "digits: warning" not in capsys.readouterr().err

    other = tmp_path / "other" / "mlflow.db"  # the same store, as a newer MLflow migrated it
    other.parent.mkdir()
    shutil.copy(db, other)
    with contextlib.closing(sqlite3.connect(other)) as conn, conn:
        conn.execute("UPDATE alembic_version SET version_num = 'ffffffffffff'")
    for ref in (uri, f"models:/{NAME}/1", uri):
        assert resolve.lookup(f"sqlite:///{other}", ref) is None  # MLflow's to answer
    said = [line for line in capsys.readouterr().err.splitlines() if "digits:" in line]
    assert said == [
        f"digits: warning: MLflow store {other} has schema revision ffffffffffff, which "
        "digits.tracking.resolve does not know; asking MLflow instead (slower)"
    ]
    assert resolve.lookup(f"sqlite:///{db}", uri) == found  # the known one still answers


class _Registry(http.server.BaseHTTPRequestHandler):
    """A tracking server's registry REST API, as far as the look-up asks it: one version behind
    an alias, for a client that sends the token; 401 to others, 404 for anything else."""

    seen: ClassVar[list[str | None]] = []

    def do_GET(self):
        self.seen.append(self.headers.get("Authorization"))
        url = urllib.parse.urlparse(self.path)
        query = urllib.parse.parse_qs(url.query)
        if self.headers.get("Authorization") != "Bearer t0ken":
            self.send_response(401)
        elif url.path.endswith("/registered-models/alias") and query["alias"] == ["champion"]:
            body = {
                "model_version": {
                    "name": query["name"][0],
                    "version": "3",
                    "status": "READY",
                    "source": "mlflow-artifacts:/1/models/m-3/artifacts",
                    "tags": [{"key": MODEL_TAG, "value": "cd" * 32}],
                }
            }
            self.send_response(200)
            self.end_headers()
            self.wfile.write(json.dumps(body).encode())
            return
        else:
            self.send_response(404)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_a_server_is_asked_with_mlflows_credentials_through_the_projects_client(monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Registry)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.delenv("MLFLOW_WORKSPACE", raising=False)
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "t0ken")
        found = resolve.lookup(url, f"models:/{NAME}@champion")
        assert found == resolve.Version(
            NAME, "3", "cd" * 32, "mlflow-artifacts:/1/models/m-3/artifacts"
        )
        assert resolve.lookup(url, f"models:/{NAME}@other") is None  # 404: MLflow's to say
        monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "wrong")
        assert resolve.lookup(url, f"models:/{NAME}@champion") is None  # 401
        assert _Registry.seen == ["Bearer t0ken", "Bearer t0ken", "Bearer wrong"]
    finally:
        server.shutdown()
        server.server_close()
    assert resolve.lookup(url, f"models:/{NAME}@champion") is None  # no server: no answer
