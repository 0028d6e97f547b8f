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

    Owns the tunnels it registered for as long as their link lives; when a link drops, its streams are parked
    for the resume window (visitors' connections stay open) and an agent that comes back with the resume key
    takes them on over its new link; when the session ends, the name is kept for the grace period (or freed at
    once when the agent said goodbye with GO_AWAY).
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
        existing = self.registry.get(name)
        old_session = existing.session if isinstance(existing, AgentTunnel) else None
        resuming = False
        if old_session is not None and not old_session.closed.done():
            # the key proved it: this agent held the name, and has moved on from its old link
            if request.resume_streams:
                old_session.detach("the agent came back on a new link")
                resuming = old_session.parked
            if not resuming:  # the agent no longer has the streams: each is reset, visibly
                if old_session.parked:
                    old_session.abandon()
                else:
                    old_session.close()
        grant = LinkGrant(name, self.public_url(name), secrets.token_urlsafe(24), streams_resumed=resuming)
        conn.write(grant.encode())
        visitor.mark_upgraded()
        transport = conn.transport
        assert transport is not None
        if resuming:
            assert isinstance(existing, AgentTunnel) and old_session is not None
            existing.resume_key = grant.resume_key
            existing.access = access
            old_session.resume_on(transport, link_bytes)
            self.registry.keep(existing)
            log.info("tunnel %s online again at %s: %d streams resumed", name, grant.url, len(old_session.streams))
            # this connection's part ends with this link (the register call that started the session sees the
            # session's end through): an agent that reconnects all day must not pile up connections on its address
            await old_session.link_down()
            return False
        session = MuxSession(Role.SERVER, self.config.mux)
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
        session.on_link_lost = lambda reason: self._parked(tunnel, reason)
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

    def _parked(self, tunnel: AgentTunnel, reason: str) -> None:
        """The link was lost and its streams wait for the agent: the name is held for the resume window and the
        grace period after it (a resume cancels that; the session's end restarts the grace period)."""
        window = self.config.mux.resume_window
        log.info("tunnel %s offline: %s (its open streams wait up to %gs for the agent)", tunnel.name, reason, window)
        self.registry.free_after(tunnel, window + self.config.grace_period)


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
    return secrets.compare_digest(resume_key, tunnel.resume_key)
