"""`portway server`: one port for visitors and agents, routing each request by its Host."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import ipaddress
import logging
import ssl
import sys
from typing import TYPE_CHECKING

from ..auth import BasicAuthGuard, FailureThrottle, TokenBook
from ..config import RelayConfig
from ..errors import HttpError, InsecureConfiguration
from ..link.connection import Connection
from ..link.deadlines import DeadlineSweeper, resolution_for
from ..link.session import MuxSession
from ..policy.admission import Admission, AdmissionLimits, Refusal
from ..proto.control import LINK_PATH
from ..proto.node_link import NODE_LINK_PATH
from ..proto.http1 import RequestHead
from ..proto.names import SYSTEM_NAMES
from ..proto.pages import error_response, json_response, landing_page
from ..proto.routing import OneTunnel, Router
from .agents import AgentLinks
from .access_log import AccessLog
from .certificates import CertificateFiles
from .front import FrontServices, VisitorConnection
from .localtunnel import LocalTunnelService
from .metrics import RelayCollector, RelayCounters, serve_metrics
from .naming import NameClaims
from .nodes import NodeLinks
from .registry import MemoryRegistry, Registry
from .tunnels import AgentTunnel

if TYPE_CHECKING:
    from .acme import AcmeCertificates

log = logging.getLogger(__name__)

HANDOVER_TIMEOUT = 5.0  # seconds a stopping cluster node waits for its agents to register on the nodes it named
DRAIN_CHECK = 0.05  # seconds between looks at other nodes' streams still in flight through a stopping node


class Relay:
    """A relay: owns its listening socket, the registry of tunnels, the deadline sweep and the per-address count
    of visitor connections. Each connection is served by a visitor front (front.py); requests for the relay's
    own host go to its pages, agent registration (agents.py) or the localtunnel service (localtunnel.py)."""

    def __init__(self, config: RelayConfig) -> None:
        self.config = config
        self.router = Router(config.domain, SYSTEM_NAMES)
        self.registry = make_registry(config)
        self.server: asyncio.base_events.Server | None = None
        self.ssl_context: ssl.SSLContext | None = None
        self.certificates: CertificateFiles | None = None
        self.acme: AcmeCertificates | None = None
        self.port = config.port
        self.counters = RelayCounters()
        throttle = FailureThrottle(config.auth_failures_per_address, config.auth_failure_window)
        self.claims = NameClaims(TokenBook(list(config.grants)), throttle, self.registry, self.counters)
        guard = BasicAuthGuard(config.auth_failures_per_address, config.auth_failures_per_tunnel,
                               config.auth_failure_window)
        self.agents = AgentLinks(config, self.registry, self.claims, self.public_url)
        self.nodes = NodeLinks(config, self.registry, self.counters)
        self.localtunnel = LocalTunnelService(config, self.registry, self.claims, self.public_url, self.listen_hosts)
        self.admission = Admission(AdmissionLimits(
            connections=config.max_connections_per_ip, upgraded=config.max_upgraded_per_ip,
            rate=config.max_connection_rate_per_ip, burst=2 * config.max_connection_rate_per_ip))
        self.visitors: dict[str, set[VisitorConnection]] = {}  # by address
        self._exchanges_done = asyncio.Event()  # set, while draining, once no visitor connection is busy
        self.deadlines: DeadlineSweeper | None = None
        self.metrics_server: asyncio.base_events.Server | None = None
        self.extra_servers: list[asyncio.base_events.Server] = []
        access_log = AccessLog(sys.stderr, config.log_format) if config.access_log else None
        self.front = FrontServices(config, self.router, self.registry, self.serve_own, self.counters, guard,
                                   access_log, admission=self.admission, nodes=self.nodes)

    # lifecycle
    async def start(self) -> None:
        check_secure_default(self.config)
        await self.registry.start()
        if self.config.tls_cert:
            self.certificates = CertificateFiles(self.config.tls_cert, self.config.tls_key)
            self.ssl_context = self.certificates.context
            self.certificates.watch(self.config.tls_reload_interval)
        elif self.config.acme_email:
            from .acme import AcmeCertificates  # the acme library and its dependencies: only when ACME is on

            self.acme = AcmeCertificates(self.config, lambda name: self.registry.get(name) is not None)
            self.acme.prepare()
            self.ssl_context = self.acme.context
        loop = asyncio.get_running_loop()
        config = self.config
        self.deadlines = DeadlineSweeper(loop, resolution_for(config.idle_timeout, config.head_timeout,
                                                              config.response_timeout, config.linger_timeout))
        # a handshake that never completes is a slowloris the per-address limit can't count yet: bound it like a head
        handshake = {"ssl_handshake_timeout": self.config.head_timeout} if self.ssl_context is not None else {}
        self.server = await loop.create_server(
            self._new_connection, self.config.bind, self.config.port, ssl=self.ssl_context,
            reuse_address=True, backlog=1024, **handshake,
        )
        self.port = self.server.sockets[0].getsockname()[1]
        if self.acme is not None:
            self.acme.start()
        if config.metrics is not None:
            collector = RelayCollector(self.counters, self.registry, self.visitor_connections,
                                       self.nodes.open_links if config.cluster is not None else None)
            host, port = config.metrics
            self.metrics_server = await serve_metrics(host, port, collector)

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        if self.metrics_server is None:
            return None
        return self.metrics_server.sockets[0].getsockname()[:2]

    def visitor_connections(self) -> int:
        return self.admission.open_connections()

    def exchanges_in_flight(self) -> int:
        """Visitor connections in the middle of something (a head, an exchange, a WebSocket), agent links aside."""
        return sum(1 for visitors in self.visitors.values() for visitor in visitors
                   if not visitor.carries_agent_link and not visitor.idle)

    async def drain(self, timeout: float) -> int:
        """Stop gracefully: stop accepting connections, close idle ones, tell every agent no new streams will
        come (GO_AWAY), and give the exchanges in flight up to `timeout` seconds to finish. Returns how many were
        still going when it gave up (0: all finished). The caller then closes the relay.

        A cluster node first hands its agents over: each agent that understands MOVE is sent to another live node,
        registers there (taking its names' leases over) and then says GO_AWAY here; meanwhile this node serves
        its visitors as before, so there is no gap. Only then are the other nodes' links told GO_AWAY."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        self.front.draining.start()
        for server in (self.server, *self.extra_servers):
            if server is not None:
                server.close()
        for visitors in list(self.visitors.values()):
            for visitor in list(visitors):
                if visitor.idle:
                    visitor.conn.close()
        moving = await self._hand_over_agents(min(deadline, loop.time() + HANDOVER_TIMEOUT))
        for tunnel in self.registry:
            if isinstance(tunnel, AgentTunnel) and tunnel.online and tunnel.session not in moving:
                tunnel.drop_idle()
                tunnel.session.go_away()
        self.nodes.go_away()
        if self.exchanges_in_flight():
            try:
                await asyncio.wait_for(self._exchanges_done.wait(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                pass
        # streams other nodes' visitors have through this node (none is waited for on one relay)
        while self.nodes.streams_in_flight() and loop.time() < deadline:
            await asyncio.sleep(DRAIN_CHECK)
        return self.exchanges_in_flight() + self.nodes.streams_in_flight()

    async def _hand_over_agents(self, deadline: float) -> set[MuxSession]:
        """Send every agent link whose agent understands MOVE to another live node of the cluster (spread over
        them), and wait until deadline for each to say GO_AWAY here (registered there) or to end. Returns the
        links that were sent; none on a relay that runs alone or when no other node is alive."""
        try:
            await self.registry.leave()
            nodes = await self.registry.live_nodes()
        except HttpError:
            return set()  # Redis is away: agents are told GO_AWAY and find another node through their --relay list
        sessions: list[MuxSession] = []
        for tunnel in self.registry:
            if (isinstance(tunnel, AgentTunnel) and tunnel.online and tunnel.can_move
                    and tunnel.session not in sessions):
                sessions.append(tunnel.session)
        if not nodes or not sessions:
            return set()
        for index, session in enumerate(sessions):
            node, address = nodes[index % len(nodes)]
            session.move(address)
        log.info("handing %d agent link(s) over to %s", len(sessions), ", ".join(node for node, _ in nodes))
        loop = asyncio.get_running_loop()
        while any(not session.go_away_received and not session.ended for session in sessions) \
                and loop.time() < deadline:
            await asyncio.sleep(DRAIN_CHECK)
        stayed = [session for session in sessions if not session.go_away_received and not session.ended]
        if stayed:
            log.warning("%d agent link(s) did not move within %g s: told to go away", len(stayed), HANDOVER_TIMEOUT)
        return {session for session in sessions if session not in stayed}

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        if self.metrics_server is not None:
            self.metrics_server.close()
        if self.certificates is not None:
            self.certificates.close()
        if self.acme is not None:
            self.acme.close()
        for server in self.extra_servers:
            server.close()
        if self.deadlines is not None:
            self.deadlines.close()
        self.nodes.close()
        for tunnel in self.registry:
            if isinstance(tunnel, AgentTunnel) and tunnel.session is not None:
                tunnel.session.close()
            self.registry.remove(tunnel)
        for port in self.agents.ports.ports():  # TCP tunnels: their links, then their public ports
            tcp_tunnel = self.agents.ports.get(port)
            if tcp_tunnel is not None and tcp_tunnel.session is not None:
                tcp_tunnel.session.close()
        self.agents.ports.close()
        await self.registry.close()

    @property
    def scheme(self) -> str:
        return "https" if self.ssl_context is not None else "http"

    def public_url(self, name: str | None = None) -> str:
        port = self.config.public_port or self.port
        default = 443 if self.scheme == "https" else 80
        suffix = "" if port == default else f":{port}"
        host = f"{name}.{self.config.domain}" if name else self.config.domain
        return f"{self.scheme}://{host}{suffix}"

    def listen_hosts(self) -> list[str]:
        """The addresses the relay listens on (an lt tunnel's pool port goes where `lt` reached the relay)."""
        hosts: list[str] = []
        for sock in self.server.sockets if self.server is not None else ():
            host = sock.getsockname()[0]
            if host not in hosts:
                hosts.append(host)
        return hosts or [self.config.bind]

    def _new_connection(self, front: FrontServices | None = None) -> Connection:
        loop = asyncio.get_running_loop()
        front = front or self.front
        return Connection(lambda conn: loop.create_task(self._serve(conn, front)))

    async def serve_one_tunnel(self, name: str, host: str = "127.0.0.1", first_port: int = 0,
                               attempts: int = 1) -> int:
        """A listener of its own where every request goes to tunnel `name`, whatever its Host names (the
        embedded relay's address for clients that can't resolve `NAME.localhost`); returns its port."""
        front = dataclasses.replace(self.front, router=OneTunnel(name, self.config.domain))
        loop = asyncio.get_running_loop()
        for offset in range(attempts):
            try:
                server = await loop.create_server(lambda: self._new_connection(front), host,
                                                  first_port + offset if first_port else 0, reuse_address=True)
            except OSError as error:
                if error.errno != errno.EADDRINUSE or offset == attempts - 1:
                    raise
                continue
            self.extra_servers.append(server)
            return server.sockets[0].getsockname()[1]
        raise OSError(errno.EADDRINUSE, "no free port")

    async def _serve(self, conn: Connection, front: FrontServices) -> None:
        address = conn.peer_ip
        loop = asyncio.get_running_loop()
        refused = self.admission.admit(address, loop.time())
        if refused is Refusal.CONNECTIONS and self._close_an_idle_keep_alive(address):
            refused = self.admission.admit(address, loop.time(), make_room=True)
        if refused is not None:
            self.counters.refused_connections[refused.name.lower()] += 1
            conn.write(error_response(429, refused.value, close=True))
            conn.close()
            return
        visitor = VisitorConnection(conn, self.scheme, front)
        self.deadlines.watch(visitor.deadline)
        self.visitors.setdefault(address, set()).add(visitor)
        try:
            await visitor.serve()
        finally:
            same_address = self.visitors[address]
            same_address.discard(visitor)
            if not same_address:
                del self.visitors[address]
            if self.front.draining.started and not self.exchanges_in_flight():
                self._exchanges_done.set()
            self.deadlines.unwatch(visitor.deadline)
            self.admission.release(address, visitor.upgraded, loop.time())

    def _close_an_idle_keep_alive(self, address: str) -> bool:
        """Make room at the address's HTTP cap by closing one of its idle keep-alive connections (one that served
        a request and waits for the next: its client opens a new one if it needs it); False if it has none."""
        for visitor in self.visitors.get(address, ()):
            transport = visitor.conn.transport
            # one already closing (for an earlier newcomer) frees its slot soon, but is no room for this one
            if visitor.idle and visitor.served and transport is not None and not transport.is_closing():
                visitor.conn.close()
                return True
        return False

    # the relay's own endpoints (bare domain, IP literal, localhost)
    async def serve_own(self, visitor: VisitorConnection, head: RequestHead) -> bool:
        path, _, query = head.target.decode("latin-1").partition("?")
        if path == LINK_PATH:
            return await self.agents.register(visitor, head, query)
        if path == NODE_LINK_PATH:
            return await self.nodes.accept(visitor, head)
        if self.localtunnel.wants(head, path, query):
            return await self.localtunnel.serve(visitor, head, path, query)
        if not await visitor.skip_body(head):
            visitor.send_error(400, "unexpected request body", close=True)
            return False
        if path == "/api/status":
            visitor.send(json_response(200, self.status()), head_only=head.method == "HEAD")
        elif path == "/" or path == "":
            suffix = self.public_url().split(self.config.domain, 1)[1]
            visitor.send(landing_page(self.config.domain, suffix, len(self.registry)),
                         head_only=head.method == "HEAD")
        else:
            visitor.send_error(404, f"Nothing is served at {path} on this relay.", close=False,
                               head_only=head.method == "HEAD")
        return head.keep_alive

    def status(self) -> dict:
        return {"tunnels": len(self.registry)}


def make_registry(config: RelayConfig) -> Registry:
    """The cluster's Redis registry with --cluster, else this process's memory."""
    if config.cluster is None:
        return MemoryRegistry()
    from .cluster import RedisRegistry  # redis-py: only for a cluster node

    return RedisRegistry(config.cluster, config.node_id, config.advertise, secret=config.cluster_secret,
                         auth_failures_per_address=config.auth_failures_per_address,
                         auth_failure_window=config.auth_failure_window)


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
