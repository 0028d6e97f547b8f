"""Which public TCP port a TCP tunnel may take: ports are owned the way names are (policy/claims.py).

The relay offers the ports of its `--tcp-ports`; a token may reserve some of them in the tokens file; a port in
use, or kept for an agent whose link dropped (its grace period), is not given to anyone else; a token's
`max_tunnels` counts its TCP tunnels and its HTTP ones together. :func:`claim_port` applies these in one order:
ports offered at all, quota, the requested port's range, reservation, holder. It runs after the token was
verified (:func:`portway.policy.claims.claim` or the link's own check), once per TCP tunnel.

Pure: the relay's tunnels are read through the small :class:`PortHolders` view, and `now` and the source of
randomness are passed in. A port picked for a tunnel that asked for none is drawn at random among the free
ones, so a tunnel's port tells nothing about the others' and can't be guessed from the order of registrations.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Protocol, TypeVar

from ..auth import Grant, TokenBook
from ..errors import HttpError
from ..proto.port_sets import describe_port_set

if TYPE_CHECKING:
    import random

Holder = TypeVar("Holder")


class PortHolders(Protocol[Holder]):
    def get(self, port: int) -> Holder | None:
        """The tunnel holding `port`, online or in its grace period, or None."""

    def ports(self) -> frozenset[int]:
        """Every port held, online or in a grace period."""

    def held_by(self, owner: str) -> int:
        """How many tunnels of every kind (HTTP names and TCP ports) the token with digest `owner` holds."""

    def frees_at(self, port: int) -> float | None:
        """When an offline holder's grace period ends (same clock as `now`), or None while it is online."""


def claim_port(*, grant: Grant, tokens: TokenBook, offered: frozenset[int], holders: PortHolders,
               requested: int | None, may_replace: Callable[[object], bool], now: float,
               rng: random.Random) -> int:
    """The port a TCP tunnel registered with `grant` gets: `requested`, or a free one picked at random; raises
    HttpError with the refusal. `offered` is the relay's `--tcp-ports`.

    `may_replace(holder)` says whether the tunnel holding the requested port may be taken over by this request
    (the same agent coming back with its resume key).
    """
    if not offered:
        raise HttpError(403, "no TCP ports configured on this relay: start it with --tcp-ports")
    if grant.max_tunnels:
        held = holders.held_by(grant.digest)
        replacing = requested is not None and _replaceable(holders, requested, may_replace)
        if held >= grant.max_tunnels and not replacing:
            raise HttpError(403, f"this token may hold {grant.max_tunnels} tunnel(s) at once and holds {held}")
    if requested is None:
        free = offered - holders.ports() - tokens.reserved_ports()
        if not free:
            raise HttpError(503, "every TCP port of this relay is in use")
        return rng.choice(sorted(free))
    if requested not in offered:
        raise HttpError(400, f"port {requested} is outside this relay's TCP range {describe_port_set(offered)}")
    owner = tokens.port_owner(requested)
    if owner is not None and owner.digest != grant.digest:
        raise HttpError(403, f"port {requested} is reserved for another token")
    existing = holders.get(requested)
    if existing is not None and not may_replace(existing):
        frees_at = holders.frees_at(requested)
        if frees_at is not None:
            raise HttpError(409, f"port {requested} is held for the agent that had it (its link dropped); "
                                 f"it is free in {max(1, math.ceil(frees_at - now))} s unless that agent comes back")
        raise HttpError(409, f"port {requested} is already in use")
    return requested


def _replaceable(holders: PortHolders, port: int, may_replace: Callable[[object], bool]) -> bool:
    existing = holders.get(port)
    return existing is not None and may_replace(existing)
