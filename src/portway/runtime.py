"""Process-wide tuning for a long-running relay or agent: the garbage collector and glibc's malloc."""

from __future__ import annotations

import asyncio
import ctypes
import gc
from typing import Callable

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


class HeapTrimmer:
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
        self._timer: asyncio.TimerHandle | None = None

    @classmethod
    def for_this_process(cls) -> "HeapTrimmer | None":
        """glibc's (2.33 or later); None elsewhere."""
        libc = _glibc("mallinfo2", "malloc_trim")
        if libc is None:
            return None
        libc.mallinfo2.restype = _MallInfo2
        return cls(lambda: libc.mallinfo2().fordblks, lambda: libc.malloc_trim(0))

    def start(self) -> None:
        self._timer = asyncio.get_running_loop().call_later(self.interval, self.check)

    def check(self) -> None:
        if self.free_bytes() >= self.slack:
            self.trim()
            self.trims += 1
        self.start()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
