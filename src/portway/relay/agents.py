"""Agents on the relay: the link handshake, the name claim, and a link's life as a tunnel.

The rules live in proto/control.py (the handshake) and policy/claims.py (who may take which name); this module
runs them against a connection and the registry, and keeps the tunnel's name through a link's grace period.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import logging
import secrets
import socket
from typing import TYPE_CHECKING, Callable

from ..auth import Grant
from ..config import RelayConfig
from ..errors import HttpError
from ..link.bridge import StreamBridge
from ..link.connection import Connection
from ..link.session import MuxSession
from ..policy.claims import THROTTLED
from ..policy.ports import claim_port
from ..proto import http1
from ..proto.control import GrantedTunnel, LinkGrant, LinkRequest, TunnelRequest, refusal, stream_preamble
from ..proto.http1 import RequestHead
from ..proto.mux import Role
from ..proto.proxy_protocol import Endpoints
from .naming import NameClaims
from .registry import Registry, port_lease_name
from .tcp_listeners import TcpListener, TcpListenerError
from .tunnels import AccessPolicy, AgentTunnel

if TYPE_CHECKING:
    from .front import VisitorConnection

log = logging.getLogger(__name__)

PORT_PICKS = 5  # random ports tried for a TCP tunnel when other cluster nodes hold the ones picked


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
        self.ports = TcpPorts(registry)
        self._rng = secrets.SystemRandom()  # a port picked at random must not be predictable
        self._lookups: set[asyncio.Task] = set()
        # the host of TCP tunnels' addresses: a port listens on its own node only, so a cluster node names itself
        self.tcp_host = f"{config.node_id}.{config.domain}" if config.cluster is not None else config.domain

    async def register(self, visitor: "VisitorConnection", head: RequestHead, query: str) -> bool:
        """Serve one agent link on `visitor`'s connection until it ends; the connection never returns to HTTP."""
        conn = visitor.conn
        visitor.carries_agent_link = True
        try:
            request = LinkRequest.parse(head, query)
            access = access_policy(request)
            if request.tunnels:
                return await self._register_tunnels(visitor, request)
            resume_key = secrets.token_urlsafe(24)  # before the lease: a cluster's lease keeps its digest
            claimed = await self.claims.claim(
                token=request.token, peer_ip=conn.peer_ip, requested=request.name,
                may_replace=lambda tunnel: _holds_resume_key(tunnel, request.resume_key),
                proof=request.resume_key, key=resume_key,
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
        if old_session is not None and not old_session.ended:
            # the key proved it: this agent held the name, and has moved on from its old link
            if request.resume_streams:
                old_session.detach("the agent came back on a new link")
                resuming = old_session.parked
            if not resuming:  # the agent no longer has the streams: each is reset, visibly
                if old_session.parked:
                    old_session.abandon()
                else:
                    old_session.close()
        grant = LinkGrant(name, self.public_url(name), resume_key, streams_resumed=resuming)
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
        tunnel.can_move = request.can_move
        self.registry.add(tunnel)
        # an agent stopping gracefully takes no new streams: streams pooled idle for it are let go at once
        session.on_go_away = lambda: self._went_away([tunnel], session)
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

    def _went_away(self, tunnels: list, session: MuxSession) -> None:
        """The agent said GO_AWAY: no new streams go to it over this link. It is stopping, or (in a cluster) it
        moved to another node, which holds the names now: then this node lets them go at once, and its visitors
        for them are forwarded there while the streams in flight here finish.

        The relay says GO_AWAY back: a stream it opened before reading the agent's crossed it and is served, and
        once the agent reads this answer none can still be on its way, so the agent may close the link as soon as
        its streams are done (agent/client.py), never under a stream just opened."""
        session.go_away()
        for tunnel in tunnels:
            if isinstance(tunnel, AgentTunnel):
                tunnel.drop_idle()
        task = asyncio.get_running_loop().create_task(self._forget_moved(tunnels, session))
        self._lookups.add(task)
        task.add_done_callback(self._lookups.discard)

    async def _forget_moved(self, tunnels: list, session: MuxSession) -> None:
        for tunnel in tunnels:
            if not isinstance(tunnel, AgentTunnel) or tunnel.session is not session:
                continue
            try:
                lease = await self.registry.held_elsewhere(tunnel.name)
            except HttpError:
                continue  # the registry can't say: the name stays until the link ends, as for a stopping agent
            if lease is not None and tunnel.session is session:
                log.info("tunnel %s: its agent moved to relay node %s", tunnel.name, lease.node)
                self.registry.remove(tunnel)

    def _parked(self, tunnel: AgentTunnel, reason: str) -> None:
        """The link was lost and its streams wait for the agent: the name is held for the resume window and the
        grace period after it (a resume cancels that; the session's end restarts the grace period)."""
        window = self.config.mux.resume_window
        log.info("tunnel %s offline: %s (its open streams wait up to %gs for the agent)", tunnel.name, reason, window)
        self.registry.free_after(tunnel, window + self.config.grace_period)


    async def _register_tunnels(self, visitor: "VisitorConnection", request: LinkRequest) -> bool:
        """The several-tunnel form: claim every tunnel (names as above, ports through policy/ports.py), all or
        nothing, and serve them all over the one link; every stream opened on it starts with its preamble."""
        conn = visitor.conn
        names: dict[int, str] = {}
        ports: dict[int, int] = {}
        refused: list[tuple[int, HttpError]] = []
        grant: Grant | None = None
        may_replace = lambda tunnel: _holds_resume_key(tunnel, request.resume_key)  # noqa: E731
        resume_key = secrets.token_urlsafe(24)  # before the leases: a cluster's lease keeps its digest
        access = [access_policy(wanted) for wanted in request.tunnels]
        for index, wanted in enumerate(request.tunnels):
            try:
                if wanted.proto == "http":
                    claimed = await self.claims.claim(token=request.token, peer_ip=conn.peer_ip,
                                                      requested=wanted.name, may_replace=may_replace,
                                                      proof=request.resume_key, key=resume_key)
                    grant = claimed.grant
                    names[index] = claimed.name
                else:
                    grant = grant or self._verify(request.token, conn.peer_ip)
                    ports[index] = await self._claim_port(grant, wanted.port, frozenset(ports.values()), may_replace,
                                                          proof=request.resume_key, key=resume_key)
            except HttpError as error:
                if error.status in (401, 429):  # the token or the address: nothing else is worth asking
                    raise
                refused.append((index, error))
        if not refused and grant is not None and grant.max_tunnels:
            # each claim saw the tunnels held before this link, not the others it asks for: the whole link counts
            holders = [self.registry.get(name) for name in names.values()] + [self.ports.get(port)
                                                                              for port in ports.values()]
            held = self.ports.held_by(grant.digest)
            after = held - sum(1 for holder in holders if holder is not None and holder.owner == grant.digest) \
                + len(request.tunnels)
            if after > grant.max_tunnels:
                refused.append((0, HttpError(403, f"this token may hold {grant.max_tunnels} tunnel(s) at once and "
                                                  f"holds {held}; this link asks for {len(request.tunnels)}")))
        opened: list[TcpListener] = []
        if not refused:
            for index, port in ports.items():
                if self.ports.get(port) is not None:
                    continue  # held through a grace period: its listener stayed bound
                listener = TcpListener(self.config.bind, port, self._on_visitor(port), access[index].allow_networks)
                try:
                    await listener.open()
                except TcpListenerError as error:
                    refused.append((index, HttpError(503, str(error))))
                    continue
                opened.append(listener)
        if refused:
            for listener in opened:
                listener.close()
            conn.write(refusal(refused[0][1].status, "\n".join(error.message for _, error in refused),
                               [{"index": index, "status": error.status, "message": error.message}
                                for index, error in refused]))
            return False
        listeners = {listener.port: listener for listener in opened}
        switched = [event for event in visitor.pending if isinstance(event, http1.Switched)]
        visitor.pending.clear()
        link_bytes = (switched[0].trailing if switched else b"") + (conn.take_buffered() if conn.has_unread else b"")
        held: list[AgentTunnel | TcpTunnel] = [
            tunnel for tunnel in [self.registry.get(name) for name in names.values()]
            + [self.ports.get(port) for port in ports.values()]
            if isinstance(tunnel, (AgentTunnel, TcpTunnel))]
        old_session = next((tunnel.session for tunnel in held if tunnel.session is not None
                            and not tunnel.session.ended
                            and _holds_resume_key(tunnel, request.resume_key)), None)
        resuming = False
        if old_session is not None:
            if request.resume_streams:
                old_session.detach("the agent came back on a new link")
                resuming = old_session.parked
            if not resuming:
                if old_session.parked:
                    old_session.abandon()
                else:
                    old_session.close()
        granted = tuple(
            GrantedTunnel(index, "http", self.public_url(names[index]), name=names[index]) if index in names
            else GrantedTunnel(index, "tcp", f"tcp://{self.tcp_host}:{ports[index]}", port=ports[index])
            for index in range(len(request.tunnels)))
        first = granted[0]
        link_grant = LinkGrant(first.name or str(first.port), first.url, resume_key,
                               streams_resumed=resuming, tunnels=granted)
        conn.write(link_grant.encode())
        visitor.mark_upgraded()
        transport = conn.transport
        assert transport is not None
        session = old_session if resuming else MuxSession(Role.SERVER, self.config.mux)
        assert session is not None
        tunnels: list[AgentTunnel | TcpTunnel] = []
        for index, name in names.items():
            existing = self.registry.get(name)
            if isinstance(existing, AgentTunnel):
                existing.session, existing.resume_key = session, link_grant.resume_key
                existing.access = access[index]
                tunnel = existing
            else:
                tunnel = AgentTunnel(name, session, link_grant.resume_key, access[index],
                                     owner=grant.digest if grant else "")
            tunnel.preamble = stream_preamble(index, None)
            tunnel.can_move = request.can_move
            self.registry.add(tunnel)
            tunnels.append(tunnel)
        for index, port in ports.items():
            existing_port = self.ports.get(port)
            if existing_port is not None:
                existing_port.session, existing_port.resume_key = session, link_grant.resume_key
                existing_port.index = index
                existing_port.listener.allow_networks = access[index].allow_networks
                port_tunnel = existing_port
            else:
                port_tunnel = TcpTunnel(port, index, session, link_grant.resume_key, listeners[port],
                                        owner=grant.digest if grant else "")
            self.ports.add(port_tunnel)
            tunnels.append(port_tunnel)
        labels = ", ".join(tunnel.url for tunnel in granted)
        if resuming:
            old_session.resume_on(transport, link_bytes)
            log.info("tunnels %s online again: %d streams resumed", labels, len(session.streams))
            await session.link_down()
            return False
        session.on_go_away = lambda: self._went_away(tunnels, session)
        session.on_link_lost = lambda reason: self._tunnels_parked(tunnels, reason)
        transport.set_protocol(session)
        session.connection_made(transport)
        if link_bytes:
            session.data_received(link_bytes)
        log.info("tunnels online at %s", labels)
        reason_closed = await session.closed
        log.info("tunnels %s offline: %s", labels, reason_closed)
        if session.protocol_error:
            self.counters.protocol_errors["link"] += 1
        for tunnel in tunnels:
            if tunnel.session is not session:
                continue  # taken on by a newer link
            tunnel.drop_idle()
            book = self.ports if isinstance(tunnel, TcpTunnel) else self.registry
            if session.go_away_received:
                book.remove(tunnel)
            else:
                book.free_after(tunnel, self.config.grace_period)
        return False

    async def _claim_port(self, grant: Grant, requested: int | None, asked_on_this_link: frozenset[int],
                          may_replace: Callable[[object], bool], *, proof: str | None, key: str) -> int:
        """A public port for a TCP tunnel: allowed by policy/ports.py against this relay's ports, then leased over
        the cluster (a port is given once, and counts in the token's quota with its names). A port picked at random
        that another node holds is replaced by another pick, a few times. `proof` and `key` are the resume keys
        presented and given (Registry.lease): the agent that held the port on a node it left takes it over."""
        elsewhere: set[int] = set()
        for attempt in range(PORT_PICKS):
            port = claim_port(grant=grant, tokens=self.claims.tokens,
                              offered=self.config.tcp_ports - asked_on_this_link - elsewhere, holders=self.ports,
                              requested=requested, may_replace=may_replace, now=asyncio.get_running_loop().time(),
                              rng=self._rng)
            try:
                await self.registry.lease(port_lease_name(port), owner=grant.digest, kind=TcpTunnel.kind,
                                          max_tunnels=grant.max_tunnels, proof=proof, key=key)
            except HttpError as error:
                if error.status != 409 or requested is not None or attempt == PORT_PICKS - 1:
                    raise
                elsewhere.add(port)
                continue
            return port
        raise AssertionError("unreachable: the last pick returns or raises")

    def _tunnels_parked(self, tunnels: list, reason: str) -> None:
        window = self.config.mux.resume_window
        log.info("tunnels offline: %s (their open streams wait up to %gs for the agent)", reason, window)
        for tunnel in tunnels:
            (self.ports if isinstance(tunnel, TcpTunnel) else self.registry).free_after(
                tunnel, window + self.config.grace_period)

    def _verify(self, token: str | None, peer_ip: str) -> Grant:
        """The token's grant, for a link that asks for TCP tunnels only (names are verified by their claim)."""
        throttle, now = self.claims.throttle, asyncio.get_running_loop().time()
        if throttle.blocked(peer_ip, now):
            raise HttpError(429, THROTTLED)
        grant = self.claims.tokens.verify(token)
        if grant is None:
            throttle.record_failure(peer_ip, now)
            self.counters.auth_failures["token"] += 1
            raise HttpError(401, "this relay needs a valid token (--token or PORTWAY_TOKEN)" if not token
                            else "the token was not accepted by this relay")
        return grant

    def _on_visitor(self, port: int) -> Callable[[Connection], None]:
        def on_visitor(conn: Connection) -> None:
            tunnel = self.ports.get(port)
            transport = conn.transport
            assert transport is not None
            if tunnel is None or not tunnel.online:
                conn.abort()  # the agent is away (grace period): the visitor learns at once
                return
            sock = transport.get_extra_info("socket")
            if sock is not None:  # a TCP visitor may be quiet for hours: a dead peer is found by keepalives
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            assert tunnel.session is not None
            stream = tunnel.session.open_stream()
            stream.write(stream_preamble(tunnel.index, Endpoints.of(transport.get_extra_info("peername"),
                                                                    transport.get_extra_info("sockname"))))
            StreamBridge.take_over(conn, stream)
        return on_visitor


class TcpTunnel:
    """A TCP tunnel: its public port's listener, and the link (and the tunnel's index on it) visitors go to."""

    kind = "tcp"

    def __init__(self, port: int, index: int, session: MuxSession, resume_key: str, listener: TcpListener,
                 owner: str = "") -> None:
        self.port = port
        self.index = index
        self.session: MuxSession | None = session
        self.resume_key = resume_key
        self.listener = listener
        self.owner = owner

    @property
    def online(self) -> bool:
        return self.session is not None and not self.session.ended and not self.session.parked

    def drop_idle(self) -> None:
        return None  # visitors are never pooled: each has its own stream, which ends with it


class TcpPorts:
    """Port → TCP tunnel on this relay: policy/ports.py's PortHolders. An offline tunnel keeps its port (and its
    listener bound, so no other program takes it) for the grace period."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._tunnels: dict[int, TcpTunnel] = {}
        self._grace_handles: dict[int, asyncio.TimerHandle] = {}

    def _lost(self, tunnel: TcpTunnel) -> None:
        """Another cluster node holds the port now (this node's lease lapsed): the tunnel goes, and its agent's link
        is closed so that the agent reconnects and learns."""
        if tunnel.session is not None:
            tunnel.session.close()
        self.remove(tunnel)

    def get(self, port: int) -> TcpTunnel | None:
        return self._tunnels.get(port)

    def ports(self) -> frozenset[int]:
        return frozenset(self._tunnels)

    def held_by(self, owner: str) -> int:
        return self.registry.held_by(owner) + sum(1 for tunnel in self._tunnels.values() if tunnel.owner == owner)

    def frees_at(self, port: int) -> float | None:
        handle = self._grace_handles.get(port)
        return handle.when() if handle is not None else None

    def add(self, tunnel: TcpTunnel) -> None:
        self._cancel_grace(tunnel.port)
        self._tunnels[tunnel.port] = tunnel
        self.registry.hold(port_lease_name(tunnel.port), owner=tunnel.owner, kind=tunnel.kind,
                           lost=lambda: self._lost(tunnel))

    def remove(self, tunnel: TcpTunnel) -> None:
        self._cancel_grace(tunnel.port)
        if self._tunnels.get(tunnel.port) is tunnel:
            del self._tunnels[tunnel.port]
            tunnel.listener.close()
            self.registry.let_go(port_lease_name(tunnel.port))

    def free_after(self, tunnel: TcpTunnel, delay: float) -> None:
        self._cancel_grace(tunnel.port)
        self._grace_handles[tunnel.port] = asyncio.get_running_loop().call_later(delay, self._expire, tunnel)

    def close(self) -> None:
        for tunnel in list(self._tunnels.values()):
            self.remove(tunnel)

    def _cancel_grace(self, port: int) -> None:
        handle = self._grace_handles.pop(port, None)
        if handle is not None:
            handle.cancel()

    def _expire(self, tunnel: TcpTunnel) -> None:
        self._grace_handles.pop(tunnel.port, None)
        if not tunnel.online:
            self.remove(tunnel)


def access_policy(request: LinkRequest | TunnelRequest) -> AccessPolicy:
    """The visitor rules an agent asked for (for its link, or one of its tunnels), as the relay enforces them;
    HttpError(400) for a bad network."""
    access = AccessPolicy()
    if request.basic_auth is not None:
        access.basic_auth = b"Basic " + base64.b64encode(request.basic_auth.encode())
    try:
        access.allow_networks = tuple(ipaddress.ip_network(part, strict=False) for part in request.allow_ip)
    except ValueError as error:
        raise HttpError(400, f"invalid --allow-ip network: {error}") from None
    return access


def _holds_resume_key(tunnel: object, resume_key: str | None) -> bool:
    """A reconnecting agent proves it is the one that held the name (or port) by the key it was given."""
    if not isinstance(tunnel, (AgentTunnel, TcpTunnel)) or resume_key is None:
        return False
    return secrets.compare_digest(resume_key, tunnel.resume_key)
