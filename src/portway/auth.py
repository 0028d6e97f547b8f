"""Who may register tunnels on a relay: agent tokens, the names they reserve, failure throttling.

Tokens are kept as SHA-256 digests only (they are long random secrets, so a fast hash is enough to make a
leaked tokens file useless) and compared in constant time. Nothing here does I/O except reading the TOML
file it is given; time is passed in.
"""

from __future__ import annotations

import hashlib
import hmac
import tomllib
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InvalidName, TokenFileError
from .proto.names import validate_name

UNLIMITED = 0


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Grant:
    """What one token allows: a label for logs, reserved names, and how many tunnels it may hold."""

    label: str
    digest: str
    reserved_names: frozenset[str] = frozenset()
    max_tunnels: int = UNLIMITED


OPEN_GRANT = Grant(label="anonymous", digest="")


def load_tokens_file(path: str | Path) -> list[Grant]:
    """Read `[[token]]` tables: `sha256` (or `token`, hashed on load), `label`, `names`, `max_tunnels`."""
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
        max_tunnels = int(entry.get("max_tunnels", UNLIMITED))
        if max_tunnels < 0:
            raise TokenFileError(f"{where}: max_tunnels can't be negative")
        grants.append(Grant(str(entry.get("label", f"token-{index + 1}")), digest, names, max_tunnels))
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


class FailureThrottle:
    """Refuses an address for a while once it has failed authentication too often."""

    def __init__(self, max_failures: int = 10, window: float = 60.0, max_tracked: int = 10_000) -> None:
        self.max_failures = max_failures
        self.window = window
        self.max_tracked = max_tracked
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, address: str, now: float) -> deque[float] | None:
        times = self._failures.get(address)
        if times is None:
            return None
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._failures[address]
            return None
        return times

    def blocked(self, address: str, now: float) -> bool:
        times = self._recent(address, now)
        return times is not None and len(times) >= self.max_failures

    def record_failure(self, address: str, now: float) -> None:
        if address not in self._failures and len(self._failures) >= self.max_tracked:
            # under an address-spraying attack forget the oldest entry rather than grow without bound
            self._failures.pop(next(iter(self._failures)))
        self._failures.setdefault(address, deque()).append(now)
