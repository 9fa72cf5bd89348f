"""Team mode on real parts: a throwaway PostgreSQL cluster, `digits server` (a real `mlflow
server` with proxied artifacts) on 127.0.0.1, the real pipeline in a temp git+DVC project with
MLFLOW_TRACKING_URI pointing at the server, a teammate in an empty folder, queued experiments,
the server stopped mid-way, and git + a DVC folder remote shared between two clones.

The pipeline runs on the real MNIST files (its download stage checks the official MD5s) for one
epoch with relaxed gates: training takes seconds, the rest is process start-up. It runs from a
clean committed `main`, the branch the gate promotes from."""

from __future__ import annotations

import http.server
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import (
    SHORT_RUN,
    dvc,
    make_project,
    missing,
    project_env,
    registered,
    run,
    set_params,
)
from pg import PG_HINT, TeamServer, local_postgres, query

ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # 2 shared cores
NAME = "mnist-mlp"


def git(project: Path, *args: str) -> subprocess.CompletedProcess:
    return run(["git", *args], project)


def free_port() -> int:
    from digits.team.server import free_port

    return free_port()


def champion(url: str) -> str:
    from mlflow import MlflowClient

    return str(
        MlflowClient(url, registry_uri=url).get_model_version_by_alias(NAME, "champion").version
    )


# --- the cluster, the server, and Alice's pipeline run against it ----------------------------


@pytest.fixture(scope="module")
def pg():
    with local_postgres() as cluster:
        yield cluster


@pytest.fixture(scope="module")
def server(pg, tmp_path_factory):
    root = tmp_path_factory.mktemp("team")
    s = TeamServer(
        pg.create_database("mlflow"), root / "artifacts", pg.env, root / "server.log", free_port()
    )
    s.start()
    yield s
    assert s.stop() == 0, s.tail()


@dataclass
class Interrupted:
    out: str  # what `dvc repro` printed
    returncode: int
    after_stop: float  # seconds from the server's stop to the end of `dvc repro`


def repro_stopping_the_server(project: Path, env: dict, server: TeamServer, pg) -> Interrupted:
    """`dvc repro`, with the server stopped as soon as the train stage has created its MLflow
    run (it then logs every epoch), then started again."""
    import psycopg

    with psycopg.connect(
        host="127.0.0.1", port=pg.port, user="mlflow", password=pg.password, dbname="mlflow",
        autocommit=True,
    ) as conn:  # fmt: skip
        count = "SELECT count(*) FROM runs"
        before = conn.execute(count).fetchone()[0]
        proc = subprocess.Popen(
            [sys.executable, "-m", "dvc", "repro"], cwd=project, env={**os.environ, **env},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        try:
            while proc.poll() is None and conn.execute(count).fetchone()[0] == before:
                time.sleep(0.1)
            assert server.stop() == 0, server.tail()
            stopped = time.monotonic()
            out = proc.communicate(timeout=300)[0]
            return Interrupted(out, proc.returncode, time.monotonic() - stopped)
        finally:
            proc.kill()
            server.start()  # back at the same URL


@pytest.fixture(scope="module")
def alice(server, pg, tmp_path_factory, mnist_local):
    """Alice's clone of a project set up for a team: a git origin (a bare repo) and a DVC
    remote (a folder) in its committed config. Her first `dvc repro` against the team server
    loses the server mid-way; the second completes; the lock is committed. Experiments made
    later carry the remote in their config."""
    root = tmp_path_factory.mktemp("alice")
    project = make_project(root / "project")
    env = {
        **project_env(project, str(mnist_local)),
        **ONE_THREAD,
        "MLFLOW_TRACKING_URI": server.url,
    }
    run(["git", "init", "-q", "--bare", "-b", "main", str(root / "origin.git")], root)
    git(project, "remote", "add", "origin", str(root / "origin.git"))
    dvc(project, "remote", "add", "-d", "team", str(root / "dvc-store"), env=env)
    set_params(project, **SHORT_RUN)
    git(project, "commit", "-qam", "team remotes; one epoch, relaxed gates")
    interrupted = repro_stopping_the_server(project, env, server, pg)
    rerun = dvc(project, "repro", env=env)
    # A failed `dvc repro` takes back the .gitignore entries of the stages that had succeeded,
    # and the rerun skips those stages (treeverse/dvc#11091): write them again before `git add`.
    dvc(project, "commit", "-f", env=env)
    git(project, "add", "-A")
    git(project, "commit", "-qm", "pipeline run on the team server")
    return project, env, interrupted, rerun


@pytest.mark.slow
def test_server_stopped_mid_way_fails_fast_and_a_rerun_redoes_it(alice, server):
    project, env, interrupted, rerun = alice
    out = interrupted.out
    assert interrupted.returncode != 0, out
    assert interrupted.after_stop < 30, f"took {interrupted.after_stop:.1f}s to fail:\n{out}"
    assert re.search(rf"digits train: error: .*{re.escape(server.url)}", out), out
    assert "Traceback" not in out, out
    assert "Running stage 'preprocess'" in out  # the stages before it ran, and keep their outputs

    assert "Running stage 'preprocess'" not in rerun.stdout
    assert "Running stage 'train'" in rerun.stdout
    assert "Running stage 'evaluate'" in rerun.stdout
    assert "Running stage 'gate'" in rerun.stdout
    assert "changed" not in dvc(project, "status", env=env).stdout
    tracked = git(project, "ls-files").stdout.split()
    assert "dvc.lock" in tracked and "models/model.safetensors" not in tracked


@pytest.mark.slow
def test_pipeline_registers_and_promotes_on_the_server(alice, server, pg):
    from mlflow import MlflowClient

    project, _, _, _ = alice
    info = registered(project, server.url)
    client = MlflowClient(server.url, registry_uri=server.url)
    assert champion(server.url) == info["version"]
    version = client.get_model_version(NAME, info["version"])
    assert version.tags["validation_status"] == "approved"
    assert version.status == "READY"

    # artifacts went through the server, into its destination; none on Alice's disk
    exp = client.get_experiment(info["experiment_id"])
    assert exp.artifact_location.startswith("mlflow-artifacts:")
    assert client.get_run(info["run_id"]).info.artifact_uri.startswith("mlflow-artifacts:/")
    assert not (project / "mlartifacts").exists()
    assert not (project / "mlflow.db").exists()
    stored = {p.name for p in server.artifacts.rglob("*") if p.is_file()}
    assert {"MLmodel", "confusion_matrix.png", "model.safetensors"} <= stored

    # and the records are in PostgreSQL itself
    runs = query(pg, "mlflow", f"SELECT status FROM runs WHERE run_uuid = '{info['run_id']}'")
    assert runs == [("FINISHED",)]
    aliases = query(pg, "mlflow", "SELECT alias, version FROM registered_model_aliases")
    assert ("champion", int(info["version"])) in aliases


SCORE = """
import gzip, json, sys
import mlflow, numpy as np

def idx(path):
    data = gzip.open(path).read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)

x = idx(sys.argv[1] + "/t10k-images-idx3-ubyte.gz").reshape(-1, 784).astype(np.float32) / 255
y = idx(sys.argv[1] + "/t10k-labels-idx1-ubyte.gz")
model = mlflow.pyfunc.load_model("models:/mnist-mlp@champion")
guess = np.asarray(model.predict(x)["guess"])  # the most likely digit (also when refused)
print(json.dumps({"accuracy": float((guess == y).mean())}))
"""


@pytest.mark.slow
def test_teammate_in_an_empty_folder_loads_the_champion(alice, server, tmp_path, mnist_local):
    project, _, _, _ = alice
    bob = tmp_path / "bob"
    bob.mkdir()
    (bob / "score.py").write_text(SCORE)
    env = {  # nothing of the project: no checkout, no store, only the server's URL
        "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin",
        "HOME": str(tmp_path),
        "MLFLOW_TRACKING_URI": server.url,
        **ONE_THREAD,
    }
    out = subprocess.run(
        [sys.executable, "score.py", str(mnist_local)],
        cwd=bob,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    accuracy = json.loads(out.stdout.strip().splitlines()[-1])["accuracy"]
    metrics = json.loads((project / "reports/metrics.json").read_text())
    assert accuracy == pytest.approx(metrics["accuracy"], abs=1e-9)
    assert sorted(os.listdir(bob)) == ["score.py"]  # no local store appeared


@pytest.mark.slow
def test_existing_experiment_with_a_client_folder_is_refused(server, monkeypatch, tmp_path):
    from mlflow import MlflowClient

    from digits.tracking import store

    for key, value in store.HTTP_DEFAULTS.items():
        monkeypatch.setenv(key, value)  # open_store() sets them; keep this process's env as is
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    client = MlflowClient(server.url)
    # what an older client did: created the experiment with its own folder as the location
    client.create_experiment("legacy", artifact_location=(tmp_path / "mlartifacts").as_uri())
    with pytest.raises(store.StoreError) as e:
        store.open_store("legacy")
    message = str(e.value)
    assert f"experiment 'legacy' on {server.url}" in message
    assert "mlflow experiments rename" in message and "\n" not in message

    fresh = store.open_store("fresh").experiment_id
    assert client.get_experiment(fresh).artifact_location.startswith("mlflow-artifacts:")
    assert store.open_store("fresh").experiment_id == fresh


# --- queued experiments, two at a time -------------------------------------------------------


@pytest.fixture(scope="module")
def queued(alice, server):
    """Two experiments (other seeds) queued in Alice's clone and run two at a time. They stop
    at evaluate: registering is what is shared; promotion is main's business (the gate)."""
    project, env, _, _ = alice
    for seed in (1, 2):
        dvc(project, "exp", "run", "--queue", "-n", f"seed{seed}", "-S", f"train.seed={seed}",
            "evaluate", env=env)  # fmt: skip
    dvc(project, "queue", "start", "-j", "2", env=env)
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        status = dvc(project, "queue", "status", env=env).stdout
        if not re.search(r"\b(Queued|Running)\b", status):
            break
        time.sleep(5)  # each look starts a dvc process: not too often
    return project, env, status


@pytest.mark.slow
def test_two_queued_experiments_land_on_the_server(queued, server):
    from mlflow import MlflowClient

    project, env, status = queued
    assert status.count("Success") == 2, status + dvc(project, "queue", "logs", "seed1",
                                                      env=env, check=False).stdout  # fmt: skip
    client = MlflowClient(server.url, registry_uri=server.url)
    exp = client.get_experiment_by_name("mnist")
    runs = client.search_runs([exp.experiment_id], "tags.dvc_exp_name LIKE 'seed%'", max_results=10)
    assert sorted(r.data.tags["dvc_exp_name"] for r in runs) == ["seed1", "seed2"]
    for r in runs:
        assert r.info.status == "FINISHED"
        assert r.data.params["train.seed"] == r.data.tags["dvc_exp_name"].removeprefix("seed")
        versions = client.search_model_versions(f"name='{NAME}' and run_id='{r.info.run_id}'")
        assert len(versions) == 1 and versions[0].status == "READY"
    assert not (project / "mlartifacts").exists()


# --- git + a DVC folder remote: code, data and models shared between clones ------------------


@pytest.fixture(scope="module")
def remotes(alice):
    """Alice pushes her commits to origin and the pipeline's files to the DVC remote."""
    project, env, _, _ = alice
    git(project, "push", "-q", "origin", "main")
    pushed = dvc(project, "push", env=env)
    return project.parent, pushed


@pytest.fixture(scope="module")
def dan(remotes, tmp_path_factory, mnist_local):
    """A teammate's fresh clone of origin, with no MLflow store of its own."""
    root, _ = remotes
    project = tmp_path_factory.mktemp("dan") / "project"
    run(["git", "clone", "-q", str(root / "origin.git"), str(project)], root)
    closed = f"http://127.0.0.1:{free_port()}"  # nothing here may need a tracking server
    env = {**project_env(project, str(mnist_local)), **ONE_THREAD, "MLFLOW_TRACKING_URI": closed}
    return project, env


@pytest.mark.slow
def test_dvc_push_then_pull_in_another_clone_leaves_nothing_to_run(alice, remotes, dan):
    _, pushed = remotes
    assert re.search(r"\d+ files? pushed", pushed.stdout), pushed.stdout
    project, env = dan
    assert not (project / "models/model.safetensors").exists()
    dvc(project, "pull", env=env)
    for out in ("models/model.safetensors", "data/processed/test.npz", "reports/metrics.json"):
        assert (project / out).read_bytes() == (alice[0] / out).read_bytes()
    assert "up to date" in dvc(project, "status", env=env).stdout
    again = dvc(project, "repro", env=env)
    assert "Running stage" not in again.stdout, again.stdout
    assert "up to date" in dvc(project, "status", env=env).stdout


@pytest.mark.slow
def test_dvc_exp_push_and_pull_share_an_experiment(queued, remotes, dan, server):
    from mlflow import MlflowClient

    alice_project, alice_env, _ = queued
    dvc(alice_project, "exp", "push", "origin", "seed1", env=alice_env)
    project, env = dan
    dvc(project, "exp", "pull", "origin", "seed1", env=env)
    assert "seed1" in dvc(project, "exp", "list", "--all-commits", env=env).stdout
    dvc(project, "exp", "apply", "seed1", env=env)
    assert "seed: 1" in (project / "params.yaml").read_text()
    assert "changed" not in dvc(project, "status", "evaluate", env=env).stdout  # data pulled
    # the experiment's model file leads to its run on the team server
    info = registered(project, server.url)
    run_ = MlflowClient(server.url).get_run(info["run_id"])
    assert run_.data.tags["dvc_exp_name"] == "seed1"


# --- `digits server` on its own: a throwaway cluster, cleaned up on stop ---------------------


@pytest.mark.slow
def test_digits_server_runs_a_throwaway_cluster_and_removes_it(tmp_path):
    from digits.team.server import find_pg_bindir

    if find_pg_bindir() is None:
        missing("PostgreSQL is not installed (no initdb in /usr/lib/postgresql/*/bin)", PG_HINT)
    proc = subprocess.Popen(
        [sys.executable, "-m", "digits.cli", "server", "--port", "0", "--workers", "1",
         "--no-auth"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
    )  # fmt: skip
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    seen, url = [], None
    deadline = time.monotonic() + 240
    try:
        while url is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                seen.append(lines.get(timeout=1))
            except queue.Empty:
                continue
            if m := re.search(r"export MLFLOW_TRACKING_URI=(http://127\.0\.0\.1:\d+)", seen[-1]):
                url = m[1]
        text = "".join(seen)
        assert url, text[-3000:]
        cluster = Path(re.search(r"PostgreSQL cluster in (\S+)", text)[1])
        artifacts = Path(re.search(r", artifacts (\S+)\)", text)[1])
        assert (cluster / "data/PG_VERSION").exists() and artifacts.is_dir()

        from mlflow import MlflowClient

        client = MlflowClient(url)
        run_ = client.create_run(client.create_experiment("smoke"))
        (tmp_path / "note.txt").write_text("hello")
        client.log_artifact(run_.info.run_id, str(tmp_path / "note.txt"))
        assert run_.info.artifact_uri.startswith("mlflow-artifacts:/")
        assert [p.read_text() for p in artifacts.rglob("note.txt")] == ["hello"]
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
    assert rc == 0
    assert not cluster.exists() and not artifacts.exists()
    with pytest.raises(urllib.error.URLError, match="Connection refused"):
        urllib.request.urlopen(url + "/health", timeout=5)


# --- a server behind a login ------------------------------------------------------------------


class _LoginWall(http.server.BaseHTTPRequestHandler):
    """What MLflow's basic-auth app answers without credentials: /health is open, the API 401."""

    def do_GET(self):
        open_ = self.path == "/health"
        self.send_response(200 if open_ else 401)
        self.end_headers()
        self.wfile.write(b"OK" if open_ else b"You are not authenticated.")

    def log_message(self, *args):
        pass


def test_a_server_that_wants_a_login_says_so(monkeypatch):
    from digits.tracking import store

    wall = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _LoginWall)
    threading.Thread(target=wall.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{wall.server_address[1]}"
    for key, value in store.HTTP_DEFAULTS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    try:
        with pytest.raises(store.StoreError, match="wants a login") as e:
            store.open_store("mnist")
    finally:
        wall.shutdown()
    assert str(e.value) == (
        f"MLflow tracking server {url} wants a login: set MLFLOW_TRACKING_USERNAME and "
        "MLFLOW_TRACKING_PASSWORD"
    )
