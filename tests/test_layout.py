"""Imports flow one way: cli → roles (relay/, agent/) → link/ → policy/, proto/. A module that reaches back up
(the protocol importing the relay, the link glue importing a role, one role importing the other) fails here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import portway

PACKAGE = Path(portway.__file__).parent

# what each layer may import from portway (besides itself); top-level helper modules are listed by name
ALLOWED = {
    "proto": {"errors"},
    "policy": {"proto", "errors", "auth"},
    "link": {"proto", "errors"},
    "relay": {"link", "policy", "proto", "errors", "auth", "config", "metrics"},
    "agent": {"link", "proto", "errors", "config", "inspector", "metrics"},
    "inspector": {"link", "proto", "errors", "config"},
    "auth": {"proto", "errors"},
    "config": {"proto", "errors", "auth"},
    "configfile": {"config", "errors"},
    "errors": set(),
    "runtime": set(),
    "build_info": set(),
    "metrics": set(),
}


def portway_imports(path: Path) -> set[str]:
    """The first part below `portway` of everything `path` imports from the package."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    module_parts = path.relative_to(PACKAGE).with_suffix("").parts
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(module_parts[: len(module_parts) - node.level])
                target = base + (node.module.split(".") if node.module else [])
                if not target:  # `from .. import __version__`: the package itself
                    target = ["__init__"]
            elif node.module and node.module.startswith("portway."):
                target = node.module.split(".")[1:]
            else:
                continue
            found.add(target[0] if target else "")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("portway."):
                    found.add(alias.name.split(".")[1])
    return found


MODULES = sorted(path for path in PACKAGE.rglob("*.py") if path.name != "__main__.py")


@pytest.mark.parametrize("path", MODULES, ids=lambda path: str(path.relative_to(PACKAGE)))
def test_imports_flow_one_way(path: Path) -> None:
    layer = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
    if layer in ("cli", "__init__"):
        return  # the command line sits on top of everything
    reached = portway_imports(path) - {layer, "__init__", ""}
    assert reached <= ALLOWED[layer], f"{layer} may not import {sorted(reached - ALLOWED[layer])}"


def test_the_check_resolves_relative_imports() -> None:
    assert portway_imports(PACKAGE / "relay" / "front.py") >= {"link", "proto", "errors"}
