"""Which visitor connections a relay admits from one address: caps on what costs the relay, not on what an office
behind one NAT address legitimately holds open.

Three limits per address, each with its own count:

* HTTP connections (a head being read, an exchange in flight, an idle keep-alive connection): what a slowloris or
  a connection hoarder holds. Past the cap a new connection is refused, unless one of the address's own idle
  keep-alive connections can be closed to make room (the caller decides that; see ``Admission.admit``).
* Upgraded connections (WebSockets, agent links) once established: they cost a socket and two small buffers but
  no parsing and no deadline, and a busy office holds many; counted separately, with a much higher cap.
* New connections per second (a token bucket): accept churn, TLS handshakes. Bursts of ``burst`` are fine.

Pure bookkeeping: time is passed in. Per-address state is dropped once it no longer decides anything (no
connection open and a bucket full again): at once when a connection closes, else by a sweep every
``burst / rate`` seconds; so memory follows the addresses connected now or in the last few seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class Refusal(Enum):
    """Why a connection or an upgrade was refused; the value is what the visitor is told."""

    CONNECTIONS = "Too many connections from your address."
    RATE = "Too many new connections from your address; slow down."
    UPGRADED = "Too many open WebSockets from your address."


@dataclass(frozen=True)
class AdmissionLimits:
    connections: int = 256
    """HTTP connections open at once from one address."""
    upgraded: int = 4096
    """Established upgraded connections (WebSockets, agent links) open at once from one address."""
    rate: float = 1000.0
    """New connections per second from one address, sustained..."""
    burst: float = 2000.0
    """...and at once, after a quiet spell."""

    def __post_init__(self) -> None:
        if self.connections < 1 or self.upgraded < 1:
            raise ValueError("connection caps must be at least 1")
        if not self.rate > 0 or self.burst < 1:
            raise ValueError("the connection rate must be positive and its burst at least 1")


@dataclass
class _Address:
    http: int = 0
    upgraded: int = 0
    tokens: float = 0.0
    refilled_at: float = 0.0


@dataclass
class Admission:
    """The per-address counts and the decisions made on them (see the module docstring)."""

    limits: AdmissionLimits = field(default_factory=AdmissionLimits)
    _addresses: dict[str, _Address] = field(default_factory=dict)
    _swept_at: float = 0.0

    def admit(self, address: str, now: float, make_room: bool = False) -> Refusal | None:
        """A new connection from `address`: None if admitted (it then counts as an HTTP connection until
        ``upgraded`` or ``release``), else why not. `make_room`: the caller will close one of the address's idle
        keep-alive connections if the HTTP cap is reached, so that cap doesn't refuse it."""
        if now - self._swept_at >= self.limits.burst / self.limits.rate:
            self._sweep(now)
        state = self._addresses.get(address)
        if state is None:
            state = self._addresses[address] = _Address(tokens=self.limits.burst, refilled_at=now)
        else:
            elapsed = max(0.0, now - state.refilled_at)
            state.tokens = min(self.limits.burst, state.tokens + elapsed * self.limits.rate)
            state.refilled_at = now
        if state.tokens < 1:
            return Refusal.RATE
        if state.http >= self.limits.connections and not make_room:
            return Refusal.CONNECTIONS
        state.tokens -= 1
        state.http += 1
        return None

    def at_connection_cap(self, address: str) -> bool:
        state = self._addresses.get(address)
        return state is not None and state.http >= self.limits.connections

    def may_upgrade(self, address: str) -> Refusal | None:
        """Whether a connection from `address` may ask to become an upgraded one (checked before the upgrade is
        forwarded, so the visitor gets a clean 429; upgrade requests in flight together may pass it together,
        which the HTTP cap bounds)."""
        state = self._addresses.get(address)
        if state is not None and state.upgraded >= self.limits.upgraded:
            return Refusal.UPGRADED
        return None

    def upgraded(self, address: str) -> None:
        """One of the address's HTTP connections switched protocols: it counts as upgraded from now on."""
        state = self._addresses[address]
        state.http -= 1
        state.upgraded += 1

    def release(self, address: str, upgraded: bool, now: float) -> None:
        """A connection admitted from `address` closed."""
        state = self._addresses[address]
        if upgraded:
            state.upgraded -= 1
        else:
            state.http -= 1
        if self._forgettable(state, now):
            del self._addresses[address]

    def open_connections(self) -> int:
        """Connections open from all addresses, HTTP and upgraded."""
        return sum(state.http + state.upgraded for state in self._addresses.values())

    def counts(self, address: str) -> tuple[int, int]:
        """(HTTP, upgraded) connections open from `address`."""
        state = self._addresses.get(address)
        return (0, 0) if state is None else (state.http, state.upgraded)

    def tracked(self) -> int:
        """Addresses with state kept (for tests of the memory bound)."""
        return len(self._addresses)

    def _forgettable(self, state: _Address, now: float) -> bool:
        # nothing open and a bucket that would be full by now: the entry decides nothing a fresh one wouldn't
        if state.http or state.upgraded:
            return False
        return state.tokens + max(0.0, now - state.refilled_at) * self.limits.rate >= self.limits.burst

    def _sweep(self, now: float) -> None:
        self._swept_at = now
        for address in [address for address, state in self._addresses.items() if self._forgettable(state, now)]:
            del self._addresses[address]
