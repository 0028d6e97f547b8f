"""Agents on the relay: the link handshake, the name claim, and a link's life as a tunnel.

The rules live in proto/control.py (the handshake) and policy/claims.py (who may take which name); this module
runs them against a connection and the registry, and keeps the tunnel's name through a link's grace period.
"""

from __future__ import annotations

import base64
import ipaddress
import logging
import secrets
from typing import TYPE_CHECKING, Callable

from ..config import RelayConfig
from ..errors import HttpError
from ..link.session import MuxSession
from ..proto import http1
from ..proto.control import LinkGrant, LinkRequest, refusal
from ..proto.http1 import RequestHead
from ..proto.mux import Role
from .naming import NameClaims
from .registry import Registry
from .tunnels import AccessPolicy, AgentTunnel, Tunnel

if TYPE_CHECKING:
    from .front import VisitorConnection

log = logging.getLogger(__name__)


class AgentLinks:
    """Turns an agent's upgrade request into a registered tunnel served over that connection's multiplexed link.

    Owns the tunnels it registered for as long as their link lives; when a link drops, the name is kept for the
    grace period (or freed at once when the agent said goodbye with GO_AWAY).
    """

    def __init__(self, config: RelayConfig, registry: Registry, claims: NameClaims,
                 public_url: Callable[[str], str]) -> None:
        self.config = config
        self.registry = registry
        self.claims = claims
        self.public_url = public_url
        self.counters = claims.counters

    async def register(self, visitor: "VisitorConnection", head: RequestHead, query: str) -> bool:
        """Serve one agent link on `visitor`'s connection until it ends; the connection never returns to HTTP."""
        conn = visitor.conn
        visitor.carries_agent_link = True
        try:
            request = LinkRequest.parse(head, query)
            access = access_policy(request)
            claimed = await self.claims.claim(
                token=request.token, peer_ip=conn.peer_ip, requested=request.name,
                may_replace=lambda tunnel: _holds_resume_key(tunnel, request.resume_key),
            )
        except HttpError as error:
            conn.write(refusal(error.status, error.message))
            return False
        name = claimed.name
        # the rest of the connection is the multiplexed link, starting with what came after the request head
        switched = [event for event in visitor.pending if isinstance(event, http1.Switched)]
        visitor.pending.clear()
        link_bytes = (switched[0].trailing if switched else b"") + (conn.take_buffered() if conn.has_unread else b"")
        grant = LinkGrant(name, self.public_url(name), secrets.token_urlsafe(24))
        conn.write(grant.encode())
        visitor.mark_upgraded()
        session = MuxSession(Role.SERVER, self.config.mux)
        existing = self.registry.get(name)
        if isinstance(existing, AgentTunnel):
            existing.session = session
            existing.resume_key = grant.resume_key
            existing.access = access
            tunnel = existing
        else:
            tunnel = AgentTunnel(name, session, grant.resume_key, access, owner=claimed.grant.digest)
        self.registry.add(tunnel)
        # an agent stopping gracefully takes no new streams: streams pooled idle for it are let go at once
        session.on_go_away = tunnel.drop_idle
        transport = conn.transport
        assert transport is not None
        transport.set_protocol(session)
        session.connection_made(transport)
        if link_bytes:
            session.data_received(link_bytes)
        log.info("tunnel %s online at %s", name, grant.url)
        reason_closed = await session.closed
        log.info("tunnel %s offline: %s", name, reason_closed)
        if session.protocol_error:
            self.counters.protocol_errors["link"] += 1
        if tunnel.session is session:
            tunnel.drop_idle()
            if session.go_away_received:
                self.registry.remove(tunnel)  # the agent stopped on purpose: its name is free now
            else:
                self.registry.free_after(tunnel, self.config.grace_period)
        return False


def access_policy(request: LinkRequest) -> AccessPolicy:
    """The visitor rules an agent asked for, as the relay enforces them; HttpError(400) for a bad network."""
    access = AccessPolicy()
    if request.basic_auth is not None:
        access.basic_auth = b"Basic " + base64.b64encode(request.basic_auth.encode())
    try:
        access.allow_networks = tuple(ipaddress.ip_network(part, strict=False) for part in request.allow_ip)
    except ValueError as error:
        raise HttpError(400, f"invalid --allow-ip network: {error}") from None
    return access


def _holds_resume_key(tunnel: Tunnel, resume_key: str | None) -> bool:
    """A reconnecting agent proves it is the one that held the name by the key it was given."""
    if not isinstance(tunnel, AgentTunnel) or resume_key is None:
        return False
    if not secrets.compare_digest(resume_key, tunnel.resume_key):
        return False
    if tunnel.session is not None and not tunnel.session.closed.done():
        tunnel.session.close()  # the old link is stale: the agent has already moved to a new one
    return True
