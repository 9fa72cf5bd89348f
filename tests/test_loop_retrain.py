"""The production loop's second half on real parts (docs/production-loop.md, issue item 5): in a
fresh git repository holding the pipeline, `dvc repro` makes and promotes a champion, and a
running `digits app` follows `@champion`. Digits in a style the champion reads poorly (strokes
much thicker) come in; two sources correct them; `digits feedback review` approves the
corrections by the default rule and `digits feedback export` writes them into feedback/ and
tracks them with DVC; committed with `train.feedback.weight` > 0, `dvc repro` retrains, the gate
promotes the new version (better on the feedback hold-out, not significantly worse on MNIST),
the service switches to it, and fresh digits of the same style are read better. Then the
poisoning case: a flood of wrong labels for the same style from one source, which the review
rule leaves pending, forced in (a reviewer approves the lot) -> export -> `dvc repro` -> the gate
refuses the version (its check on the champion's own hold-out) and `@champion` stays.

Kept cheap: one epoch of training per run (tests/helpers.py SHORT_RUN, its absolute gates
relaxed to what one epoch reaches), a few hundred pictures through the service."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time

import numpy as np
import pytest

from helpers import SHORT_RUN, dvc, git, make_project, project_env, set_params
from service import DIGITS, NAME, App, request, wait_for
from test_loop import logged, png

pytestmark = pytest.mark.slow

CORRECTED = 400  # shifted pictures sent and corrected by two sources
FRESH = 300  # shifted test digits, read before and after the retraining
POISON = 500  # wrongly labelled pictures forced into the export
WEIGHT = 10  # train.feedback.weight: copies of each correction in training


def thickest(x: np.ndarray) -> np.ndarray:
    """Strokes two pixels thicker each way (a 5x5 max filter): a pen much broader than any
    MNIST writer's, a style the champion reads poorly."""
    img = x.reshape(-1, 28, 28)
    p = np.pad(img, ((0, 0), (2, 2), (2, 2)))
    return np.max([p[:, r : r + 28, c : c + 28] for r in range(5) for c in range(5)], axis=0)


def digits(project, env, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([DIGITS, *args], cwd=project, env={**os.environ, **env}, text=True,
                          capture_output=True, timeout=600)  # fmt: skip
    assert not check or done.returncode == 0, done.stdout + done.stderr
    return done


def champion(client) -> str:
    return str(client.get_model_version_by_alias(NAME, "champion").version)


def read_right(app: App, images: np.ndarray, labels: np.ndarray) -> int:
    """How many of `images` the service reads as their label."""
    right = 0
    for img, label in zip(images, labels, strict=True):
        status, body = request(app.url + "predict", png(img), "image/png")
        assert status == 200, body
        right += body["digit"] == int(label)
    return right


@pytest.fixture(scope="module")
def mnist():
    from digits.data.preprocess import read_pair
    from helpers import mnist_dir

    x, y = read_pair(mnist_dir(), "train")
    tx, ty = read_pair(mnist_dir(), "t10k")
    return x.reshape(-1, 784), y.astype(np.int64), tx.reshape(-1, 784), ty.astype(np.int64)


def test_corrections_retrain_a_better_champion_and_poison_is_stopped(tmp_path, mnist_http, mnist):
    from mlflow import MlflowClient

    x, y, tx, ty = mnist
    start = time.monotonic()
    phase = lambda what: print(f"{what}: {time.monotonic() - start:.0f} s")  # noqa: E731
    project = make_project(tmp_path / "project")
    set_params(project, **SHORT_RUN)
    git(project, "commit", "-qam", "a short run")
    env = project_env(project, mnist_http)
    dvc(project, "repro", env=env)
    git(project, "add", "-A")  # the lock and the reports, as a team commits them
    git(project, "commit", "-qm", "the first champion")
    phase("\nthe first champion")
    uri = f"sqlite:///{project / 'mlflow.db'}"
    client = MlflowClient(uri, uri)
    v1 = champion(client)
    served = {**env, "MLFLOW_TRACKING_URI": uri}

    rng = np.random.default_rng(0)
    traffic = rng.choice(len(y), CORRECTED + POISON, replace=False)  # MNIST's training images
    asked, forced = traffic[:CORRECTED], traffic[CORRECTED:]
    fresh = rng.choice(len(ty), FRESH, replace=False)  # test digits: never trained on
    # the service runs beside the repository, not in it (its log would be uncommitted changes,
    # and only a clean run of main promotes)
    service = tmp_path / "service"
    service.mkdir()
    log = service / "predictions.db"
    with App(["--log-db", str(log), "--follow-interval", "0.5"], served, service, 1) as app:
        assert app.health()["version"] == v1
        before = read_right(app, thickest(tx[fresh]), ty[fresh])
        answers = []
        for img, label in zip(thickest(x[asked]), y[asked], strict=True):
            status, body = request(app.url + "predict", png(img), "image/png")
            assert status == 200, body
            answers.append((body["prediction_id"], int(label)))
        wait_for("the answers in the log", lambda: logged(log) == FRESH + CORRECTED)
        for pid, label in answers:  # two people say what each one is
            for source in ("10.0.0.1", "10.0.0.2"):
                body = json.dumps({"prediction_id": pid, "label": label}).encode()
                status, said = request(app.url + "feedback", body, "application/json",
                                       {"X-Forwarded-For": source})  # fmt: skip
                assert status == 201, said

        phase("corrections sent")
        # review -> export (dvc add) -> commit -> dvc repro
        done = digits(project, served, "feedback", "review", "--log-db", str(log))
        assert f"{2 * CORRECTED} correction(s) approved by the rule" in done.stdout
        done = digits(project, served, "feedback", "export", "--log-db", str(log))
        assert f"{CORRECTED} approved example(s) -> feedback/examples.npz (written)" in done.stdout
        assert "commit feedback/examples.npz.dvc" in done.stdout
        status = git(project, "status", "--porcelain", "--untracked-files=all", "feedback")
        assert status.splitlines() == ["?? feedback/examples.npz.dvc"], status  # the data: DVC's
        git(project, "add", "feedback/examples.npz.dvc")
        set_params(project, **{"train.feedback.weight": WEIGHT})
        git(project, "commit", "-qam", f"feedback: {CORRECTED} approved corrections, weight")
        out = dvc(project, "repro", env=env).stdout
        for stage in ("train", "evaluate", "gate"):
            assert f"Running stage '{stage}'" in out
        phase("retrained")
        v2 = champion(client)
        assert v2 != v1, (project / "reports/gate.md").read_text()
        report = (project / "reports/gate.md").read_text()
        # better on the hold-out of the corrections, and not significantly worse on MNIST
        fed = json.loads((project / "reports/feedback.json").read_text())
        assert fed["examples"] == CORRECTED and 80 <= fed["holdout_size"] <= 160, fed
        m = re.search(rf"vs champion v{v1} on \d+ held-out corrections: accuracy "
                      r"([\d.]+) vs ([\d.]+)", report)  # fmt: skip
        assert m and float(m[1]) > float(m[2]), report
        assert float(m[1]) == pytest.approx(fed["accuracy"], abs=5e-5)
        assert re.search(r"^\| not_worse_than_champion \|.*\| pass \|$", report, re.M), report
        assert "feedback_not_worse_on_champions_holdout" not in report  # v1 was judged on none
        git(project, "add", "-A")
        git(project, "commit", "-qm", "the retrained champion")

        # the running service follows @champion to the new version
        wait_for(f"the service on version {v2}", lambda: app.health()["version"] == v2,
                 log=app.text)  # fmt: skip
        phase("the service switched")
        after = read_right(app, thickest(tx[fresh]), ty[fresh])
        phase("fresh digits read again")
        print(f"\nfresh thick digits read right: v{v1} {before}/{FRESH}, v{v2} {after}/{FRESH}; "
              f"hold-out accuracy {m[2]} -> {m[1]}")  # fmt: skip
        assert after > before

        # poisoning: a flood of wrong labels for the same style, from one source
        sent = []
        for img in thickest(x[forced]):
            status, body = request(app.url + "predict", png(img), "image/png")
            assert status == 200, body
            sent.append(body["prediction_id"])
        # a correction waits for its answer in the log: all of them first, then the flood
        wait_for("the answers in the log", lambda: logged(log) == 2 * FRESH + CORRECTED + POISON)
        for pid, label in zip(sent, y[forced], strict=True):
            wrong = json.dumps({"prediction_id": pid, "label": int(label + 1) % 10}).encode()
            status, said = request(app.url + "feedback", wrong, "application/json",
                                   {"X-Forwarded-For": "10.6.6.6"})  # fmt: skip
            assert status == 201, said

    phase("poison sent")
    from digits.monitor import review

    done = digits(project, served, "feedback", "review", "--log-db", str(log))
    assert f"{POISON} pending, {2 * CORRECTED} approved" in done.stdout  # the rule: not one
    # forced in past the rule: a reviewer approves the lot
    eng = review.engine(f"sqlite:///{log}")
    pending = [str(c.id) for c in review.corrections(eng) if c.decision is None]
    eng.dispose()
    digits(project, served, "feedback", "review", "--log-db", str(log), "--approve", *pending)
    done = digits(project, served, "feedback", "export", "--log-db", str(log))
    assert f"{CORRECTED + POISON} approved example(s)" in done.stdout, done.stdout
    git(project, "commit", "-qam", "feedback: forced in")
    phase("poison exported")
    done = dvc(project, "repro", env=env, check=False)
    said = done.stdout + done.stderr
    assert done.returncode != 0 and "Running stage 'gate'" in said, said[-3000:]
    failed = re.search(r"digits gate: error: failed gates: (.*)", said)
    assert failed, said[-3000:]
    phase("poisoned version judged")
    report = (project / "reports/gate.md").read_text()
    print(f"poisoned: {failed[1]}\n{report}")
    # the poisoned hold-out vouches for the poison; the champion's own hold-out does not
    assert "feedback_not_worse_on_champions_holdout: " in failed[1], failed[1]
    assert "uncommitted" not in report  # a clean run of main: it would have promoted
    assert champion(client) == v2
    newest = max(client.search_model_versions(f"name='{NAME}'"), key=lambda v: int(v.version))
    assert int(newest.version) > int(v2) and newest.tags["validation_status"] == "rejected"
