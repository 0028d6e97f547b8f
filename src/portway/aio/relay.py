"""`portway server`: one port for visitors and agents, routing each request by its Host."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import secrets
import ssl
from dataclasses import dataclass
from urllib.parse import parse_qs

from ..config import RelayConfig
from ..errors import HttpError
from ..proto import http1
from ..proto.http1 import RequestHead
from ..proto.mux import Role
from ..proto.names import SYSTEM_NAMES, InvalidName, random_name, validate_name
from ..proto.pages import landing_page, reason
from ..proto.routing import Router
from .connection import Connection
from .ltcompat import LocalTunnelService
from .proxy import VisitorConnection
from .session import MuxSession
from .tunnels import AccessPolicy, AgentTunnel, Registry

log = logging.getLogger(__name__)

AGENT_PATH = "/_portway/agent"
AGENT_UPGRADE = b"portway-mux"


@dataclass
class Registration:
    name: str | None
    resume_key: str | None
    access: AccessPolicy


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

    # lifecycle
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            self._new_connection, self.config.bind, self.config.port, ssl=self.ssl_context,
            reuse_address=True, backlog=1024,
        )
        self.port = self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
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
        await VisitorConnection(self, conn, self.scheme).serve()

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
            visitor.conn.write(json_response(200, self.status()))
        elif path == "/" or path == "":
            suffix = self.public_url().split(self.config.domain, 1)[1]
            visitor.conn.write(landing_page(self.config.domain, suffix, len(self.registry.tunnels)))
        else:
            visitor.send_error(404, f"Nothing is served at {path} on this relay.", close=False)
        return head.keep_alive

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
        return Registration(name, resume.decode("ascii") if resume else None, access)

    async def _register_agent(self, visitor: VisitorConnection, head: RequestHead, query: str) -> bool:
        conn = visitor.conn
        if head.upgrade is None or head.upgrade.lower() != AGENT_UPGRADE:
            conn.write(json_response(426, {"message": "the agent link needs Upgrade: portway-mux"}, close=True))
            return False
        try:
            registration = self._parse_registration(head, query)
            name = self._claim(registration)
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
            tunnel = AgentTunnel(name, session, resume_key, registration.access)
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
            self.registry.free_after(tunnel, self.config.grace_period)
        return False

    def _claim(self, registration: Registration) -> str:
        if registration.name is None:
            return random_name(self.registry.tunnels)
        try:
            name = validate_name(registration.name)
        except InvalidName as error:
            raise HttpError(400, str(error)) from None
        existing = self.registry.get(name)
        if existing is None:
            return name
        if (
            isinstance(existing, AgentTunnel)
            and registration.resume_key is not None
            and secrets.compare_digest(registration.resume_key, existing.resume_key)
        ):
            if existing.session is not None and not existing.session.closed.done():
                existing.session.close()  # a reconnecting agent replaces its stale link
            return name
        raise HttpError(409, f"tunnel name {name!r} is already in use")
