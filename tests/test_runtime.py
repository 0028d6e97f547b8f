"""Process-wide settings: the heap trimmer (when it gives free heap pages back, whether it reads glibc's free bytes
right) and the CPU scheduling policy (what it covers, when the governor switches it)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from portway.runtime import TRIM_SLACK, HeapTrimmer, SchedulingGovernor
from tests.async_wait import until

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


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="Linux scheduling policies")
@pytest.mark.parametrize("policy, expected", [("batch", "SCHED_BATCH"), ("normal", "SCHED_OTHER")])
def test_a_policy_covers_the_threads_started_after_it(policy, expected):
    # in a process of its own: the policy stays the process's
    code = f"""
import os, threading
from portway.runtime import schedule
assert schedule({policy!r})
seen = []
thread = threading.Thread(target=lambda: seen.append(os.sched_getscheduler(0)))
thread.start()
thread.join()
print(os.sched_getscheduler(0), seen[0])
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                         env={"PYTHONPATH": str(SRC)}, check=True)
    assert out.stdout.split() == [str(getattr(os, expected))] * 2


class Governed:
    """A governor's inputs and what it applied."""

    def __init__(self, refuse: bool = False) -> None:
        self.joined = 0
        self.applied: list[str] = []
        self.refuse = refuse
        self.governor = SchedulingGovernor(lambda: self.joined, self.apply, busy=50, idle=10)

    def apply(self, policy: str) -> bool:
        self.applied.append(policy)
        return not self.refuse

    def interval(self, joined_writes: int) -> str:
        """One interval with this many joined link writes; the policy after the governor's look."""
        self.joined += joined_writes
        self.governor.check()
        self.governor.stop()
        return self.governor.policy


def test_the_governor_batches_while_many_streams_write_at_once_and_not_a_moment_longer():
    async def main() -> None:
        governed = Governed()
        assert governed.governor.policy == "normal"
        assert [governed.interval(n) for n in (0, 49, 50, 30, 10, 11, 9, 49, 50)] == [
            "normal", "normal", "batch", "batch", "batch", "batch", "normal", "normal", "batch"]
        assert governed.applied == ["batch", "normal", "batch"]  # only changes reach the kernel
        assert governed.governor.switches == 3

    asyncio.run(main())


def test_a_policy_the_kernel_refuses_is_not_taken_for_applied_nor_asked_for_again():
    async def main() -> None:
        governed = Governed(refuse=True)
        governed.joined = 500
        governed.governor.check()
        assert governed.governor.policy == "normal" and governed.applied == ["batch"]
        assert governed.governor._timer is None  # no further looks
        governed.governor.start()
        assert governed.governor._timer is None

    asyncio.run(main())


def test_the_governor_looks_again_every_interval_until_stopped():
    async def main() -> None:
        governed = Governed()
        governed.governor.interval = 0.01
        governed.governor.start()
        governed.joined = 1000
        await until(lambda: governed.governor.policy == "batch", "the busy interval's look")
        governed.joined += 1000  # busy still: no change to apply
        await until(lambda: governed.governor._last == 2000, "the next look")
        assert governed.applied == ["batch"]
        governed.governor.stop()
        assert governed.governor._timer is None

    asyncio.run(main())
