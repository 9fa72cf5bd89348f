"""The pipeline's MLflow run, on real parts: it lives while the model trains (RUNNING, epoch by
epoch, with system metrics), the same run gets the test metrics and the registered version,
SIGTERM marks it KILLED (SIGKILL and a rerun: tests/test_train.py), a model trained elsewhere
gets a complete run of its own linked to the training's run; a tracking server that is down or
hung stops the train stage before any epoch and evaluate fast, naming it; two pipelines writing
one fresh SQLite store both land.

And what a run says about itself: a name from its DVC experiment or its branch and commit, a
description of its params against the promotion branch's, the three data splits as inputs, the
training's time, speed and numeric environment, metric names that group."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers import (
    ROOT,
    SHORT_RUN_GATES,
    SMALL_OUTLIERS,
    dvc,
    git,
    init_git,
    make_project,
    make_trained_project,
    mnist_dir,
    project_env,
    run,
    set_params,
)

EXPERIMENT = "mnist"


def closed_port_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"


def client_for(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def runs_of(uri: str) -> list:
    client = client_for(uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    return [] if exp is None else client.search_runs([exp.experiment_id])


@pytest.fixture(scope="module")
def evaluate_ready(tmp_path_factory) -> Path:
    """A project folder where the evaluate stage can run: fake data, a model trained on it
    (without an MLflow run: for evaluate, a model trained elsewhere)."""
    return make_trained_project(tmp_path_factory.mktemp("evaluate") / "project")


def stage(name: str, cwd: Path, env: dict, **kw) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "digits.cli", name], cwd, env=env, **kw)


# --- a tracking server that is down or hung --------------------------------------------------


@pytest.mark.slow
def test_unreachable_server_stops_training_before_any_epoch(tmp_path, mnist_http):
    project = make_project(tmp_path / "project")
    set_params(project, **{"train.epochs": 1, **SMALL_OUTLIERS})
    env = project_env(project, mnist_http)
    down = closed_port_url()
    bad_env = {**env, "MLFLOW_TRACKING_URI": down}

    first = dvc(project, "repro", env=bad_env, check=False)
    out = first.stdout + first.stderr
    assert first.returncode != 0
    assert "Running stage 'preprocess'" in first.stdout
    assert f"digits train: error: MLflow tracking server {down} is unreachable" in out
    assert "epoch 1/" not in out and "Traceback" not in out  # no epoch ran
    assert not (project / "models/model.safetensors").exists()

    # the store is back (the project's default SQLite store): training and the rest run (the
    # gate rejects a 1-epoch model: the run's verdict, not a crash)
    retry = dvc(project, "repro", env=env, check=False)
    for name in ("train", "evaluate", "gate"):
        assert f"Running stage '{name}'" in retry.stdout
    assert "Running stage 'preprocess'" not in retry.stdout  # kept from the first attempt
    (r,) = runs_of(f"sqlite:///{project / 'mlflow.db'}")
    assert r.info.status == "FINISHED" and "test_accuracy" in r.data.metrics
    assert r.data.tags["gate.verdict"] == "rejected" and r.data.metrics["gate/passed"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("name", ["train", "evaluate"])
def test_hung_server_fails_the_stage_naming_the_timeout(tmp_path, evaluate_ready, name):
    # a server that accepts connections and never answers (the kernel completes the TCP
    # handshake for a listening socket nobody accepts from)
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(16)
    uri = f"http://127.0.0.1:{hung.getsockname()[1]}"
    clone = tmp_path / "project"
    shutil.copytree(evaluate_ready, clone)
    model = (clone / "models/model.safetensors").read_bytes()
    try:
        # the stage's own timeout answers; the subprocess timeout only keeps a hang from
        # hanging the suite
        proc = stage(name, clone, {"MLFLOW_TRACKING_URI": uri}, check=False, timeout=120)
    finally:
        hung.close()
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(
        f"digits {name}: error: MLflow tracking server {uri} is unreachable (timed out)"
    ), proc.stderr
    assert "epoch 1/" not in proc.stdout
    assert (clone / "models/model.safetensors").read_bytes() == model  # inputs kept


# --- two pipelines, one fresh SQLite store ---------------------------------------------------


@pytest.mark.slow
def test_two_pipelines_share_a_fresh_sqlite_store(tmp_path, evaluate_ready):
    store = tmp_path / "shared" / "mlflow.db"  # neither the file nor its folder exists yet
    uri = f"sqlite:///{store}"
    clones = []
    for name in ("a", "b"):
        clone = tmp_path / name
        shutil.copytree(evaluate_ready, clone)
        clones.append(clone)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "OPENBLAS_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "digits.cli", "evaluate"],
            cwd=c,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for c in clones
    ]  # started together: both find no store, both want to create it
    results = [(p.wait(timeout=600), *p.communicate()) for p in procs]
    for rc, out, err in results:
        assert rc == 0, f"--- stdout\n{out[-3000:]}\n--- stderr\n{err[-3000:]}"
        assert "database is locked" not in out + err
        assert "evaluate: MLflow run" in out

    client = client_for(uri)
    runs = runs_of(uri)
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    for r in runs:  # every run complete: params, per-epoch and test metrics
        assert r.data.params["train.epochs"] == "2"
        assert "test_accuracy" in r.data.metrics
        assert [m.step for m in client.get_metric_history(r.info.run_id, "val_loss")] == [1, 2]
    versions = client.search_model_versions("name='mnist-mlp'")
    assert sorted(str(v.version) for v in versions) == ["1", "2"]
    assert sorted(v.run_id for v in versions) == sorted(r.info.run_id for r in runs)
    assert {v.status for v in versions} == {"READY"}


# --- the live run, in a real `dvc repro` -------------------------------------------------------


def live_project(tmp_path: Path, epochs: int) -> tuple[Path, dict]:
    """A project (DVC, git) on MNIST from the mirror whose training takes a few seconds: a
    smaller network, no augmentation, sampled system metrics every half second."""
    project = make_project(tmp_path / "project")
    set_params(
        project,
        **{
            "train.epochs": epochs,
            "train.hidden_sizes": [64, 32],
            "train.augment.enabled": False,  # the warp is most of an epoch: not tested here
            **SMALL_OUTLIERS,
            "gates.min_accuracy": 0.5,
            "gates.min_class_recall": 0.3,
            "gates.max_loss": 2.0,
            **SHORT_RUN_GATES,
        },
    )
    git(project, "commit", "-qam", "a short run")
    # the store exists before the watcher looks: two processes creating one SQLite store at once
    # race in MLflow's migrations (one of them fails), whoever they are
    client_for(f"sqlite:///{project / 'mlflow.db'}").search_experiments()
    env = {
        **project_env(project, str(mnist_dir())),
        "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "0.5",
        "MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING": "1",
    }
    return project, env


def watch(proc: subprocess.Popen, uri: str, model: Path, timeout: float = 300) -> dict | None:
    """Poll the store while `proc` runs: the first sight of a RUNNING run with two epochs of
    validation metrics and some system metrics, while the model file does not exist yet."""
    deadline = time.monotonic() + timeout
    client = None
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
        if not Path(uri.removeprefix("sqlite:///")).exists():
            continue
        try:
            client = client or client_for(uri)
            for r in runs_of(uri):
                steps = client.get_metric_history(r.info.run_id, "val_accuracy")
                system = [k for k in r.data.metrics if k.startswith("system/")]
                live = r.info.status == "RUNNING" and len(steps) >= 2 and system
                if live and not model.exists():  # the train stage has not finished
                    return {"run_id": r.info.run_id, "epochs": len(steps), "system": system}
        except Exception:  # the store is being created or migrated: look again
            continue
    return None


@pytest.mark.slow
def test_the_run_lives_while_the_model_trains(tmp_path):
    project, env = live_project(tmp_path, epochs=12)
    uri = f"sqlite:///{project / 'mlflow.db'}"
    log = tmp_path / "repro.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dvc", "repro"],
            cwd=project,
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        seen = watch(proc, uri, project / "models/model.safetensors")
        assert proc.wait(timeout=600) == 0, log.read_text()
    assert seen is not None, f"no live run seen during training:\n{log.read_text()[-3000:]}"
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} & set(
        seen["system"]
    )

    # one run for the whole pipeline: the training's, with the test metrics and the version
    (r,) = runs_of(uri)
    assert r.info.run_id == seen["run_id"] and r.info.status == "FINISHED"
    assert "test_accuracy" in r.data.metrics and r.data.metrics["gate/passed"] == 1.0
    client = client_for(uri)
    (version,) = client.search_model_versions("name='mnist-mlp'")
    assert version.run_id == r.info.run_id
    history = client.get_metric_history(r.info.run_id, "val_accuracy")
    assert [m.step for m in history] == list(range(1, 13))
    stamps = [m.timestamp for m in history]
    assert stamps == sorted(stamps) and stamps[-1] - stamps[0] > 0  # logged as each epoch ended
    assert r.data.tags["gate.verdict"] == "promoted"

    # and git stays clean: a fresh clone that reproduces the committed results (its own store,
    # its own run, its own version numbers) leaves `git status` empty
    git(project, "add", "-A")
    git(project, "commit", "-qm", "the pipeline's results")
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(project), str(clone))
    clone_env = {**env, "PYTHONPATH": str(clone / "src")}
    again = dvc(clone, "repro", env=clone_env)
    assert git(clone, "status", "--porcelain") == ""
    (run,) = runs_of(f"sqlite:///{clone / 'mlflow.db'}")
    # its gate ran too (the lock alone would have skipped it: its inputs are the same bytes),
    # so the clone's own version is judged and, on a clean clone, its @champion
    assert "Running stage 'gate'" in again.stdout, again.stdout[-3000:]
    assert run.data.tags["gate.verdict"] == "promoted"
    assert (
        client_for(f"sqlite:///{clone / 'mlflow.db'}")
        .get_model_version_by_alias("mnist-mlp", "champion")
        .run_id
        == run.info.run_id
    )
    assert (clone / "reports/gate.json").read_bytes() == (
        project / "reports/gate.json"
    ).read_bytes()


def test_sigterm_raises_while_the_block_runs():
    """SIGTERM raises the given exception (the run's Terminated, the team server's stop) in the
    block, the previous handler is back after it, and in another thread, where Python cannot
    take signals, it changes nothing."""
    import threading

    from digits.core.errors import sigterm_raises
    from digits.tracking.runs import Terminated

    def terminated() -> None:
        with sigterm_raises(Terminated):
            os.kill(os.getpid(), signal.SIGTERM)  # its handler runs before kill returns

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated, match="signal 15"):
        terminated()
    assert signal.getsignal(signal.SIGTERM) == before
    handlers = []

    def elsewhere():
        with sigterm_raises(Terminated):
            handlers.append(signal.getsignal(signal.SIGTERM))

    thread = threading.Thread(target=elsewhere)
    thread.start()
    thread.join()
    assert handlers == [before]


@pytest.mark.slow
def test_sigterm_marks_the_run_killed(tmp_path):
    project, env = live_project(tmp_path, epochs=200)
    uri = f"sqlite:///{project / 'mlflow.db'}"
    stage("download", project, env)
    stage("preprocess", project, env)
    proc = subprocess.Popen(
        [sys.executable, "-m", "digits.cli", "train"],
        cwd=project,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen = watch(proc, uri, project / "models/model.safetensors")
    assert seen is not None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "digits train: stopped" in err and "Traceback" not in err
    (r,) = runs_of(uri)
    assert r.info.status == "KILLED" and r.info.end_time


# --- a model trained elsewhere ---------------------------------------------------------------


@pytest.mark.slow
def test_a_model_trained_elsewhere_gets_a_complete_run_linked_to_its_training(tmp_path):
    project, env = live_project(tmp_path, epochs=3)
    store = tmp_path / "team" / "mlflow.db"
    env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{store}"}
    dvc(project, "repro", env=env)
    (trained,) = runs_of(env["MLFLOW_TRACKING_URI"])

    # a teammate's workspace with the same model (from DVC's cache or a remote): not trained here
    teammate = tmp_path / "teammate"
    shutil.copytree(project, teammate)
    stage("evaluate", teammate, env)
    runs = {r.info.run_id: r for r in runs_of(env["MLFLOW_TRACKING_URI"])}
    assert len(runs) == 2
    (new,) = [r for r in runs.values() if r.info.run_id != trained.info.run_id]
    assert new.data.tags["digits.training_run_id"] == trained.info.run_id
    assert new.data.params["train.epochs"] == "3"
    assert "test_accuracy" in new.data.metrics
    steps = client_for(env["MLFLOW_TRACKING_URI"]).get_metric_history(new.info.run_id, "val_loss")
    assert [m.step for m in steps] == [1, 2, 3]  # the history, from the committed file
    assert "training/seconds" not in new.data.metrics  # no training happened in this run


# --- what a run says about itself: where it came from, its data, its training ----------------


@pytest.fixture
def small_repo(tmp_path, monkeypatch) -> Path:
    """A git repository with the project's dvc.yaml and .gitignore and a small params.yaml."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy2(ROOT / name, repo / name)
    (repo / "params.yaml").write_text(yaml.safe_dump({"train": {"lr": 0.005, "epochs": 25}}))
    for var in ("DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "DVC_ROOT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(repo)
    return init_git(repo)


def test_run_name_and_description_follow_git(small_repo, monkeypatch):
    from digits.core.config import load_params
    from digits.core.provenance import run_origin
    from digits.tracking.lineage import description

    repo = small_repo
    first = git(repo, "rev-parse", "HEAD")[:7]
    origin = run_origin(repo)
    assert origin.run_name == f"main@{first}"
    text = description(origin, load_params(repo / "params.yaml"), repo)
    assert f"Commit `main@{first}`" in text
    assert "Params: as on the promotion branch `main`." in text

    # what the pipeline writes itself does not make the workspace dirty
    (repo / "dvc.lock").write_text("schema: '2.0'\n")
    (repo / "reports").mkdir()
    (repo / "reports/metrics.json").write_text("{}\n")
    assert run_origin(repo).run_name == f"main@{first}"

    # a branch with a committed change of train.lr, then an uncommitted change of epochs
    git(repo, "checkout", "-qb", "idea")
    set_params(repo, **{"train.lr": 0.001})
    git(repo, "commit", "-qam", "lower lr")
    second = git(repo, "rev-parse", "HEAD")[:7]
    set_params(repo, **{"train.epochs": 3})
    origin = run_origin(repo)
    assert origin.changed == ("params.yaml",)
    assert origin.run_name == f"idea@{second}-dirty"
    text = description(origin, load_params(repo / "params.yaml"), repo)
    assert "Run with uncommitted changes to `params.yaml`." in text
    assert "Params that differ from the promotion branch `main`:" in text
    assert "| `train.epochs` | 3 | 25 |" in text
    assert "| `train.lr` | 0.001 | 0.005 |" in text
    assert "`train.batch_size`" not in text  # equal on both sides
    assert "```diff" in text and "-  epochs: 25" in text and "+  epochs: 3" in text
    assert "-  lr: 0.001" not in text  # the diff is against HEAD, not main

    # a DVC experiment is named after itself
    monkeypatch.setenv("DVC_EXP_NAME", "bushy-lamb")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", git(repo, "rev-parse", "HEAD"))
    origin = run_origin(repo)
    assert origin.run_name == "bushy-lamb"
    text = description(origin, load_params(repo / "params.yaml"), repo)
    assert f"DVC experiment `bushy-lamb` (baseline commit `{second}`)." in text


def test_without_git_runs_get_plain_names(small_repo, tmp_path, monkeypatch):
    from digits.core.config import parse_params
    from digits.core.provenance import run_origin
    from digits.tracking.lineage import description

    outside = tmp_path / "not-a-repo"
    outside.mkdir()
    origin = run_origin(outside)
    assert origin.run_name is None  # MLflow picks its own
    assert "Not run from a git repository" in description(origin, parse_params({}), outside)

    empty = tmp_path / "no-programs"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))  # git is not installed
    origin = run_origin(small_repo)
    assert origin.commit == "" and origin.run_name is None


def test_a_hung_git_is_an_error_naming_the_command(tmp_path, monkeypatch):
    from digits.core import provenance

    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "git").write_text(f"#!/bin/sh\nexec {shutil.which('sleep')} 30\n")
    (fake / "git").chmod(0o755)
    monkeypatch.setenv("PATH", str(fake))
    monkeypatch.setattr(provenance, "GIT_TIMEOUT", 0.5)
    with pytest.raises(provenance.ProvenanceError, match=r"`git rev-parse HEAD` .* within 0.5 s"):
        provenance.head_commit(tmp_path)


def test_metric_names_group_by_prefix():
    from digits.core.metrics import Evaluation
    from digits.tracking.runs import evaluation_metrics

    metrics = {
        "accuracy": 0.9,
        "loss": 0.3,
        "macro_f1": 0.89,
        "per_class": {str(d): {"precision": 0.9, "recall": 0.8 + d / 100} for d in range(10)},
    }
    logged = evaluation_metrics(Evaluation.from_dict(metrics))
    assert {"test_accuracy", "test_loss", "test_macro_f1"} <= logged.keys()
    assert logged["test_class/3/recall"] == pytest.approx(0.83)
    assert len([k for k in logged if k.startswith("test_class/")]) == 20
    assert len(logged) == 23  # nothing else: no robustness section, no flat per-class names

    metrics["robustness"] = {"mean": 0.7, "worst": 0.4, "corruptions": {"blur": 0.8, "thin": 0.4}}
    logged = evaluation_metrics(Evaluation.from_dict(metrics))
    assert logged["robustness/mean"] == 0.7 and logged["robustness/worst"] == 0.4
    assert logged["robustness/blur"] == 0.8 and logged["robustness/thin"] == 0.4
    assert len(logged) == 27


@pytest.mark.slow
def test_run_records_origin_datasets_and_training(tmp_path, evaluate_ready):
    from digits.core.files import file_digest
    from digits.core.mnist import RESOURCES

    project = tmp_path / "project"
    shutil.copytree(evaluate_ready, project)
    init_git(project)
    commit = git(project, "rev-parse", "HEAD")
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    env = {"MLFLOW_TRACKING_URI": uri, "DVC_EXP_NAME": "", "DVC_ROOT": ""}
    trained = stage("train", project, env)
    stage("evaluate", project, env)

    client = client_for(uri)
    (r,) = runs_of(uri)
    # named after its origin, which the stages' own outputs do not make dirty
    assert r.info.run_name == f"main@{commit[:7]}"
    assert r.data.tags["git_dirty"] == "false"
    assert r.data.tags["mlflow.source.git.commit"] == commit
    assert f"Commit `main@{commit[:7]}` ({commit})" in r.data.tags["mlflow.note.content"]
    # the training: its time, speed and environment, in the run (not in a file DVC tracks)
    seconds = r.data.metrics["training/seconds"]
    assert 0 < seconds < 120
    assert r.data.metrics["training/samples_per_second"] == pytest.approx(
        500 * 2 / seconds, rel=0.05
    )  # 500 training images (600 less 100 for validation), 2 epochs
    assert r.data.tags["device"] == "cpu"
    assert r.data.tags["numerics.matmul"] == "openblas"
    assert "Haswell, 2 threads" in r.data.tags["numerics.openblas"]
    assert r.data.tags["numerics.cpu_capability"] == "AVX2"
    assert r.data.tags["digits.model_sha256"] == file_digest(project / "models/model.safetensors")
    assert "val accuracy" in trained.stdout
    # metrics: headline, grouped per class, per epoch
    assert {"test_accuracy", "test_loss", "test_macro_f1", "test_class/7/recall"} <= set(
        r.data.metrics
    )
    assert [m.step for m in client.get_metric_history(r.info.run_id, "val_loss")] == [1, 2]

    # the three splits as inputs: name, digest of the processed file, source, shape, context
    inputs = {i.tags[0].value: i.dataset for i in r.inputs.dataset_inputs}
    assert set(inputs) == {"training", "validation", "testing"}
    train_sha = file_digest(project / "data/processed/train.npz")
    test_sha = file_digest(project / "data/processed/test.npz")
    expected = {
        "training": ("mnist-train", train_sha, 500, "train-"),
        "validation": ("mnist-val", train_sha, 100, "train-"),
        "testing": ("mnist-test", test_sha, 100, "t10k-"),
    }
    for context, (name, sha, rows, prefix) in expected.items():
        ds = inputs[context]
        assert (ds.name, ds.digest) == (name, sha[:8])
        profile = json.loads(ds.profile)
        assert profile["num_rows"] == rows and profile["sha256"] == sha
        assert profile["features_shape"] == [rows, 784]
        source = json.loads(ds.source)
        assert ds.source_type == "http" and source["url"].startswith("https://")
        assert source["files"] == {f: md5 for f, md5 in RESOURCES if f.startswith(prefix)}
        assert "mlflow_tensorspec" in json.loads(ds.schema)

    # the experiment is a model-training one; the registered model says what it takes
    exp = client.get_experiment(r.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    description = client.get_registered_model("mnist-mlp").description
    assert "(N, 784)" in description and "[0, 1]" in description and "`digit`" in description
    (version,) = client.search_model_versions("name='mnist-mlp'")
    assert version.run_id == r.info.run_id
    assert version.tags["run_name"] == r.info.run_name
    assert version.tags["digits.model_sha256"] == r.data.tags["digits.model_sha256"]


# --- the registered model's code -------------------------------------------------------------


def test_a_version_carries_the_modules_its_model_code_imports():
    """SERVED_MODULES, the library files copied into every registered version, are exactly
    what mlflow_model.py imports, directly or not (with their packages' __init__.py): one
    missing and the version cannot load where the project is not installed."""
    from digits.tracking.pyfunc import CODE_FILE, SERVED_MODULES
    from test_stage_deps import SRC, imported_modules, module_file

    package = SRC / "digits"
    seen: set[Path] = set()
    todo = [CODE_FILE]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in imported_modules(path):
            parts = name.split(".")
            found = (module_file(".".join(parts[:i])) for i in range(1, len(parts) + 1))
            todo += [f for f in found if f is not None]
    seen.discard(CODE_FILE)  # logged as the model's code itself, not copied beside it
    assert sorted(p.relative_to(package).as_posix() for p in seen) == sorted(SERVED_MODULES)
