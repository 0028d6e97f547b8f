"""The inspector's core is sans-I/O like proto/: capture, store, views, diff, replay and HAR import no I/O, clock,
threads or randomness (har.py may import datetime: it only formats the time it is handed). The asyncio glue is
app.py and web.py alone."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import portway.inspector
from tests.proto.test_purity import FORBIDDEN, imported_roots

PACKAGE = Path(portway.inspector.__file__).parent
PURE = ["capture.py", "store.py", "views.py", "diff.py", "replay.py", "har.py"]
ALLOWED = {"har.py": {"datetime"}}


@pytest.mark.parametrize("name", PURE)
def test_the_core_imports_no_io_clock_or_randomness(name):
    tree = ast.parse((PACKAGE / name).read_text(encoding="utf-8"))
    assert not imported_roots(tree) & (FORBIDDEN - ALLOWED.get(name, set()))


def test_only_the_glue_is_left_out():
    modules = {path.name for path in PACKAGE.glob("*.py")} - {"__init__.py"}
    assert modules - set(PURE) == {"app.py", "web.py"}
