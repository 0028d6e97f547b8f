"""Process-wide tuning for a long-running relay or agent: the garbage collector and glibc's malloc."""

from __future__ import annotations

import ctypes
import gc

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 16 * 1024 * 1024
TRIM_THRESHOLD = 64 * 1024 * 1024


def tune_for_serving() -> None:
    # Everything imported so far lives for the whole run: keep it out of the cyclic collector's way, and
    # collect less often, since the data path makes many short-lived but acyclic objects.
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)
    _keep_freed_buffers_mapped()


def _keep_freed_buffers_mapped() -> None:
    """Every socket read makes a buffer of up to 256 KiB. By default glibc serves those with mmap or
    trims them off the heap when freed, so the next read faults in fresh zeroed pages: that cost half
    the relay's CPU in a bulk download. Keeping them on an untrimmed heap reuses the same pages."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return  # not glibc (musl, macOS): its allocator has its own policy
    mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
