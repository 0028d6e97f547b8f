"""ACME's decisions, without I/O or a clock (`now` is passed in): which certificate serves a TLS server name, when a
certificate is renewed (a third of its lifetime left), how long to wait after a failed attempt (doubling backoff),
and whether a name may make the relay order a certificate at all."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from ..errors import InvalidName
from ..proto.names import validate_name

RENEW_WHEN_LEFT = 1 / 3  # renew once a third of the lifetime is left (60 of 90 days at Let's Encrypt)
FIRST_RETRY = 60.0  # seconds after a first failure
MAX_RETRY = 6 * 3600.0  # the backoff doubles up to this
WILDCARD = "_wildcard"  # the key of the `*.DOMAIN` + `DOMAIN` certificate ('_' is in no tunnel name)


def renewal_time(not_before: float, not_after: float) -> float:
    """When a certificate valid from `not_before` to `not_after` (epoch seconds) is renewed."""
    return not_after - (not_after - not_before) * RENEW_WHEN_LEFT


def retry_delay(failures: int) -> float:
    """Seconds to wait after the `failures`-th failure in a row (1, 2, ...): 60 s doubling, at most 6 h."""
    if failures < 1:
        raise ValueError("retry_delay counts failures from 1")
    return min(FIRST_RETRY * 2 ** min(failures - 1, 32), MAX_RETRY)


def certificate_key(server_name: str | None, domain: str, wildcard: bool) -> str | None:
    """Which certificate serves `server_name` (SNI, any case): WILDCARD for DOMAIN and every NAME.DOMAIN when the
    relay has the wildcard one, else the name itself (DOMAIN or NAME.DOMAIN); None for a name outside the domain
    (or nested deeper, which `*.DOMAIN` doesn't cover either)."""
    if server_name is None:
        return WILDCARD if wildcard else domain
    name = server_name.lower().rstrip(".")
    if name != domain:
        label, dot, rest = name.partition(".")
        if not dot or rest != domain or not _is_tunnel_name(label):
            return None
    return WILDCARD if wildcard else name


def _is_tunnel_name(label: str) -> bool:
    try:
        return validate_name(label) == label
    except InvalidName:
        return False


def certificate_names(key: str, domain: str) -> list[str]:
    """The names a certificate key stands for, in the order they go into the order and the CSR."""
    return [f"*.{domain}", domain] if key == WILDCARD else [key]


def tunnel_of(key: str, domain: str) -> str | None:
    """The tunnel name a per-name certificate key belongs to; None for the relay's own domain (or the wildcard)."""
    if key in (WILDCARD, domain):
        return None
    return key[: -len(domain) - 1]


class Verdict(enum.Enum):
    SERVE = "serve"  # a certificate is there
    ORDER = "order"  # none (or one due for renewal): order one now, and serve the old one meanwhile if any
    WAIT = "wait"  # an order is on its way, or the last one failed and the backoff has not passed
    REFUSE = "refuse"  # not a name the relay may order a certificate for


@dataclass
class _State:
    not_before: float | None = None  # of the certificate in use; None: none yet
    not_after: float | None = None
    in_flight: bool = False
    failures: int = 0
    retry_at: float | None = None  # after a failure: not before this
    scheduled: bool = True  # renewed by the timer (per-name certificates drop out when their tunnel is gone)


@dataclass
class IssuancePlan:
    """Every certificate the relay has or wants, and when to act on each. The glue asks `due(now)` when the timer
    from `next_wakeup()` fires, `on_demand(...)` from the SNI callback, and reports back with `started`,
    `installed` and `failed` (which returns the next try)."""

    states: dict[str, _State] = field(default_factory=dict)

    def want(self, key: str) -> None:
        """Ask for a certificate `key` on the timer (the wildcard one, the relay's own domain, a cluster node's
        own NODE-ID.DOMAIN)."""
        self.states.setdefault(key, _State()).scheduled = True

    def installed(self, key: str, not_before: float, not_after: float) -> None:
        state = self.states.setdefault(key, _State())
        state.not_before, state.not_after = not_before, not_after
        state.in_flight, state.failures, state.retry_at = False, 0, None
        state.scheduled = True  # renewed on time again (an unscheduled name back on demand included)

    def started(self, key: str) -> None:
        self.states.setdefault(key, _State()).in_flight = True

    def failed(self, key: str, now: float) -> float:
        """Record a failed order; returns when the next try is due."""
        state = self.states.setdefault(key, _State())
        state.in_flight = False
        state.failures += 1
        state.retry_at = now + retry_delay(state.failures)
        return state.retry_at

    def unscheduled(self, key: str) -> None:
        """Stop renewing `key` on the timer (its tunnel is gone); its certificate is still served while valid, and
        a visit after the tunnel is back renews it on demand."""
        if key in self.states:
            self.states[key].scheduled = False

    def has_certificate(self, key: str) -> bool:
        state = self.states.get(key)
        return state is not None and state.not_after is not None

    def _next_time(self, state: _State) -> float:
        """When `state` next wants an order (0: as soon as possible)."""
        renew = renewal_time(state.not_before, state.not_after) if state.not_after is not None else 0.0
        return max(renew, state.retry_at or 0.0)

    def due(self, now: float) -> list[str]:
        """The scheduled keys whose order should start now."""
        return sorted(key for key, state in self.states.items()
                      if state.scheduled and not state.in_flight and self._next_time(state) <= now)

    def next_wakeup(self) -> float | None:
        """The earliest time a scheduled key becomes due (None: nothing to wait for)."""
        times = [self._next_time(state) for state in self.states.values() if state.scheduled and not state.in_flight]
        return min(times) if times else None

    def on_demand(self, key: str | None, registered: bool, now: float) -> Verdict:
        """A TLS handshake names `key` (see certificate_key); `registered`: the name is the relay's own or a tunnel
        registered right now. Only such names may make the relay order (or renew) a certificate."""
        if key is None:
            return Verdict.REFUSE
        state = self.states.get(key)
        has = state is not None and state.not_after is not None
        if not registered:
            return Verdict.SERVE if has else Verdict.REFUSE
        if state is None:
            return Verdict.ORDER
        if state.in_flight or (state.retry_at is not None and now < state.retry_at):
            return Verdict.SERVE if has else Verdict.WAIT
        if has and now < renewal_time(state.not_before, state.not_after):
            return Verdict.SERVE
        return Verdict.ORDER
