"""`portway http PORT`: dial the relay, register a tunnel, serve each stream from the local service."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import ssl
from dataclasses import dataclass
from typing import Callable
from urllib.parse import quote, urlsplit

from ..config import AgentConfig
from ..errors import HttpError, RegistrationError
from ..proto import http1
from ..proto.mux import Role
from ..proto.pages import error_response
from .bridge import StreamBridge
from .connection import ConduitReset, Connection
from .relay import AGENT_PATH
from .session import MuxSession, MuxStream

log = logging.getLogger(__name__)

RECONNECT_MIN_DELAY = 0.5
RECONNECT_MAX_DELAY = 30.0


@dataclass
class Registered:
    name: str
    url: str
    resume_key: str
    session: MuxSession


class Agent:
    def __init__(self, config: AgentConfig, relay_url: str, on_url: Callable[[str], None],
                 on_status: Callable[[str], None]) -> None:
        self.config = config
        parts = urlsplit(relay_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"--relay must be an http:// or https:// URL, not {relay_url!r}")
        self.relay_host = parts.hostname
        self.relay_port = parts.port or (443 if parts.scheme == "https" else 80)
        self.ssl_context: ssl.SSLContext | None = None
        if parts.scheme == "https":
            self.ssl_context = ssl.create_default_context(cafile=config.ca_file)
        self.on_url = on_url
        self.on_status = on_status
        self.resume_key: str | None = None
        self.name = config.name
        self.local_target = f"{config.local_host}:{config.port}"

    async def run(self) -> None:
        """Serve until cancelled; raises RegistrationError when the relay refuses us for good."""
        delay = RECONNECT_MIN_DELAY
        first = True
        while True:
            try:
                registered = await self.register()
            except OSError as error:
                if first:
                    raise RegistrationError(0, f"cannot reach the relay at {self.relay_host}:{self.relay_port}: "
                                               f"{error.strerror or error}") from None
                self.on_status(f"relay unreachable ({error.strerror or error}); retrying in {delay:.1f}s")
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX_DELAY)
                continue
            if first:
                self.on_url(registered.url)
                self.on_status(f"forwarding {registered.url} → {self.local_target}")
            else:
                self.on_status(f"reconnected: {registered.url}")
            first = False
            delay = RECONNECT_MIN_DELAY
            try:
                reason = await registered.session.closed
            except asyncio.CancelledError:
                # stopping on purpose: say so, so the relay frees the name at once instead of holding it
                registered.session.go_away()
                registered.session.close()
                raise
            self.on_status(f"link to relay lost ({reason}); reconnecting")

    async def register(self) -> Registered:
        loop = asyncio.get_running_loop()
        transport, conn = await loop.create_connection(
            Connection, self.relay_host, self.relay_port, ssl=self.ssl_context,
            server_hostname=self.relay_host if self.ssl_context else None,
        )
        try:
            conn.write(self._registration_request())
            head, leftover = await self._read_answer(conn)
        except BaseException:
            conn.close()
            raise
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in head.headers}
        self.name = headers["portway-name"]
        self.resume_key = headers["portway-resume"]
        session = MuxSession(Role.CLIENT, self.config.mux, on_stream=self.serve_stream)
        transport.set_protocol(session)
        session.connection_made(transport)
        if leftover:
            session.data_received(leftover)
        return Registered(self.name, headers["portway-url"], self.resume_key, session)

    def _registration_request(self) -> bytes:
        target = AGENT_PATH + (f"?name={quote(self.name)}" if self.name else "")
        lines = [
            f"GET {target} HTTP/1.1",
            f"Host: {self.relay_host}:{self.relay_port}",
            "Upgrade: portway-mux",
            "Connection: Upgrade",
        ]
        if self.config.token:
            lines.append(f"Authorization: Bearer {self.config.token}")
        if self.resume_key:
            lines.append(f"Portway-Resume: {self.resume_key}")
        if self.config.basic_auth:
            lines.append("Portway-Basic-Auth: " + base64.b64encode(self.config.basic_auth.encode()).decode())
        if self.config.allow_ip:
            lines.append("Portway-Allow-Ip: " + ", ".join(self.config.allow_ip))
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    async def _read_answer(self, conn: Connection) -> tuple[http1.ResponseHead, bytes]:
        parser = http1.ResponseParser("GET")
        body = b""
        while True:
            data = await asyncio.wait_for(conn.read(), 15)
            try:
                events = parser.feed(data) if data else parser.feed_eof()
            except HttpError:
                raise RegistrationError(502, "the relay answered with something that is not HTTP") from None
            for event in events:
                if isinstance(event, http1.Switched):
                    assert parser.head is not None
                    return parser.head, event.trailing
                if isinstance(event, http1.Body):
                    body += event.data
                elif event is http1.MESSAGE_END:
                    assert parser.head is not None
                    raise RegistrationError(parser.head.status, _message_of(body, parser.head.status))

    async def serve_stream(self, stream: MuxStream) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.create_connection(lambda: StreamBridge(stream), self.config.local_host, self.config.port)
        except OSError as error:
            if isinstance(error, ConnectionRefusedError) or "refused" in str(error).lower():
                message = f"{self.local_target} refused the connection (is the service running?)"
            else:
                message = f"{self.local_target} could not be reached: {error.strerror or error}"
            try:
                await stream.send(error_response(502, message, close=True))  # waits for link credit if need be
                stream.write_eof()
            except ConduitReset:
                pass  # the relay gave up on the stream meanwhile
            finally:
                stream.close()


def _message_of(body: bytes, status: int) -> str:
    try:
        return str(json.loads(body)["message"])
    except (ValueError, KeyError, TypeError):
        return body.decode("utf-8", "replace").strip() or f"the relay answered HTTP {status}"
