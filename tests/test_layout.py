"""The package's shape: its layers, as the import-linter contract in pyproject.toml states them."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

from importlinter.cli import lint_imports

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "clue_mtl"


def _layers(pyproject: Path = ROOT / "pyproject.toml") -> list[list[str]]:
    """The layers contract, top to bottom: each layer's modules without the `clue_mtl.` prefix."""
    contracts = tomllib.loads(pyproject.read_text(encoding="utf-8"))["tool"]["importlinter"]["contracts"]
    (layers,) = [contract["layers"] for contract in contracts if contract["type"] == "layers"]
    return [[name.strip().removeprefix("clue_mtl.") for name in re.split(r"[|:]", layer)] for layer in layers]


def _top_level() -> set[str]:
    """The package's own modules and subpackages (its entry points aside)."""
    names = {path.stem for path in PACKAGE.glob("*.py")} - {"__init__", "__main__"}
    return names | {path.parent.name for path in PACKAGE.glob("*/__init__.py")}


def test_the_package_imports_only_downward():
    assert lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True, no_logo=True) == 0


def test_every_module_and_subpackage_has_one_layer():
    named = [name for layer in _layers() for name in layer]
    assert len(named) == len(set(named))
    assert set(named) == _top_level()


def test_an_upward_import_breaks_the_contract(tmp_path, monkeypatch):
    """The check itself can fail: a lower layer that imports a higher one is reported."""
    package = tmp_path / "layered"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "high.py").write_text("VALUE = 1\n")
    (package / "low.py").write_text("from layered.high import VALUE\n")
    config = tmp_path / "pyproject.toml"
    config.write_text('[tool.importlinter]\nroot_package = "layered"\n\n[[tool.importlinter.contracts]]\n'
                      'name = "down"\ntype = "layers"\nlayers = ["layered.high", "layered.low"]\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    assert lint_imports(config_filename=str(config), no_cache=True, no_logo=True) == 1
    (package / "low.py").write_text("VALUE = 2\n")
    assert lint_imports(config_filename=str(config), no_cache=True, no_logo=True) == 0


def test_every_module_opens_with_the_concept_it_holds():
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "__main__.py":
            continue
        docstring = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
        assert docstring and docstring.splitlines()[0].strip(), f"{path.relative_to(ROOT)} has no opening line"
