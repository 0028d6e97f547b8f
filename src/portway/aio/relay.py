"""`portway server`: one port for visitors and agents, routing each request by its Host."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import secrets
import ssl
import time
from dataclasses import dataclass
from typing import Callable
from urllib.parse import parse_qs

from ..auth import BasicAuthGuard, FailureThrottle, Grant, TokenBook
from ..config import RelayConfig
from ..errors import HttpError
from ..proto import http1
from ..proto.http1 import RequestHead
from ..proto.mux import Role
from ..proto.names import SYSTEM_NAMES, InvalidName, random_name, validate_name
from ..proto.pages import error_response, landing_page, reason
from ..proto.routing import Router
from .connection import Connection
from .deadlines import DeadlineSweeper, resolution_for
from .ltcompat import LocalTunnelService
from .proxy import VisitorConnection
from .session import MuxSession
from .tunnels import AccessPolicy, AgentTunnel, Registry, Tunnel

log = logging.getLogger(__name__)

AGENT_PATH = "/_portway/agent"
AGENT_UPGRADE = b"portway-mux"


@dataclass
class Registration:
    name: str | None
    resume_key: str | None
    access: AccessPolicy
    token: str | None


def json_response(status: int, payload: dict, *, close: bool = False) -> bytes:
    return http1.simple_response(
        status, reason(status), json.dumps(payload).encode(), content_type="application/json", close=close
    )


class Relay:
    def __init__(self, config: RelayConfig) -> None:
        self.config = config
        self.router = Router(config.domain, SYSTEM_NAMES)
        self.registry = Registry()
        self.server: asyncio.base_events.Server | None = None
        self.ssl_context: ssl.SSLContext | None = None
        self.port = config.port
        self.localtunnel = LocalTunnelService(self)
        self.tokens = TokenBook(list(config.grants))
        self.throttle = FailureThrottle(config.auth_failures_per_address, config.auth_failure_window)
        self.guard = BasicAuthGuard(config.auth_failures_per_address, config.auth_failures_per_tunnel,
                                    config.auth_failure_window)
        self.connections_per_ip: dict[str, int] = {}
        self.deadlines: DeadlineSweeper | None = None

    # lifecycle
    async def start(self) -> None:
        check_secure_default(self.config)
        if self.config.tls_cert:
            self.ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self.ssl_context.load_cert_chain(self.config.tls_cert, self.config.tls_key)
        loop = asyncio.get_running_loop()
        config = self.config
        self.deadlines = DeadlineSweeper(loop, resolution_for(config.idle_timeout, config.head_timeout,
                                                              config.response_timeout))
        # a handshake that never completes is a slowloris the per-address limit can't count yet: bound it like a head
        handshake = {"ssl_handshake_timeout": self.config.head_timeout} if self.ssl_context is not None else {}
        self.server = await loop.create_server(
            self._new_connection, self.config.bind, self.config.port, ssl=self.ssl_context,
            reuse_address=True, backlog=1024, **handshake,
        )
        self.port = self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        if self.deadlines is not None:
            self.deadlines.close()
        for tunnel in list(self.registry.tunnels.values()):
            if isinstance(tunnel, AgentTunnel) and tunnel.session is not None:
                tunnel.session.close()
            self.registry.remove(tunnel)

    @property
    def scheme(self) -> str:
        return "https" if self.ssl_context is not None else "http"

    def public_url(self, name: str | None = None) -> str:
        port = self.config.public_port or self.port
        default = 443 if self.scheme == "https" else 80
        suffix = "" if port == default else f":{port}"
        host = f"{name}.{self.config.domain}" if name else self.config.domain
        return f"{self.scheme}://{host}{suffix}"

    def _new_connection(self) -> Connection:
        conn = Connection()
        asyncio.get_running_loop().create_task(self._serve(conn))
        return conn

    async def _serve(self, conn: Connection) -> None:
        await asyncio.sleep(0)  # connection_made runs right after the factory returns
        address = conn.peer_ip
        count = self.connections_per_ip.get(address, 0)
        if count >= self.config.max_connections_per_ip:
            conn.write(error_response(429, "Too many connections from your address.", close=True))
            conn.close()
            return
        self.connections_per_ip[address] = count + 1
        visitor = VisitorConnection(self, conn, self.scheme)
        self.deadlines.watch(visitor.deadline)
        try:
            await visitor.serve()
        finally:
            self.deadlines.unwatch(visitor.deadline)
            remaining = self.connections_per_ip[address] - 1
            if remaining:
                self.connections_per_ip[address] = remaining
            else:
                del self.connections_per_ip[address]

    # the relay's own endpoints (bare domain, IP literal, localhost)
    async def serve_own(self, visitor: VisitorConnection, head: RequestHead) -> bool:
        path, _, query = head.target.decode("latin-1").partition("?")
        if path == AGENT_PATH:
            return await self._register_agent(visitor, head, query)
        if self.localtunnel.wants(head, path, query):
            return await self.localtunnel.serve(visitor, head, path, query)
        if not await visitor.skip_body(head):
            visitor.send_error(400, "unexpected request body", close=True)
            return False
        if path == "/api/status":
            visitor.send(json_response(200, self.status()), head_only=head.method == "HEAD")
        elif path == "/" or path == "":
            suffix = self.public_url().split(self.config.domain, 1)[1]
            visitor.send(landing_page(self.config.domain, suffix, len(self.registry.tunnels)),
                         head_only=head.method == "HEAD")
        else:
            visitor.send_error(404, f"Nothing is served at {path} on this relay.", close=False,
                               head_only=head.method == "HEAD")
        return head.keep_alive

    def admit(self, tunnel: Tunnel, peer_ip: str, head: RequestHead) -> None:
        """Raise HttpError unless the tunnel's access policy lets this request through (403, 429, 401)."""
        access = tunnel.access
        if access.basic_auth is not None:
            access.check(peer_ip, head, self.guard, tunnel.name, time.monotonic())
        elif access.allow_networks:
            access.check(peer_ip, head)

    def status(self) -> dict:
        return {"tunnels": len(self.registry.tunnels)}

    # agent registration
    def _parse_registration(self, head: RequestHead, query: str) -> Registration:
        params = parse_qs(query)
        name = params.get("name", [None])[0]
        resume = head.header(b"portway-resume")
        access = AccessPolicy()
        basic = head.header(b"portway-basic-auth")
        if basic:
            access.basic_auth = b"Basic " + basic.strip()
        allow = head.header(b"portway-allow-ip")
        if allow:
            try:
                access.allow_networks = tuple(
                    ipaddress.ip_network(part.strip(), strict=False)
                    for part in allow.decode("ascii").split(",") if part.strip()
                )
            except ValueError as error:
                raise HttpError(400, f"invalid --allow-ip network: {error}") from None
        return Registration(name, resume.decode("ascii") if resume else None, access, bearer_token(head))

    async def _register_agent(self, visitor: VisitorConnection, head: RequestHead, query: str) -> bool:
        conn = visitor.conn
        if head.upgrade is None or head.upgrade.lower() != AGENT_UPGRADE:
            conn.write(json_response(426, {"message": "the agent link needs Upgrade: portway-mux"}, close=True))
            return False
        try:
            registration = self._parse_registration(head, query)
            name, grant = self.claim(
                token=registration.token, peer_ip=conn.peer_ip, requested=registration.name,
                may_replace=lambda tunnel: _holds_resume_key(tunnel, registration.resume_key),
            )
        except HttpError as error:
            conn.write(json_response(error.status, {"message": error.message}, close=True))
            return False
        # the rest of the connection is the multiplexed link
        leftover = b""
        for event in visitor.pending:
            if isinstance(event, http1.Switched):
                leftover = event.trailing
        leftover += conn.take_buffered() if conn.has_unread and not conn.at_eof else b""
        resume_key = secrets.token_urlsafe(24)
        url = self.public_url(name)
        conn.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: portway-mux\r\nConnection: Upgrade\r\n"
            + f"Portway-Name: {name}\r\nPortway-Url: {url}\r\nPortway-Resume: {resume_key}\r\n\r\n".encode()
        )
        session = MuxSession(Role.SERVER, self.config.mux)
        existing = self.registry.get(name)
        if isinstance(existing, AgentTunnel):
            existing.session = session
            existing.resume_key = resume_key
            existing.access = registration.access
            tunnel = existing
        else:
            tunnel = AgentTunnel(name, session, resume_key, registration.access, owner=grant.digest)
        self.registry.add(tunnel)
        transport = conn.transport
        assert transport is not None
        transport.set_protocol(session)
        session.connection_made(transport)
        if leftover:
            session.data_received(leftover)
        log.info("tunnel %s online at %s", name, url)
        reason_closed = await session.closed
        log.info("tunnel %s offline: %s", name, reason_closed)
        if tunnel.session is session:
            tunnel.drop_idle()
            if session.go_away_received:
                self.registry.remove(tunnel)  # the agent stopped on purpose: its name is free now
            else:
                self.registry.free_after(tunnel, self.config.grace_period)
        return False

    def claim(self, *, token: str | None, peer_ip: str, requested: str | None,
              may_replace: Callable[[Tunnel], bool]) -> tuple[str, Grant]:
        """Authenticate a registration and pick its name; raises HttpError with the refusal."""
        now = asyncio.get_running_loop().time()
        if self.throttle.blocked(peer_ip, now):
            raise HttpError(429, "too many failed authentication attempts from your address; try again later")
        grant = self.tokens.verify(token)
        if grant is None:
            self.throttle.record_failure(peer_ip, now)
            raise HttpError(401, "this relay needs a valid token (--token or PORTWAY_TOKEN)" if not token
                            else "the token was not accepted by this relay")
        if grant.max_tunnels:
            held = sum(1 for tunnel in self.registry.tunnels.values() if tunnel.owner == grant.digest)
            if held >= grant.max_tunnels and not (requested and self._replaceable(requested, may_replace)):
                raise HttpError(403, f"this token may hold {grant.max_tunnels} tunnel(s) at once and holds {held}")
        if requested is None:
            return random_name(self.reserved_or_taken()), grant
        try:
            name = validate_name(requested)
        except InvalidName as error:
            raise HttpError(400, str(error)) from None
        owner = self.tokens.owner_of(name)
        if owner is not None and owner.digest != grant.digest:
            raise HttpError(403, f"tunnel name {name!r} is reserved for another token")
        existing = self.registry.get(name)
        if existing is not None and not may_replace(existing):
            raise HttpError(409, f"tunnel name {name!r} is already in use")
        return name, grant

    def _replaceable(self, name: str, may_replace: Callable[[Tunnel], bool]) -> bool:
        existing = self.registry.get(name)
        return existing is not None and may_replace(existing)

    def reserved_or_taken(self) -> set[str]:
        taken = set(self.registry.tunnels)
        for grant in self.tokens.grants:
            taken |= grant.reserved_names
        return taken


def check_secure_default(config: RelayConfig) -> None:
    """Refuse to run an open relay on a reachable address unless the operator said so."""
    if config.grants or config.open_relay:
        return
    try:
        loopback = ipaddress.ip_address(config.bind).is_loopback
    except ValueError:
        loopback = config.bind == "localhost"
    if not loopback:
        raise InsecureConfiguration(
            f"refusing to listen on {config.bind} without agent tokens: anyone could open tunnels here. "
            "Add --token SECRET (or --tokens FILE), or pass --open to run an open relay knowingly."
        )


class InsecureConfiguration(ValueError):
    """The relay configuration would expose an unauthenticated relay."""


def bearer_token(head: RequestHead) -> str | None:
    value = head.header(b"authorization")
    if value is None or not value[:7].lower() == b"bearer ":
        return None
    return value[7:].strip().decode("latin-1")


def _holds_resume_key(tunnel: Tunnel, resume_key: str | None) -> bool:
    """A reconnecting agent proves it is the one that held the name by the key it was given."""
    if not isinstance(tunnel, AgentTunnel) or resume_key is None:
        return False
    if not secrets.compare_digest(resume_key, tunnel.resume_key):
        return False
    if tunnel.session is not None and not tunnel.session.closed.done():
        tunnel.session.close()  # the old link is stale: the agent has already moved to a new one
    return True
