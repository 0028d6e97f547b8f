"""Which build of the hot path the tests exercise.

An install with a C compiler runs the mypyc-compiled modules (setup.py); PORTWAY_PURE_PYTHON=1 makes this
process import them from source instead, so the fallback every other machine runs is tested too
(scripts/test.sh runs the unit tests both ways). Without it, compiled modules older than their sources stop
the run: they would test yesterday's code.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parent.parent / "src"


class _SourceFirst(importlib.abc.MetaPathFinder):
    """Finds portway's modules as .py files even where a compiled extension sits beside them."""

    def find_spec(self, name, path, target=None):
        if not name.startswith("portway.") or path is None:
            return None
        leaf = name.rpartition(".")[2]
        for entry in path:
            source = os.path.join(entry, leaf + ".py")
            if os.path.exists(source):
                return importlib.util.spec_from_file_location(name, source)
        return None


if os.environ.get("PORTWAY_PURE_PYTHON"):
    sys.meta_path.insert(0, _SourceFirst())


def pytest_sessionstart(session: pytest.Session) -> None:
    from portway.build_info import compiled_hot_path

    if os.environ.get("PORTWAY_PURE_PYTHON"):
        if compiled_hot_path():
            raise pytest.UsageError("PORTWAY_PURE_PYTHON=1 but the compiled hot path was imported")
        return
    built_from = SOURCE / "portway" / "hot_path_sources.json"  # written by setup.py with the extensions
    if not compiled_hot_path() or not built_from.exists():
        return
    for path, digest in json.loads(built_from.read_text()).items():
        source = SOURCE.parent / path
        if source.exists() and hashlib.sha256(source.read_bytes()).hexdigest() != digest:
            raise pytest.UsageError(f"the compiled {source.name} was built from another version of it: rebuild "
                                    "(pip install -e .), or run with PORTWAY_PURE_PYTHON=1")
