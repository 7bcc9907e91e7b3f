"""requirements.txt, the one place versions are pinned: every dependency pyproject.toml declares is
pinned there, inside its declared range, and is the version installed here."""

import re
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def pins() -> dict[str, Version]:
    found = {}
    for number, line in enumerate((ROOT / "requirements.txt").read_text().splitlines(), 1):
        if line.strip() and not line.startswith("#"):
            match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line.strip())
            assert match, f"requirements.txt:{number}: not NAME==VERSION: {line!r}"
            found[canonicalize_name(match[1])] = Version(match[2])
    return found


def test_every_declared_dependency_is_pinned_in_its_range_and_installed_at_the_pin():
    tomllib = pytest.importorskip("tomllib", reason="Python 3.11 reads TOML")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [Requirement(text) for text in project["dependencies"] + project["optional-dependencies"]["test"]]
    pinned = pins()
    for requirement in declared:
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"{requirement.name} is not pinned in requirements.txt"
        assert requirement.specifier.contains(pinned[name]), f"{name}=={pinned[name]} is outside {requirement}"
        assert Version(version(requirement.name)).base_version == pinned[name].base_version, name
