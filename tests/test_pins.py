"""Every dependency is pinned to one exact version, the same in requirements*.txt, constraints.txt and
pyproject.toml: a fresh install gets the environment the tests passed in (an unpinned dependency once
changed an error's wording under a fresh install)."""

from __future__ import annotations

import re

import pytest

from conftest import ROOT

tomllib = pytest.importorskip("tomllib")
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!-]+)$")


def _name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()  # PEP 503: Jinja2 / jinja2, typing_extensions / typing-extensions


def _pins(lines: list[str], where: str) -> dict[str, str]:
    pins = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith(("-r ", "-c ")):
            continue
        found = PIN.match(line)
        assert found, f"{where}: {line!r} is not pinned to one exact version (name==version)"
        pins[_name(found.group(1))] = found.group(2)
    return pins


def _file_pins(name: str) -> dict[str, str]:
    return _pins((ROOT / name).read_text().splitlines(), name)


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_requirement_files_pin_every_dependency_exactly():
    for name in ("requirements.txt", "requirements-dev.txt", "requirements-bench.txt", "constraints.txt"):
        assert _file_pins(name), f"{name} pins nothing"


def test_pyproject_agrees_with_the_requirement_files():
    project = _pyproject()["project"]
    extras = project["optional-dependencies"]
    assert _pins(project["dependencies"], "pyproject dependencies") == _file_pins("requirements.txt")
    assert _pins(extras["dev"], "pyproject dev") == _file_pins("requirements-dev.txt")
    assert _pins(extras["bench"], "pyproject bench") == _file_pins("requirements-bench.txt")
    _pins(_pyproject()["build-system"]["requires"], "pyproject build-system")


def test_the_lock_covers_every_direct_pin_at_the_same_version():
    lock = _file_pins("constraints.txt")
    direct = {**_file_pins("requirements.txt"), **_file_pins("requirements-dev.txt")}
    assert {name: lock.get(name) for name in direct} == direct


def test_requirement_files_chain_to_the_lock():
    assert "-c constraints.txt" in (ROOT / "requirements.txt").read_text().splitlines()
    for name in ("requirements-dev.txt", "requirements-bench.txt"):
        assert "-r requirements.txt" in (ROOT / name).read_text().splitlines()


def test_nothing_of_the_project_is_installed_by_pip_install():
    # Modules named utils, config, main, methods, mas would shadow other projects' modules in an environment.
    setuptools = _pyproject()["tool"]["setuptools"]
    assert setuptools["py-modules"] == [] and setuptools["packages"] == []
    assert "-e ." not in (ROOT / "requirements-dev.txt").read_text()
