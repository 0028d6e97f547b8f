"""localtunnel compatibility: the stock `lt` client registers on the relay's own port and serves visitors.

`lt` asks for a tunnel with `GET /?new` or `GET /NAME`, is told a TCP port and a pool size, and opens
that many plain sockets to the port; each one is spliced to its local app, so the relay talks HTTP/1.1
over it as a client. Here each lt tunnel gets its own listener on the relay's bind address that only
takes sockets from the registering address, up to the advertised count, and an `LtTunnel` lends those
sockets to front.VisitorConnection as conduits — the same path visitors of agent tunnels take.
Decisions (what is a registration, who may connect, the answers) live in proto/lt_protocol.py.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque
from typing import TYPE_CHECKING, Callable

from ..config import RelayConfig
from ..errors import HttpError, InvalidName, LtRefused
from ..link.connection import Connection
from ..link.pipe import SocketPipe
from ..proto import lt_protocol as lt
from ..proto.http1 import RequestHead
from ..proto.names import validate_name
from ..proto.pages import json_response
from .tunnels import Tunnel

if TYPE_CHECKING:
    from .naming import NameClaims
    from .front import VisitorConnection
    from .registry import Registry

log = logging.getLogger(__name__)

# TCP keep-alive on pool sockets: an `lt` that vanished without a FIN is noticed in about 1.5 minutes.
KEEPALIVE_IDLE = 60
KEEPALIVE_INTERVAL = 10
KEEPALIVE_COUNT = 3
# An emptied pool is waited on this long for lt's replacement sockets before visitors get "not connected".
REPLACEMENT_WAIT = 1.0


class PoolSocket(Connection):
    """One socket of an `lt` client's pool; tells its tunnel when it joins, goes stale or leaves."""

    def __init__(self, tunnel: "LtTunnel") -> None:
        super().__init__()
        self.tunnel = tunnel
        self.idle = False  # sitting in the pool: any byte or EOF now means the origin side moved on
        self.uses = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if not self.tunnel._joined(self):
            transport.close()
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            _enable_keepalive(sock)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.idle:
            self.tunnel._stale(self, "sent bytes while idle")

    def eof_received(self) -> bool:
        keep_open = super().eof_received()
        if self.idle:
            self.tunnel._stale(self, "was closed by the client while idle")
        return keep_open

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.tunnel._left(self)

    def close(self) -> None:
        super().close()
        self.tunnel._left(self)

    def abort(self) -> None:
        super().abort()
        self.tunnel._left(self)


def _enable_keepalive(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if hasattr(socket, "TCP_KEEPIDLE"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)
    except OSError:
        pass


class LtTunnel(Tunnel):
    """A tunnel served by an `lt` client through its pool of plain TCP sockets.

    Free sockets are kept in two stacks: `warm` ones have carried an exchange (a failure on them
    before any answer may be retried elsewhere, like a keep-alive connection), `fresh` ones have
    not. The base class's `idle` list stays empty. Visitors wait for a busy pool instead of failing;
    proxy bounds the wait with `pool_wait_timeout`.
    """

    kind = "localtunnel"

    def __init__(self, name: str, owner_ip: str, registry: "Registry", grace_period: float,
                 owner: str = "", max_sockets: int = lt.MAX_SOCKETS) -> None:
        super().__init__(name, owner=owner)
        self.owner_ip = lt.normalize_ip(owner_ip)
        self.registry = registry
        self.grace_period = grace_period
        self.max_sockets = max_sockets
        self.sockets: set[PoolSocket] = set()
        self.warm: list[PoolSocket] = []
        self.fresh: list[PoolSocket] = []
        self.waiters: deque[asyncio.Future] = deque()
        self.servers: list[asyncio.base_events.Server] = []
        self.port = 0
        self.closed = False
        self._replacing: asyncio.TimerHandle | None = None  # the pool emptied just now: lt is opening new sockets

    # state
    @property
    def online(self) -> bool:
        return not self.closed and (bool(self.sockets) or self._replacing is not None)

    @property
    def connected_sockets(self) -> int:
        return len(self.sockets)

    # the listener
    async def listen(self, hosts: list[str]) -> int:
        """Open the pool port on every relay address (one port number for all of them)."""
        loop = asyncio.get_running_loop()

        def factory() -> PoolSocket:
            return PoolSocket(self)

        for _ in range(8):
            first = await loop.create_server(factory, hosts[0], 0, backlog=64)
            port = first.sockets[0].getsockname()[1]
            servers = [first]
            try:
                for host in hosts[1:]:
                    servers.append(await loop.create_server(factory, host, port, backlog=64))
            except OSError:
                for server in servers:
                    server.close()
                continue
            self.servers, self.port = servers, port
            if self.closed:  # retired while we were binding
                self._close_servers()
            return port
        raise OSError("no port is free on every relay address")

    def _close_servers(self) -> None:
        for server in self.servers:
            server.close()

    # pool bookkeeping, driven by PoolSocket callbacks
    def _joined(self, sock: PoolSocket) -> bool:
        verdict = (lt.Admission.CLOSED if self.closed
                   else lt.admit_socket(sock.peer_ip, self.owner_ip, len(self.sockets), self.max_sockets))
        if verdict is not lt.Admission.ACCEPT:
            log.info("lt tunnel %s: refused a pool socket from %s: %s", self.name, sock.peer_ip, verdict.value)
            return False
        self.sockets.add(sock)
        if self._replacing is not None:
            self._replacing.cancel()
            self._replacing = None
        if self.registry.get(self.name) is self:
            self.registry.keep(self)
        self._offer(sock)
        return True

    def _stale(self, sock: PoolSocket, why: str) -> None:
        log.debug("lt tunnel %s: an idle pool socket %s; closing it so lt opens a new one", self.name, why)
        sock.close()

    def _left(self, sock: PoolSocket) -> None:
        sock.idle = False
        if sock not in self.sockets:
            return
        self.sockets.discard(sock)
        for stack in (self.warm, self.fresh):
            if sock in stack:
                stack.remove(sock)
        if not self.sockets and not self.closed:
            # lt replaces each socket it sees closed within milliseconds, and a pool of visitors that each close
            # their connection (so lt's local one, so its socket) empties it now and then: visitors wait for the
            # replacements, up to REPLACEMENT_WAIT; an lt client that is gone gets them their 502 after that
            if self._replacing is None:
                self._replacing = asyncio.get_running_loop().call_later(REPLACEMENT_WAIT, self._replacement_overdue)
            if self.registry.get(self.name) is self:
                self.registry.free_after(self, self.grace_period)

    def _replacement_overdue(self) -> None:
        self._replacing = None
        log.info("lt tunnel %s: no pool socket left; name kept for %ss", self.name, self.grace_period)
        self._wake_all()

    def _offer(self, sock: PoolSocket) -> None:
        """A clean, free socket: to the longest waiting visitor, else into the pool."""
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(sock)
                return
        sock.idle = True
        (self.warm if sock.uses else self.fresh).append(sock)

    def _wake_all(self) -> None:
        waiters, self.waiters = self.waiters, deque()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _lend(self, sock: PoolSocket) -> tuple[PoolSocket, bool]:
        sock.idle = False
        sock.uses += 1
        return sock, sock.uses > 1

    def _pop_clean(self, stack: list[PoolSocket]) -> PoolSocket | None:
        while stack:
            sock = stack.pop()
            sock.idle = False
            if sock.has_unread or sock not in self.sockets:
                sock.close()
                continue
            return sock
        return None

    async def join(self, conn: Connection, conduit, unread: bytes) -> None:
        await SocketPipe.take_over(conn, conduit, unread).closed

    # the conduit pool, as front.VisitorConnection uses it
    def take_idle(self):
        """A socket that already carried an exchange and is still clean, or None."""
        sock = self._pop_clean(self.warm)
        if sock is None:
            return None
        sock.uses += 1
        return sock

    async def acquire(self):
        """A free pool socket and whether it was used before; waits while all are busy."""
        while True:
            if not self.online:
                raise HttpError(502, f"The lt client for tunnel {self.name!r} is not connected.")
            sock = self._pop_clean(self.warm) or self._pop_clean(self.fresh)
            if sock is not None:
                return self._lend(sock)
            waiter = asyncio.get_running_loop().create_future()
            self.waiters.append(waiter)
            self.counters.pool_waits += 1
            try:
                sock = await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled() and waiter.result() is not None:
                    self.release(waiter.result(), True)  # handed over just as the wait ran out
                else:
                    try:
                        self.waiters.remove(waiter)
                    except ValueError:
                        pass
                raise
            if sock is not None and sock in self.sockets and not sock.has_unread:
                return self._lend(sock)
            if sock is not None:
                sock.close()

    def release(self, conduit, reusable: bool) -> None:
        if reusable and not self.closed and conduit in self.sockets and not conduit.has_unread:
            self._offer(conduit)
        else:
            conduit.close()  # lt opens a replacement as soon as it sees the close

    def close(self) -> None:
        """Retired from the registry: stop listening and let go of every socket."""
        if self.closed:
            return
        self.closed = True
        if self._replacing is not None:
            self._replacing.cancel()
            self._replacing = None
        self._close_servers()
        for sock in list(self.sockets):
            sock.close()
        self._wake_all()
        super().close()


class LocalTunnelService:
    """The relay's `lt` endpoints: registration (`/?new`, `/NAME`) and `/api/tunnels/NAME/status`."""

    def __init__(self, config: RelayConfig, registry: "Registry", claims: "NameClaims",
                 public_url: Callable[[str], str], listen_hosts: Callable[[], list[str]]) -> None:
        self.config = config
        self.registry = registry
        self.claims = claims
        self.public_url = public_url
        self.listen_hosts = listen_hosts

    def wants(self, head: RequestHead, path: str, query: str) -> bool:
        return lt.parse_registration(path, query) is not None or lt.tunnel_status_name(path) is not None

    async def serve(self, visitor: "VisitorConnection", head: RequestHead, path: str, query: str) -> bool:
        if not await visitor.skip_body(head):
            visitor.send_error(400, "unexpected request body", close=True)
            return False
        conn = visitor.conn
        status_name = lt.tunnel_status_name(path)
        if status_name is not None:
            conn.write(self._tunnel_status(status_name, head.keep_alive))
            return head.keep_alive
        request = lt.parse_registration(path, query)
        assert request is not None
        try:
            tunnel = await self.register(request, conn.peer_ip, lt.token_from_basic(head.header(b"authorization")))
        except LtRefused as refusal:
            log.info("lt registration from %s refused: %s", conn.peer_ip, refusal.message)
            conn.write(lt.refusal_response(refusal.message, close=not head.keep_alive))
            return head.keep_alive
        answer = lt.registration_answer(tunnel.name, tunnel.port, self.public_url(tunnel.name),
                                        tunnel.max_sockets)
        conn.write(json_response(200, answer, close=not head.keep_alive))
        return head.keep_alive

    def _tunnel_status(self, name: str, keep_alive: bool) -> bytes:
        tunnel = self.registry.get(name)
        if tunnel is None:
            return json_response(404, {"message": f"no tunnel named {name}"}, close=not keep_alive)
        connected = tunnel.connected_sockets if isinstance(tunnel, LtTunnel) else int(tunnel.online)
        return json_response(200, lt.tunnel_status(connected), close=not keep_alive)

    async def register(self, request: lt.RegistrationRequest, peer_ip: str, token: str | None) -> LtTunnel:
        """Claim the name (token, reserved names and limits as for agents) and open the pool port."""
        registry = self.registry

        def may_replace(existing: Tunnel) -> bool:
            return isinstance(existing, LtTunnel) and lt.may_take_over(
                existing.owner_ip, peer_ip, existing.connected_sockets)

        try:
            claimed = await self.claims.claim(token=token, peer_ip=peer_ip, requested=request.requested,
                                              may_replace=may_replace, kind=LtTunnel.kind)
            name, grant = claimed.name, claimed.grant
        except HttpError as error:
            if error.status == 409 and request.requested is not None:
                raise LtRefused(lt.taken_message(_canonical(request.requested))) from None
            if error.status == 401:
                raise LtRefused(lt.token_message(given=token is not None)) from None
            raise LtRefused(error.message) from None
        existing = registry.get(name)
        if existing is not None:
            if existing.owner != grant.digest:
                raise LtRefused(lt.taken_message(name))
            log.info("lt tunnel %s: taken back by %s within its grace period", name, peer_ip)
            registry.remove(existing)
        tunnel = LtTunnel(name, peer_ip, registry, self.config.lt_grace_period, owner=grant.digest)
        registry.add(tunnel)  # holds the name while the port opens
        try:
            await tunnel.listen(self.listen_hosts())
        except OSError as error:
            registry.remove(tunnel)
            raise LtRefused(f"the relay could not open a port for the tunnel's sockets: {error}") from None
        if registry.get(name) is not tunnel:  # retired meanwhile (relay shutting down)
            tunnel.close()
            raise LtRefused(f"tunnel {name} was closed while it was being set up")
        registry.free_after(tunnel, self.config.lt_grace_period)  # freed unless a socket connects
        log.info("lt tunnel %s registered by %s: pool sockets on port %d, %s",
                 name, peer_ip, tunnel.port, self.public_url(name))
        return tunnel


def _canonical(requested: str) -> str:
    try:
        return validate_name(requested)
    except InvalidName:
        return requested
