"""Which tunnel holds which name: the interface a relay needs from its registry, and the in-process one.

A relay asks its registry four things: the tunnel behind a name (every visitor request), whether a name is
free (every registration), how many tunnels a token holds (quotas), and to keep an offline tunnel's name for
its grace period. :class:`Registry` states that contract; :class:`MemoryRegistry` keeps it in this process's
memory, for a relay that runs alone. A registry shared by several relay nodes is another implementation of the
same interface.
"""

from __future__ import annotations

import asyncio
from typing import Iterator, Protocol

from .tunnels import Tunnel


class Registry(Protocol):
    def get(self, name: str) -> Tunnel | None:
        """The tunnel registered under `name` (online, or offline within its grace period), or None."""

    def add(self, tunnel: Tunnel) -> None:
        """Register `tunnel` under its name, replacing whatever held it (the caller checked it may)."""

    def remove(self, tunnel: Tunnel) -> None:
        """Forget `tunnel` (if it still holds its name) and close it."""

    def free_after(self, tunnel: Tunnel, delay: float) -> None:
        """Forget `tunnel` after `delay` seconds unless it is back online by then."""

    def keep(self, tunnel: Tunnel) -> None:
        """`tunnel` is back online: its name is no longer counting down."""

    def frees_at(self, name: str) -> float | None:
        """The loop time when `name`'s offline tunnel loses it, or None if no countdown runs for it."""

    def names(self) -> frozenset[str]:
        """Every name held right now."""

    def held_by(self, owner: str) -> int:
        """How many tunnels the token with digest `owner` holds."""

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[Tunnel]: ...


class MemoryRegistry:
    """Name → tunnel in this relay's memory. Offline tunnels keep their name for a grace period."""

    def __init__(self) -> None:
        self._tunnels: dict[str, Tunnel] = {}
        self._grace_handles: dict[str, asyncio.TimerHandle] = {}

    def get(self, name: str) -> Tunnel | None:
        return self._tunnels.get(name)

    def add(self, tunnel: Tunnel) -> None:
        self._cancel_grace(tunnel.name)
        self._tunnels[tunnel.name] = tunnel

    def remove(self, tunnel: Tunnel) -> None:
        if self._tunnels.get(tunnel.name) is tunnel:
            del self._tunnels[tunnel.name]
            tunnel.close()
        self._cancel_grace(tunnel.name)

    def free_after(self, tunnel: Tunnel, delay: float) -> None:
        self._cancel_grace(tunnel.name)
        loop = asyncio.get_running_loop()
        self._grace_handles[tunnel.name] = loop.call_later(delay, self._expire, tunnel)

    def keep(self, tunnel: Tunnel) -> None:
        if self._tunnels.get(tunnel.name) is tunnel:
            self._cancel_grace(tunnel.name)

    def frees_at(self, name: str) -> float | None:
        handle = self._grace_handles.get(name)
        return handle.when() if handle is not None else None

    def names(self) -> frozenset[str]:
        return frozenset(self._tunnels)

    def held_by(self, owner: str) -> int:
        return sum(1 for tunnel in self._tunnels.values() if tunnel.owner == owner)

    def __len__(self) -> int:
        return len(self._tunnels)

    def __iter__(self) -> Iterator[Tunnel]:
        return iter(list(self._tunnels.values()))

    def _cancel_grace(self, name: str) -> None:
        handle = self._grace_handles.pop(name, None)
        if handle is not None:
            handle.cancel()

    def _expire(self, tunnel: Tunnel) -> None:
        self._grace_handles.pop(tunnel.name, None)
        if not tunnel.online:
            self.remove(tunnel)
