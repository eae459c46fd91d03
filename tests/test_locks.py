"""The committed locks (requirements/*.txt, made by ``make lock``) and the venvs made from them.

pyproject.toml and requirements/*.in choose the direct dependencies; the locks pin every package
with hashes, and every venv and image installs from a lock. These tests fail when a venv drifted
from its lock (a package changed by hand, a lock changed without reinstalling: ``make test``
reinstalls) or when a lock no longer satisfies what pyproject.toml asks (edited without
``make lock``), naming each difference.
"""

from __future__ import annotations

import json
import re
import subprocess
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
REQUIREMENTS = REPO / "requirements"
DEV_LOCK = REQUIREMENTS / "dev.txt"
MAIN_LOCK = REQUIREMENTS / "main.txt"
LS_LOCK = REQUIREMENTS / "labelstudio.txt"
# venv -> (its lock, what it may hold beyond the lock: the installer and the project itself)
VENVS = {
    ".venv": (DEV_LOCK, {"pip", "regcl"}),
    ".venv-labelstudio": (LS_LOCK, {"pip"}),
}
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")
INSTALLED = ("import importlib.metadata as m, json; "
             "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))")


def normalize(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> dict[str, str]:
    """name -> pinned version, and every pin carries at least one hash."""
    pins: dict[str, str] = {}
    text = path.read_text()
    for entry in re.split(r"\n(?=\S)", text):
        match = PIN.match(entry)
        if match is None:
            continue
        assert "--hash=sha256:" in entry, f"{path.name}: {match.group(1)} has no hash"
        pins[normalize(match.group(1))] = match.group(2)
    assert pins, f"{path} pins nothing"
    return pins


def differences(installed: dict[str, str], locked: dict[str, str], allowed: set[str]) -> list[str]:
    """One line per package whose installed version is not the locked one."""
    found = {normalize(name): version for name, version in installed.items()}
    lines = []
    for name in sorted(set(found) | set(locked)):
        if name in allowed:
            continue
        if name not in locked:
            lines.append(f"{name} {found[name]} is installed but not in the lock")
        elif name not in found:
            lines.append(f"{name} {locked[name]} is locked but not installed")
        elif found[name] != locked[name]:
            lines.append(f"{name} is {found[name]}, the lock says {locked[name]}")
    return lines


@pytest.mark.parametrize("venv", sorted(VENVS))
def test_venv_matches_its_lock(venv: str) -> None:
    lock, allowed = VENVS[venv]
    python = REPO / venv / "bin" / "python"
    assert python.exists(), f"{venv} is missing: `make test` makes it from {lock.name}"
    out = subprocess.run([str(python), "-c", INSTALLED], check=True, capture_output=True,
                         text=True, timeout=120).stdout
    drift = differences(json.loads(out), read_lock(lock), allowed)
    assert not drift, (f"{venv} differs from requirements/{lock.name} (`make test` puts the "
                       f"locked versions back; a package the lock lacks goes with `rm -r {venv}`):"
                       "\n" + "\n".join(drift))


def test_differences_name_each_kind_of_drift() -> None:
    locked = {"six": "1.17.0", "numpy": "2.4.6", "torch": "2.14.1"}
    installed = {"six": "1.16.0", "NumPy": "2.4.6", "Extra_Pkg": "1.0", "pip": "23.2.1"}
    assert differences(installed, locked, {"pip"}) == [
        "extra-pkg 1.0 is installed but not in the lock",
        "six is 1.16.0, the lock says 1.17.0",
        "torch 2.14.1 is locked but not installed",
    ]


def pyproject_requirements(*extras: str) -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    chosen = list(project["dependencies"])
    for extra in extras:
        chosen += project["optional-dependencies"][extra]
    return [Requirement(line) for line in chosen]


def in_file_requirements(path: Path) -> list[Requirement]:
    lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    return [Requirement(line) for line in lines if line]


def unmet(requirements: list[Requirement], pins: dict[str, str]) -> list[str]:
    """The requirements a lock does not satisfy (missing, or pinned outside the specifier)."""
    lines = []
    for requirement in requirements:
        name = normalize(requirement.name)
        if name not in pins:
            lines.append(f"{requirement} is not in the lock")
        elif not requirement.specifier.contains(pins[name], prereleases=True):
            lines.append(f"{requirement}: the lock has {pins[name]}")
    return lines


def test_locks_satisfy_what_pyproject_and_the_in_files_ask() -> None:
    build = in_file_requirements(REQUIREMENTS / "build.in")
    wanted = {
        DEV_LOCK: pyproject_requirements("dev", "s3") + build,
        MAIN_LOCK: pyproject_requirements("s3") + build,
        LS_LOCK: in_file_requirements(REQUIREMENTS / "labelstudio.in"),
    }
    problems = [f"{lock.name}: {line}" for lock, requirements in wanted.items()
                for line in unmet(requirements, read_lock(lock))]
    assert not problems, "run `make lock` and commit the locks:\n" + "\n".join(problems)


def test_the_runtime_lock_is_the_dev_lock_without_the_dev_tools() -> None:
    dev, main = read_lock(DEV_LOCK), read_lock(MAIN_LOCK)
    assert {name: dev.get(name) for name in main} == main  # the images run what the tests ran
    dev_only = {normalize(r.name) for r in pyproject_requirements("dev")}
    runtime = {normalize(r.name) for r in pyproject_requirements("s3")}
    assert not (dev_only - runtime) & set(main)


def test_the_build_backend_is_locked_as_pyproject_requires_it() -> None:
    build_system = tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]
    locked = {str(r) for r in in_file_requirements(REQUIREMENTS / "build.in")}
    assert set(build_system["requires"]) == locked
