"""A workspace for the gate's tests: a git repository on `main` holding the project's dvc.yaml,
.gitignore and a params.yaml with the test's gates (committed), fake MNIST-shaped data, and its
own SQLite registry. Versions are registered through the real evaluate stage.

The models are real MLPs with hand-set weights, so their accuracy is exact: on the fake data
each digit is a bright bar at its own rows, and the network sums each bar's pixels. A "decoy"
unit reads noise pixels of row 27 (never a bar) and pushes its weight onto digit 0: with the
decoy's weight chosen from the test images, exactly `wrong` images flip to 0, and a model with
more wrong images gets every image of a model with fewer wrong too (nested errors)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
import yaml

from helpers import ROOT, init_git, make_fake_mnist

NAME = "mnist-mlp"
N_TEST = 2000  # one image = 0.05 accuracy points
SCALE = 20.0  # logit of a bar fully lit


def write_params(root: Path, gates: dict) -> dict:
    """A whole params file (every key, as DVC's `-S` wants), with these gates."""
    from digits.core.config import Params

    raw = Params().model_dump(mode="json")
    raw["data"].update(val_size=100, seed=0)
    raw["evaluate"].update(misclassified_shown=6)
    raw["gates"].update(gates)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return raw


def make_repo(root: Path, gates: dict) -> Path:
    """A git repository with the project's dvc.yaml and .gitignore and these gates, committed
    on main."""
    root.mkdir(parents=True)
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy(ROOT / name, root / name)
    write_params(root, gates)
    return init_git(root, "Ada", "ada@example.com")


def make_workspace(root: Path, gates: dict) -> None:
    """make_repo, then the data and a history (what the stages before evaluate leave); the
    caller chdirs into it."""
    from digits.core.files import DATA_SUMMARY, HISTORY, TEST_DATA, TRAIN_DATA
    from digits.core.reports import Epoch, write_history
    from digits.data.preprocess import preprocess

    make_repo(root, gates)
    # the pipeline's outputs (dvc.yaml outs): not uncommitted changes to the project
    raw = make_fake_mnist(root / "data/raw", n_train=200, n_test=N_TEST)
    preprocess(raw, root / TRAIN_DATA, root / TEST_DATA, root / DATA_SUMMARY, 100, 0)
    row = Epoch(
        epoch=1, train_loss=0.1, train_accuracy=1.0, val_loss=0.1, val_accuracy=1.0, lr=0.01
    )
    write_history(root / HISTORY, [row])


def workspace_params(root: Path):
    """The params in `root`'s params.yaml, parsed as the stages parse them."""
    from digits.core.config import parse_params

    return parse_params(yaml.safe_load((root / "params.yaml").read_text()))


def enter_workspace(tmp_path: Path, monkeypatch, gates: dict):
    """make_workspace at tmp_path/project, then work in it: its folder as the cwd, outside any
    DVC experiment, with its own SQLite store. Returns (root, its params)."""
    import mlflow

    root = tmp_path / "project"
    make_workspace(root, gates)
    monkeypatch.chdir(root)
    for var in ("DVC_ROOT", "DVC_EXP_NAME"):
        monkeypatch.delenv(var, raising=False)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)  # a URI set by an earlier test would win over the env
    return root, workspace_params(root)


def heldout_set() -> tuple[np.ndarray, np.ndarray]:
    from digits.core.files import TEST_DATA
    from digits.data.preprocess import load_split

    x, y = load_split(TEST_DATA, "test")
    return x.numpy().astype(np.float64), y.numpy()


def bar_pixels(digit: int) -> np.ndarray:
    rows = range(2 + 2 * digit, 4 + 2 * digit)  # where make_fake_mnist draws the bar
    return np.array([r * 28 + c for r in rows for c in range(4, 24)])


NOISE = np.arange(27 * 28, 27 * 28 + 12)  # in row 27, never a bar: noise only


def hand_model(wrong: int = 0, variant: str = "") -> torch.nn.Sequential:
    """784 -> 11 -> 10: units 0-9 average the bars, unit 10 is the decoy. `wrong` test images
    are misclassified as 0; variant "crippled" never predicts 9, "garbage" predicts 0 always."""
    from digits.model.network import build_mlp

    w1 = np.zeros((11, 784))
    for d in range(10):
        w1[d, bar_pixels(d)] = 1 / len(bar_pixels(d))
    w1[10, NOISE] = np.random.default_rng(0).uniform(0.5, 1.5, len(NOISE))
    w2, b2 = SCALE * np.eye(10, 11), np.zeros(10)
    if wrong:
        x, y = heldout_set()
        h = x[y != 0] @ w1.T
        true = h[np.arange(len(h)), y[y != 0]]
        # image i flips to 0 when decoy_weight * decoy_i > SCALE * (bar_true_i - bar_0_i)
        margin = np.sort(SCALE * (true - h[:, 0]) / h[:, 10])
        lo, hi = margin[wrong - 1], margin[wrong]
        assert hi - lo > 1e-4 * hi, "two test images too close to tell apart"
        w2[0, 10] = (lo + hi) / 2
    if variant == "crippled":
        b2[9] = -1e4
    elif variant == "garbage":
        w2[:] = 0
    model = build_mlp([11])
    with torch.no_grad():
        model[0].weight.copy_(torch.from_numpy(w1))
        model[0].bias.zero_()
        model[2].weight.copy_(torch.from_numpy(w2))
        model[2].bias.copy_(torch.from_numpy(b2))
    return model.eval()


def register(params, wrong: int = 0, variant: str = "") -> str:
    """Save a hand-set model as the train stage would and run the real evaluate stage, which
    logs it and registers a new version; return that version (the newest of that model file:
    the one the gate judges)."""
    from mlflow import MlflowClient

    from digits.core.files import MODEL
    from digits.data.preprocess import file_digest
    from digits.model.network import save_model
    from digits.stages import evaluate
    from digits.tracking import registry

    save_model(hand_model(wrong, variant), MODEL, [11], 0.0)
    evaluate.run(params)
    return registry.version_of_model(MlflowClient(), NAME, file_digest(MODEL))


def aliases(client) -> dict:
    return {k: str(v) for k, v in client.get_registered_model(NAME).aliases.items()}
