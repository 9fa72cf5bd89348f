"""requirements.lock against pyproject.toml: .ci/check_lock.py passes on the committed files and
names the package on a lock that lacks a dependency, violates a specifier or is not pinned.
Fast and offline: the checker runs as a function on temporary copies."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.lock"
PYPROJECT = ROOT / "pyproject.toml"


def _load_checker():
    spec = importlib.util.spec_from_file_location("check_lock", ROOT / ".ci" / "check_lock.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


check_lock = _load_checker()


@pytest.fixture
def copies(tmp_path) -> tuple[Path, Path]:
    """Temporary copies of pyproject.toml and requirements.lock."""
    pyproject = Path(shutil.copy(PYPROJECT, tmp_path / "pyproject.toml"))
    lock = Path(shutil.copy(LOCK, tmp_path / "requirements.lock"))
    return pyproject, lock


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path.name}"
    path.write_text(text.replace(old, new, 1))


def pinned(name: str) -> str:
    """The lock's line for `name` (its `name==version`)."""
    lines = [line for line in LOCK.read_text().splitlines() if line.startswith(f"{name}==")]
    assert len(lines) == 1, f"{name} is not locked once"
    return lines[0]


def test_the_committed_lock_matches_pyproject():
    result = check_lock.check(PYPROJECT, LOCK)
    assert result.problems == []
    assert result.checked


def test_every_line_is_pinned_and_the_project_is_left_out():
    names = [line.split("==")[0] for line in LOCK.read_text().splitlines() if "==" in line]
    assert len(names) > 100  # the transitive closure, not only the direct requirements
    assert "digits" not in names
    # bit-for-bit training: the numerics come from exactly these
    for name in ("numpy", "torch", "torchvision", "mlflow", "dvc"):
        assert pinned(name)
    assert pinned("numpy") == "numpy==2.4.6"


def test_main_prints_what_it_checked(capsys):
    assert check_lock.main(["--pyproject", str(PYPROJECT), "--lock", str(LOCK)]) == 0
    out = capsys.readouterr().out
    assert "lock check:" in out
    assert "requirements of pyproject.toml" in out


@pytest.mark.parametrize(
    ("name", "broken", "words"),
    [
        ("mlflow", "", ["does not lock it"]),  # a dependency left out
        ("numpy", "numpy==2.4.5", ["locks 2.4.5", "numpy==2.4.6"]),  # outside pyproject's pin
        ("dvc", "dvc==2.58.2", ["locks 2.58.2", "3.60"]),  # outside pyproject's range
        ("scipy", "scipy>=1.11", ["not `name==version`"]),  # a range, not a pin
        ("moto", "moto[server]==5.2.5", ["not `name==version`"]),  # extras belong in pyproject
    ],
)
def test_a_broken_lock_names_the_package(copies, name, broken, words, capsys):
    pyproject, lock = copies
    edit(lock, pinned(name) + "\n", broken + "\n" if broken else "")
    result = check_lock.check(pyproject, lock)
    assert not result.ok
    mentions = [p for p in result.problems if name in p]
    assert mentions, result.problems
    for word in words:
        assert any(word in p for p in mentions), (word, mentions)
    # the command line: one line per problem, exit 1
    assert check_lock.main(["--pyproject", str(pyproject), "--lock", str(lock)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert any(name in line for line in err[:-1])
    assert "does not match" in err[-1]


def test_a_new_requirement_in_pyproject_needs_a_new_lock(copies):
    pyproject, lock = copies
    edit(pyproject, '"psutil>=5.9",', '"psutil>=5.9",\n    "not-a-locked-package>=1",')
    edit(pyproject, '"optuna>=5,<6",', '"optuna>=6",')
    problems = check_lock.check(pyproject, lock).problems
    assert len(problems) == 2, problems
    assert "not-a-locked-package" in problems[0] and "make lock" in problems[0]
    assert "optuna" in problems[1] and "optuna>=6" in problems[1]


def test_option_lines_duplicates_and_the_project_itself_are_refused(copies):
    pyproject, lock = copies
    text = lock.read_text()
    lock.write_text(
        "--extra-index-url file:///opt/pypi/simple\n"
        + text
        + pinned("numpy")
        + "\ndigits==0.1.0\ntorch==2.14.1 ; sys_platform == 'linux'\n"
    )
    problems = "\n".join(check_lock.check(pyproject, lock).problems)
    assert "--extra-index-url" in problems
    assert "numpy is locked twice" in problems
    assert "digits: the project itself" in problems
    assert "sys_platform" in problems


def _installed(name: str) -> str:
    return f"{name}=={metadata.version(name)}"


def _closure(name: str) -> list[str]:
    """`name` and what it requires in this interpreter, transitively (no extras)."""
    found, todo = set(), [name]
    while todo:
        current = check_lock.canonicalize_name(todo.pop())
        if current in found:
            continue
        found.add(current)
        for text in metadata.requires(current) or []:
            req = check_lock.Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return sorted(found)


def _tiny_project(tmp_path, requirement: str, pins: list[str]) -> tuple[Path, Path]:
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(f'[project]\nname = "tiny"\ndependencies = ["{requirement}"]\n')
    lock = tmp_path / "requirements.lock"
    lock.write_text("".join(f"{pin}\n" for pin in pins))
    return pyproject, lock


def test_installed_versions_and_the_closure_are_checked(tmp_path):
    # pytest and all it requires, at the versions installed here: passes
    names = _closure("pytest")
    assert len(names) > 1
    pyproject, lock = _tiny_project(tmp_path, "pytest", [_installed(n) for n in names])
    result = check_lock.check(pyproject, lock, installed=True)
    assert result.problems == []
    assert any(f"all {len(names)} packages they reach are locked" in c for c in result.checked)

    # one of pytest's requirements left out, pytest at another version, a pin nothing needs
    left_out = next(n for n in names if n != "pytest")
    unneeded = next(n for n in ("pip", "setuptools", "packaging") if n not in names)
    pins = [_installed(n) for n in names if n not in ("pytest", left_out)]
    pins += ["pytest==0.0.1", _installed(unneeded)]
    pyproject, lock = _tiny_project(tmp_path, "pytest", pins)
    problems = check_lock.check(pyproject, lock, installed=True).problems
    assert any(p.startswith(f"{left_out}: pytest requires") for p in problems), problems
    installed = metadata.version("pytest")
    assert f"pytest: locked at 0.0.1 but {installed} is installed" in problems
    assert f"{unneeded}: locked but nothing requires it: run `make lock`" in problems
