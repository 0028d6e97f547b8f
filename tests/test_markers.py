"""The `e2e` marker selects exactly the tests that start real processes: `-m e2e` runs all of tests/e2e and
nothing else, so `-m "not e2e"` is the suite without them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def collected(*args: str) -> set[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])))
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args,
                          "tests"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return {line for line in out.stdout.splitlines() if line.startswith("tests/") and "::" in line}


def test_e2e_marker_selects_exactly_the_end_to_end_tests():
    # every test lands in exactly one of the two selections, so together they pin the marker to the folder
    end_to_end, others = collected("-m", "e2e"), collected("-m", "not e2e")
    assert end_to_end and others
    assert all(node.startswith("tests/e2e/") for node in end_to_end)
    assert not any(node.startswith("tests/e2e/") for node in others)
