"""The model card (digits.scoring.card): Hugging Face's format (YAML metadata with a
`model-index`, then Markdown), every figure of evaluate, the same bytes for the same inputs,
and on a registered version of a real MLflow store: the run's artifact and the description's
gist under the gate's words, within MLflow's 5,000 characters."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from digits.core.config import Params
from digits.core.metrics import Evaluation
from digits.gate.policy import Check
from digits.model import ood
from digits.scoring import card

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"optdigits": "a" * 64, "china.jpg": "b" * 64}
DATA = {"train.npz": "c" * 64, "test.npz": "d" * 64}


@pytest.fixture(scope="module")
def figures() -> tuple[Evaluation, dict]:
    ev = Evaluation.from_dict(json.loads((ROOT / "reports/metrics.json").read_text()))
    eye = np.eye(10)
    digits = {"printed": (eye[[1, 2, 3, 4]] * 0.9 + 0.01, np.array([1, 2, 3, 5]))}
    wild = ood.measure_wild(digits, {"shapes": np.full((4, 10), 0.1)}, 0.5)
    return ev, wild


def _render(figures, checks=()) -> str:
    ev, wild = figures
    return card.render(
        Params(),
        ev,
        wild,
        checks=list(checks),
        branch="main",
        model_sha256="e" * 64,
        data_sha256=DATA,
        sources_sha256=SOURCES,
    )


def test_the_card_is_hugging_face_metadata_then_markdown(figures):
    text = _render(figures)
    assert text.startswith("---\n")
    front, body = text[4:].split("\n---\n", 1)
    meta = yaml.safe_load(front)
    (entry,) = meta["model-index"]
    assert entry["name"] == "mnist-mlp"
    mnist = entry["results"][0]
    assert mnist["dataset"]["type"] == "mnist"
    values = {m["name"]: m["value"] for m in mnist["metrics"]}
    assert values["Test accuracy"] == 0.9913
    assert values["Worst corruption accuracy (occlusion)"] == 0.9566
    printed = next(r for r in entry["results"] if r["dataset"]["type"] == "digits-wild-printed")
    assert {m["name"]: m["value"] for m in printed["metrics"]} == {"Read right": 0.75, "Refused": 0}
    assert body.lstrip().startswith("# mnist-mlp")


def test_every_figure_of_evaluate_and_every_hash_is_in_it(figures):
    ev, _ = figures
    text = _render(figures)
    assert ev.robustness and ev.ood
    for name in (*ev.robustness.corruptions, *ev.ood.refused, "printed", "shapes"):
        assert f"| {name} |" in text, name
    for sha in (*card.MNIST_SHA256.values(), *DATA.values(), *SOURCES.values(), "e" * 64):
        assert sha in text
    for heading in ("## Intended use", "## Known limits", "## Outside MNIST", "## How it was"):
        assert heading in text
    assert "75.00%" in text and "25.00%" in text  # printed: 3 of 4 read, 1 misread
    assert "(printed digits most of all: 75.00% read right)" in text


def test_the_same_inputs_give_the_same_bytes_and_no_clock(figures):
    assert _render(figures) == _render(figures)
    assert not re.search(r"20\d\d-\d\d-\d\d|\d\d:\d\d:\d\d", _render(figures))


def test_the_gates_as_judged_say_which_failed(figures):
    checks = [
        Check(gate="min_accuracy", metric="accuracy", value=0.9913, threshold=0.99, op=">="),
        Check(gate="min_wild_read", metric="printed", value=0.75, threshold=0.82, op=">="),
    ]
    text = _render(figures, checks)
    assert "| `min_accuracy` | accuracy | 0.9913 | >= 0.9900 | yes |" in text
    assert "| `min_wild_read` | printed | 0.7500 | >= 0.8200 | **no** |" in text


def test_the_gist_leaves_out_the_front_matter_and_fits(figures):
    text = _render(figures)
    gist = card.short(text)
    assert not gist.startswith("---") and "model-index" not in gist
    assert "## Outside MNIST" in gist and "| printed |" in gist
    assert "## Training data" not in gist and "e" * 64 in gist  # the model's hash stays
    tight = card.short(text, 900)
    assert len(tight) <= 900 and tight.endswith("registered it.")


def test_attach_puts_the_card_on_the_version_under_the_gate_words(tmp_path, figures):
    from mlflow.tracking import MlflowClient

    from digits.tracking.store import open_store

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    store = open_store("cards", uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run = client.create_run(store.experiment_id)
    client.create_registered_model("m")
    version = client.create_model_version("m", f"{run.info.artifact_uri}/model", run.info.run_id)
    path = tmp_path / "model_card.md"
    path.write_text(_render(figures) + "\n" + "x" * 9000)  # longer than a description may be
    client.update_model_version("m", version.version, "Gate: APPROVED.")

    for _ in range(2):  # again (evaluate rerun): one card, not two
        card.attach(store, "m", version.version, run.info.run_id, path)
        text = client.get_model_version("m", version.version).description
        assert text.startswith("Gate: APPROVED.") and text.count(card.CARD_MARK) == 1
        assert "## Outside MNIST" in text and len(text) <= 5000
    names = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert names == ["model_card.md"]
