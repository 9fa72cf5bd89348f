"""CI: does requirements.lock match pyproject.toml?

requirements.lock pins every dependency, direct and transitive, with `name==version`; `make
install` and CI install from it, and `make lock` writes it again (pip-compile). This check fails,
one line per problem, when the lock and pyproject.toml have drifted apart:

- a requirement of `dependencies` or of the `test` extra that the lock lacks, or pins at a
  version outside pyproject.toml's specifier (an edit of pyproject.toml without `make lock`);
- a lock line that is not `name==version` (a range, a URL, an option line, a marker);
- a package locked twice, or the project itself in the lock (it is installed with --no-deps -e).

With --installed it also checks the running interpreter (the venv after `make install`): every
locked package installed at its locked version, and every requirement that the installed
packages declare, followed from pyproject.toml down (extras included), locked and satisfied:
the lock is closed, nothing comes from outside it.

    .venv/bin/python .ci/check_lock.py [--installed] [--pyproject FILE] [--lock FILE]

Exit 0 with a summary of what was checked, 1 with the problems."""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

ROOT = Path(__file__).resolve().parent.parent
EXTRA = "test"  # the extra that `make install` and CI install along with `dependencies`
PIN = re.compile(r"^(?P<name>[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)==(?P<version>[^\s=;#]+)$")


@dataclass
class Result:
    problems: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)  # what was checked, for the summary

    @property
    def ok(self) -> bool:
        return not self.problems


def read_lock(lock: Path, result: Result) -> dict[str, Version]:
    """The pins of a lock file, by canonical name; bad lines go to result.problems."""
    pins: dict[str, Version] = {}
    for number, raw in enumerate(lock.read_text().splitlines(), 1):
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        where = f"{lock.name}:{number}"
        match = PIN.match(line)
        if not match:
            result.problems.append(f"{where}: {line!r} is not `name==version`")
            continue
        name = canonicalize_name(match["name"])
        try:
            version = Version(match["version"])
        except InvalidVersion:
            result.problems.append(f"{where}: {name}: {match['version']!r} is not a version")
            continue
        if name in pins:
            result.problems.append(f"{where}: {name} is locked twice ({pins[name]}, {version})")
            continue
        pins[name] = version
    return pins


def direct_requirements(pyproject: Path) -> tuple[str, list[tuple[str, Requirement]]]:
    """The project's name and its requirements (`dependencies` and the `test` extra), each
    with where it was declared."""
    project = tomllib.loads(pyproject.read_text())["project"]
    declared = [("dependencies", r) for r in project.get("dependencies", [])]
    extras = project.get("optional-dependencies", {})
    declared += [(f"optional-dependencies.{EXTRA}", r) for r in extras.get(EXTRA, [])]
    return project["name"], [(where, Requirement(text)) for where, text in declared]


def applies(req: Requirement, extras: set[str]) -> bool:
    """Does `req` apply on this interpreter, for a package installed with these extras?"""
    if req.marker is None:
        return True
    return any(req.marker.evaluate({"extra": extra}) for extra in extras | {""})


def satisfied(req: Requirement, version: Version) -> bool:
    # a pinned pre-release is a deliberate choice: let it satisfy a plain specifier
    return req.specifier.contains(version, prereleases=True)


def check(pyproject: Path, lock: Path, installed: bool = False) -> Result:
    result = Result()
    pins = read_lock(lock, result)
    project, declared = direct_requirements(pyproject)
    if canonicalize_name(project) in pins:
        result.problems.append(
            f"{project}: the project itself is in {lock.name} (it is installed by `pip install "
            "--no-deps -e .`): lock it with pip-compile, which leaves it out"
        )

    direct = 0
    for where, req in declared:
        if not applies(req, {EXTRA}):
            continue
        direct += 1
        name = canonicalize_name(req.name)
        if name not in pins:
            result.problems.append(
                f"{name}: pyproject.toml ({where}) requires {req} but {lock.name} does not "
                "lock it: run `make lock`"
            )
        elif not satisfied(req, pins[name]):
            result.problems.append(
                f"{name}: {lock.name} locks {pins[name]} but pyproject.toml ({where}) requires "
                f"{req}: run `make lock`"
            )
    result.checked.append(
        f"{direct} requirements of pyproject.toml (dependencies and the `{EXTRA}` extra) "
        f"against {len(pins)} pins of {lock.name}"
    )
    if installed:
        check_installed(pins, [req for _, req in declared], result)
    return result


def check_installed(pins: dict[str, Version], declared: list[Requirement], result: Result):
    """The running interpreter has every pin, and the lock closes over what they require."""
    found: dict[str, metadata.Distribution] = {}
    for name, version in sorted(pins.items()):
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            result.problems.append(f"{name}: locked at {version} but not installed")
            continue
        if Version(dist.version) != version:
            result.problems.append(f"{name}: locked at {version} but {dist.version} is installed")
        found[name] = dist
    result.checked.append(f"{len(found)} of {len(pins)} pins installed in {sys.prefix}")

    # Walk the requirements from pyproject.toml down, through the installed metadata: each
    # package's own requirements once, and those of an extra when something asks for it.
    todo = [(req, "pyproject.toml") for req in declared if applies(req, {EXTRA})]
    expanded: dict[str, set[str]] = {}  # package -> the extras whose requirements were followed
    edges = 0
    while todo:
        req, parent = todo.pop()
        name = canonicalize_name(req.name)
        edges += 1
        if name not in pins:
            result.problems.append(f"{name}: {parent} requires {req} but it is not locked")
            continue
        if not satisfied(req, pins[name]):
            result.problems.append(f"{name}: locked at {pins[name]} but {parent} requires {req}")
        extras = {canonicalize_name(e) for e in req.extras}
        done = expanded.get(name)
        if done is not None and extras <= done:
            continue
        wanted = extras | {""} if done is None else extras - done
        expanded[name] = (done or set()) | extras
        if name not in found:
            continue
        for text in found[name].requires or []:
            try:
                sub = Requirement(text)
            except InvalidRequirement:
                result.problems.append(f"{name}: unreadable requirement {text!r} in its metadata")
                continue
            if sub.marker is None:
                if done is None:
                    todo.append((sub, name))
            elif any(sub.marker.evaluate({"extra": extra}) for extra in wanted):
                todo.append((sub, name))
    if len(found) == len(pins):  # (with pins missing, the walk cannot see what they require)
        for name in sorted(set(pins) - set(expanded)):
            result.problems.append(f"{name}: locked but nothing requires it: run `make lock`")
    result.checked.append(
        f"{edges} requirements followed from pyproject.toml through the installed metadata: "
        f"all {len(expanded)} packages they reach are locked"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pyproject", type=Path, default=ROOT / "pyproject.toml")
    parser.add_argument("--lock", type=Path, default=ROOT / "requirements.lock")
    parser.add_argument(
        "--installed",
        action="store_true",
        help="also check the running interpreter against the lock",
    )
    args = parser.parse_args(argv)
    result = check(args.pyproject, args.lock, installed=args.installed)
    for problem in result.problems:
        print(problem, file=sys.stderr)
    if not result.ok:
        print(
            f"{args.lock.name} does not match {args.pyproject.name}: {len(result.problems)} "
            "problem(s)",
            file=sys.stderr,
        )
        return 1
    for line in result.checked:
        print(f"lock check: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
