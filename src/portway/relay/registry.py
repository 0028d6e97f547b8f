"""Which tunnel holds which name: the interface a relay needs from its registry, and the in-process one.

A relay asks its registry four things: the tunnel behind a name (every visitor request), whether a name is
free (every registration), how many tunnels a token holds (quotas), and to keep an offline tunnel's name for
its grace period. :class:`Registry` states that contract; :class:`MemoryRegistry` keeps it in this process's
memory, for a relay that runs alone. :class:`portway.relay.cluster.RedisRegistry` is the other implementation:
several relay nodes share their names through Redis.

The interface has two halves. The synchronous one is this node's own tunnels (the `Tunnel` objects it serves),
asked on every visitor request and never waiting on the network. The asynchronous one is where a shared store
is asked: `lease` takes a name for this node (atomically, across the cluster) once the claim policy has allowed
it, `held_elsewhere` says which other node holds a name (and where), and `failures` is the failed-token count
per address that must be global. For the memory registry these answer at once: one process sees everything.

A TCP tunnel's public port is leased the same way, under `port_lease_name(port)`, so that a port is given once
over the cluster and counts in its token's quota with the names; `hold` keeps such a lease alive (the registry
renews its own tunnels' names by itself) and `let_go` gives it up.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol

from ..errors import HttpError
from .tunnels import Tunnel

REGISTRY_UNAVAILABLE = "registry unavailable: this relay can't reach the cluster's registry now; try again shortly"


def key_digest(resume_key: str | None) -> str:
    """How a resume key is kept in a shared registry: its SHA-256 (hex), "" for none."""
    return hashlib.sha256(resume_key.encode()).hexdigest() if resume_key else ""


def registry_unavailable() -> HttpError:
    """The refusal of anything that needs the shared registry while it can't be reached."""
    return HttpError(503, REGISTRY_UNAVAILABLE)


PORT_LEASE_KIND = "tcp"


def port_lease_name(port: int) -> str:
    """The lease of a TCP tunnel's public port: never a tunnel name (those have no ':'), so names and ports share
    the leases' keys and the quotas without meeting."""
    return f"tcp:{port}"


def leased_thing(name: str) -> str:
    """What a lease is of, for a refusal: "TCP port 20001" or "tunnel name 'web'"."""
    kind, _, port = name.partition(":")
    return f"TCP port {port}" if kind == PORT_LEASE_KIND and port else f"tunnel name {name!r}"


@dataclass(frozen=True, slots=True)
class RemoteLease:
    """A name held by another node of the cluster: which node, where the nodes reach it, what kind of tunnel, and
    the lease's epoch."""

    node: str
    advertise: str
    kind: str
    epoch: int


class SharedFailures(Protocol):
    """Failed token attempts per address, counted over the whole cluster (a sliding window like
    auth.FailureThrottle's, whose limits it shares). Raises HttpError(503) when the count can't be reached."""

    async def retry_after(self, address: str) -> float | None:
        """None when `address` may try now, else the seconds until it may."""

    async def record_failure(self, address: str) -> None: ...


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

    # the shared half
    failures: SharedFailures | None
    """The cluster-wide failed-token count, or None when the relay's own auth.FailureThrottle is the whole
    truth (a relay that runs alone)."""

    async def start(self) -> None:
        """Connect to the shared store (if any) and keep this node's leases alive until close()."""

    async def close(self) -> None: ...

    async def lease(self, name: str, *, owner: str, kind: str, max_tunnels: int, proof: str | None = None,
                    key: str = "") -> None:
        """Take `name` for this node, for the token with digest `owner` holding at most `max_tunnels` names over
        the whole cluster (0: no limit); the claim policy has already allowed it against this node's tunnels.
        Atomic: of two nodes leasing one name at once, one wins. HttpError 409 (held by another node), 403
        (the token's quota) or 503 (the registry can't be reached); add() then registers the tunnel.

        `key` is the resume key the tunnel's agent is given with this registration; `proof` the one it presented
        (the key of its last registration). A live lease of another node is taken over, under a higher epoch,
        when the proof matches that lease's key and the owner is the same: the agent moved here (its node died,
        or handed it over), and proves it is the one that held the name."""

    async def live_nodes(self) -> list[tuple[str, str]]:
        """The other nodes alive in the cluster (their heartbeat seen within a lease's TTL) that are not stopping,
        as (node id, advertised HOST:PORT); HttpError(503) when the registry can't be reached."""

    async def leave(self) -> None:
        """This node is stopping: other nodes no longer send agents here (its leases stay until released)."""

    async def held_elsewhere(self, name: str) -> RemoteLease | None:
        """The lease of the node that holds `name` when it isn't this one, or None; HttpError(503) when the
        registry can't be reached."""

    def hold(self, name: str, *, owner: str, kind: str, lost: Callable[[], None]) -> None:
        """Keep the lease on `name` (taken with lease(), for something other than a registered tunnel: a TCP
        port) alive until let_go(); `lost` is called if another node holds it meanwhile."""

    def let_go(self, name: str) -> None:
        """Stop keeping `name`'s lease alive and release it."""


class MemoryRegistry:
    """Name → tunnel in this relay's memory. Offline tunnels keep their name for a grace period."""

    failures = None  # the relay's own FailureThrottle counts everything

    def __init__(self) -> None:
        self._tunnels: dict[str, Tunnel] = {}
        self._grace_handles: dict[str, asyncio.TimerHandle] = {}

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def lease(self, name: str, *, owner: str, kind: str, max_tunnels: int, proof: str | None = None,
                    key: str = "") -> None:
        return None  # one process: the claim policy saw every name and quota, and nothing ran in between

    async def live_nodes(self) -> list[tuple[str, str]]:
        return []  # a relay that runs alone

    async def leave(self) -> None:
        return None

    async def held_elsewhere(self, name: str) -> RemoteLease | None:
        return None

    def hold(self, name: str, *, owner: str, kind: str, lost: Callable[[], None]) -> None:
        return None  # one process: nothing to keep alive

    def let_go(self, name: str) -> None:
        return None

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
