"""`digits sweep` on real parts: the search space checked as strictly as params.yaml; two workers
in two clones (as two machines would be) running one Optuna study on a real PostgreSQL, logging
to a real `mlflow server`: every trial once, each a DVC experiment of the clone that ran it and
an MLflow child of the study's one parent run; a worker killed mid-trial leaves a failed trial
and the study completes; the best trial, applied, gives its model's bytes again; the MLflow UI
compares the children in its parallel-coordinates and contour views (a real browser).

With SCREENSHOT_DIR set (`SCREENSHOT_DIR=docs pytest tests/test_sweep.py`), the two views are
saved there as sweep-parallel-coordinates.png and sweep-contour.png: the pictures in
docs/sweeps.md."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from digits.core.config import Params
from digits.sweep.study import SweepError, load_space
from helpers import (
    SHORT_RUN_GATES,
    dvc,
    git,
    make_project,
    mnist_dir,
    project_env,
    run,
    set_params,
    wait_still,
)
from pg import TeamServer, local_postgres, query

SPACE = (
    "train.lr: {low: 0.001, high: 0.01, log: true}\ntrain.label_smoothing: {low: 0.0, high: 0.2}\n"
)


def space_of(tmp_path: Path, text: str):
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    return load_space(path, Params())


def test_the_repositorys_search_space_is_valid():
    from helpers import ROOT

    dims = load_space(ROOT / "sweep.yaml", Params())
    assert {d.key for d in dims} >= {"train.lr", "train.epochs"}
    epochs = next(d for d in dims if d.key == "train.epochs")
    assert epochs.integer and epochs.step == 10


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("train.learning_rate: {low: 0.001, high: 0.01}\n", "not a key of params.yaml"),
        ("train.lr: {low: 0.01, high: 0.001}\n", "low 0.01 is not below high 0.001"),
        ("train.lr: {low: -1, high: 0.01}\n", "train.lr: input should be greater than 0"),
        ("train.epochs: {low: 1.5, high: 8}\n", "takes whole numbers"),
        ("train.lr: {low: 0.001, high: 0.01, log: true, step: 0.001}\n", "log: true needs"),
        ("train.lr: {low: 0.001, hi: 0.01}\n", "unknown field 'hi'"),
        ("train.schedule: {choices: [onecycle, linear]}\n", "train.schedule"),
        ("train.lr: {choices: []}\n", "a non-empty list"),
        ("train.augment.enabled: {low: 0, high: 1}\n", "a range for a bool param"),
        ("[1, 2]\n", "expected a mapping"),
        ("train.lr: [0.001\n", "not valid YAML"),
    ],
    ids=[
        "unknown",
        "reversed",
        "out-of-range",
        "int",
        "log-step",
        "field",
        "choice",
        "empty",
        "bool",
        "list",
        "yaml",
    ],
)
def test_a_bad_search_space_is_one_line_naming_it(tmp_path, text, says):
    with pytest.raises(SweepError) as e:
        space_of(tmp_path, text)
    assert says in str(e.value) and "\n" not in str(e.value)
    assert str(e.value).startswith(str(tmp_path / "sweep.yaml"))


def test_a_sweep_before_the_pipeline_ran_is_one_line_saying_so(tmp_path):
    from digits.sweep.study import check_pipeline_ran

    project = make_project(tmp_path / "project")
    cmd = [sys.executable, "-m", "digits.cli", "sweep", "--study", "s", "--trials", "1"]
    env = {**os.environ, **project_env(project, str(mnist_dir()))}
    out = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr
    assert out.stderr.strip().splitlines() == [
        "digits sweep: error: dvc.lock has no entry for any stage: run the pipeline (`dvc repro`) "
        "and commit dvc.lock before a sweep (its trials build on them)"
    ]
    assert not (project / "optuna.db").exists()  # stopped before opening the study
    (project / "dvc.lock").write_text("schema: '2.0'\nstages:\n  download: {}\n  preprocess: {}\n")
    with pytest.raises(SweepError, match="no entry for evaluate, gate, train: run the pipeline"):
        check_pipeline_ran(project)


def test_a_good_search_space(tmp_path):
    (lr, epochs, weight) = space_of(
        tmp_path,
        "train.lr: {low: 0.001, high: 0.01, log: true}\n"
        "train.epochs: {low: 2, high: 6, step: 2}\n"
        "train.outliers.weight: {choices: [0.25, 0.5]}\n",
    )
    assert lr.log and not lr.integer and (lr.low, lr.high) == (0.001, 0.01)
    assert epochs.integer and epochs.step == 2
    assert weight.choices == (0.25, 0.5)


# --- two workers, one study, the team's database and tracking server ---------------------------


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    with local_postgres() as pg:
        server = TeamServer(
            pg.create_database("mlflow"), root / "artifacts", pg.env, root / "server.log", _port()
        ).start()
        try:
            yield {"pg": pg, "server": server, "optuna": pg.create_database("optuna"), "root": root}
        finally:
            server.stop()


def _port() -> int:
    from digits.team.server import free_port

    return free_port()


@pytest.fixture(scope="module")
def clones(team):
    """Two clones of one project, as a team has them before a sweep: the pipeline run once on
    main (its champion on the team server), its lock in git (a bare origin) and its files in a
    DVC remote (a folder) that the second clone pulled."""
    root = team["root"]
    origin = root / "origin.git"
    run(["git", "init", "-q", "--bare", "-b", "main", str(origin)], root)
    first = make_project(root / "a")
    (first / "sweep.yaml").write_text(SPACE)
    set_params(first, **TINY)
    envs = [env_for(first, team)]
    dvc(first, "remote", "add", "-d", "team", str(root / "dvc-store"), env=envs[0])
    git(first, "add", "-A")
    git(first, "commit", "-qm", "a sweep of the learning rate and the label smoothing")
    dvc(first, "repro", env=envs[0])
    dvc(first, "push", env=envs[0])
    git(first, "add", "-A")
    git(first, "commit", "-qm", "pipeline run")
    git(first, "remote", "add", "origin", str(origin))
    git(first, "push", "-q", "origin", "main")
    second = root / "b"
    git(root, "clone", "-q", str(origin), str(second))
    git(second, "config", "user.email", "b@example.com")
    git(second, "config", "user.name", "b")
    envs.append(env_for(second, team))
    dvc(second, "pull", env=envs[1])
    return (first, envs[0]), (second, envs[1])


# trials of seconds: one epoch of a smaller network, no augmentation; gates a short run passes
TINY = {
    "train.epochs": 1,
    "train.augment.enabled": False,
    "train.outliers.enabled": False,
    "train.hidden_sizes": [64, 32],
    "evaluate.outliers_per_kind": 50,
    "gates.min_accuracy": 0.5,
    "gates.min_class_recall": 0.1,
    "gates.max_loss": 5.0,
    **SHORT_RUN_GATES,
}


def env_for(clone: Path, team) -> dict:
    return {
        **project_env(clone, str(mnist_dir())),
        **team["pg"].env,  # the database's password (PGPASSWORD), as a worker's ~/.pgpass
        "MLFLOW_TRACKING_URI": team["server"].url,
        "OPENBLAS_NUM_THREADS": "1",  # two workers at once on two cores
        "DIGITS_SWEEP_GRACE": "6",
        "DIGITS_SWEEP_HEARTBEAT": "2",
    }


def worker(clone: Path, env: dict, study: str, storage: str, trials: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "digits.cli", "sweep", "--study", study, "--trials", str(trials)]
    return subprocess.Popen(
        [*cmd, "--storage", storage],
        cwd=clone,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # the test kills its whole group (the worker and its trial)
    )


def trials_of(storage: str, study: str, pg) -> list:
    """The study's trials, read straight from the database (this process logs in as a worker
    does: PGPASSWORD)."""
    import optuna

    from digits.sweep.study import storage_url

    before = os.environ.get("PGPASSWORD")
    os.environ.update(pg.env)
    try:
        return optuna.load_study(study_name=study, storage=storage_url(storage)).get_trials()
    finally:
        if before is None:
            os.environ.pop("PGPASSWORD", None)
        else:
            os.environ["PGPASSWORD"] = before


@pytest.fixture(scope="module")
def lr_study(team, clones) -> list[tuple[int, str]]:
    """The study "lr", 4 trials, run by two workers at once, one in each clone: each worker's
    exit status and output."""
    (a, env_a), (b, env_b) = clones
    workers = [worker(c, e, "lr", team["optuna"], 4) for c, e in ((a, env_a), (b, env_b))]
    outs = [w.communicate(timeout=900)[0] for w in workers]
    return [(w.returncode, out) for w, out in zip(workers, outs, strict=True)]


@pytest.mark.slow
def test_two_workers_run_one_study_on_the_team_database(team, clones, lr_study):
    import optuna
    from mlflow import MlflowClient

    (a, env_a), (b, env_b) = clones
    for returncode, out in lr_study:
        assert returncode == 0, out[-3000:]
    trials = trials_of(team["optuna"], "lr", team["pg"])
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) >= 4 and len(trials) <= 5  # no more than one extra, from the race
    assert len({t.number for t in trials}) == len(trials)  # every trial once
    workers_seen = {t.user_attrs["worker"].split(":")[0] for t in complete}
    assert len({t.user_attrs["worker"] for t in complete}) == 2 or len(workers_seen) == 1

    # every trial a DVC experiment of the clone that ran it ...
    listed = dvc(a, "exp", "list", env=env_a).stdout + dvc(b, "exp", "list", env=env_b).stdout
    for t in complete:
        assert t.user_attrs["dvc_experiment"] in listed
    # ... and an MLflow child of the one parent run, tagged with its study, number and worker
    client = MlflowClient(team["server"].url)
    exp = client.get_experiment_by_name("mnist")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`digits.sweep.study` = 'lr'")
    parents = [r for r in runs if r.data.tags.get("digits.sweep.parent") == "true"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs if "digits.sweep.trial" in r.data.tags]
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    by_trial = {int(r.data.tags["digits.sweep.trial"]): r for r in children}
    for t in complete:
        r = by_trial[t.number]
        assert r.data.tags["digits.sweep.worker"] == t.user_attrs["worker"]
        assert float(r.data.params["train.lr"]) == pytest.approx(t.params["train.lr"])
        assert r.data.metrics["val_accuracy"] == pytest.approx(t.value)
        assert "test_accuracy" not in r.data.metrics  # a trial never sees the test set
    # nor registers a model: the one version is the pipeline run's, still the champion
    (only,) = client.search_model_versions("name='mnist-mlp'")
    assert client.get_model_version_by_alias("mnist-mlp", "champion").version == only.version

    # the best, as --best says, applied in the clone that ran it: its model's bytes again
    best = run(
        [sys.executable, "-m", "digits.cli", "sweep", "--study", "lr", "--best",
         "--storage", team["optuna"]], a, env=env_a,
    ).stdout  # fmt: skip
    winner = max(complete, key=lambda t: t.value)
    name = winner.user_attrs["dvc_experiment"]
    assert f"dvc exp apply {name}" in best and f"{winner.value:.4f}" in best
    home = a if name in dvc(a, "exp", "list", env=env_a).stdout else b
    env = env_a if home == a else env_b
    dvc(home, "exp", "apply", name, env=env)
    from digits.core.files import file_digest

    model = home / "models/model.safetensors"
    assert file_digest(model) == by_trial[winner.number].data.tags["digits.model_sha256"]
    # and training it again gives the same bytes (reproducible, not just restored)
    before = model.read_bytes()
    dvc(home, "repro", "--force", "train", env=env)
    assert model.read_bytes() == before


def compare_in_ui(driver, url: str, run_ids: list, experiment_id: str, params, metric, shots):
    """The MLflow UI's comparison of `run_ids` (its compare-runs page, as the runs table's
    Compare button opens it): parallel coordinates of `params` against `metric`, then the
    contour of the first two params; a screenshot of each in `shots`. Returns the page's text
    and the params the plot picked by itself (the ones that differ between the runs)."""
    import urllib.parse

    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    def q(value) -> str:
        return urllib.parse.quote(json.dumps(value))

    def option(css: str, text: str):
        found = wait.until(
            lambda d: (
                [o for o in d.find_elements(By.CSS_SELECTOR, css) if o.text.strip() == text]
                or False
            )
        )[0]
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", found)
        return found

    driver.get(f"{url}/#/compare-runs?runs={q(run_ids)}&experiments={q([experiment_id])}")
    wait = WebDriverWait(driver, 60)
    css = "[class*='select-selector']"
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, css)) >= 2)
    selects = driver.find_elements(By.CSS_SELECTOR, css)
    picked = selects[0].text.split("\n")
    for remove in selects[1].find_elements(By.CSS_SELECTOR, "[class*='selection-item-remove']"):
        remove.click()  # the plot's first metric, whatever it is: the objective instead
    selects[1].click()
    option("[class*='select-item-option']", metric).click()
    ActionChains(driver).send_keys(Keys.ESCAPE).perform()
    for close in driver.find_elements(By.CSS_SELECTOR, "button[aria-label='Close']"):
        close.click()  # the assistant's side panel, out of the picture
    wait_still(driver)  # the plot's transition over
    assert driver.save_screenshot(str(shots / "sweep-parallel-coordinates.png"))
    text = driver.find_element(By.TAG_NAME, "body").text
    tabs = driver.find_elements(By.CSS_SELECTOR, "[role='tab']")
    next(t for t in tabs if t.text == "Contour Plot").click()
    for axis, value in zip(("xaxis", "yaxis", "zaxis"), (*params[:2], metric), strict=True):
        wait.until(lambda d, a=axis: d.find_element(By.ID, f"{a}-selector")).click()
        option("[role='option']", value).click()
    wait_still(driver)
    assert driver.save_screenshot(str(shots / "sweep-contour.png"))
    return text + driver.find_element(By.TAG_NAME, "body").text, picked


@pytest.mark.slow
def test_the_ui_compares_the_trials_in_parallel_coordinates_and_contours(team, lr_study, tmp_path):
    from mlflow import MlflowClient

    from helpers import start_chromium

    for returncode, out in lr_study:
        assert returncode == 0, out[-3000:]
    client = MlflowClient(team["server"].url)
    exp = client.get_experiment_by_name("mnist")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`digits.sweep.study` = 'lr'")
    children = [r for r in runs if "digits.sweep.trial" in r.data.tags]
    assert len(children) >= 4, [r.data.tags for r in runs]
    shots = Path(os.environ.get("SCREENSHOT_DIR") or tmp_path)
    driver = start_chromium(1400, 700)
    try:
        text, picked = compare_in_ui(
            driver,
            team["server"].url,
            [r.info.run_id for r in children],
            exp.experiment_id,
            ["train.lr", "train.label_smoothing"],
            "val_accuracy",
            shots,
        )
    finally:
        driver.quit()
    assert sorted(picked) == ["train.label_smoothing", "train.lr"]  # what the trials vary
    assert f"Comparing {len(children)} Runs" in text and "val_accuracy" in text
    assert "enough unique data points" not in text  # the contour has the trials to draw
    for r in children:
        assert r.data.tags["mlflow.runName"] in text  # each trial, named after its experiment
    for png in ("sweep-parallel-coordinates.png", "sweep-contour.png"):
        assert (shots / png).stat().st_size > 20_000  # a drawn page, not a blank one


# running trials of a study with a heartbeat recorded (Optuna's tables)
BEATING_TRIALS = """
SELECT count(*) FROM trial_heartbeats h JOIN trials t ON t.trial_id = h.trial_id
JOIN studies s ON s.study_id = t.study_id WHERE s.study_name = '{study}' AND t.state = 'RUNNING'
"""


@pytest.mark.slow
def test_a_killed_worker_leaves_a_failed_trial_and_the_study_completes(team, clones):
    import optuna

    (a, env_a), (b, env_b) = clones
    victim = worker(b, env_b, "kill", team["optuna"], 4)
    deadline = time.monotonic() + 300
    lines = []
    while time.monotonic() < deadline:  # until the victim has started a trial
        line = victim.stdout.readline()
        lines.append(line)
        if "sweep: trial" in line or victim.poll() is not None:
            break
    assert victim.poll() is None, "".join(lines)
    # mid-trial for Optuna too: the trial's heartbeat recorded (a trial that never beat is
    # never taken for a dead worker's)
    deadline = time.monotonic() + 60
    while not query(team["pg"], "optuna", BEATING_TRIALS.format(study="kill"))[0][0]:
        assert victim.poll() is None and time.monotonic() < deadline, "".join(lines)
        time.sleep(0.2)
    os.killpg(victim.pid, signal.SIGKILL)  # the worker and its trial's processes
    victim.wait()
    survivor = worker(a, env_a, "kill", team["optuna"], 4)
    out = survivor.communicate(timeout=900)[0]
    assert survivor.returncode == 0, out[-3000:]
    trials = trials_of(team["optuna"], "kill", team["pg"])
    states = [t.state for t in trials]
    assert optuna.trial.TrialState.FAIL in states  # failed by the heartbeat
    assert optuna.trial.TrialState.RUNNING not in states
    finished = [s for s in states if s in (optuna.trial.TrialState.COMPLETE,
                                           optuna.trial.TrialState.FAIL)]  # fmt: skip
    assert len(finished) >= 4
    assert sorted(t.number for t in trials) == list(range(len(trials)))  # numbered, once each


# --- sweep.yaml's schema (pydantic, as params.yaml's) -------------------------------------------


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("train.lr: 0.01\n", "train.lr: expected {low, high} or {choices: [...]}"),
        ("train.lr: {low: 0.001}\n", "train.lr: expected numbers low and high, got"),
        ("train.lr: {low: '0.001', high: 0.01}\n", "train.lr: expected numbers low and high"),
        ("train.lr: {low: 0.001, high: 0.01, step: 0}\n", "train.lr: step: input should be"),
        ("train.lr: {low: 0.001, high: 0.01, log: 2}\n", "train.lr: log: input should be"),
        ("train.lr: {choices: [0.1], low: 0}\n", "train.lr: unknown field 'low'"),
        ("train.lr: {choices: 0.1}\n", "train.lr: expected {choices: [a non-empty list]}"),
        ("train.epochs: {low: 6, high: 2}\n", "train.epochs: low 6 is not below high 2"),
        ("1: {low: 1, high: 2}\n", "expected a mapping of params.yaml keys"),
        ("train.lr: {choices: [0.1, -1]}\n", "train.lr=-1: train.lr: input should be greater"),
    ],
    ids=["scalar", "missing", "string", "step", "log", "mixed", "choices", "ints", "key", "value"],
)
def test_the_schema_names_the_key_and_what_was_expected(tmp_path, text, says):
    with pytest.raises(SweepError) as e:
        space_of(tmp_path, text)
    said = str(e.value)
    assert said.startswith(f"{tmp_path / 'sweep.yaml'}: ") and "\n" not in said
    assert says in said, said
