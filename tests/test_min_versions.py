"""The minimum versions pyproject.toml declares are the ones CI tests.

.ci/run installs .ci/min-versions.txt as pip constraints into a venv of its
own and runs a subset of the tests there; these checks keep that file and the
lower bounds in pyproject.toml in step, so a floor cannot be raised or lowered
in one place only.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
requirements = pytest.importorskip("packaging.requirements")
version = pytest.importorskip("packaging.version")

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
CONSTRAINTS = ROOT / ".ci" / "min-versions.txt"

# Runtime dependencies whose floor the constraints file must pin exactly.
PINNED = ("numpy", "scipy", "numba", "scikit-learn", "threadpoolctl")


def _name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _project():
    with PYPROJECT.open("rb") as f:
        return tomllib.load(f)["project"]


def _floors(specs) -> dict[str, str]:
    floors = {}
    for spec in specs:
        req = requirements.Requirement(spec)
        lower = [s.version for s in req.specifier if s.operator == ">="]
        if lower:
            floors[_name(req.name)] = lower[0]
    return floors


def _pins() -> dict[str, str]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep, f"{CONSTRAINTS.name}: {line!r} is not an exact '==' pin"
        pins[_name(name.strip())] = version.strip()
    return pins


def test_every_runtime_floor_is_pinned_in_the_constraints():
    floors = _floors(_project()["dependencies"])
    pins = _pins()
    for name in PINNED:
        assert name in floors, f"pyproject.toml declares no lower bound for {name}"
        assert name in pins, f"{CONSTRAINTS.name} pins no version of {name}"
        assert version.Version(pins[name]) == version.Version(floors[name]), (
            f"{name}: pyproject.toml says >={floors[name]}, "
            f"{CONSTRAINTS.name} pins {pins[name]}"
        )


def test_the_test_extra_admits_the_minimum_scikit_learn():
    floors = _floors(_project()["dependencies"])
    test_floors = _floors(_project()["optional-dependencies"]["test"])
    assert test_floors.get("scikit-learn") == floors["scikit-learn"]
