"""The heap trimmer: when it gives free heap pages back, and that it reads glibc's free bytes right."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from portway.runtime import TRIM_SLACK, HeapTrimmer

SRC = Path(__file__).resolve().parents[1] / "src"


def test_the_heap_is_trimmed_only_when_enough_of_it_is_free_and_checked_again_later():
    free = [0]
    trimmed: list[int] = []

    async def main() -> None:
        trimmer = HeapTrimmer(lambda: free[0], lambda: trimmed.append(free[0]), interval=60.0)
        trimmer.check()  # nothing free: nothing to give back
        free[0] = TRIM_SLACK - 1
        trimmer.check()
        assert trimmed == []
        free[0] = TRIM_SLACK
        trimmer.check()
        assert trimmed == [TRIM_SLACK] and trimmer.trims == 1
        assert trimmer._timer is not None and not trimmer._timer.cancelled()  # the next look is scheduled
        trimmer.stop()
        assert trimmer._timer is None

    asyncio.run(main())


@pytest.mark.skipif(HeapTrimmer.for_this_process() is None, reason="not glibc >= 2.33")
def test_the_trimmer_sees_what_a_burst_left_free_on_the_heap():
    # in a process of its own: tune_for_serving changes malloc's policy process-wide
    code = """
from portway.runtime import HeapTrimmer, tune_for_serving
tune_for_serving()
trimmer = HeapTrimmer.for_this_process()
before = trimmer.free_bytes()
burst = [bytes(200_000) for _ in range(40)]  # 8 MB of socket-read-sized buffers, on the heap
del burst
print(trimmer.free_bytes() - before)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                         env={"PYTHONPATH": str(SRC)}, check=True)
    assert int(out.stdout) >= 7_000_000
