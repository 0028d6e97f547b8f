"""Name claims on a relay: policy.claims.claim run against this relay's tokens, failure throttle, registry, clock
and randomness, then the name leased in the registry (which, for a cluster, is where another node's names,
the token's quota over every node, and the failed-token count of every node are seen)."""

from __future__ import annotations

import asyncio
import random
import secrets
from typing import Callable

from ..auth import FailureThrottle, TokenBook
from ..errors import HttpError
from ..policy.claims import THROTTLED, Claim, claim
from .metrics import RelayCounters
from .registry import Registry
from .tunnels import Tunnel

RANDOM_NAME_TRIES = 5  # a random name another node took between our pick and our lease: pick again


class NameClaims:
    """Who may take which name on this relay (policy/claims.py), and the lease that makes it this node's."""

    def __init__(self, tokens: TokenBook, throttle: FailureThrottle, registry: Registry,
                 counters: RelayCounters) -> None:
        self.tokens = tokens
        self.throttle = throttle
        self.registry = registry
        self.counters = counters
        self._rng = secrets.SystemRandom()  # random names must not be predictable

    async def claim(self, *, token: str | None, peer_ip: str, requested: str | None,
                    may_replace: Callable[[Tunnel], bool], rng: random.Random | None = None,
                    kind: str = "portway", proof: str | None = None, key: str = "") -> Claim:
        """The name the request may hold, leased for this node; raises HttpError with the refusal. `key` is the
        resume key the registration will be given, `proof` the one the agent presented (Registry.lease)."""
        shared = self.registry.failures
        if shared is not None and await shared.retry_after(peer_ip) is not None:
            raise HttpError(429, THROTTLED)
        tries = 0
        while True:
            tries += 1
            try:
                claimed = claim(tokens=self.tokens, throttle=self.throttle, holders=self.registry, token=token,
                                peer_ip=peer_ip, requested=requested, may_replace=may_replace,
                                now=asyncio.get_running_loop().time(), rng=rng or self._rng)
            except HttpError as refused:
                if refused.status == 401:
                    self.counters.auth_failures["token"] += 1
                    if shared is not None:
                        await shared.record_failure(peer_ip)
                raise
            try:
                await self.registry.lease(claimed.name, owner=claimed.grant.digest, kind=kind,
                                          max_tunnels=claimed.grant.max_tunnels, proof=proof, key=key)
            except HttpError as refused:
                if refused.status == 409 and requested is None and tries < RANDOM_NAME_TRIES:
                    continue
                raise
            return claimed
