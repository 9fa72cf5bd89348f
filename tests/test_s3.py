"""Object storage on real parts: moto's S3 server (`moto[server]`, the S3 API DVC's own tests run)
on 127.0.0.1, a DVC remote on it (dvc-s3) and a team `digits server` keeping its artifacts in it
(`--artifacts-destination s3://...` with MLFLOW_S3_ENDPOINT_URL: only the server talks to S3).

Alice runs the pipeline against the server and pushes to the S3 remote; Bob clones and pulls with
nothing to run again; a teammate in an empty folder, who has no S3 credentials at all, loads
@champion through the server; then S3 stops and each of them gets one clear line, with nothing
registered or written half-way. The last test stops S3 (moto keeps its buckets in memory)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from helpers import (
    SHORT_RUN,
    dvc,
    git,
    imported,
    make_project,
    missing,
    mnist_dir,
    photo_like,
    project_env,
    registered,
    run,
    set_params,
)
from pg import TeamServer, local_postgres

MOTO_HINT = "install the test dependencies (make install): moto[server] gives `moto_server`"
CREDENTIALS = {  # moto takes any; a real bucket takes the team's (docs/team.md)
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    # botocore's default, 5 attempts with backoff, made every call to the stopped S3 take
    # seconds, on the server and in DVC: moto on 127.0.0.1 needs no retry
    "AWS_MAX_ATTEMPTS": "1",
}
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
DVC_BUCKET, MLFLOW_BUCKET = "digits-dvc", "digits-mlflow"
NAME = "mnist-mlp"


class S3Server:
    """`moto_server` on a free loopback port; stop() ends it (and every bucket in it)."""

    def __init__(self, log: Path):
        from digits.team.server import free_port

        exe = shutil.which("moto_server", path=str(Path(sys.executable).parent))
        if exe is None:
            missing("moto's S3 server is not installed", MOTO_HINT)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                [exe, "-H", "127.0.0.1", "-p", str(self.port)], stdout=out, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(self.url, timeout=2).close()
                return
            except OSError:
                if self.proc.poll() is not None:
                    tail = log.read_text()[-2000:]
                    raise AssertionError(f"moto_server exited:\n{tail}") from None
                time.sleep(0.2)
        raise AssertionError(f"moto_server did not answer on {self.url}")

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.url, **_boto_credentials())

    def keys(self, bucket: str) -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


def _boto_credentials() -> dict:
    return {
        "aws_access_key_id": CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        "region_name": CREDENTIALS["AWS_DEFAULT_REGION"],
    }


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = S3Server(tmp_path_factory.mktemp("s3") / "moto.log")
    try:
        for bucket in (DVC_BUCKET, MLFLOW_BUCKET):
            server.client().create_bucket(Bucket=bucket)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def team(s3, tmp_path_factory):
    """A team server on a throwaway PostgreSQL whose artifacts go to the S3 bucket."""
    root = tmp_path_factory.mktemp("s3-team")
    with local_postgres() as pg:
        from digits.team.server import free_port

        env = {**pg.env, **CREDENTIALS, "MLFLOW_S3_ENDPOINT_URL": s3.url}
        server = TeamServer(
            pg.create_database("mlflow"),
            f"s3://{MLFLOW_BUCKET}/artifacts",  # type: ignore[arg-type]  (a URL, not a folder)
            env,
            root / "server.log",
            free_port(),
        ).start()
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture(scope="module")
def alice(s3, team, tmp_path_factory):
    """Alice's project: git origin a bare repo, DVC's default remote the S3 bucket (endpoint in
    the committed config: a real bucket needs none). One pipeline run on the team server, the
    lock committed and pushed, the data pushed to S3."""
    root = tmp_path_factory.mktemp("alice-s3")
    project = make_project(root / "project")
    env = {
        **project_env(project, str(mnist_dir())),
        **ONE_THREAD,
        **CREDENTIALS,  # for DVC's remote; MLflow's artifacts go through the server
        "MLFLOW_TRACKING_URI": team.url,
    }
    run(["git", "init", "-q", "--bare", "-b", "main", str(root / "origin.git")], root)
    git(project, "remote", "add", "origin", str(root / "origin.git"))
    dvc(project, "remote", "add", "-d", "team", f"s3://{DVC_BUCKET}/cache", env=env)
    dvc(project, "remote", "modify", "team", "endpointurl", s3.url, env=env)
    set_params(project, **SHORT_RUN)
    git(project, "commit", "-qam", "an S3 remote; one epoch, relaxed gates")
    repro = dvc(project, "repro", env=env)
    git(project, "add", "-A")
    git(project, "commit", "-qm", "pipeline run on the team server")
    git(project, "push", "-q", "origin", "main")
    pushed = dvc(project, "push", env=env)
    return {"project": project, "env": env, "repro": repro, "pushed": pushed, "root": root}


@pytest.mark.slow
def test_the_servers_artifacts_live_in_s3(alice, s3, team):
    from mlflow import MlflowClient

    info = registered(alice["project"], team.url)
    client = MlflowClient(team.url)
    version = client.get_model_version(NAME, info["version"])
    assert client.get_model_version_by_alias(NAME, "champion").version == info["version"]
    run_ = client.get_run(info["run_id"])
    assert run_.info.artifact_uri.startswith("mlflow-artifacts:/")  # proxied: clients need no S3
    keys = s3.keys(MLFLOW_BUCKET)
    # the registered model's files, and the run's figures, are objects in the bucket
    model_keys = [k for k in keys if "/models/" in k or version.source.split("/")[-1] in k]
    assert any(k.endswith("MLmodel") for k in model_keys), keys[:20]
    assert any(k.endswith(".safetensors") for k in keys), keys[:20]
    assert any(k.endswith("figures/confusion_matrix.png") for k in keys), keys[:20]


@pytest.mark.slow
def test_dvc_push_to_s3_then_pull_in_another_clone_leaves_nothing_to_run(alice, s3, team):
    assert "pushed" in alice["pushed"].stdout, alice["pushed"].stdout
    cached = s3.keys(DVC_BUCKET)
    assert cached and all(k.startswith("cache/files/md5/") for k in cached)
    project = alice["root"] / "bob"
    run(["git", "clone", "-q", str(alice["root"] / "origin.git"), str(project)], alice["root"])
    env = {**project_env(project, str(mnist_dir())), **CREDENTIALS, "MLFLOW_TRACKING_URI": team.url}
    dvc(project, "pull", env=env)
    for out in ("models/model.safetensors", "data/processed/test.npz", "reports/metrics.json"):
        assert (project / out).read_bytes() == (alice["project"] / out).read_bytes(), out
    again = dvc(project, "repro", env=env)
    assert "Running stage" not in again.stdout, again.stdout
    assert "up to date" in dvc(project, "status", env=env).stdout


def _digit_png(path: Path) -> Path:
    """A photo-like picture of the first MNIST test digit, a 7."""
    from digits.data.preprocess import read_idx

    images = read_idx(mnist_dir() / "t10k-images-idx3-ubyte.gz", "images")
    path.write_bytes(photo_like(images[0], np.random.default_rng(0)))
    return path


def _teammate(tmp_path: Path, team, name: str) -> tuple[Path, dict]:
    """An empty folder and an environment that knows nothing but the server's URL: no project,
    no S3 endpoint or credentials, an empty model cache."""
    folder = tmp_path / name
    folder.mkdir()
    env = {
        "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin",
        "HOME": str(tmp_path / f"{name}-home"),
        "MLFLOW_TRACKING_URI": team.url,
        **ONE_THREAD,
    }
    return folder, env


def _predict(folder: Path, env: dict, image: Path) -> subprocess.CompletedProcess:
    model = f"models:/{NAME}@champion"
    cmd = [sys.executable, "-m", "digits.cli", "predict", "--json", "--model", model, str(image)]
    return subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_teammate_without_s3_access_loads_the_champion_from_s3(alice, team, tmp_path):
    del alice  # the pipeline that registered @champion
    folder, env = _teammate(tmp_path, team, "carol")
    image = _digit_png(tmp_path / "seven.png")
    out = _predict(folder, env, image)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout)["digit"] == 7, out.stdout
    assert os.listdir(folder) == []  # nothing written where she stands
    # again: the server asked which version @champion is (one GET), its weights from her model
    # cache by their registered sha256, and no MLflow import
    again = _predict(folder, {**env, "PYTHONPROFILEIMPORTTIME": "1"}, image)
    assert again.returncode == 0
    first, second = json.loads(out.stdout), json.loads(again.stdout)
    assert first.pop("prediction_id") != second.pop("prediction_id")  # each answer its own
    assert second == first
    modules = imported(again.stderr)
    assert "digits.tracking.resolve" in modules and not {
        m for m in modules if m.startswith("mlflow")
    }
    assert os.listdir(Path(env["HOME"]) / ".cache/digits/models")


@pytest.mark.slow
def test_a_stopped_s3_is_one_clear_line_and_nothing_half_written(alice, s3, team, tmp_path):
    """Last in this module: stopping moto ends its buckets."""
    from mlflow import MlflowClient

    client = MlflowClient(team.url)
    versions = len(client.search_model_versions(f"name='{NAME}'"))
    project, env = alice["project"], alice["env"]
    lock = (project / "dvc.lock").read_bytes()
    s3.stop()

    # the teammate's first load: the server cannot read the files
    folder, teammate_env = _teammate(tmp_path, team, "dave")
    out = _predict(folder, teammate_env, _digit_png(tmp_path / "seven.png"))
    assert out.returncode == 1, out.stdout + out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("digits predict: error:") and NAME in last, out.stderr[-2000:]
    assert os.listdir(folder) == []
    print(last)  # what the teammate reads (shown by pytest -rP)

    # a new version cannot be stored: the evaluate stage fails, no version is registered
    rerun = dvc(project, "repro", "--force", "evaluate", env=env, check=False)
    said = rerun.stdout + rerun.stderr
    assert rerun.returncode != 0, said
    assert "digits evaluate: error:" in said, said[-3000:]
    print(next(line for line in said.splitlines() if "digits evaluate: error:" in line))
    assert len(client.search_model_versions(f"name='{NAME}'")) == versions
    assert (project / "dvc.lock").read_bytes() == lock  # DVC recorded nothing

    # DVC's remote: push fails naming the endpoint it cannot reach, exit non-zero
    (project / "notes.txt").write_text("more data\n")
    dvc(project, "add", "notes.txt", env=env)
    push = dvc(project, "push", env=env, check=False)
    assert push.returncode != 0
    said = push.stdout + push.stderr
    assert f'Could not connect to the endpoint URL: "{s3.url}/{DVC_BUCKET}/' in said, said
