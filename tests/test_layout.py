"""The package layout: one package per part, imports running one way (README, "Where things are").

The parts, from the ground up: the store (on-disk format) and input (documents)
on the ground, the model above them, search and run above that, serve and the
CLI on top. A module may import its own part and the parts below it, never one
above it or a peer beside it; the top-level `errors`, `timings` and `extras`
import no part. Imports are read from the source (inside functions too), so a
lazy import cannot hide a wrong-way edge.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "bge_index"

# part -> the parts it may import (besides itself and the top level)
ALLOWED = {
    "store": set(),
    "input": {"store.names"},  # only the names of index files, so an index is never read as input
    "model": {"store", "input"},
    "search": {"store", "input", "model"},
    "run": {"store", "input", "model"},
    "serve": {"store", "input", "model", "search"},
    "cli": {"store", "input", "model", "search", "run", "serve"},
}
TOP_LEVEL = {"errors", "timings", "extras", "__init__", "__main__"}


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module) of every bge_index import in a file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.startswith("bge_index")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("bge_index"):
            # `from bge_index.serve import http_api` may name a module: count each name under its module
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def _part(module: str) -> str:
    """The part a dotted module belongs to: 'store' for bge_index.store.manifest, 'errors' for bge_index.errors."""
    return module.split(".")[1] if module.count(".") >= 1 else ""


def _allowed(importer_part: str, module: str) -> bool:
    target = _part(module)
    if target in TOP_LEVEL or target == "__version__" or target == importer_part or not target:
        return True
    allowed = ALLOWED[importer_part]
    return target in allowed or any(module == f"bge_index.{a}" or module.startswith(f"bge_index.{a}.")
                                    for a in allowed if "." in a)


def test_every_module_belongs_to_a_part():
    strays = [p.name for p in PACKAGE.glob("*.py") if p.stem not in TOP_LEVEL]
    assert strays == [], f"modules outside any part: {strays}"
    for part in ALLOWED:
        init = PACKAGE / part / "__init__.py"
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and "never import" in doc, f"{part}/__init__.py must say what the part owns and never imports"


@pytest.mark.parametrize("part", sorted(ALLOWED))
def test_imports_run_one_way(part):
    wrong = []
    for path in sorted((PACKAGE / part).rglob("*.py")):
        for line, module in _imports(path):
            if not _allowed(part, module):
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {module}")
    assert wrong == [], "imports against the layout:\n" + "\n".join(wrong)


def test_top_level_modules_import_no_part():
    wrong = []
    for name in ("errors", "timings", "extras"):
        path = PACKAGE / f"{name}.py"
        wrong += [f"{name}.py:{line} imports {module}" for line, module in _imports(path)
                  if _part(module) not in TOP_LEVEL]
    assert wrong == []


def test_the_direction_check_catches_a_wrong_way_import(tmp_path):
    # The checker itself: a store module importing the search part is refused, a search module importing
    # the store is allowed, input may see the store's names only.
    assert not _allowed("store", "bge_index.search.scoring")
    assert _allowed("search", "bge_index.store.manifest")
    assert _allowed("input", "bge_index.store.names")
    assert not _allowed("input", "bge_index.store.manifest")
    assert not _allowed("search", "bge_index.run.local") and not _allowed("run", "bge_index.search.query")
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from bge_index.serve import http_api\n")
    assert _imports(source) == [(2, "bge_index.serve.http_api")]


def test_public_names_still_importable_from_the_package():
    import bge_index
    for name in bge_index.__all__:
        assert getattr(bge_index, name) is not None, name
