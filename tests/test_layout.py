"""The tree reads as the data flow: imports only run downstream, and only through public names.

    actstore (store, extract, loader)  ->  sae  ->  services  ->  actstore_cli (the `actstore` command)

A package may import its own private (`_`) modules and any public name upstream of it; the test and
demo generators (`actstore.testing`) are imported by no production module but the demo command.
Read from the source with `ast`, so it checks the lazy imports inside functions too.
"""

from __future__ import annotations

import ast
from pathlib import Path, PurePosixPath

import pytest

ROOT = Path(__file__).resolve().parents[1]
ORDER = ("actstore", "sae", "services", "actstore_cli")
"""Packages in data-flow order: each may import those before it, never those after."""
GENERATORS = "actstore.testing"
MAY_USE_GENERATORS = {"actstore_cli/demo.py"}


def _imports(rel: PurePosixPath, source: str) -> list[tuple[int, str]]:
    """(line, module.name) of every import in the file at `rel`, relative imports resolved."""
    package = list(rel.with_suffix("").parts[:-1])
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package[:len(package) - node.level + 1], *([base] if base else [])])
            out += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return out


def _owner(module: str) -> str:
    """The package a private module or name belongs to: all before its first `_`-prefixed part."""
    parts = module.split(".")
    for i, part in enumerate(parts):
        if part.startswith("_") and not part.startswith("__"):
            return ".".join(parts[:i])
    return module


def violations(rel: PurePosixPath, source: str) -> list[str]:
    """What the file at `rel` (relative to the repository) imports against the rules."""
    me = rel.parts[0]
    mine = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
    found = []
    for line, module in _imports(rel, source):
        top = module.split(".")[0]
        if top in ORDER and ORDER.index(top) > ORDER.index(me):
            found.append(f"{rel}:{line} imports {module}, downstream of {me}")
        owner = _owner(module)
        if owner != module and not (mine == owner or mine.startswith(owner + ".")):
            found.append(f"{rel}:{line} imports {module}, private to {owner}")
        if module.startswith(GENERATORS) and not mine.startswith(GENERATORS) and str(rel) not in MAY_USE_GENERATORS:
            found.append(f"{rel}:{line} imports the test/demo generators ({module})")
    return found


SOURCES = sorted(p.relative_to(ROOT) for pkg in ORDER for p in (ROOT / pkg).rglob("*.py"))


@pytest.mark.parametrize("rel", SOURCES, ids=str)
def test_imports_run_downstream_through_public_names(rel: Path) -> None:
    assert violations(PurePosixPath(rel.as_posix()), (ROOT / rel).read_text()) == []


def test_modules_stay_small() -> None:
    """Modules under ~400 lines, so that a stage reads in one sitting (STYLE.md)."""
    big = {str(rel): n for rel in SOURCES if (n := len((ROOT / rel).read_text().splitlines())) > 420}
    assert not big, f"modules over 420 lines: {big}"


def test_the_rules_catch_what_they_forbid() -> None:
    source = ("from services.index import build_index\n"
              "from actstore.store._io import put_bytes\n"
              "from . import _eager\n"
              "from actstore.testing.shapes import generate_dataset\n")
    assert violations(PurePosixPath("sae/kernels/__init__.py"), source) == [
        "sae/kernels/__init__.py:1 imports services.index.build_index, downstream of sae",
        "sae/kernels/__init__.py:2 imports actstore.store._io.put_bytes, private to actstore.store",
        "sae/kernels/__init__.py:4 imports the test/demo generators (actstore.testing.shapes.generate_dataset)",
    ]
    assert violations(PurePosixPath("actstore/store/_writer.py"), "from actstore.store._io import put_bytes\n") == []
    assert violations(PurePosixPath("actstore_cli/demo.py"), "from actstore.testing.shapes import generate_dataset\n") == []
