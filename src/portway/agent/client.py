"""`portway http PORT`: dial the relay, register a tunnel, serve each stream from the local service."""

from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass
from typing import Callable
from urllib.parse import urlsplit

from ..config import AgentConfig
from ..errors import ConduitReset, RegistrationError
from ..link.bridge import StreamBridge
from ..link.connection import Connection
from ..link.session import MuxSession, MuxStream
from ..proto.control import AgentHandshake, LinkRequest
from ..proto.mux import Role
from ..proto.pages import error_response

log = logging.getLogger(__name__)

RECONNECT_MIN_DELAY = 0.5
RECONNECT_MAX_DELAY = 30.0
HANDSHAKE_TIMEOUT = 15.0  # seconds the relay may take to answer a link request


@dataclass
class Registered:
    name: str
    url: str
    resume_key: str
    session: MuxSession


class Agent:
    """`portway http`: owns the link to the relay (dialled out, re-dialled with backoff when it drops, keeping
    the tunnel's name through its resume key) and serves every stream the relay opens on it by bridging the
    stream to a new connection to the local service."""

    new_tap: Callable[[], object] | None = None  # the inspector's: a tap for each stream's bridge
    session: MuxSession | None = None  # the current link (closed while reconnecting); None before the first
    reconnects = 0  # links re-established after one dropped

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
            try:
                self.ssl_context = ssl.create_default_context(cafile=config.ca_file)
            except (OSError, ssl.SSLError) as error:
                reason = error.strerror if isinstance(error, OSError) and error.strerror else error
                raise ValueError(f"--ca {config.ca_file}: cannot load CA certificates from it ({reason})") from None
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
            except ssl.SSLCertVerificationError as error:
                hint = "check --ca" if self.config.ca_file else "pass --ca FILE with the CA that signed it"
                raise RegistrationError(0, f"cannot reach the relay at {self.relay_host}:{self.relay_port}: "
                                           f"certificate verify failed ({error.verify_message}); {hint}") from None
            except OSError as error:
                if first and not self.config.wait_for_relay:
                    raise RegistrationError(0, f"cannot reach the relay at {self.relay_host}:{self.relay_port}: "
                                               f"{error.strerror or error}") from None
                self.on_status(f"relay at {self.relay_host}:{self.relay_port} unreachable "
                               f"({error.strerror or error}); retrying in {delay:.1f}s")
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX_DELAY)
                continue
            if first:
                self.on_url(registered.url)
                self.on_status(f"forwarding {registered.url} → {self.local_target}")
            else:
                self.reconnects += 1
                self.on_status(f"reconnected: {registered.url}")
            first = False
            delay = RECONNECT_MIN_DELAY
            try:
                reason = await registered.session.link_down()  # parked (streams kept for a resume) or closed
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
        parked = self.session if self.session is not None and self.session.parked else None
        request = LinkRequest(name=self.name, token=self.config.token, resume_key=self.resume_key,
                              basic_auth=self.config.basic_auth, allow_ip=tuple(self.config.allow_ip),
                              resume_streams=parked is not None)
        handshake = AgentHandshake()
        try:
            conn.write(request.encode(f"{self.relay_host}:{self.relay_port}"))
            granted = None
            while granted is None:
                granted = handshake.receive_data(await asyncio.wait_for(conn.read(), HANDSHAKE_TIMEOUT))
        except BaseException:
            conn.close()
            raise
        grant = granted.grant
        self.name = grant.name
        self.resume_key = grant.resume_key
        if parked is not None and parked.parked and grant.streams_resumed:
            parked.resume_on(transport, granted.link_bytes)  # the streams carry on where they stopped
            self.on_status(f"{len(parked.streams)} open streams resumed")
            return Registered(grant.name, grant.url, grant.resume_key, parked)
        if parked is not None:
            parked.abandon()  # the relay no longer has them: each local connection is reset, visibly
        session = MuxSession(Role.CLIENT, self.config.mux, on_stream=self.serve_stream)
        transport.set_protocol(session)
        session.connection_made(transport)
        if granted.link_bytes:
            session.data_received(granted.link_bytes)
        self.session = session
        return Registered(grant.name, grant.url, grant.resume_key, session)

    async def serve_stream(self, stream: MuxStream) -> None:
        loop = asyncio.get_running_loop()

        def bridge() -> StreamBridge:
            made = StreamBridge(stream)
            if self.new_tap is not None:
                made.tap = self.new_tap()
            return made

        try:
            await loop.create_connection(bridge, self.config.local_host, self.config.port)
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

