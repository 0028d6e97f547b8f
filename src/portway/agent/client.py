"""`portway http PORT` / `portway tcp PORT` / `portway start`: dial the relay, register the tunnels (one, or
several over one link), serve each stream from its tunnel's local service."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import random
import socket
import ssl
from dataclasses import dataclass
from typing import Callable, Sequence
from urllib.parse import urlsplit

from ..config import AgentConfig
from ..errors import ConduitReset, ProtocolError, RegistrationError
from ..link.bridge import StreamBridge
from ..link.connection import Connection
from ..link.session import MuxSession, MuxStream
from ..proto.control import (PREAMBLE_LIMIT, AgentHandshake, GrantedTunnel, LinkRequest, TunnelRequest,
                             preamble_index)
from ..proto.mux import Role
from ..proto.pages import error_response
from ..proto.proxy_protocol import HeaderReader, Version, encode
from .reconnect import Backoff, RelayAddress, Rotation, retry_status

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0  # seconds a connect to the relay (TCP, and TLS) may take: a black-holed network never refuses
NEXT_ADDRESS_AFTER = 2.0  # ...but with another relay address left to try in the round, it is tried after this
HANDSHAKE_TIMEOUT = 15.0  # seconds the relay may take to answer a link request
DRAIN_CHECK = 0.1  # seconds between looks at the streams still in flight while stopping gracefully
PROBE_INTERVAL = 1.0  # while the relay can't be reached, a bare TCP connect tries it this often...
PROBE_TIMEOUT = 1.0  # ...and waits this long for it: a relay back (or a network back) is dialled within ~2 s


class RelayUnreachable(Exception):
    """No connection to the relay could be made (refused, unreachable, timed out); says why."""


def describe_failure(error: OSError | RelayUnreachable) -> str:
    """Why one relay address failed, in a few words."""
    if isinstance(error, RelayUnreachable):
        return f"is unreachable ({error})"
    return f"did not complete the link handshake ({error.strerror or error})"


@dataclass
class Registered:
    name: str
    url: str
    resume_key: str
    session: MuxSession


@dataclass
class LocalTunnel:
    """One tunnel of a several-tunnel link, as the agent serves it: where its streams go, and what it asks for.
    `name` (http) and `remote_port` (tcp) become the granted ones once the relay answered, so a reconnect asks
    for the same."""

    proto: str  # "http" | "tcp"
    local_host: str
    port: int
    name: str | None = None
    remote_port: int | None = None
    proxy_protocol: Version | None = None  # tcp: the PROXY header the local service gets first
    allow_ip: tuple[str, ...] = ()
    basic_auth: str | None = None  # http only
    label: str = ""  # the config file's name for it, shown on the console
    url: str = ""  # its public URL once granted

    @property
    def target(self) -> str:
        return f"{self.local_host}:{self.port}"

    def request(self) -> TunnelRequest:
        return TunnelRequest(self.proto, name=self.name if self.proto == "http" else None,
                             port=self.remote_port if self.proto == "tcp" else None, allow_ip=self.allow_ip,
                             basic_auth=self.basic_auth if self.proto == "http" else None)


class Agent:
    """`portway http`: owns the link to the relay (dialled out, re-dialled with backoff when it drops, keeping
    the tunnel's name through its resume key) and serves every stream the relay opens on it by bridging the
    stream to a new connection to the local service."""

    new_tap: Callable[[], object] | None = None  # the inspector's: a tap for each stream's bridge
    session: MuxSession | None = None  # the current link (closed while reconnecting); None before the first
    reconnects = 0  # links re-established after one dropped

    def __init__(self, config: AgentConfig, relay_url: str | Sequence[str], on_url: Callable[[str], None],
                 on_status: Callable[[str], None], rng: random.Random | None = None,
                 tunnels: tuple[LocalTunnel, ...] = ()) -> None:
        self.config = config
        self.tunnels = tunnels  # the several-tunnel form (tcp, or more than one); () is `portway http PORT`
        self.backoff = Backoff(rng or random.Random())
        self.rotation = Rotation()
        self.relays: list[tuple[str, str, int]] = []  # (scheme, host, port) of every --relay, in order
        for url in [relay_url] if isinstance(relay_url, str) else relay_url:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"--relay must be an http:// or https:// URL, not {url!r}")
            self.relays.append((parts.scheme, parts.hostname,
                                parts.port or (443 if parts.scheme == "https" else 80)))
        if not self.relays:
            raise ValueError("--relay needs a URL")
        if len({scheme for scheme, _, _ in self.relays}) > 1:
            raise ValueError("--relay URLs must all be http:// or all https://")
        _, self.relay_host, self.relay_port = self.relays[0]
        self.ssl_context: ssl.SSLContext | None = None
        if self.relays[0][0] == "https":
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
        self._moved = asyncio.Event()  # the relay node named another one to go to (MOVE)
        self._leaving: set[asyncio.Task] = set()  # old links finishing their streams after a move

    async def relay_addresses(self) -> list[RelayAddress]:
        """Every address the --relay URLs name, in order: a host name counts once per address the system
        resolver gives for it (one that doesn't resolve is kept as it is: dialling it says why)."""
        loop = asyncio.get_running_loop()
        addresses: list[RelayAddress] = []
        for _, host, port in self.relays:
            try:
                ipaddress.ip_address(host)
                found = [host]
            except ValueError:
                try:
                    infos = await asyncio.wait_for(
                        loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), CONNECT_TIMEOUT)
                    found = list(dict.fromkeys(str(info[4][0]) for info in infos)) or [host]
                except (OSError, asyncio.TimeoutError):
                    found = [host]
            for address in found:
                relay = RelayAddress(address, port, host)
                if relay not in addresses:
                    addresses.append(relay)
        return addresses

    async def connect_round(self, stay: bool) -> Registered:
        """Try every relay address once (Rotation.round), going on to the next at once when one can't be
        reached or can't register anyone now (503); raises the last failure when none worked."""
        addresses = await self.relay_addresses()
        order = self.rotation.round(addresses, stay=stay)
        for index, address in enumerate(order):
            try:
                registered = await self.register(address, NEXT_ADDRESS_AFTER if index + 1 < len(order)
                                                 else CONNECT_TIMEOUT)
            except ssl.SSLCertVerificationError:
                raise
            except RegistrationError as error:
                if error.status != 503 or index == len(order) - 1:
                    raise
                reason = f"refused for now ({error.message})"
            except (RelayUnreachable, OSError) as error:
                if index == len(order) - 1:
                    raise
                reason = describe_failure(error)
            else:
                self.rotation.link_up(address)
                return registered
            self.on_status(f"relay at {address} {reason}; trying {order[index + 1]}")
        raise AssertionError("a round has at least one address")

    async def run(self) -> None:
        """Serve until cancelled; raises RegistrationError when the relay refuses us for good.

        A dropped link is dialled again at once if it had been healthy, else after the backoff's delay; a failed
        attempt waits the backoff's delay, probing meanwhile whether an unreachable relay is back. With several
        relay addresses, each attempt is a round over all of them (Rotation)."""
        loop = asyncio.get_running_loop()
        backoff = self.backoff
        first = True
        stay = True
        while True:
            was_on = self.rotation.current
            try:
                registered = await self.connect_round(stay)
            except ssl.SSLCertVerificationError as error:
                hint = "check --ca" if self.config.ca_file else "pass --ca FILE with the CA that signed it"
                raise RegistrationError(0, f"cannot reach the relay at {self.where()}: "
                                           f"certificate verify failed ({error.verify_message}); {hint}") from None
            except RegistrationError as error:
                if error.status != 503:
                    raise  # a refusal for good: bad token, name taken, invalid name, quota
                # the relay can't register anyone just now (its cluster registry is away): it says so, and is
                # asked again after the backoff's delay, like an unreachable relay
                delay = backoff.next_delay()
                self.on_status(retry_status(delay, backoff.attempt, f"the relay refused for now ({error.message})",
                                            reconnecting=not first))
                await self.wait_before_retry(delay, probe=False)
                stay = True
                continue
            except (RelayUnreachable, OSError) as error:
                unreachable = isinstance(error, RelayUnreachable)
                detail = str(error) if unreachable else error.strerror or str(error)
                if first and not self.config.wait_for_relay:
                    raise RegistrationError(0, f"cannot reach the relay at {self.where()}: {detail}") from None
                where = f"the relay at {self.where()}"
                reason = (f"{where} is unreachable ({detail})" if unreachable
                          else f"{where} did not complete the link handshake ({detail})")
                delay = backoff.next_delay()
                self.on_status(retry_status(delay, backoff.attempt, reason, reconnecting=not first))
                # an unreachable relay that comes back is noticed by probing; one that answered and failed is not
                # probed (it would answer the probe at once and turn the backoff into a tight loop)
                await self.wait_before_retry(delay, probe=unreachable)
                stay = True
                continue
            backoff.link_up(loop.time())
            if first and self.tunnels:
                for tunnel in self.tunnels:
                    self.on_url(tunnel.url)
                    label = f"{tunnel.label}: " if tunnel.label else ""
                    self.on_status(f"{label}forwarding {tunnel.url} → {tunnel.target}")
            elif first:
                self.on_url(registered.url)
                self.on_status(f"forwarding {registered.url} → {self.local_target}")
            else:
                self.reconnects += 1
                now_on = self.rotation.current
                moved = f" (relay node at {now_on}; the link was on {was_on})" if now_on != was_on else ""
                self.on_status(f"reconnected: {registered.url}{moved}")
            first = False
            try:
                registered, reason = await self.serve_link(registered)
            except asyncio.CancelledError:
                # stopping on purpose: say so, so the relay frees the name at once instead of holding it
                session = self.session or registered.session  # the link served last (a move replaces it)
                session.go_away()
                session.close()
                for leaving in self._leaving:
                    leaving.cancel()
                raise
            went_away = registered.session.go_away_received
            if went_away:
                reason += ", the relay went away (restarting?)"
            self.on_status(f"link to relay lost ({reason}); reconnecting")
            resuming = registered.session.parked and bool(registered.session.streams)
            healthy = backoff.link_down(loop.time())
            # only the relay the link was on can resume its streams; one that went away is left for another
            stay = (healthy or resuming) and not went_away
            back_off = self.rotation.link_down(await self.relay_addresses(), healthy=healthy)
            if back_off and not resuming:
                # it dropped soon after it came up: don't redial a flapping link or a failing relay in a loop
                # (unless streams wait to be resumed: a wait here would eat their resume window)
                delay = backoff.next_delay()
                self.on_status(retry_status(delay, backoff.attempt, f"link lost soon after it came up ({reason})",
                                            reconnecting=True))
                await self.wait_before_retry(delay, probe=False)

    def where(self) -> str:
        """The relay as the user named it, for messages: HOST:PORT, or every one of several."""
        return ", ".join(f"{host}:{port}" for _, host, port in self.relays)

    async def serve_link(self, registered: Registered) -> tuple[Registered, str]:
        """Wait until the link is lost (parked or closed), moving to another node whenever the relay node asks
        (MOVE); returns the link last served and why it was lost."""
        while True:
            self._moved.clear()
            session = registered.session
            if session.moved_to is not None:
                self._moved.set()  # it came with the link's first bytes
            down = asyncio.ensure_future(session.link_down())
            moved = asyncio.ensure_future(self._moved.wait())
            try:
                await asyncio.wait((down, moved), return_when=asyncio.FIRST_COMPLETED)
            finally:
                moved.cancel()
                if not down.done():
                    down.cancel()
            if down.done() and not down.cancelled():
                return registered, down.result()
            if session.moved_to is not None:  # (not a MOVE on a link already left behind)
                registered = await self.move(registered)

    async def move(self, registered: Registered) -> Registered:
        """The relay node is stopping and named another (MOVE): register there (or at any other relay address)
        while the old link still serves; then tell the old node GO_AWAY, let its streams finish (up to
        --drain-timeout) and close it. When no node can be reached, stay until the old link ends."""
        old = registered.session
        target_text = old.moved_to or ""
        old.moved_to = None
        current = self.rotation.current
        server_name = current.server_name if current is not None else self.relay_host
        host, _, port = target_text.rpartition(":")
        candidates: list[RelayAddress] = []
        if port.isdigit() and host:
            candidates.append(RelayAddress(host.strip("[]"), int(port), server_name))
        candidates += [address for address in await self.relay_addresses()
                       if address != current and address not in candidates]
        self.on_status(f"relay node at {current} is stopping; moving to {candidates[0] if candidates else '?'}")
        for index, address in enumerate(candidates):
            try:
                moved = await self.register(address, NEXT_ADDRESS_AFTER if index + 1 < len(candidates)
                                            else CONNECT_TIMEOUT)
            except (RegistrationError, RelayUnreachable, OSError) as error:
                why = f"refused ({error.message})" if isinstance(error, RegistrationError) else describe_failure(error)
                following = f"; trying {candidates[index + 1]}" if index + 1 < len(candidates) else ""
                self.on_status(f"could not move: relay at {address} {why}{following}")
                continue
            self.rotation.link_up(address)
            old.go_away()  # registered there: no new streams here; those in flight finish
            task = asyncio.get_running_loop().create_task(self._finish(old))
            self._leaving.add(task)
            task.add_done_callback(self._leaving.discard)
            self.on_status(f"moved to relay node at {address}: {moved.url}")
            return moved
        self.on_status(f"no other relay node could be reached; staying on {current} until it closes the link")
        return registered

    async def _finish(self, session: MuxSession) -> None:
        """An old link after a move: closed once the relay node has answered our GO_AWAY with its own and the
        streams are done, or at --drain-timeout. Before that answer a stream the node opened for a visitor may
        still be on its way (it crossed our GO_AWAY, and is served): closing under it would fail that visitor.
        (A node older than that answer closes the link itself once it has drained.)"""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.drain_timeout
        try:
            while ((session.streams or not session.go_away_received) and not session.ended
                   and loop.time() < deadline):
                await asyncio.sleep(DRAIN_CHECK)
        finally:
            session.close()

    def open_streams(self) -> int:
        session = self.session
        return 0 if session is None or session.ended else len(session.streams)

    async def drain(self, timeout: float) -> None:
        """Stop gracefully: tell the relay no new streams will be taken (GO_AWAY), and give the streams in flight
        up to `timeout` seconds to finish. The caller then stops `run()`, which closes the link."""
        session = self.session
        if session is None or session.ended:
            return
        session.go_away()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # streams end inside bridge callbacks, with nothing to await: look again every DRAIN_CHECK seconds
        while session.streams and not session.ended and loop.time() < deadline:
            await asyncio.sleep(min(DRAIN_CHECK, deadline - loop.time()))

    async def wait_before_retry(self, delay: float, probe: bool) -> None:
        """Wait `delay` seconds. With `probe` (the relay could not be reached), try a bare TCP connect to it every
        PROBE_INTERVAL meanwhile and end the wait as soon as one succeeds: the relay (or the network) is back, and
        a long backoff must not sleep through that."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + delay
        while (remaining := deadline - loop.time()) > 0:
            await asyncio.sleep(min(PROBE_INTERVAL, remaining) if probe else remaining)
            remaining = deadline - loop.time()
            if probe and remaining > 0 and await self.relay_listening(min(PROBE_TIMEOUT, remaining)):
                return

    async def relay_listening(self, timeout: float) -> bool:
        """Whether a TCP connection to any relay address can be made within `timeout` (closed at once, unused)."""

        async def listening(address: RelayAddress) -> bool:
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection(address.host, address.port), timeout)
            except (OSError, asyncio.TimeoutError):
                return False
            writer.close()
            return True

        addresses = [RelayAddress(host, port, host) for _, host, port in self.relays]
        return any(await asyncio.gather(*(listening(address) for address in addresses)))

    async def register(self, address: RelayAddress | None = None,
                       connect_timeout: float = CONNECT_TIMEOUT) -> Registered:
        """Dial `address` (the first --relay by default) within `connect_timeout` and register the tunnel(s)
        there."""
        if address is None:
            address = RelayAddress(self.relay_host, self.relay_port, self.relay_host)
        loop = asyncio.get_running_loop()
        try:
            transport, conn = await asyncio.wait_for(loop.create_connection(
                Connection, address.host, address.port, ssl=self.ssl_context,
                server_hostname=address.server_name if self.ssl_context else None,
            ), connect_timeout)
        except ssl.SSLError:
            raise
        except asyncio.TimeoutError:
            raise RelayUnreachable("timed out") from None
        except OSError as error:  # asyncio's own text repeats the address: the system's reason says it all
            raise RelayUnreachable(os.strerror(error.errno) if error.errno else str(error)) from None
        parked = self.session if self.session is not None and self.session.parked else None
        request = LinkRequest(name=self.name, token=self.config.token, resume_key=self.resume_key,
                              # a several-tunnel link carries each tunnel's visitor rules with the tunnel
                              basic_auth=None if self.tunnels else self.config.basic_auth,
                              allow_ip=() if self.tunnels else tuple(self.config.allow_ip),
                              resume_streams=parked is not None,
                              tunnels=tuple(tunnel.request() for tunnel in self.tunnels), can_move=True)
        handshake = AgentHandshake()
        try:
            conn.write(request.encode(f"{address.server_name}:{address.port}"))
            granted = None
            while granted is None:
                granted = handshake.receive_data(await asyncio.wait_for(conn.read(), HANDSHAKE_TIMEOUT))
        except BaseException:
            conn.close()
            raise
        grant = granted.grant
        self.name = grant.name
        self.resume_key = grant.resume_key
        if self.tunnels:
            self._take_grants(grant.tunnels)
        # The relay's first frames follow its 101 at once, and some may have arrived after the read that
        # completed the handshake: they are the link's too (lost, they were the link window's first increase,
        # and the link stalled once the agent had sent the protocol's base 1 MiB).
        link_bytes = granted.link_bytes + conn.take_buffered()
        if conn.at_eof or transport.is_closing():
            conn.close()
            raise RelayUnreachable("the relay closed the link right after granting it")
        if parked is not None and parked.parked and grant.streams_resumed:
            parked.resume_on(transport, link_bytes)  # the streams carry on where they stopped
            self.on_status(f"{len(parked.streams)} open streams resumed")
            return Registered(grant.name, grant.url, grant.resume_key, parked)
        if parked is not None:
            parked.abandon()  # the relay no longer has them: each local connection is reset, visibly
        serve = self.serve_tunnel_stream if self.tunnels else self.serve_stream
        session = MuxSession(Role.CLIENT, self.config.mux, on_stream=serve)
        session.on_move = lambda address: self._moved.set()
        transport.set_protocol(session)
        session.connection_made(transport)
        if link_bytes:
            session.data_received(link_bytes)
        self.session = session
        return Registered(grant.name, grant.url, grant.resume_key, session)

    def _take_grants(self, grants: tuple[GrantedTunnel, ...]) -> None:
        if len(grants) != len(self.tunnels) or any(granted.index != index for index, granted in enumerate(grants)):
            raise RegistrationError(502, f"the relay granted {len(grants)} tunnels for the {len(self.tunnels)} "
                                         "asked for (is it too old for tcp tunnels or several tunnels per link?)")
        for tunnel, granted in zip(self.tunnels, grants):
            tunnel.url = granted.url
            if tunnel.proto == "http":
                tunnel.name = granted.name
            else:
                tunnel.remote_port = granted.port

    async def serve_tunnel_stream(self, stream: MuxStream) -> None:
        """A stream of a several-tunnel link: its preamble says which tunnel (and which visitor) it is for."""
        reader = HeaderReader()
        header = None
        received = 0
        try:
            while header is None:
                chunks = await asyncio.wait_for(stream.read_chunks(), HANDSHAKE_TIMEOUT)
                if not chunks:
                    raise ProtocolError("the stream ended before its preamble")
                data = b"".join(chunks)
                received += len(data)
                header = reader.feed(data)
                if header is None and received > PREAMBLE_LIMIT:
                    raise ProtocolError(f"no preamble within {PREAMBLE_LIMIT} bytes")
            index = preamble_index(header)
            if index is None or index >= len(self.tunnels):
                raise ProtocolError(f"the preamble names no tunnel of this link (index {index})")
        except (ProtocolError, asyncio.TimeoutError, ConduitReset) as error:
            reason = "no preamble in time" if isinstance(error, asyncio.TimeoutError) else str(error)
            log.warning("stream %d reset: %s", stream.stream_id, reason)
            stream.abort()
            return
        if reader.rest:
            stream.put_back([reader.rest])
        tunnel = self.tunnels[index]
        if tunnel.proto == "http":
            await self.serve_stream(stream, tunnel.local_host, tunnel.port)
            return
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(loop.create_connection(Connection, tunnel.local_host, tunnel.port),
                                             CONNECT_TIMEOUT)
        except (OSError, asyncio.TimeoutError) as error:
            why = "timed out" if isinstance(error, asyncio.TimeoutError) else error.strerror or str(error)
            self.on_status(f"{tunnel.label or tunnel.url}: connection to {tunnel.target} failed ({why})")
            stream.abort()  # the visitor sees a reset, as if the service had refused it
            return
        if tunnel.proxy_protocol is not None:
            conn.write(encode(tunnel.proxy_protocol, header.endpoints))  # before any visitor byte
        StreamBridge.take_over(conn, stream)

    async def serve_stream(self, stream: MuxStream, local_host: str | None = None, port: int | None = None) -> None:
        loop = asyncio.get_running_loop()
        local_host = local_host or self.config.local_host
        port = port or self.config.port
        local_target = f"{local_host}:{port}"

        def bridge() -> StreamBridge:
            made = StreamBridge(stream)
            if self.new_tap is not None:
                made.tap = self.new_tap()
            return made

        try:
            await loop.create_connection(bridge, local_host, port)
        except OSError as error:
            if isinstance(error, ConnectionRefusedError) or "refused" in str(error).lower():
                message = f"{local_target} refused the connection (is the service running?)"
            else:
                message = f"{local_target} could not be reached: {error.strerror or error}"
            # The answer goes out whole and the stream stays open for the relay to end once it has read it: a
            # reset right behind the answer could reach the relay before it has even sent the request (this
            # runs as soon as the stream opens), and the visitor would read "the agent went away" instead.
            try:
                await stream.send(error_response(502, message, close=True))  # waits for link credit if need be
                stream.write_eof()
            except ConduitReset:
                stream.close()  # the relay gave up on the stream meanwhile

