"""Live tunnels on this relay: what a visitor request is forwarded through.

A tunnel hands out conduits (byte pipes that end at the origin): multiplexed streams for Portway
agents, pool sockets for localtunnel clients. Conduits whose origin connection is still open after a
complete exchange are kept idle for the next request, like a keep-alive pool.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import secrets
from dataclasses import dataclass
from typing import Callable, ClassVar, Final

from mypy_extensions import mypyc_attr

from ..auth import BasicAuthGuard
from ..errors import HttpError, MuxClosedError
from ..proto.http1 import RequestHead
from ..link.bridge import StreamBridge
from ..link.connection import Connection
from ..link.session import MuxSession
from .metrics import TunnelCounters

IDLE_CONDUITS_PER_TUNNEL: Final = 256


@dataclass
class AccessPolicy:
    """Who may visit a tunnel: checked on the same parsed request the relay routes by."""

    basic_auth: bytes | None = None  # the expected `Authorization` header value
    allow_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    # a tunnel served by another node: its rules came over the node link, basic auth as the value's SHA-256 (hex)
    basic_auth_digest: str | None = None

    @property
    def requires_login(self) -> bool:
        return self.basic_auth is not None or self.basic_auth_digest is not None

    def login_digest(self) -> str | None:
        """The expected `Authorization` value as SHA-256 hex: how the rule travels to the node a visitor is on."""
        if self.basic_auth is not None:
            return hashlib.sha256(self.basic_auth).hexdigest()
        return self.basic_auth_digest

    def check(self, peer_ip: str, head: RequestHead, guard: BasicAuthGuard | None = None, tunnel: str = "",
              now: float = 0.0) -> None:
        """Raise HttpError unless the request may pass: 403 (address), 429 (`guard` throttles password
        guessing; Retry-After), 401 (credentials)."""
        if self.allow_networks:
            try:
                address = ipaddress.ip_address(peer_ip)
            except ValueError:
                raise HttpError(403, "this tunnel does not accept visitors from your address", close=False)
            if not any(address in network for network in self.allow_networks):
                raise HttpError(403, "this tunnel does not accept visitors from your address", close=False)
        if self.requires_login:
            authorization = head.header(b"authorization")
            if guard is not None:
                wait = guard.refusal(tunnel, peer_ip, authorization is not None, now)
                if wait is not None:
                    seconds = max(1, math.ceil(wait))
                    raise HttpError(429, f"too many failed logins; try again in {seconds} s", close=False,
                                    headers=[("Retry-After", str(seconds))])
            if authorization is None:
                raise HttpError(401, "this tunnel requires a user name and password", close=False)
            if self.basic_auth is not None:
                succeeded = secrets.compare_digest(authorization, self.basic_auth)
            else:
                assert self.basic_auth_digest is not None
                succeeded = secrets.compare_digest(hashlib.sha256(authorization).hexdigest(), self.basic_auth_digest)
            if guard is not None:
                guard.record(tunnel, peer_ip, succeeded, now)
            if not succeeded:
                raise HttpError(401, "this tunnel requires a user name and password", close=False)


@mypyc_attr(allow_interpreted_subclasses=True)  # localtunnel's, the cluster's and the tests' tunnels
class Tunnel:
    """Common part of every tunnel kind: name, idle conduit pool, online state."""

    kind: ClassVar[str] = "tunnel"

    def __init__(self, name: str, access: AccessPolicy | None = None, owner: str = "") -> None:
        self.name = name
        self.owner = owner  # digest of the token that registered it ("" on an open relay)
        self.access = access or AccessPolicy()
        self.idle: list = []
        self.counters = TunnelCounters()

    @property
    def online(self) -> bool:
        raise NotImplementedError

    @property
    def agent_leaving(self) -> bool:
        """Its agent said it goes away (it stops, or it moved to another node of the cluster): no new streams."""
        return False

    async def _new_conduit(self):
        raise NotImplementedError

    async def join(self, conn: Connection, conduit, unread: bytes) -> None:
        """After a 101: the visitor's connection and the conduit become one raw pipe, by callbacks, until both
        ends are gone. `unread` is what the visitor sent after its request head."""
        raise NotImplementedError

    def take_idle(self):
        """An idle conduit still clean, or None."""
        idle = self.idle
        while idle:
            conduit = idle.pop()
            if not conduit.has_unread:
                return conduit
            conduit.close()  # the origin closed it or sent stray bytes (a 408) while it sat idle
        return None

    async def fresh_conduit(self):
        """A new conduit to the origin, never a pooled one (for a stream another node keeps for itself)."""
        return await self._new_conduit()

    async def acquire(self):
        """A conduit to the origin: an idle one still clean, else a new one; and whether it was reused."""
        conduit = self.take_idle()
        if conduit is not None:
            return conduit, True
        return await self._new_conduit(), False

    def release(self, conduit, reusable: bool) -> None:
        if reusable and self.online and len(self.idle) < IDLE_CONDUITS_PER_TUNNEL:
            conduit.reader_done()
            self.idle.append(conduit)
        else:
            conduit.close()

    def drop_idle(self) -> None:
        idle, self.idle = self.idle, []
        for conduit in idle:
            conduit.close()

    def close(self) -> None:
        """The tunnel left the registry for good: release whatever it holds (subclasses add theirs)."""
        self.drop_idle()



class AgentTunnel(Tunnel):
    """A tunnel served by a Portway agent over one multiplexed link."""

    kind: ClassVar[str] = "portway"

    def __init__(self, name: str, session: MuxSession, resume_key: str, access: AccessPolicy | None = None,
                 owner: str = "") -> None:
        super().__init__(name, access, owner)
        self.session: MuxSession | None = session
        self.resume_key = resume_key
        self.preamble = b""  # on a several-tunnel link: the first bytes of each stream, naming this tunnel
        self.can_move = False  # its agent understands MOVE: a stopping cluster node may send it to another node
        # set by relay/nodes.py once other cluster nodes forward visitors here: told when the agent says it is going
        # away, as they keep streams of this tunnel idle (the agent waits for every stream it has open to end)
        self.on_going_away: Callable[["AgentTunnel"], None] | None = None
        # the accepted node links that carried streams of this tunnel (relay/nodes.py): the ones told on going away
        self.forwarding_links: set[MuxSession] = set()

    @property
    def online(self) -> bool:
        """The agent's link is up (a parked session, whose link is lost, is not online: it waits for one)."""
        session = self.session
        return session is not None and not session.ended and not session.parked

    @property
    def agent_leaving(self) -> bool:
        session = self.session
        return session is not None and session.go_away_received

    def drop_idle(self) -> None:
        super().drop_idle()
        session = self.session
        if self.on_going_away is not None and session is not None and session.go_away_received:
            self.on_going_away(self)

    def release(self, conduit, reusable: bool) -> None:
        # a link going away (either end sent GO_AWAY) carries the exchanges in flight, no new ones: don't pool
        session = self.session
        if session is not None and session.mux.going_away:
            reusable = False
        super().release(conduit, reusable)

    async def join(self, conn: Connection, conduit, unread: bytes) -> None:
        await StreamBridge.take_over(conn, conduit, unread).closed

    async def _new_conduit(self):
        session = self.session
        if session is None or session.ended:
            raise HttpError(502, f"the agent for tunnel {self.name!r} is not connected (agent reconnecting)")
        if session.resuming:  # the agent is back and the streams are being settled: a round trip
            await session.until_resumed()
        if session.parked or session.ended:
            raise HttpError(502, f"the agent for tunnel {self.name!r} is not connected (agent reconnecting)")
        try:
            stream = session.open_stream()
        except MuxClosedError:
            raise HttpError(502, f"the agent for tunnel {self.name!r} is going away") from None
        if self.preamble:
            stream.write(self.preamble)  # fits any fresh stream's window: sent with the stream's first bytes
        return stream
