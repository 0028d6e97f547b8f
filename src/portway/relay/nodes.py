"""Relay nodes forwarding visitors to each other: any node serves any tunnel of the cluster.

A visitor lands on node B for a tunnel whose agent is on node A. B parses and checks the request exactly as for a
tunnel of its own (head rules, routing, the tunnel's access rules, per-address caps, every deadline) and sends
A the same bytes it would send down an agent link, over one multiplexed link to A's --advertise address that B
opens on demand (proto/node_link.py proves the cluster secret) and reuses for every later visitor. A splices each
stream to a stream of the tunnel's agent link without reading it: nothing is parsed twice.

A localtunnel (`lt`) tunnel on A is served the same way: A joins each forwarded stream to one of the lt client's
pool sockets, for that one stream (B never pools streams to an lt tunnel, since each would hold one of the pool's
few sockets while idle; lt opens a new socket as soon as one closes).

Where the checks happen: B does everything a relay checks about a visitor's request; the tunnel's access rules
live with the agent's registration on A, so A states them in its answer to each stream (basic auth as a digest)
and B enforces them. A checks only that the stream comes over an admitted node link and names a tunnel it serves.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import json
import logging
import secrets
import ssl
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Callable, TypeVar

from ..config import RelayConfig
from ..errors import ConduitReset, ConfigurationError, HttpError, MuxClosedError
from ..link.bridge import StreamBridge
from ..link.connection import Connection
from ..link.session import MuxSession, MuxStream
from ..proto import http1
from ..proto.control import refusal
from ..proto.http1 import RequestHead
from ..proto.mux import Role
from ..proto.node_link import (NODE_LINK_UPGRADE, AgentGoingAway, LineReader, NodeLinkGate, NodeLinkRequest,
                               StreamPreamble, TunnelAnswer, parse_answer, parse_going_away, parse_preamble)
from .localtunnel import LtTunnel
from .metrics import RelayCounters
from .registry import Registry, RemoteLease
from .tunnels import AccessPolicy, AgentTunnel, Tunnel

if TYPE_CHECKING:
    from .front import VisitorConnection

log = logging.getLogger(__name__)
T = TypeVar("T")  # what a stream's first line parses to

NODE_CONNECT_TIMEOUT = 3.0  # seconds to reach another node: an unreachable one is a quick 502, not a hang
NODE_ANSWER_TIMEOUT = 5.0  # seconds for a node's 101, and for its answer line on each new stream
MAX_NODE_LINKS = 64  # links this node keeps open to other nodes, and accepts from them
MAX_REMOTE_TUNNELS = 4096  # other nodes' tunnels this node keeps a pool of streams for
# seconds a lease read from Redis is trusted for later visitors: a Redis read per request cost more CPU than the
# forwarding itself; a name that moved meanwhile is answered for by the node that held it (404: not here), and
# that refusal sends the next visitor's lookup back to Redis
LEASE_RECHECK = 1.0
# seconds a forwarded visitor waits on the tunnel's node for a free lt pool socket at most (--pool-wait-timeout
# when shorter): less than the forwarding node waits for the answer, so a busy pool is answered as such (503)
# rather than as a node that did not answer
LT_SOCKET_WAIT = NODE_ANSWER_TIMEOUT - 1.0


def node_mux_config(config: RelayConfig):
    """A node link's streams are visitors' exchanges, never parked: a lost node link resets them visibly."""
    return dataclasses.replace(config.mux, resume_window=0)


def node_server_name(node: str, domain: str) -> str:
    """The name a node's certificate must hold for a node link: NODE-ID.DOMAIN, the node's own DNS name (its TCP
    tunnels' address), which the lease names and a wildcard certificate for *.DOMAIN covers."""
    return f"{node}.{domain.rstrip('.')}".lower()


def node_link_tls(config: RelayConfig) -> ssl.SSLContext | None:
    """How this node dials the others: plain TCP (None) when it serves no TLS itself; else TLS, each node's
    certificate verified (hostname and chain) against the system trust store and --cluster-ca. A node that serves
    TLS expects its peers to, as they are set up alike: a node link never falls back to plain TCP."""
    if not (config.tls_cert or config.acme_email):
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if config.cluster_ca:
        try:
            context.load_verify_locations(cafile=config.cluster_ca)
        except (OSError, ssl.SSLError) as error:
            raise ConfigurationError(f"--cluster-ca {config.cluster_ca}: not a readable PEM CA certificate "
                                     f"({getattr(error, 'strerror', None) or error})") from None
    return context


class RemoteTunnel(Tunnel):
    """A tunnel served by another node's agent, as this node forwards to it: conduits are streams on the node
    link to that node; access rules are those the node stated in its last answer."""

    kind = "remote"

    def __init__(self, name: str, lease: RemoteLease, links: "NodeLinks") -> None:
        super().__init__(name)
        self.lease = lease
        self.links = links
        # its node has stated the tunnel's rules at least once; an lt registration can state none
        self.answered = lease.kind == LtTunnel.kind
        self.checked_at = float("-inf")  # when the lease was last read from the registry (loop time)
        self.agent_going_away = False  # its node said the agent is going away: no stream is kept idle any more

    @property
    def online(self) -> bool:
        return True  # as far as the lease says: a node that can't serve it answers so, per stream

    async def _new_conduit(self) -> MuxStream:
        """A stream to the tunnel's agent through the node holding it. Nothing of the request has left when
        that fails (the node can't be reached, its link is closing, it no longer holds the name), so the lease
        is read again: when the name moved (its agent went to another node, or to this one), the stream comes
        from its new place instead of a refusal."""
        tried = self.lease
        try:
            return await self._conduit_from_holder()
        except HttpError as refused:
            try:
                lease = await self.links.registry.held_elsewhere(self.name)
            except HttpError:
                raise refused from None  # the registry can't say where it went: the holder's answer stands
            local = self.links.registry.get(self.name) if lease is None else None
            if isinstance(local, AgentTunnel) and local.online:
                return await local.fresh_conduit()  # the agent moved to this node meanwhile
            # (compared with the lease this visitor tried, not self.lease: another visitor refused by the same
            # node may have followed the name to its new node already)
            if lease is None or lease == tried:
                raise
        if lease != self.lease and lease.epoch >= self.lease.epoch:  # (not back to an older one)
            log.info("tunnel %s moved from relay node %s to %s", self.name, self.lease.node, lease.node)
            self.drop_idle()
            self.lease = lease
        self.checked_at = asyncio.get_running_loop().time()
        return await self._conduit_from_holder()

    async def _conduit_from_holder(self) -> MuxStream:
        node = self.lease.node
        session = await self.links.session(self.lease, self.name)
        try:
            stream = session.open_stream()
        except MuxClosedError:
            raise HttpError(502, f"Tunnel {self.name!r} is served by relay node {node}, and the link to it "
                                 "is closing; try again.") from None
        self.links.counters.forwarded_streams["out"] += 1
        stream.write(StreamPreamble(self.name).encode())
        try:
            line, rest = await _read_line(stream)
            answer = parse_answer(line)
        except (ConduitReset, TimeoutError, HttpError):
            stream.abort()
            raise HttpError(502, f"Tunnel {self.name!r} is served by relay node {node}, which did not answer "
                                 "for it.") from None
        if rest:
            stream.put_back([rest])
        if answer.status != 200:
            stream.close()
            self.checked_at = float("-inf")  # the name may have moved: the next visitor reads the lease again
            raise HttpError(answer.status, answer.message)
        self.access = AccessPolicy(
            allow_networks=tuple(ipaddress.ip_network(network) for network in answer.allow_networks),
            basic_auth_digest=answer.basic_auth_digest)
        self.answered = True
        return stream

    def release(self, conduit, reusable: bool) -> None:
        session = self.links.sessions.get(self.lease.node)
        if (session is None or session.mux.going_away or conduit.session is not session or self.agent_going_away
                or self.lease.kind == LtTunnel.kind):
            # going away; a stream of another link (a node the name left, or this node's); or an lt tunnel, where
            # an idle stream would hold one of its node's few pool sockets
            reusable = False
        super().release(conduit, reusable)

    async def join(self, conn: Connection, conduit, unread: bytes) -> None:
        await StreamBridge.take_over(conn, conduit, unread).closed


async def _read_line(stream: MuxStream) -> tuple[bytes, bytes]:
    """A stream's first line (a preamble or an answer) and what came after it, within NODE_ANSWER_TIMEOUT;
    TimeoutError, ConduitReset (the stream ended first) or HttpError (a line too long) otherwise."""
    reader = LineReader()
    async with asyncio.timeout(NODE_ANSWER_TIMEOUT):
        while (got := reader.feed(b"".join(await _read_some(stream)))) is None:
            pass
    return got


async def _first_line(stream: MuxStream, parse: Callable[[bytes], T]) -> tuple[T, bytes] | None:
    """A stream's first line parsed, and what came after it; None, the stream aborted, when it didn't come in time,
    the stream ended first, or the line is not what `parse` takes."""
    try:
        line, rest = await _read_line(stream)
        return parse(line), rest
    except (ConduitReset, TimeoutError, HttpError):
        stream.abort()
        return None


async def _read_some(stream: MuxStream) -> list[bytes]:
    chunks = await stream.read_chunks()
    if not chunks:
        raise ConduitReset("the stream ended")
    return chunks


class NodeLinks:
    """This node's links to the other nodes of the cluster, both ways.

    Opening (forwarding side): one link per node, dialled on the first visitor for one of its tunnels and reused;
    concurrent visitors wait for the same dial. Accepting (serving side): a node link's upgrade request must
    prove the cluster secret (NodeLinkGate); each stream on it is spliced to the named tunnel's agent link.
    """

    def __init__(self, config: RelayConfig, registry: Registry, counters: RelayCounters) -> None:
        self.config = config
        self.registry = registry
        self.counters = counters
        self.node_id = config.node_id or ""
        self.gate = NodeLinkGate(self.node_id, config.cluster_secret)
        self.tls = node_link_tls(config)
        self.sessions: dict[str, MuxSession] = {}  # node id -> the link this node opened to it
        self._dialling: dict[str, asyncio.Task[MuxSession]] = {}
        self._lookups: dict[str, asyncio.Task[RemoteTunnel | None]] = {}  # tunnel name -> its lease being read
        self.accepted: set[MuxSession] = set()
        self.tunnels: OrderedDict[str, RemoteTunnel] = OrderedDict()
        self._notices: set[asyncio.Task] = set()

    # forwarding side
    async def find(self, name: str) -> RemoteTunnel | None:
        """The tunnel `name` as held by another node, or None when no node holds it; HttpError as `tunnel`'s,
        and 503 when the registry can't be asked."""
        loop = asyncio.get_running_loop()
        tunnel = self.tunnels.get(name)
        if tunnel is not None and tunnel.answered and loop.time() - tunnel.checked_at < LEASE_RECHECK:
            self.tunnels.move_to_end(name)
            return tunnel
        # Every visitor arriving while the lease is looked up waits for that one lookup: when the cached lease of a
        # busy tunnel runs out, its hundreds of visitors would otherwise each ask Redis, past the registry's bound
        # on lookups at once (503 for the rest).
        lookup = self._lookups.get(name)
        if lookup is None:
            lookup = self._lookups[name] = loop.create_task(self._look_up(name))
            lookup.add_done_callback(lambda done: self._looked_up(name, done))
        return await asyncio.shield(lookup)

    def _looked_up(self, name: str, lookup: "asyncio.Task[RemoteTunnel | None]") -> None:
        if self._lookups.get(name) is lookup:
            del self._lookups[name]
        if not lookup.cancelled():
            lookup.exception()  # retrieved: each visitor that waited for it got it already

    async def _look_up(self, name: str) -> RemoteTunnel | None:
        now = asyncio.get_running_loop().time()
        lease = await self.registry.held_elsewhere(name)
        if lease is None:
            return None
        tunnel = await self.tunnel(name, lease)
        tunnel.checked_at = now
        return tunnel

    async def tunnel(self, name: str, lease: RemoteLease) -> RemoteTunnel:
        """The other node's tunnel `name` under `lease`, its access rules known; HttpError (502 naming the node,
        or the node's own refusal) when it can't be served from here."""
        tunnel = self.tunnels.get(name)
        if tunnel is None or tunnel.lease != lease:  # a new registration: new rules, maybe another node
            if tunnel is not None:
                tunnel.close()
            tunnel = self.tunnels[name] = RemoteTunnel(name, lease, self)
            while len(self.tunnels) > MAX_REMOTE_TUNNELS:
                _, evicted = self.tunnels.popitem(last=False)
                evicted.close()
        self.tunnels.move_to_end(name)
        if not tunnel.answered:
            conduit = await tunnel.fresh_conduit()
            tunnel.release(conduit, True)
        return tunnel

    async def session(self, lease: RemoteLease, name: str) -> MuxSession:
        session = self.sessions.get(lease.node)
        if session is not None and not session.ended and not session.mux.going_away:
            return session
        dial = self._dialling.get(lease.node)
        if dial is None:
            if len(self.sessions) >= MAX_NODE_LINKS:
                raise HttpError(503, f"Tunnel {name!r} is served by relay node {lease.node}, and this node "
                                     f"holds its {MAX_NODE_LINKS} node links already.")
            dial = self._dialling[lease.node] = asyncio.get_running_loop().create_task(self._dial(lease, name))
            dial.add_done_callback(lambda _: self._dialling.pop(lease.node, None))
        return await asyncio.shield(dial)

    async def _dial(self, lease: RemoteLease, name: str) -> MuxSession:
        node = lease.node
        unreachable = f"Tunnel {name!r} is served by relay node {node}, which this node cannot reach"
        secret = self.config.cluster_secret
        if secret is None:
            raise HttpError(502, f"Tunnel {name!r} is served by relay node {node}; this node runs without "
                                 "--cluster-secret and forwards no visitors to other nodes.")
        host, _, port = lease.advertise.rpartition(":")
        host = host.strip("[]")
        loop = asyncio.get_running_loop()
        server_name = node_server_name(node, self.config.domain) if self.tls is not None else None
        try:
            transport, conn = await asyncio.wait_for(
                loop.create_connection(Connection, host, int(port), ssl=self.tls, server_hostname=server_name),
                NODE_CONNECT_TIMEOUT)
        except ssl.SSLCertVerificationError as error:
            self.counters.node_link_failures["untrusted"] += 1
            message = (f"Tunnel {name!r} is served by relay node {node}, whose certificate this node does not "
                       f"accept for {server_name} ({error.verify_message.rstrip('.')}).")
            log.warning("node link to %s at %s: %s", node, lease.advertise, message)
            raise HttpError(502, message) from None
        except ssl.SSLError as error:  # no TLS there (a node serving plain TCP), or no certificate for the name
            self.counters.node_link_failures["unreachable"] += 1
            message = f"{unreachable} over TLS as {server_name} ({error.reason or error})."
            log.warning("node link to %s at %s: %s", node, lease.advertise, message)
            raise HttpError(502, message) from None
        except (OSError, ValueError, asyncio.TimeoutError) as error:
            self.counters.node_link_failures["unreachable"] += 1
            reason = "timed out" if isinstance(error, asyncio.TimeoutError) else getattr(error, "strerror", None)
            raise HttpError(502, f"{unreachable} ({reason or error}).") from None
        request = NodeLinkRequest.make(secret, self.node_id, node, time.time(), secrets.token_hex(16))
        parser = http1.ResponseParser("GET", NODE_LINK_UPGRADE)
        body = b""
        try:
            conn.write(request.encode(lease.advertise))
            async with asyncio.timeout(NODE_ANSWER_TIMEOUT):
                switched = None
                while switched is None:
                    data = await conn.read()
                    for event in parser.feed(data) if data else parser.feed_eof():
                        if isinstance(event, http1.Switched):
                            switched = event
                        elif isinstance(event, http1.Body):
                            body += event.data
                        elif event is http1.MESSAGE_END:
                            raise HttpError(502, f"{unreachable}: it refused this node's link "
                                                 f"({_message_of(body)}).")
        except (ConduitReset, TimeoutError, HttpError) as error:
            conn.close()
            refused = isinstance(error, HttpError) and error.status == 502
            self.counters.node_link_failures["refused" if refused else "unreachable"] += 1
            message = error.message if refused else f"{unreachable}: its link did not open."
            log.warning("node link to %s at %s: %s", node, lease.advertise, message)
            raise HttpError(502, message) from None
        session = MuxSession(Role.SERVER, node_mux_config(self.config),
                             on_stream=lambda stream: self._take_notice(stream, node))
        link_bytes = switched.trailing + conn.take_buffered()
        transport.set_protocol(session)
        session.connection_made(transport)
        if link_bytes:
            session.data_received(link_bytes)
        self.sessions[node] = session
        session.closed.add_done_callback(lambda _: self._forget(node, session))
        # the node is stopping: streams pooled idle for it would hold its drain up; visitors look again
        session.on_go_away = lambda: self._drop_idle(node)
        log.info("node link to %s at %s open", node, lease.advertise)
        return session

    def _forget(self, node: str, session: MuxSession) -> None:
        if self.sessions.get(node) is session:
            del self.sessions[node]
        self._drop_idle(node)

    def _drop_idle(self, node: str) -> None:
        for tunnel in self.tunnels.values():
            if tunnel.lease.node == node:
                tunnel.drop_idle()

    # serving side
    async def accept(self, visitor: "VisitorConnection", head: RequestHead) -> bool:
        """Serve one node link on `visitor`'s connection until it ends; the connection never returns to HTTP."""
        conn = visitor.conn
        visitor.carries_agent_link = True  # a link, not an exchange a drain waits for
        try:
            request = NodeLinkRequest.parse(head)
            self.gate.admit(request, time.time())
            if len(self.accepted) >= MAX_NODE_LINKS:
                raise HttpError(503, f"relay node {self.node_id} holds {MAX_NODE_LINKS} node links already")
        except HttpError as error:
            self.counters.node_link_failures["rejected"] += 1
            log.warning("refused a node link from %s: %s", conn.peer_ip, error.message)
            conn.write(refusal(error.status, error.message))
            return False
        switched = [event for event in visitor.pending if isinstance(event, http1.Switched)]
        visitor.pending.clear()
        link_bytes = (switched[0].trailing if switched else b"") + (conn.take_buffered() if conn.has_unread else b"")
        conn.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: portway-node\r\nConnection: Upgrade\r\n\r\n")
        transport = conn.transport
        assert transport is not None
        session = MuxSession(Role.CLIENT, node_mux_config(self.config), on_stream=self.serve_stream)
        transport.set_protocol(session)
        session.connection_made(transport)
        if link_bytes:
            session.data_received(link_bytes)
        self.accepted.add(session)
        log.info("node link from %s (%s) open", request.from_node, conn.peer_ip)
        try:
            reason = await session.closed
        finally:
            self.accepted.discard(session)
        log.info("node link from %s closed: %s", request.from_node, reason)
        return False

    async def serve_stream(self, stream: MuxStream) -> None:
        """One stream from another node: name the tunnel's rules and splice it to the tunnel's agent link."""
        self.counters.forwarded_streams["in"] += 1
        if (first := await _first_line(stream, parse_preamble)) is None:
            return
        preamble, rest = first
        tunnel = self.registry.get(preamble.tunnel)
        try:
            if isinstance(tunnel, LtTunnel):
                origin = await _lt_socket(tunnel, min(self.config.pool_wait_timeout, LT_SOCKET_WAIT))
            elif isinstance(tunnel, AgentTunnel):
                if not tunnel.online:
                    raise HttpError(502, f"The agent for tunnel {tunnel.name!r} is not connected (agent "
                                         "reconnecting); try again in a moment.")
                origin = await tunnel.fresh_conduit()
                tunnel.forwarding_links.add(stream.session)
                tunnel.on_going_away = self._tell_going_away
            else:
                raise HttpError(404, f"There is no tunnel {preamble.tunnel!r} on relay node {self.node_id}.")
        except HttpError as error:
            try:
                stream.write(TunnelAnswer(error.status, error.message).encode())
                stream.write_eof()
            except ConduitReset:
                pass
            stream.close()
            return
        access = tunnel.access
        try:
            stream.write(TunnelAnswer(200, "", access.login_digest(),
                                      tuple(str(network) for network in access.allow_networks)).encode())
        except ConduitReset:  # the other node gave up on the stream meanwhile: let the conduit go too
            origin.abort()
            return
        if rest:
            stream.put_back([rest])
        await splice(stream, origin)

    def _tell_going_away(self, tunnel: AgentTunnel) -> None:
        """The agent of `tunnel` said it is going away: tell every node that forwarded visitors to it."""
        sessions, tunnel.forwarding_links = tunnel.forwarding_links, set()
        for session in sessions:
            if session.ended:
                continue
            try:
                stream = session.open_stream()
            except MuxClosedError:
                continue  # that link is going away itself: its streams end with it
            task = asyncio.get_running_loop().create_task(self._send_notice(stream, tunnel.name))
            self._notices.add(task)
            task.add_done_callback(self._notices.discard)

    async def _send_notice(self, stream: MuxStream, name: str) -> None:
        try:
            stream.write(AgentGoingAway(name).encode())
            stream.write_eof()
            async with asyncio.timeout(NODE_ANSWER_TIMEOUT):  # the other node ends its side once it has read it
                while await stream.read_chunks():
                    pass
        except (ConduitReset, TimeoutError):
            pass
        stream.close()

    async def _take_notice(self, stream: MuxStream, node: str) -> None:
        """A stream the node `node` opened on the link this node dialled: its agent of a tunnel is going away, so
        the streams kept idle for that tunnel go (the agent waits for each one) and no more are kept."""
        if (first := await _first_line(stream, parse_going_away)) is None:
            return
        notice, _ = first
        tunnel = self.tunnels.get(notice.tunnel)
        if tunnel is not None and tunnel.lease.node == node:
            tunnel.agent_going_away = True
            tunnel.drop_idle()
        try:
            stream.write_eof()
        except ConduitReset:
            pass
        stream.close()

    def open_links(self) -> dict[str, int]:
        """Node links open now: opened by this node ("out") and accepted from other nodes ("in")."""
        return {"out": len(self.sessions), "in": len(self.accepted)}

    def go_away(self) -> None:
        """This node is stopping: the nodes linked to it open no new streams here (they look the lease up again
        and find the tunnel's new node); the streams in flight finish."""
        for session in self.accepted:
            session.go_away()

    def streams_in_flight(self) -> int:
        """Other nodes' visitors being served through this node right now."""
        return sum(len(session.streams) for session in self.accepted)

    def close(self) -> None:
        for task in [*self._dialling.values(), *self._lookups.values(), *self._notices]:
            task.cancel()
        for session in [*self.sessions.values(), *self.accepted]:
            session.close()
        for tunnel in self.tunnels.values():
            tunnel.close()


async def _lt_socket(tunnel: LtTunnel, wait: float):
    """One of the lt client's pool sockets, for one forwarded stream; HttpError when none is connected or none
    became free within `wait` seconds."""
    try:
        sock, _ = await asyncio.wait_for(tunnel.acquire(), wait)
    except asyncio.TimeoutError:
        raise HttpError(503, f"Tunnel {tunnel.name!r} is busy: no connection to its origin became free in "
                             "time.") from None
    return sock


async def splice(first: MuxStream, second: MuxStream | Connection) -> None:
    """Copy bytes both ways between a node stream and a conduit (an agent's stream or an lt pool socket) until
    both directions ended, each at the pace its receiver grants; a reset on either side resets the other."""

    async def pump(source: MuxStream | Connection, sink: MuxStream | Connection) -> None:
        try:
            while chunks := await source.read_chunks():
                for chunk in chunks:
                    await sink.send(chunk)
            sink.write_eof()
        except ConduitReset:
            source.abort()
            sink.abort()

    await asyncio.gather(pump(first, second), pump(second, first))
    first.close()
    second.close()


def _message_of(body: bytes) -> str:
    try:
        return str(json.loads(body)["message"])
    except (ValueError, KeyError, TypeError):
        return body.decode("utf-8", "replace")[:200] or "no reason given"
