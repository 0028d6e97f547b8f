"""The sans-I/O rule: nothing under portway.proto may import I/O, clocks, threads or network clients."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import portway.proto

FORBIDDEN = {"asyncio", "socket", "time", "ssl", "selectors", "threading", "redis"}
PROTO_FILES = sorted(Path(portway.proto.__file__).parent.glob("*.py"))


def imported_roots(tree: ast.AST) -> set[str]:
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_proto_package_has_the_core_modules() -> None:
    assert {"frame.py", "events.py", "mux.py"} <= {path.name for path in PROTO_FILES}


@pytest.mark.parametrize("path", PROTO_FILES, ids=lambda path: path.name)
def test_module_imports_no_io(path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    assert not imported_roots(tree) & FORBIDDEN


def test_the_check_catches_every_import_form() -> None:
    tree = ast.parse("import os, time\nfrom asyncio import sleep\nimport socket.x as s\nfrom . import frame\n")
    assert imported_roots(tree) & FORBIDDEN == {"time", "asyncio", "socket"}
