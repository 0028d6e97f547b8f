"""Process-wide settings for a long-running relay or agent: the garbage collector, glibc's malloc and how the
kernel schedules the agent."""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import os
from typing import Callable

log = logging.getLogger(__name__)

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 16 * 1024 * 1024
TRIM_THRESHOLD = 64 * 1024 * 1024

TRIM_CHECK_INTERVAL = 1.0
"""Seconds between looks at how much of the heap is free (see HeapTrimmer)."""
TRIM_SLACK = 2 * 1024 * 1024
"""Free heap bytes worth giving back: less is what a busy relay frees and reuses within a second anyway."""


def tune_for_serving() -> None:
    # Everything imported so far lives for the whole run: keep it out of the cyclic collector's way, and
    # collect less often, since the data path makes many short-lived but acyclic objects.
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)
    _keep_freed_buffers_mapped()


def schedule(policy: str) -> bool:
    """Run the calling thread (and the threads it starts later) under `policy`: "batch" is Linux's SCHED_BATCH,
    "normal" the default (SCHED_OTHER). False where it can't be had: no such policy here (not Linux), or the
    kernel refused it (the default then stays, which works the same)."""
    if not hasattr(os, "SCHED_BATCH"):
        return False
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH if policy == "batch" else os.SCHED_OTHER, os.sched_param(0))
    except OSError as error:
        log.info("keeping the CPU scheduling policy: %s refused (%s)", policy, error)
        return False
    return True


SCHEDULING_CHECK_INTERVAL = 0.5
"""Seconds between the governor's looks at the link writes (see SchedulingGovernor)."""
BUSY_JOINED_WRITES = 50
"""Batched link writes (more than one send each) within an interval from which the agent runs as a batch process."""
IDLE_JOINED_WRITES = 10
"""...and below which it runs as an ordinary one again (between the two it stays as it is)."""


class Periodic:
    """Something that takes a look every `interval` seconds on the running loop, from start() until stop()."""

    interval: float
    _timer: asyncio.TimerHandle | None = None

    def look(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        self._timer = asyncio.get_running_loop().call_later(self.interval, self.check)

    def check(self) -> None:
        self.look()
        self.start()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class SchedulingGovernor(Periodic):
    """`--scheduling auto`: the agent runs as a batch process (SCHED_BATCH) while it is busy with many streams at
    once, as an ordinary one otherwise.

    Woken by data, an ordinary process preempts the task running on that CPU; a batch one waits for the next
    scheduling point, the same share of the CPU either way. An agent serving many visitors at once was woken for
    every few frames (every 5 requests at 200 connections, against every 40 for ssh -R's client): each wake-up a
    context switch and a cold cache for a Python process. Waiting for its turn, it finds more frames ready and
    writes them out together, and the local service, woken once for many, answers them together too: the agent's
    CPU per request fell 18 % at 10 connections and 21 % at 200 (README, Architecture). A lone conversation (a
    WebSocket's messages taking turns, one request at a time) only waits longer that way, so it runs as an
    ordinary process. The measure of "many at once" is the link writes that carried more than one stream's send
    (link.session.LINK_WRITES), counted per interval, with a gap between the two thresholds so that a load near
    one does not flip the policy each time.
    """

    def __init__(self, joined_writes: Callable[[], int], apply: Callable[[str], bool],
                 interval: float = SCHEDULING_CHECK_INTERVAL, busy: int = BUSY_JOINED_WRITES,
                 idle: int = IDLE_JOINED_WRITES) -> None:
        self.joined_writes = joined_writes
        self.apply = apply
        self.interval = interval
        self.busy = busy
        self.idle = idle
        self.policy = "normal"
        self.switches = 0
        self.stop_looking = False
        self._last = joined_writes()

    def observe(self, joined_writes: int) -> str | None:
        """The policy to switch to, given the count of joined link writes now; None to stay."""
        recent, self._last = joined_writes - self._last, joined_writes
        wanted = "batch" if recent >= self.busy else "normal" if recent < self.idle else self.policy
        return None if wanted == self.policy else wanted

    def look(self) -> None:
        wanted = self.observe(self.joined_writes())
        if wanted is None:
            return
        if self.apply(wanted):
            self.policy = wanted
            self.switches += 1
        else:
            self.stop_looking = True  # the kernel won't change its mind: the agent stays as it is

    def start(self) -> None:
        if not self.stop_looking:
            super().start()


def _glibc(*functions: str) -> ctypes.CDLL | None:
    """The C library, if it has all of `functions` (glibc's malloc tuning); else None: another allocator (musl,
    macOS) has its own policy."""
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    return libc if all(hasattr(libc, name) for name in functions) else None


def _keep_freed_buffers_mapped() -> None:
    """Every socket read makes a buffer of up to 256 KiB. By default glibc serves those with mmap or
    trims them off the heap when freed, so the next read faults in fresh zeroed pages: that cost half
    the relay's CPU in a bulk download. Keeping them on an untrimmed heap reuses the same pages."""
    libc = _glibc("mallopt")
    if libc is None:
        return
    libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


class HeapTrimmer(Periodic):
    """Gives the heap's free pages back to the kernel a second after a burst left them free.

    The heap is never trimmed as memory is freed (see _keep_freed_buffers_mapped), so a bulk transfer, or a
    burst of connections, leaves its peak on the heap: several MiB, for good. Once a second this looks at the
    free bytes (glibc's mallinfo2, a walk of its free lists) and, past TRIM_SLACK, has malloc_trim release their
    pages. A steady load frees and reuses less than that within a second, so it is rarely trimmed, and a trim
    during a transfer costs it only the page faults of what it takes again: a few hundred a second at most.
    """

    def __init__(self, free_bytes: Callable[[], int], trim: Callable[[], object],
                 interval: float = TRIM_CHECK_INTERVAL, slack: int = TRIM_SLACK) -> None:
        self.free_bytes = free_bytes
        self.trim = trim
        self.interval = interval
        self.slack = slack
        self.trims = 0

    @classmethod
    def for_this_process(cls) -> "HeapTrimmer | None":
        """glibc's (2.33 or later); None elsewhere."""
        libc = _glibc("mallinfo2", "malloc_trim")
        if libc is None:
            return None
        libc.mallinfo2.restype = _MallInfo2
        return cls(lambda: libc.mallinfo2().fordblks, lambda: libc.malloc_trim(0))

    def look(self) -> None:
        if self.free_bytes() >= self.slack:
            self.trim()
            self.trims += 1
