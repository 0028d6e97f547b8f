"""When the agent dials the relay again: capped exponential backoff with jitter, and what the user is told.

Pure decisions (the randomness and the clock are passed in), tested without sockets; agent/client.py waits out
the delays, and while the relay can't even be reached it probes cheaply and often meanwhile (a bare TCP connect),
so that a long delay never sleeps through the relay's return.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

FIRST_DELAY = 0.5
"""Seconds before the first retry after a failure."""
MAX_DELAY = 30.0
"""The delay doubles with every failed attempt up to this."""
HEALTHY_AFTER = 30.0
"""A link that lived this long was healthy: the next drop starts the schedule over from ``FIRST_DELAY``."""


@dataclass
class Backoff:
    """The delay before each new attempt: ``FIRST_DELAY`` doubling up to ``MAX_DELAY``, each drawn at random
    between half of that and all of it ("equal jitter"), so that agents dropped together by one relay restart
    don't all dial back in the same instant, and none ever retries in a tight loop.

    ``attempt`` counts the attempts since the last healthy link (1 for the first retry). A link that came up and
    lived ``healthy_after`` seconds resets it; one that dropped sooner (a flapping network, a relay that accepts
    and then fails) keeps counting, so it is retried ever less often.
    """

    rng: random.Random
    first_delay: float = FIRST_DELAY
    max_delay: float = MAX_DELAY
    healthy_after: float = HEALTHY_AFTER
    attempt: int = 0
    _up_since: float | None = None

    def __post_init__(self) -> None:
        if not 0 < self.first_delay <= self.max_delay:
            raise ValueError(f"need 0 < first_delay <= max_delay, got {self.first_delay} and {self.max_delay}")

    def next_delay(self) -> float:
        """Count one more failed attempt and return the seconds to wait before the next."""
        self.attempt += 1
        ceiling = min(self.first_delay * 2 ** min(self.attempt - 1, 64), self.max_delay)
        return ceiling / 2 + self.rng.uniform(0, ceiling / 2)

    def link_up(self, now: float) -> None:
        """A link was registered at ``now``."""
        self._up_since = now

    def link_down(self, now: float) -> bool:
        """The link registered last dropped at ``now``; returns whether it had been healthy, which starts the
        schedule over (dial again at once); else the next attempt waits ``next_delay()``."""
        healthy = self._up_since is not None and now - self._up_since >= self.healthy_after
        if healthy:
            self.attempt = 0
        self._up_since = None
        return healthy


def retry_status(delay: float, attempt: int, reason: str, *, reconnecting: bool) -> str:
    """The line the user sees while the agent waits, e.g. `reconnecting in 4 s (attempt 3): connection refused`."""
    shown = f"{delay:.1f}" if delay < 10 else f"{delay:.0f}"
    return f"{'reconnecting' if reconnecting else 'retrying'} in {shown} s (attempt {attempt}): {reason}"


@dataclass(frozen=True, slots=True)
class RelayAddress:
    """One address a relay (node) is dialled at: `host` is what is connected to (an address the relay's name
    resolved to, or the name itself), `server_name` the name from --relay (the Host header, and the name TLS
    checks the relay's certificate against)."""

    host: str
    port: int
    server_name: str

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass
class Rotation:
    """Which relay address the agent dials, when it was given several (--relay repeated, or a name that resolves
    to several addresses): each *round* tries every address once, at once one after the other; the backoff's
    delay comes between rounds, not between addresses, so a dead node costs no wait when another is up.

    A round after a lost link starts with the address the link was on when that link was healthy or its streams
    wait to be resumed there (only that relay can resume them), else with the next one. A link that dropped soon
    after it came up counts against its address; once every address has had one such drop since the last healthy
    link, the agent waits the backoff's delay before the next round (it never hops between failing nodes in a
    tight loop).
    """

    current: RelayAddress | None = None  # the address of the link up now, or of the last one
    _dropped_young: set[RelayAddress] | None = None

    def round(self, addresses: list[RelayAddress], *, stay: bool) -> list[RelayAddress]:
        """The addresses of one round, in the order to try them."""
        if self.current not in addresses:
            return list(addresses)
        index = addresses.index(self.current) + (0 if stay else 1)
        return addresses[index % len(addresses):] + addresses[:index % len(addresses)]

    def link_up(self, address: RelayAddress) -> None:
        self.current = address

    def link_down(self, addresses: list[RelayAddress], *, healthy: bool) -> bool:
        """The current link dropped (`healthy`: it had lived long enough); returns whether to wait the backoff's
        delay before the next round."""
        if healthy or self.current is None:
            self._dropped_young = None
            return False
        dropped = self._dropped_young = (self._dropped_young or set()) | {self.current}
        if all(address in dropped for address in addresses):
            self._dropped_young = None
            return True
        return False
