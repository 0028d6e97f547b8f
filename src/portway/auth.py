"""Who may register tunnels on a relay (agent tokens, the names and TCP ports they reserve) and how failed logins
are throttled (agent tokens and tunnels' basic auth).

Tokens are kept as SHA-256 digests only (they are long random secrets, so a fast hash is enough to make a
leaked tokens file useless) and compared in constant time. Nothing here does I/O except reading the TOML
file it is given; time is passed in.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Hashable

from .errors import InvalidName, TokenFileError
from .proto.names import validate_name

UNLIMITED = 0


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Grant:
    """What one token allows: a label for logs, reserved names and TCP ports, and how many tunnels (HTTP and TCP
    together) it may hold."""

    label: str
    digest: str
    reserved_names: frozenset[str] = frozenset()
    max_tunnels: int = UNLIMITED
    reserved_ports: frozenset[int] = frozenset()


OPEN_GRANT = Grant(label="anonymous", digest="")


def load_tokens_file(path: str | Path) -> list[Grant]:
    """Read `[[token]]` tables: `sha256` (or `token`, hashed on load), `label`, `names`, `ports`, `max_tunnels`.
    A port reserved by two tokens is refused: it could only ever be the first one's."""
    import tomllib  # here: an open relay never needs it (nor datetime, which it loads)

    try:
        document = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise TokenFileError(f"cannot read tokens file {path}: {error}") from None
    grants = []
    for index, entry in enumerate(document.get("token", [])):
        where = f"{path}: token #{index + 1}"
        if "sha256" in entry:
            digest = str(entry["sha256"]).lower()
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise TokenFileError(f"{where}: sha256 must be 64 hex digits")
        elif "token" in entry:
            digest = hash_token(str(entry["token"]))
        else:
            raise TokenFileError(f"{where}: needs `sha256 = \"…\"` (see `portway hash-token`)")
        try:
            names = frozenset(validate_name(str(name)) for name in entry.get("names", []))
        except InvalidName as error:
            raise TokenFileError(f"{where}: {error}") from None
        ports = entry.get("ports", [])
        if not isinstance(ports, list) or any(type(port) is not int or not 1 <= port <= 65535 for port in ports):
            raise TokenFileError(f"{where}: ports must be an array of port numbers (1-65535), "
                                 f"e.g. ports = [20001, 20002]")
        max_tunnels = int(entry.get("max_tunnels", UNLIMITED))
        if max_tunnels < 0:
            raise TokenFileError(f"{where}: max_tunnels can't be negative")
        for earlier in grants:
            shared = sorted(earlier.reserved_ports & set(ports))
            if shared:
                raise TokenFileError(f"{where}: port {shared[0]} is already reserved by {earlier.label!r}")
        grants.append(Grant(str(entry.get("label", f"token-{index + 1}")), digest, names, max_tunnels,
                            frozenset(ports)))
    if not grants:
        raise TokenFileError(f"{path} defines no [[token]] entries")
    return grants


@dataclass
class TokenBook:
    """All grants of a relay. Empty means an open relay: anyone may register unreserved names."""

    grants: list[Grant] = field(default_factory=list)

    def verify(self, token: str | None) -> Grant | None:
        """The grant for `token`, or None. Every stored digest is compared, in constant time."""
        if not self.grants:
            return OPEN_GRANT
        if not token:
            return None
        presented = hash_token(token)
        found = None
        for grant in self.grants:
            if hmac.compare_digest(presented, grant.digest):
                found = grant
        return found

    def owner_of(self, name: str) -> Grant | None:
        for grant in self.grants:
            if name in grant.reserved_names:
                return grant
        return None

    def port_owner(self, port: int) -> Grant | None:
        for grant in self.grants:
            if port in grant.reserved_ports:
                return grant
        return None

    def reserved_ports(self) -> frozenset[int]:
        return frozenset().union(*(grant.reserved_ports for grant in self.grants))


class FailureThrottle:
    """Refuses a key (an address, a tunnel) for a while once it has failed authentication too often.

    A key is blocked while ``max_failures`` failures fall within the last ``window`` seconds: a sliding window.
    Only the latest ``max_failures`` failure times of a key are kept (an older one can't decide anything the
    newer ones don't), and at most ``max_tracked`` keys, the oldest forgotten first, so memory stays bounded
    however many failures and keys an attacker produces. Time is passed in.
    """

    def __init__(self, max_failures: int = 10, window: float = 60.0, max_tracked: int = 10_000) -> None:
        if max_failures < 1 or not window > 0 or max_tracked < 1:
            raise ValueError("max_failures and max_tracked must be at least 1 and window positive")
        self.max_failures = max_failures
        self.window = window
        self.max_tracked = max_tracked
        self._failures: dict[Hashable, deque[float]] = {}

    def _recent(self, key: Hashable, now: float) -> deque[float] | None:
        times = self._failures.get(key)
        if times is None:
            return None
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._failures[key]
            return None
        return times

    def blocked(self, key: Hashable, now: float) -> bool:
        return self.retry_after(key, now) is not None

    def retry_after(self, key: Hashable, now: float) -> float | None:
        """None when `key` may try now, else the seconds until it may (when its oldest kept failure leaves the
        window)."""
        times = self._recent(key, now)
        if times is None or len(times) < self.max_failures:
            return None
        return times[0] + self.window - now

    def record_failure(self, key: Hashable, now: float) -> None:
        times = self._failures.get(key)
        if times is None:
            if len(self._failures) >= self.max_tracked:
                # under an address-spraying attack forget the oldest entry rather than grow without bound
                self._failures.pop(next(iter(self._failures)))
            times = self._failures[key] = deque(maxlen=self.max_failures)
        times.append(now)


def address_key(address: str) -> str:
    """What the per-address throttle counts by: an IPv4 address, or the /64 an IPv6 address is in (one host
    usually holds a whole /64, so counting single IPv6 addresses would give it 2**64 fresh starts)."""
    if ":" not in address:
        return address  # IPv4 (or not an address at all): counted as it is, without parsing
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return address


class BasicAuthGuard:
    """Bounds password guessing against tunnels' basic auth: a pure policy, time passed in.

    Only requests that present credentials (an ``Authorization`` header) and fail count: a browser's first
    request carries none and is answered 401 as usual. Two limits, each a :class:`FailureThrottle`:

    - **per address**, over all the relay's basic-auth tunnels: after ``per_address`` failures within
      ``window`` seconds, every request from that address to a basic-auth tunnel is refused (429) until the
      window has moved past enough of them, whatever credentials it carries: the right password is not even
      compared, so a throttled address learns nothing;
    - **per tunnel**, from all addresses together (guessing spread over many addresses): after ``per_tunnel``
      failures within the window the tunnel locks: requests that present credentials are refused (429)
      unless they come from an address that logged in to that tunnel within ``trust_period`` seconds, so
      visitors already using the tunnel carry on. Requests without credentials still get their 401.

    :meth:`refusal` says whether a request must be refused before its credentials are looked at, and for
    how long; :meth:`record` reports the outcome of a comparison that did happen. Memory is bounded: at most
    ``max_tracked`` addresses, tunnels and trusted (tunnel, address) pairs, each with at most its limit's
    number of failure times.
    """

    def __init__(self, per_address: int = 10, per_tunnel: int = 100, window: float = 60.0,
                 trust_period: float = 3600.0, max_tracked: int = 10_000) -> None:
        self.addresses = FailureThrottle(per_address, window, max_tracked)
        self.tunnels = FailureThrottle(per_tunnel, window, max_tracked)
        self.trust_period = trust_period
        self.max_tracked = max_tracked
        self._trusted: dict[tuple[str, str], float] = {}  # (tunnel, address key) -> last success; oldest first

    def refusal(self, tunnel: str, address: str, presents_credentials: bool, now: float) -> float | None:
        """None if the request's credentials may be checked; else the seconds to announce in Retry-After."""
        key = address_key(address)
        wait = self.addresses.retry_after(key, now)
        if wait is None and presents_credentials and not self.trusted(tunnel, key, now):
            wait = self.tunnels.retry_after(tunnel, now)
        return wait

    def record(self, tunnel: str, address: str, succeeded: bool, now: float) -> None:
        """The outcome of checking credentials a request presented."""
        key = address_key(address)
        if succeeded:
            trusted = self._trusted
            trusted.pop((tunnel, key), None)  # re-inserted last: the dict stays ordered by last success
            if len(trusted) >= self.max_tracked:
                trusted.pop(next(iter(trusted)))
            trusted[tunnel, key] = now
        else:
            self.addresses.record_failure(key, now)
            self.tunnels.record_failure(tunnel, now)

    def trusted(self, tunnel: str, key: str, now: float) -> bool:
        """Whether the address (its :func:`address_key`) logged in to the tunnel within the trust period."""
        last = self._trusted.get((tunnel, key))
        return last is not None and now - last < self.trust_period
