"""The pieces of a TCP tunnel put together by hand, the way the design note (notes: tcp-design) has the relay and
the agent do it: a visitor of a TcpListener becomes a stream on a multiplexed link whose first bytes are a
preamble naming the visitor (a PROXY v2 header), then StreamBridge.take_over; the agent's end reads the preamble,
connects to the local service, writes the PROXY header in the tunnel's version first and bridges the rest. Over
real loopback sockets: the service learns the visitor's address and port, bytes arrive complete in both
directions (checksummed), and a visitor's half-close still gets the whole answer."""

from __future__ import annotations

import asyncio
import hashlib
import os

import pytest

from portway.link.bridge import StreamBridge
from portway.link.connection import Connection
from portway.link.session import MuxSession
from portway.proto.mux import MuxConfig, Role
from portway.proto.proxy_protocol import Endpoints, HeaderReader, Version, encode
from portway.relay.tcp_listeners import TcpListener

TIMEOUT = 20


class ProxyAwareService:
    """A local service behind the tunnel: decodes the PROXY header, checksums everything after it until the
    visitor's end arrives, then answers `SOURCE_IP SOURCE_PORT SHA256` followed by `answer_size` bytes."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        header_reader = HeaderReader()
        header = None
        while header is None:
            header = header_reader.feed(await reader.read(64))
        checksum = hashlib.sha256(header_reader.rest)
        while data := await reader.read(1 << 20):
            checksum.update(data)
        source = header.endpoints
        writer.write(f"{source.source} {source.source_port} {checksum.hexdigest()}\n".encode() + self.answer)
        await writer.drain()
        writer.close()


async def agent_serves(stream, service_port: int, version: Version) -> None:
    """The agent's end of a TCP tunnel's stream: the relay's preamble, then the service's connection with the
    PROXY header first, then the bridge; the bytes that came after the preamble go first."""
    preamble = HeaderReader()
    header = None
    while header is None:
        chunks = await asyncio.wait_for(stream.read_chunks(), TIMEOUT)
        assert chunks, "the stream ended before its preamble"
        header = preamble.feed(b"".join(chunks))
    if preamble.rest:
        stream.put_back([preamble.rest])
    _, conn = await asyncio.get_running_loop().create_connection(Connection, "127.0.0.1", service_port)
    conn.write(encode(version, header.endpoints))
    StreamBridge.take_over(conn, stream)


class Link:
    """A relay-side and an agent-side session over one loopback connection; the agent side serves every stream
    with agent_serves() towards the service."""

    @classmethod
    async def start(cls, version: Version, answer: bytes) -> "Link":
        link = cls()
        loop = asyncio.get_running_loop()
        link.service_server = await asyncio.start_server(ProxyAwareService(answer).handle, "127.0.0.1", 0)
        service_port = link.service_server.sockets[0].getsockname()[1]
        link.agent_sides = []

        async def on_stream(stream) -> None:
            await agent_serves(stream, service_port, version)

        def agent_side() -> MuxSession:
            link.agent_sides.append(MuxSession(Role.CLIENT, MuxConfig(), on_stream=on_stream))
            return link.agent_sides[-1]

        link.link_server = await loop.create_server(agent_side, "127.0.0.1", 0)
        _, link.relay_side = await loop.create_connection(lambda: MuxSession(Role.SERVER, MuxConfig()),
                                                          "127.0.0.1", link.link_server.sockets[0].getsockname()[1])
        return link

    def close(self) -> None:
        self.relay_side.close()
        for session in self.agent_sides:
            session.close()
        self.link_server.close()
        self.service_server.close()


@pytest.mark.parametrize("version", list(Version))
def test_a_visitor_reaches_the_service_through_the_link_with_its_address(version):
    async def main():
        answer = os.urandom(2 * 1024 * 1024)
        link = await Link.start(version, answer)
        visitors: list[Connection] = []

        def on_visitor(conn: Connection) -> None:
            visitors.append(conn)
            stream = link.relay_side.open_stream()
            transport = conn.transport
            stream.write(encode(Version.V2, Endpoints.of(transport.get_extra_info("peername"),
                                                         transport.get_extra_info("sockname"))))
            StreamBridge.take_over(conn, stream)

        listener = TcpListener("127.0.0.1", 0, on_visitor)
        public_port = await listener.open()

        async def visit(payload: bytes) -> None:
            reader, writer = await asyncio.open_connection("127.0.0.1", public_port)
            own_port = writer.get_extra_info("sockname")[1]
            for start in range(0, len(payload), 256 * 1024):
                writer.write(payload[start:start + 256 * 1024])
                await writer.drain()
            writer.write_eof()  # the visitor is done sending; the answer must still come whole
            line = await asyncio.wait_for(reader.readline(), TIMEOUT)
            rest = await asyncio.wait_for(reader.read(), TIMEOUT)
            writer.close()
            assert line.decode().split() == ["127.0.0.1", str(own_port), hashlib.sha256(payload).hexdigest()]
            assert hashlib.sha256(rest).digest() == hashlib.sha256(answer).digest()

        await asyncio.gather(*(visit(os.urandom(size)) for size in (0, 1, 5 * 1024 * 1024 + 3)))
        assert len(visitors) == 3
        listener.close()
        link.close()

    asyncio.run(main())


def test_bytes_that_arrive_with_the_preamble_reach_the_service_right_after_the_header():
    """The relay's preamble and a visitor's first bytes may come in one read on the agent's side: those bytes
    are the service's first, after the PROXY header, not lost or put ahead of it."""
    async def main():
        link = await Link.start(Version.V1, b"")
        visitor = Endpoints.of(("203.0.113.9", 50123), ("192.0.2.1", 20001))
        stream = link.relay_side.open_stream()
        stream.write(encode(Version.V2, visitor) + b"early bytes")
        await stream.send(b", later bytes")
        stream.write_eof()
        answer = b""
        while chunks := await asyncio.wait_for(stream.read_chunks(), TIMEOUT):
            answer += b"".join(chunks)
        assert answer.decode().split() == ["203.0.113.9", "50123",
                                           hashlib.sha256(b"early bytes, later bytes").hexdigest()]
        link.close()

    asyncio.run(main())
