"""The sans-IO core imports no IO; the public surface matches __all__."""

from __future__ import annotations

import ast
import pathlib

import pytest

import fastrelay

CORE = ["session", "tickets", "heads", "chunked", "config", "errors", "mint", "observe"]
FORBIDDEN = {"asyncio", "ssl", "socket", "uvloop", "selectors"}
PKG = pathlib.Path(fastrelay.__file__).parent


@pytest.mark.parametrize("module", CORE)
def test_core_module_does_no_io(module: str) -> None:
    tree = ast.parse((PKG / f"{module}.py").read_text())
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imported.add(node.module.split(".")[0])
    assert not imported & FORBIDDEN


def test_public_names() -> None:
    for name in fastrelay.__all__:
        assert hasattr(fastrelay, name), name
