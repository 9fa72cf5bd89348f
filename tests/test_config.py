"""params.yaml validation: every bad value stops a stage before any work, with one line that
names the key and says what was expected. And the environment variables: each declared once
(digits.core.settings), listed in docs/settings.md, read only through there and only when used."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
import yaml

from digits.core import numerics, settings
from digits.core.config import ConfigError, Params, TrainParams, flat_params, load_params
from helpers import ROOT, run

# (YAML text, the dotted key the message must name, words of what was expected)
BAD = {
    "unknown key": ("train:\n  epochz: 3\n", "train.epochz", "unknown key"),
    "unknown section": ("trian:\n  epochs: 3\n", "trian", "unknown key"),
    "wrong type": ("train:\n  epochs: ten\n", "train.epochs", "valid integer"),
    "float as int": ("train:\n  batch_size: 2.5\n", "train.batch_size", "valid integer"),
    "string as float": ("train:\n  lr: '0.1'\n", "train.lr", "valid number"),
    "negative lr": ("train:\n  lr: -0.001\n", "train.lr", "greater than 0"),
    "empty hidden_sizes": ("train:\n  hidden_sizes: []\n", "train.hidden_sizes", "at least 1"),
    "zero layer size": (
        "train:\n  hidden_sizes: [256, 0]\n",
        "train.hidden_sizes",
        "positive layer sizes",
    ),
    "zero epochs": ("train:\n  epochs: 0\n", "train.epochs", "greater than or equal to 1"),
    "dropout 1": ("train:\n  dropout: 1.0\n", "train.dropout", "less than 1"),
    "beta out of range": ("train:\n  betas: [0.9, 1.5]\n", "train.betas", "[0, 1)"),
    "unknown schedule": ("train:\n  schedule: linear\n", "train.schedule", "'cosine'"),
    "val_size too small": (
        "data:\n  val_size: 5\n",
        "data.val_size",
        "greater than or equal to 10",
    ),
    "val_size too large": (
        "data:\n  val_size: 50000\n",
        "data.val_size",
        "less than or equal to 30000",
    ),
    "augment scale order": (
        "train:\n  augment:\n    scale: [1.2, 0.8]\n",
        "train.augment.scale",
        "low <= high",
    ),
    "section not a mapping": ("train: 5\n", "train", "dictionary"),
}


def test_default_params_file_validates():
    params = load_params(ROOT / "params.yaml")
    assert isinstance(params, Params)
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    # every value in the file is what the model holds (nothing dropped or coerced away)
    flat = flat_params(params)
    assert flat["train.hidden_sizes"] == raw["train"]["hidden_sizes"]
    assert flat["train.epochs"] == raw["train"]["epochs"]
    assert flat["data.val_size"] == raw["data"]["val_size"]


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_value_names_key_and_expectation(tmp_path, case):
    text, key, expected = BAD[case]
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_params(path)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: {key}: "), msg
    assert expected in msg, msg


def test_several_errors_report_first_and_count(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  lr: -1\n  epochs: 0\n  dropout: 2\n")
    with pytest.raises(ConfigError) as err:
        load_params(path)
    msg = str(err.value)
    # the first error in the schema's order is named, the others counted
    assert ": train.dropout: " in msg and msg.endswith("(and 2 more)")


def test_missing_and_unparsable_files(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_params(bad)


def test_valid_values_are_accepted(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  lr: 1\n  hidden_sizes: [8]\n  schedule: none\n")
    p = load_params(path).train
    assert p.lr == 1.0 and p.hidden_sizes == (8,) and p.schedule == "none"
    assert p.epochs == TrainParams().epochs  # unspecified keys keep their defaults


def _project(tmp_path, text: str, name: str = "params.yaml") -> set[Path]:
    """A project folder holding `text` as its params file; returns the paths now in it."""
    (tmp_path / name).write_text(text)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")  # the project root marker
    return {p.relative_to(tmp_path) for p in tmp_path.rglob("*")}


@pytest.mark.parametrize("how", ["pipeline-script", "cli-params-option"])
def test_cli_stops_before_any_work(tmp_path, fake_raw, how):
    # Processed data is present, so with good params the stage would train and write files.
    from digits.data.preprocess import preprocess

    processed = tmp_path / "data/processed"
    preprocess(
        fake_raw,
        processed / "train.npz",
        processed / "test.npz",
        tmp_path / "reports/data.json",
        val_size=100,
        seed=0,
    )
    bad = "train:\n  epochs: 1\n  lr: -0.5\n"
    if how == "pipeline-script":
        before = _project(tmp_path, bad)
        cmd = [sys.executable, str(ROOT / "pipeline/train.py")]
    else:
        before = _project(tmp_path, bad, "bad.yaml")
        cmd = [sys.executable, "-m", "digits.cli", "--params", "bad.yaml", "train"]
    proc = run(cmd, tmp_path, check=False, timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("digits train: error: ")
    assert "train.lr" in lines[0] and "greater than 0" in lines[0]
    after = {p.relative_to(tmp_path) for p in tmp_path.rglob("*")}
    assert after == before  # no models/, reports/train_history.csv, .checkpoints/ created


def test_download_stage_validates_before_network(tmp_path):
    # the mirror is a closed port: a download attempt would fail with another message
    before = _project(tmp_path, "data:\n  seed: -1\n")
    proc = run(
        [sys.executable, str(ROOT / "pipeline/download.py")],
        tmp_path,
        check=False,
        env={"MNIST_MIRROR": "http://127.0.0.1:9/"},
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "digits download: error: params.yaml: data.seed: input should be greater than or "
        "equal to 0, got -1"
    ]
    assert {p.relative_to(tmp_path) for p in tmp_path.rglob("*")} == before  # no data/raw


# --- environment variables ---------------------------------------------------------------------


def test_every_environment_variable_is_in_the_docs_with_its_default():
    doc = (ROOT / "docs" / "settings.md").read_text()
    for group in settings.GROUPS.values():
        for var in group:
            default = str(var.default).lower() if isinstance(var.default, bool) else var.default
            shown = "unset" if default is None else f"`{default}`"
            assert f"| `{var.name}` | {shown} |" in doc, var.name
    for name in [
        *numerics.PINS,
        *numerics.SPEED,
        *settings.MLFLOW_CLIENT_DEFAULTS,
    ]:  # what the project sets
        assert f"| `{name}` |" in doc, name
    assert f"| `{numerics.SWITCH}` | `1` |" in doc  # what the served model's code reads


def environment_reads(path: Path) -> list[int]:
    """Lines of `path` that read the environment: os.getenv(...), os.environ.get(...),
    os.environ[...] (not a write), `... in os.environ`."""

    def environ(node: ast.AST) -> bool:
        return isinstance(node, ast.Attribute) and node.attr == "environ"

    lines = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            f = node.func
            if f.attr == "getenv" or (f.attr == "get" and environ(f.value)):
                lines.append(node.lineno)
        elif isinstance(node, ast.Subscript) and environ(node.value):
            if isinstance(node.ctx, ast.Load):
                lines.append(node.lineno)
        elif isinstance(node, ast.Compare) and any(environ(c) for c in node.comparators):
            lines.append(node.lineno)
    return lines


# modules that read the environment themselves, and why
READ_ELSEWHERE = {
    "core/settings.py": "the one place",
    # shipped in the registered model (digits.tracking.pyfunc.SERVED_MODULES), with its own
    # few requirements: they import nothing of the project's but each other and errors
    "core/numerics.py": "DIGITS_PORTABLE_NUMERICS, and the library pins it sets",
    "core/blas.py": "OPENBLAS_NUM_THREADS, OPENBLAS_CORETYPE",
    "tracking/runs.py": "numerics_tags records the library pins in force",
}


def test_no_module_reads_the_environment_but_through_settings():
    package = ROOT / "src" / "digits"
    reads = {
        path.relative_to(package).as_posix(): lines
        for path in sorted(package.rglob("*.py"))
        if (lines := environment_reads(path))
    }
    assert set(reads) <= set(READ_ELSEWHERE), reads
    # and the checker finds a read
    assert environment_reads(ROOT / "tests" / "helpers.py")


def test_a_bad_variable_is_one_line_naming_it_and_read_when_asked(monkeypatch):
    monkeypatch.setenv("DIGITS_SWEEP_HEARTBEAT", "soon")
    with pytest.raises(settings.SettingsError) as e:
        settings.DIGITS_SWEEP_HEARTBEAT.get()
    assert str(e.value) == "DIGITS_SWEEP_HEARTBEAT: expected a whole number, got 'soon'"
    monkeypatch.setenv("DIGITS_SWEEP_HEARTBEAT", "0")
    with pytest.raises(settings.SettingsError, match="expected a positive whole number, got '0'"):
        settings.DIGITS_SWEEP_HEARTBEAT.get()
    assert settings.DIGITS_SWEEP_GRACE.get() == 30  # another variable reads on
    monkeypatch.setenv("DIGITS_SWEEP_HEARTBEAT", "")  # empty: unset, the default
    assert settings.DIGITS_SWEEP_HEARTBEAT.get() == 10
    monkeypatch.setenv("DIGITS_SWEEP_HEARTBEAT", "3")  # read when asked, not at import
    assert settings.DIGITS_SWEEP_HEARTBEAT.get() == 3
    assert settings.MNIST_TIMEOUT.get({"MNIST_TIMEOUT": "2.5"}) == 2.5  # or from a mapping
    assert settings.MLFLOW_TRACKING_INSECURE_TLS.get({"MLFLOW_TRACKING_INSECURE_TLS": "TRUE"})


def test_importing_reads_no_variable(tmp_path):
    """A bad value stops what uses it, not an import (sweep.py read one at import once)."""
    bad = {"DIGITS_SWEEP_HEARTBEAT": "soon", "MNIST_TIMEOUT": "-1", "MLFLOW_TRACKING_URI": ""}
    code = "import digits.sweep.study, digits.data.download, digits.tracking.store, digits.cli"
    run([sys.executable, "-c", code], cwd=tmp_path, env=bad)


def test_the_registered_models_code_imports_only_itself():
    """numerics and blas read their variables themselves (not through digits.core.settings):
    they are shipped in every registered model, which has none of the project's other code."""
    from digits.tracking.pyfunc import SERVED_MODULES
    from test_stage_deps import SRC, imported_modules, module_file

    package = SRC / "digits"
    served = {package / m for m in SERVED_MODULES}
    for path in served:
        files = {module_file(name) for name in imported_modules(path)} - {None}
        assert files <= served, (path, files - served)
