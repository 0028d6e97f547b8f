"""The sans-I/O rule: nothing under portway.proto or portway.policy may import I/O, clocks, threads, network
clients or a source of randomness. Time is passed in as `now`, randomness as an `rng`, so every decision can be
replayed in a test. (Imports under `if TYPE_CHECKING:` only name types and are allowed.)"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import portway.policy
import portway.proto

FORBIDDEN = {"asyncio", "socket", "time", "ssl", "selectors", "threading", "redis", "subprocess", "os",
             "random", "secrets", "uuid", "uvloop", "datetime"}
SANS_IO_PACKAGES = [Path(portway.proto.__file__).parent, Path(portway.policy.__file__).parent]
SANS_IO_FILES = sorted(path for package in SANS_IO_PACKAGES for path in package.rglob("*.py"))


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imported_roots(tree: ast.AST) -> set[str]:
    """Top-level packages a module imports at run time (type-checking-only blocks skipped)."""
    roots: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking_only(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return roots


def test_the_sans_io_packages_have_the_core_modules() -> None:
    names = {path.name for path in SANS_IO_FILES}
    assert {"frame.py", "events.py", "mux.py", "http1.py", "control.py", "claims.py"} <= names


@pytest.mark.parametrize("path", SANS_IO_FILES, ids=lambda path: f"{path.parent.name}/{path.name}")
def test_module_imports_no_io_clock_or_randomness(path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    assert not imported_roots(tree) & FORBIDDEN


def test_the_check_catches_every_import_form() -> None:
    tree = ast.parse("import os, time\nfrom asyncio import sleep\nimport socket.x as s\nfrom . import frame\n"
                     "def f():\n    import secrets\n"
                     "if TYPE_CHECKING:\n    import random\nelse:\n    import uuid\n")
    assert imported_roots(tree) & FORBIDDEN == {"os", "time", "asyncio", "socket", "secrets", "uuid"}
