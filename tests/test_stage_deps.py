"""dvc.yaml lists, for each stage, exactly the project code that the stage runs: editing a file
a stage runs must make `dvc status` report that stage, and nothing else may be listed. And the
library's shape: imports point one way (no circle, counting the imports inside functions),
and importing a module has no side effects.

Two views of "the code a stage runs": the static import closure of its pipeline script (every
`digits` import, at the top of a module or inside a function), which must equal the stage's code
deps; and, in the slow pipeline test, the modules each stage process really loaded, which must
be among them, and editing gate.py makes `dvc status` report the gate alone (both in
`test_pipeline.py`)."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import ROOT, run

SRC = ROOT / "src"


def module_file(name: str) -> Path | None:
    """The project file of module `name` (digits.x), or None for a third-party module."""
    if name != "digits" and not name.startswith("digits."):
        return None
    base = SRC / Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, anywhere in it (functions included)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module)
            # `from digits.tracking import runs` imports the submodule digits.tracking.runs
            out.update(f"{node.module}.{alias.name}" for alias in node.names)
    return out


# files a module runs by path rather than by import: pyfunc.py logs mlflow_model.py as the
# model's code, and MLflow executes it as the version is logged
TRACKING = SRC / "digits" / "tracking"
RUN_BY_PATH = {TRACKING / "pyfunc.py": [TRACKING / "mlflow_model.py"]}


def code_closure(script: Path, stage: str) -> set[Path]:
    """Project files reachable from a stage's script by imports (plus its parent packages)."""
    from digits.stages.runner import STAGES

    seen: set[Path] = set()
    todo = [script]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo += RUN_BY_PATH.get(path, [])
        names = imported_modules(path)
        if path == SRC / "digits" / "stages" / "runner.py":
            names.add(STAGES[stage])  # the one stage module this process imports
        for name in names:
            parts = name.split(".")
            for i in range(1, len(parts) + 1):  # importing digits.x runs digits/__init__.py too
                f = module_file(".".join(parts[:i]))
                if f is not None and f not in seen:
                    todo.append(f)
    return {p.relative_to(ROOT) for p in seen}


def declared_code_deps(stage: dict) -> set[Path]:
    """A stage's deps that are project code (.py files, or folders of them)."""
    out: set[Path] = set()
    for dep in stage.get("deps", []):
        path = ROOT / dep
        if path.is_dir() and dep.startswith(("src", "pipeline")):
            out.update(p.relative_to(ROOT) for p in path.rglob("*.py"))
        elif dep.endswith(".py"):
            out.add(Path(dep))
    return out


STAGES_YAML = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
# the models-from-code file MLflow logs with every version: importing it registers the model
# with MLflow (`set_model`), which is its job; no library module imports it
MODEL_CODE = "digits.tracking.mlflow_model"


def library_modules() -> list[str]:
    """Every module of the library, in its packages too (packages themselves left out)."""
    return sorted(
        ".".join(p.relative_to(SRC).with_suffix("").parts)
        for p in (SRC / "digits").rglob("*.py")
        if p.stem != "__init__"
    )


def import_graph() -> dict[str, set[str]]:
    """digits module -> the digits modules it imports (anywhere in it)."""
    graph = {}
    for name in library_modules():
        found = set()
        for imported in imported_modules(module_file(name)):
            if module_file(imported) is not None and imported != "digits":
                found.add(imported)
        graph[name] = found - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_imports_point_one_way():
    assert find_cycle(import_graph()) is None, " -> ".join(find_cycle(import_graph()))
    # and the check can fail: a circle added by hand is found
    graph = import_graph()
    graph["digits.core.errors"] = {"digits.tracking.runs"}
    assert find_cycle(graph) is not None


def test_the_promote_command_is_in_no_stage():
    """`digits promote` is a command over the registry: editing it must make no stage stale
    (and so reruns no evaluate, registers no version)."""
    for stage, spec in STAGES_YAML.items():
        assert "src/digits/gate/promote.py" not in spec.get("deps", []), stage
        script = ROOT / spec["cmd"].split()[-1]
        assert Path("src/digits/gate/promote.py") not in code_closure(script, stage), stage


@pytest.mark.parametrize("stage", list(STAGES_YAML))
def test_stage_code_deps_are_exact(stage):
    spec = STAGES_YAML[stage]
    script = ROOT / spec["cmd"].split()[-1]
    runs = code_closure(script, stage)
    declared = declared_code_deps(spec)
    missing = sorted(map(str, runs - declared))
    extra = sorted(map(str, declared - runs))
    assert not missing, f"stage {stage}: runs {missing} but dvc.yaml does not list them"
    assert not extra, f"stage {stage}: dvc.yaml lists {extra} but the stage never runs them"


def third_party_imports() -> list[str]:
    """The non-project modules that any digits module imports at its top level."""
    out = set()
    for path in (SRC / "digits").rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                out.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                out.add(node.module)
    return sorted(m for m in out if module_file(m) is None and m != "__future__")


PROBE = """
import importlib, json, os, sys
third_party, modules = sys.argv[1].split(","), sys.argv[2].split(",")
for dep in third_party:  # third-party modules first: their side effects are not ours
    importlib.import_module(dep)
results = {}
for name in modules:  # then each digits module (with what it imports that is not loaded yet)
    env, files = dict(os.environ), set(os.listdir())
    importlib.import_module(name)
    changed = sorted(k for k in set(env) | set(os.environ) if env.get(k) != os.environ.get(k))
    mpl = sys.modules.get("matplotlib")
    backend = mpl.rcParams._get_backend_or_none() if mpl else None
    new_files = sorted(set(os.listdir()) - files)
    results[name] = {"env": changed, "backend": backend, "files": new_files}
print(json.dumps(results))
"""


@pytest.mark.slow  # imports torch, MLflow, torchvision, FastAPI once: ~15 s
def test_importing_modules_changes_no_environment():
    """Importing any digits module changes no environment variable, selects no matplotlib
    backend and writes no file: no import-time side effects. One interpreter: the third-party
    modules are imported first, then each digits module in turn, checking after each."""
    modules = [m for m in library_modules() if m != MODEL_CODE]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "MPLBACKEND"))}
    cmd = [sys.executable, "-c", PROBE, ",".join(third_party_imports()), ",".join(modules)]
    results = json.loads(run(cmd, ROOT, env=env).stdout.strip().splitlines()[-1])
    assert set(results) == set(modules)
    clean = {"env": [], "backend": None, "files": []}
    for name, result in results.items():
        assert result == clean, f"importing {name}: {result}"


def lint_imports(src: Path, cwd: Path) -> subprocess.CompletedProcess:
    """import-linter's verdict on the `digits` package found in `src` (its contract: the
    [tool.importlinter] table of the pyproject.toml in `cwd`)."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    exe = Path(sys.executable).with_name("lint-imports")
    return subprocess.run(
        [str(exe), "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_the_layers_are_kept_and_a_wrong_arrow_is_caught(tmp_path):
    """`make lint` runs import-linter's layers contract; here it passes on the library, and fails
    on a copy in which a bottom layer imports a top one (lazily, inside a function)."""
    kept = lint_imports(SRC, ROOT)
    assert kept.returncode == 0, kept.stdout + kept.stderr
    assert "KEPT" in kept.stdout

    shutil.copytree(SRC / "digits", tmp_path / "src" / "digits")
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    errors = tmp_path / "src" / "digits" / "core" / "errors.py"
    errors.write_text(errors.read_text() + "\n\ndef _up():\n    from digits.cli import entry\n")
    broken = lint_imports(tmp_path / "src", tmp_path)
    assert broken.returncode != 0
    assert "digits.core.errors -> digits.cli" in broken.stdout, broken.stdout
