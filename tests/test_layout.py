"""The package's shape: imports only downward, in the order the README's module table gives."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "clue_mtl"
README = PACKAGE / "README.md"


def _table_order() -> list[str]:
    """Module names in the order of the README's "What is inside" table (`weighting/` as `weighting`)."""
    section = README.read_text(encoding="utf-8").split("## What is inside", 1)[1].split("\n## ", 1)[0]
    names = []
    for line in section.splitlines():
        if line.startswith("| `"):
            cell = line.split("|")[1]
            names += [name.rstrip("/").removesuffix(".py") for name in re.findall(r"`([a-z_]+(?:\.py|/))`", cell)]
    return names


def _modules() -> dict[str, list[Path]]:
    """Module name -> its files; a sub-package (`weighting/`) counts as one module."""
    modules: dict[str, list[Path]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.parent == PACKAGE:
            if path.stem not in ("__init__", "__main__"):
                modules[path.stem] = [path]
        else:
            modules.setdefault(path.parent.name, []).append(path)
    return modules


def _imports(path: Path, module: str) -> set[str]:
    """The package's modules that `path` imports anywhere (top level, inside functions, TYPE_CHECKING)."""
    found = set()
    inside_subpackage = path.parent != PACKAGE
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            if inside_subpackage and node.level == 1:
                continue  # a sibling inside the same sub-package
            head = (node.module or "").split(".")[0]
            found |= {head} if head else {alias.name for alias in node.names}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found |= {name.split(".")[1] for name in names if name.startswith("clue_mtl.")}
    return found - {module}


def test_the_readme_table_lists_every_module_once():
    order = _table_order()
    assert len(order) == len(set(order))
    assert set(order) == set(_modules())


def test_every_module_imports_only_modules_above_it_in_the_table():
    position = {name: index for index, name in enumerate(_table_order())}
    upward = [f"{module} imports {target}" for module, paths in _modules().items() for path in paths
              for target in _imports(path, module) if position[target] >= position[module]]
    assert upward == []


def test_every_module_opens_with_the_concept_it_holds():
    for paths in _modules().values():
        for path in paths:
            docstring = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
            assert docstring and docstring.splitlines()[0].strip(), f"{path.name} has no opening line"
