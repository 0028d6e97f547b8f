"""Deadlines for many connections at once: one periodic check instead of a timer per request.

A uvloop timer costs a libuv handle to arm and to cancel (about 1.7 µs together), and the relay used
two per proxied request (idle wait, response wait). Its timeouts are seconds long, so a check a few
times a second is precise enough, and arming a deadline is two attribute writes.
"""

from __future__ import annotations

import asyncio
import math
from typing import Callable, Final, Protocol

NEVER: Final = math.inf


class Expiring(Protocol):
    expires_at: float

    def expire(self) -> None: ...


def resolution_for(*timeouts: float) -> float:
    """Check often enough that the shortest timeout fires at most a quarter late (within 50 ms .. 1 s)."""
    return min(1.0, max(0.05, min(timeouts) / 4))


class DeadlineSweeper:
    def __init__(self, loop: asyncio.AbstractEventLoop, resolution: float) -> None:
        self._loop = loop
        self.resolution = resolution
        self._watched: set[Expiring] = set()
        self._timer: asyncio.TimerHandle | None = None

    def watch(self, item: Expiring) -> None:
        self._watched.add(item)
        if self._timer is None:
            self._timer = self._loop.call_later(self.resolution, self._sweep)

    def unwatch(self, item: Expiring) -> None:
        self._watched.discard(item)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._watched.clear()

    def _sweep(self) -> None:
        now = self._loop.time()
        due = [item for item in self._watched if item.expires_at <= now]
        for item in due:
            item.expires_at = NEVER
            try:
                item.expire()
            except Exception as error:  # noqa: BLE001 - one failing action must not stop every other deadline
                self._loop.call_exception_handler({"message": "a deadline's action failed", "exception": error})
        self._timer = self._loop.call_later(self.resolution, self._sweep) if self._watched else None


class Deadline:
    """One armed-or-not deadline, for an object watched by a DeadlineSweeper."""

    __slots__ = ("expires_at", "_action", "_clock")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._clock: Callable[[], float] = loop.time  # bound once: armed per request, a method lookup each time
        self.expires_at = NEVER
        self._action: Callable[[], None] | None = None

    def arm(self, seconds: float, action: Callable[[], None]) -> None:
        self.expires_at = self._clock() + seconds
        self._action = action

    def disarm(self) -> None:
        self.expires_at = NEVER
        self._action = None

    def expire(self) -> None:
        action, self._action = self._action, None
        if action is not None:
            action()
