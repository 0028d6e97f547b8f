"""Who may take which tunnel name. Every registration, a Portway agent's or an `lt` client's, goes through
:func:`claim`, in one order: throttle, token, quota, name rules, reservations, name taken. A refused token
learns nothing about names.

Pure: the registry is read through the small :class:`NameHolders` view, and `now` and the source of
randomness are passed in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol, TypeVar

from ..auth import FailureThrottle, Grant, TokenBook
from ..errors import HttpError, InvalidName
from ..proto.names import random_name, validate_name

if TYPE_CHECKING:
    import random

class Owned(Protocol):
    owner: str  # digest of the token that registered it ("" on an open relay)


Holder = TypeVar("Holder", bound=Owned)


class NameHolders(Protocol[Holder]):
    def get(self, name: str) -> Holder | None: ...

    def names(self) -> frozenset[str]: ...

    def held_by(self, owner: str) -> int: ...

    def frees_at(self, name: str) -> float | None:
        """When an offline holder's grace period ends (same clock as `now`), or None while it is online."""


THROTTLED = "too many failed authentication attempts from your address; try again later"


@dataclass(frozen=True, slots=True)
class Claim:
    name: str
    grant: Grant


def claim(*, tokens: TokenBook, throttle: FailureThrottle, holders: NameHolders, token: str | None, peer_ip: str,
          requested: str | None, may_replace: Callable[[object], bool], now: float, rng: random.Random) -> Claim:
    """Authenticate a registration and pick its name; raises HttpError with the refusal.

    `may_replace(holder)` says whether the tunnel holding the requested name may be taken over by this request
    (the same agent coming back with its resume key, the same `lt` client within its grace period); a name held
    only for an agent whose link is down may also be taken by any agent of the same token.
    """
    if throttle.blocked(peer_ip, now):
        raise HttpError(429, THROTTLED)
    grant = tokens.verify(token)
    if grant is None:
        throttle.record_failure(peer_ip, now)
        raise HttpError(401, "this relay needs a valid token (--token or PORTWAY_TOKEN)" if not token
                        else "the token was not accepted by this relay")
    if grant.max_tunnels:
        held = holders.held_by(grant.digest)
        replacing = requested is not None and _replaceable(holders, requested, grant, may_replace)
        if held >= grant.max_tunnels and not replacing:
            raise HttpError(403, f"this token may hold {grant.max_tunnels} tunnel(s) at once and holds {held}")
    if requested is None:
        return Claim(random_name(reserved_or_taken(tokens, holders), rng), grant)
    try:
        name = validate_name(requested)
    except InvalidName as error:
        raise HttpError(400, str(error)) from None
    owner = tokens.owner_of(name)
    if owner is not None and owner.digest != grant.digest:
        raise HttpError(403, f"tunnel name {name!r} is reserved for another token")
    if holders.get(name) is not None and not _replaceable(holders, name, grant, may_replace):
        frees_at = holders.frees_at(name)
        if frees_at is not None:
            raise HttpError(409, f"tunnel name {name!r} is held for the agent that had it (its link dropped); "
                                 f"it is free in {max(1, math.ceil(frees_at - now))} s unless that agent comes back")
        raise HttpError(409, f"tunnel name {name!r} is already in use")
    return Claim(name, grant)


def _replaceable(holders: NameHolders, name: str, grant: Grant, may_replace: Callable[[object], bool]) -> bool:
    """Whether the tunnel holding `name` may be replaced: by the same agent back with its resume key
    (`may_replace`), or, once its link is down and the name only held for it, by any agent of the same token: an
    agent restarted after a crash has no resume key, and the token proves whose name it is. On an open relay
    everyone shares one anonymous grant, so there only the key counts."""
    existing = holders.get(name)
    if existing is None:
        return False
    if may_replace(existing):
        return True
    return bool(grant.digest) and existing.owner == grant.digest and holders.frees_at(name) is not None


def reserved_or_taken(tokens: TokenBook, holders: NameHolders) -> set[str]:
    """Names a random pick must avoid: those held now and those reserved for any token."""
    taken = set(holders.names())
    for grant in tokens.grants:
        taken |= grant.reserved_names
    return taken
