"""How the relay copies one origin response to the visitor when a single read from the conduit brings
several chunks (several frames of one link read): they leave in one write; stray bytes after the response's
end are left unread on the conduit and never sent, and after a 101 the origin's first bytes are not lost. And where a
cluster node sends a visitor whose tunnel's agent just moved to another node."""

from __future__ import annotations

import asyncio
from collections import deque
from types import SimpleNamespace

import pytest

from portway.errors import ConduitReset, VisitorGone
from portway.link.connection import Connection, ReceiveBuffer
from portway.auth import BasicAuthGuard
from portway.proto.names import SYSTEM_NAMES
from portway.proto.routing import Router
from portway.relay.front import FrontServices, VisitorConnection
from portway.relay.registry import MemoryRegistry
from portway.relay.tunnels import AgentTunnel, Tunnel
from portway.link.session import MuxSession
from portway.proto.mux import MuxConfig, Role
from portway.relay.metrics import RelayCounters, TunnelCounters
from portway.config import RelayConfig
from portway.proto.http1 import RequestHead, RequestParser, Switched


class ScriptedConduit(ReceiveBuffer):
    """A conduit whose reads return the scripted lists of chunks, one list per read."""

    def __init__(self, reads: list[list[bytes]]) -> None:
        self._loop = asyncio.get_running_loop()
        self._chunks: deque[bytes] = deque()
        self._eof = False
        self._reset = False
        self._read_waiter = None
        self._reads = reads

    def poll_readable(self):
        if not self._chunks and self._reads:
            self._chunks.extend(self._reads.pop(0))
        return super().poll_readable()

    def _take_chunks(self) -> list[bytes]:
        chunks = list(self._chunks)
        self._chunks.clear()
        return chunks

    def abort(self) -> None:
        raise AssertionError("the conduit must not be aborted")


class RecordingVisitor(Connection):
    """The visitor's side of a VisitorConnection: records every write (never paused, so never drained)."""

    def __init__(self) -> None:
        super().__init__()
        self.peer_ip = "127.0.0.1"
        self.writes: list[bytes] = []

    def writelines(self, buffers: list[bytes]) -> None:
        self.writes.append(b"".join(buffers))

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def abort(self) -> None:
        raise AssertionError("the visitor must not be reset")


def front_services() -> FrontServices:
    """What forward_response and switch_protocols use of a relay: its settings and counters."""
    return FrontServices(RelayConfig(), Router("a.x", SYSTEM_NAMES), MemoryRegistry(), None, RelayCounters(),
                         BasicAuthGuard())


def request_head(method: str, upgrade: bytes | None) -> RequestHead:
    asks = b"Connection: Upgrade\r\nUpgrade: %b\r\n" % upgrade if upgrade is not None else b""
    (head, *_) = RequestParser().feed(b"%b / HTTP/1.1\r\nHost: a.x\r\n%b\r\n" % (method.encode(), asks))
    assert isinstance(head, RequestHead) and head.upgrade == upgrade
    return head


def forward(reads: list[list[bytes]], method: str = "GET", upgrade: bytes | None = None):
    async def main():
        visitor = RecordingVisitor()
        proxy = VisitorConnection(visitor, "http", front_services())
        request = request_head(method, upgrade)
        conduit = ScriptedConduit(reads)
        outcome = await proxy.forward_response(request, conduit, may_retry=False)
        return outcome, visitor.writes, list(conduit._chunks)

    return asyncio.run(main())


HEAD = b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n"


def test_the_chunks_of_one_read_leave_in_one_write():
    outcome, writes, unread = forward([[HEAD + b"hell", b"o wo", b"rld!"]])
    assert outcome is True
    assert len(writes) == 1
    assert writes[0].endswith(b"\r\n\r\nhello world!")
    assert unread == []


def test_bytes_after_the_response_stay_unread_on_the_conduit():
    stray = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nextra"
    outcome, writes, unread = forward([[HEAD + b"hello ", b"world!", stray, b"more"]])
    assert outcome is True
    assert b"".join(writes).endswith(b"hello world!")
    assert b"extra" not in b"".join(writes)
    assert unread == [stray, b"more"]  # so the conduit is not reused for the next request


def test_the_origins_first_bytes_after_a_101_go_to_the_visitor_first():
    switch = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    outcome, writes, unread = forward([[switch + b"\x81\x02hi", b"\x81\x03bye"]], upgrade=b"websocket")
    assert isinstance(outcome, Switched)
    assert outcome.trailing == b"\x81\x02hi\x81\x03bye"  # written to the visitor before the bridge starts
    assert unread == []  # the stream already returned credit for them: the bridge must not see them again
    assert writes == [writes[0]] and writes[0].startswith(b"HTTP/1.1 101 ")


def test_a_visitor_gone_when_the_101_arrived_resets_the_conduit():
    """The origin's first bytes after its 101 can't reach a visitor that has just gone: the conduit (a stream
    whose agent side is bridged to the origin) is reset, not left open and unread with nobody to close it."""

    class GoneVisitor(RecordingVisitor):
        def write(self, data: bytes) -> None:
            raise ConduitReset("connection already closed")

    async def main():
        proxy = VisitorConnection(GoneVisitor(), "http",
                                  front_services())
        conduit = SimpleNamespace(aborted=False)
        conduit.abort = lambda: setattr(conduit, "aborted", True)

        async def join(conn, joined, unread) -> None:
            raise AssertionError("nothing to join: the visitor is gone")

        tunnel = SimpleNamespace(counters=TunnelCounters(), join=join)
        with pytest.raises(VisitorGone):
            await proxy.switch_protocols(tunnel, conduit, Switched(b"\x81\x02hi"))
        assert conduit.aborted
        assert tunnel.counters.websockets_open == 0

    asyncio.run(main())


class ElsewhereTunnel(Tunnel):
    """A tunnel as another cluster node serves it: its one conduit answers with the scripted reads."""

    def __init__(self, name: str, reads: list[list[bytes]]) -> None:
        super().__init__(name)
        self.reads = reads
        self.sent: list[bytes] = []

    @property
    def online(self) -> bool:
        return True

    async def _new_conduit(self):
        conduit = ScriptedConduit(self.reads)
        sent = self.sent

        async def send(data: bytes) -> None:
            sent.append(bytes(data))

        conduit.send = send
        return conduit


def test_a_cluster_node_forwards_a_visitor_of_a_tunnel_whose_agent_moved_away_to_the_node_it_went_to():
    """A stopping node's agent, registered on another node, said GO_AWAY here; until this node has seen the
    name's lease go (a Redis read away), a visitor still on it is served through the node the name went to, not
    refused with a 502 because the agent here takes no new streams."""

    async def main():
        session = MuxSession(Role.SERVER, MuxConfig())
        session.go_away_received = True
        registry = MemoryRegistry()
        registry.add(AgentTunnel("web", session, "key"))
        new_node = ElsewhereTunnel("web", [[HEAD + b"hello world!"]])

        async def find(name: str):
            return new_node if name == "web" else None

        services = FrontServices(RelayConfig(), Router("a.x", SYSTEM_NAMES), registry, None, RelayCounters(),
                                 BasicAuthGuard(), nodes=SimpleNamespace(find=find))
        visitor = RecordingVisitor()
        proxy = VisitorConnection(visitor, "http", services)
        proxy.pending.extend(RequestParser().feed(b"GET / HTTP/1.1\r\nHost: web.a.x\r\n\r\n"))
        assert await proxy.handle(proxy.pending.popleft()) is True
        answer = b"".join(visitor.writes)
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"hello world!")
        assert len(new_node.sent) == 1 and new_node.sent[0].startswith(b"GET / HTTP/1.1\r\n")

    asyncio.run(main())
