"""The MLflow UI as a user meets it: `mlflow ui` on a store with two pipeline runs from two
commits, looked at in Debian's headless Chromium. The runs table names each run after its
branch and commit and shows its datasets; the run page explains its params against main's; the
model page shows the @champion alias and what the model takes and returns.

With SCREENSHOT_DIR set (e.g. `SCREENSHOT_DIR=docs pytest tests/test_mlflow_ui.py`), the runs
table is saved there as mlflow-runs.png: the picture in the README and docs/mlflow.md."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from helpers import (
    git,
    init_git,
    make_trained_project,
    registered,
    run,
    set_params,
    start_chromium,
    wait_still,
)

pytestmark = pytest.mark.slow

WAIT_S = 90  # for a page to show what it should (the machines running the tests are busy)


def stages(project: Path, uri: str, *names: str) -> dict:
    """The real stages, as DVC would run them (but with no experiment name)."""
    env = {"MLFLOW_TRACKING_URI": uri, "DVC_EXP_NAME": "", "DVC_ROOT": ""}
    for name in names:
        run([sys.executable, "-m", "digits.cli", name], project, env=env)
    return registered(project, uri)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    """Two runs: one on main, one on a branch with one param changed; version 1 @champion."""
    from mlflow import MlflowClient

    base = tmp_path_factory.mktemp("ui")
    project = make_trained_project(base / "project")
    init_git(project)
    uri = f"sqlite:///{base / 'store' / 'mlflow.db'}"
    first = stages(project, uri, "train", "evaluate")
    git(project, "checkout", "-qb", "more-errors")
    set_params(project, **{"evaluate.misclassified_shown": 12})
    git(project, "commit", "-qam", "show more misclassified digits")
    second = stages(project, uri, "evaluate")  # the same model: evaluate alone reruns
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.set_registered_model_alias("mnist-mlp", "champion", first["version"])
    names = [client.get_run(r["run_id"]).info.run_name for r in (first, second)]
    return {"uri": uri, "runs": [first, second], "names": names, "project": project}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ui(store, tmp_path_factory) -> str:
    """`mlflow ui` on 127.0.0.1 against the store; its URL once /health answers."""
    port = free_port()
    log = tmp_path_factory.mktemp("ui-log") / "mlflow-ui.log"
    mlflow_cli = Path(sys.executable).parent / "mlflow"
    cmd = [str(mlflow_cli), "ui", "--backend-store-uri", store["uri"]]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    with open(log, "wb") as out:
        # its own process group, so that the workers it starts are stopped with it
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=5).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"mlflow ui did not come up:\n{log.read_text()[-3000:]}")
                time.sleep(1)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and the workers it started
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    driver = start_chromium(1600, 640)  # wide enough for the table's columns in the picture
    yield driver
    driver.quit()


def wait_for_text(driver, *texts: str) -> str:
    """The page's text once it contains all of `texts` (fails after WAIT_S)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def shown(d):
        body = d.find_element(By.TAG_NAME, "body").text
        return body if all(t in body for t in texts) else False

    try:
        return WebDriverWait(driver, WAIT_S).until(shown)
    except Exception:
        body = driver.find_element(By.TAG_NAME, "body").text
        missing = [t for t in texts if t not in body]
        pytest.fail(f"{driver.current_url} never showed {missing}; it shows:\n{body[:2000]}")


def toggle_columns(driver, *names: str) -> None:
    """Show or hide columns of the runs table, with its Columns menu."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver.find_element(By.XPATH, "//button[.//*[text()='Columns']]").click()
    search = driver.find_element(By.CSS_SELECTOR, "input[placeholder='Search columns']")
    for name in names:
        search.send_keys(Keys.CONTROL, "a")  # clear() would not tell React the field changed
        search.send_keys(Keys.BACKSPACE, name)
        wait_for_text(driver, name)
        # the match is highlighted: the name is split over several elements
        xpath = f"//span[contains(@class, 'tree-title')][normalize-space()='{name}']"
        driver.find_element(By.XPATH, xpath).click()
    search.send_keys(Keys.ESCAPE)


def test_runs_table_names_runs_and_shows_datasets(store, ui, browser, tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=store["uri"])
    first, second = store["runs"]
    main_name, branch_name = store["names"]
    project = store["project"]
    commits = [git(project, "rev-parse", ref)[:7] for ref in ("main", "more-errors")]
    assert store["names"] == [f"main@{commits[0]}", f"more-errors@{commits[1]}"]
    inputs = client.get_run(first["run_id"]).inputs.dataset_inputs
    digest = next(i.dataset.digest for i in inputs if i.dataset.name == "mnist-train")

    # The link the README gives: MLflow 3.17's UI opens an experiment by the workflow chosen
    # in its sidebar (GenAI unless chosen otherwise); this one picks "Model training".
    browser.get(f"{ui}/#/experiments/{first['experiment_id']}?workflowType=machine_learning")
    wait_for_text(browser, main_name)
    # close the MLflow Assistant panel, which opens on a first visit over a quarter of the page
    browser.execute_script("window.localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false')")
    browser.refresh()
    text = wait_for_text(browser, main_name, branch_name, "Dataset", f"mnist-train ({digest})")
    assert "/runs" in browser.current_url  # opened on the runs, not on traces
    assert "Training" in text  # the dataset's context
    # for the picture: how well and how long each trained, not the Source ("dvc repro")
    toggle_columns(browser, "test_accuracy", "training/seconds", "Source")
    wait_for_text(browser, "test_accuracy")
    wait_still(browser)  # the table settled before the picture
    shot = Path(os.environ.get("SCREENSHOT_DIR") or tmp_path) / "mlflow-runs.png"
    assert browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000

    # the run page: where the run came from, its params against main's
    browser.get(f"{ui}/#/experiments/{second['experiment_id']}/runs/{second['run_id']}")
    wait_for_text(
        browser,
        branch_name,
        "Params that differ from the promotion branch",
        "evaluate.misclassified_shown",
    )


def test_model_page_shows_champion_and_contract(store, ui, browser):
    name = store["runs"][0]["registered_model"]
    browser.get(f"{ui}/#/models/{name}")
    text = wait_for_text(browser, "Version 1", "Version 2", "champion", "(N, 784)")
    assert "p0" in text and "not a digit" in text  # the output table (markdown rendered)
    assert store["names"][0] in text  # each version's run_name tag
