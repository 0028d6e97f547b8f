"""Plain requests served from callbacks (relay/front.py's InlineExchange), in one process over real loopback
sockets: a visitor, the relay's front, a relay-side and an agent-side session, an agent bridge per stream, and a
scripted origin. The connection's task must stay asleep for plain requests, and every way an exchange can go
wrong must end as it does in the task: a retry on a fresh conduit, a 504, a 502, an answer cut short, a conduit
reset when the visitor leaves, a conduit never reused after stray bytes, a full write buffer drained."""

from __future__ import annotations

import asyncio
import hashlib
import os

from portway.auth import BasicAuthGuard
from portway.config import RelayConfig
from portway.link.bridge import StreamBridge
from portway.link.connection import Connection, abort_with_reset
from portway.link.deadlines import DeadlineSweeper
from portway.link.session import MuxSession
from portway.proto.mux import MuxConfig, Role
from portway.proto.names import SYSTEM_NAMES
from portway.proto.routing import Router
from portway.relay.front import FrontServices, VisitorConnection
from portway.relay.metrics import RelayCounters
from portway.relay.registry import MemoryRegistry
from portway.relay.tunnels import AgentTunnel
from tests.async_wait import until

HOST = b"app.a.x"
BIG = os.urandom(24 * 1024 * 1024)  # well past what the loopback socket buffers can take


def answer(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%b\r\n%b" % (len(body), extra, body)


class Origin:
    """The tunnel's local service. `script(number)` gives, for the n-th request it reads (from 1, over all its
    connections), what it does: bytes to answer, "close" (close without answering), "silent" (never answer),
    "reset" (send a head and part of a body, then reset). It counts its connections."""

    def __init__(self, script) -> None:
        self.script = script
        self.requests = 0
        self.connections = 0
        self.gone = 0  # connections that ended
        self.writers: list[asyncio.StreamWriter] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                self.requests += 1
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                body = await reader.readexactly(length)
                action = self.script(self.requests)
                if action == "close":
                    return
                if action == "silent":
                    await reader.read()  # until the relay gives the stream up (a FIN or a reset)
                    return
                if action == "reset":
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
                    await writer.drain()
                    writer.transport.abort()
                    return
                writer.write(action if action != "echo" else answer(body))
                await writer.drain()
        except ConnectionError:
            pass  # the relay reset the stream: its bridge resets this connection
        finally:
            self.gone += 1
            writer.close()


class Served(Connection):
    """The relay's listener protocol: each visitor connection gets a VisitorConnection and its task."""

    def __init__(self, world: "World") -> None:
        super().__init__()
        self.world = world

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        proxy = VisitorConnection(self, "http", self.world.services)
        self.world.proxies.append(proxy)
        self.world.sweeper.watch(proxy.deadline)
        self.world.tasks.append(asyncio.get_running_loop().create_task(proxy.serve()))


class World:
    def __init__(self, origin: Origin, config: RelayConfig) -> None:
        self.origin = origin
        self.config = config
        self.proxies: list[VisitorConnection] = []
        self.tasks: list[asyncio.Task] = []
        self.servers: list[asyncio.AbstractServer] = []
        self.visitors: list[asyncio.StreamWriter] = []

    @classmethod
    async def start(cls, script, **settings) -> "World":
        world = cls(Origin(script), RelayConfig(**settings))
        loop = asyncio.get_running_loop()
        world.sweeper = DeadlineSweeper(loop, 0.05)
        origin_server = await asyncio.start_server(world.origin.handle, "127.0.0.1", 0)
        origin_port = origin_server.sockets[0].getsockname()[1]

        async def serve_stream(stream) -> None:
            await loop.create_connection(lambda: StreamBridge(stream), "127.0.0.1", origin_port)

        agent_sides: list[MuxSession] = []

        def agent_side() -> MuxSession:
            agent_sides.append(MuxSession(Role.CLIENT, MuxConfig(), on_stream=serve_stream))
            return agent_sides[-1]

        link_server = await loop.create_server(agent_side, "127.0.0.1", 0)
        _, world.relay_side = await loop.create_connection(
            lambda: MuxSession(Role.SERVER, MuxConfig()), "127.0.0.1", link_server.sockets[0].getsockname()[1])
        await until(lambda: agent_sides, "the agent side of the link")
        world.agent_side = agent_sides[0]
        registry = MemoryRegistry()
        world.tunnel = AgentTunnel("app", world.relay_side, resume_key="k")
        registry.add(world.tunnel)
        world.counters = RelayCounters()
        world.services = FrontServices(world.config, Router("a.x", SYSTEM_NAMES), registry, None, world.counters,
                                       BasicAuthGuard())
        front = await loop.create_server(lambda: Served(world), "127.0.0.1", 0)
        world.port = front.sockets[0].getsockname()[1]
        world.servers = [origin_server, link_server, front]
        return world

    async def visitor(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.visitors.append(writer)
        return reader, writer

    async def stop(self) -> None:
        for writer in self.visitors:
            writer.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.relay_side.close()
        self.agent_side.close()
        self.sweeper.close()
        for server in self.servers:
            server.close()


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[bytes, bytes], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    headers = {line.split(b":", 1)[0].lower(): line.split(b":", 1)[1].strip() for line in lines[1:] if b":" in line}
    body = await asyncio.wait_for(reader.readexactly(int(headers.get(b"content-length", b"0"))), 10)
    return status, headers, body


def get(path: str = "/", extra: bytes = b"") -> bytes:
    return b"GET %b HTTP/1.1\r\nHost: %b\r\n%b\r\n" % (path.encode(), HOST, extra)


def run(main) -> None:
    asyncio.run(asyncio.wait_for(main(), 60))


async def on_second_request(world: World) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A visitor whose first request opened the conduit (in the task) and whose second is on its way inline."""
    reader, writer = await world.visitor()
    writer.write(get("/1"))
    await read_answer(reader)
    writer.write(get("/2"))
    return reader, writer


def test_plain_requests_are_answered_without_waking_the_connections_task():
    async def main():
        world = await World.start(lambda n: answer(b"answer %d" % n))
        reader, writer = await world.visitor()
        for number in range(1, 6):
            writer.write(get(f"/{number}"))
            assert await read_answer(reader) == (200, {b"content-length": b"%d" % len(b"answer %d" % number),
                                                      b"connection": b"keep-alive"}, b"answer %d" % number)
            if number == 1:
                (proxy,) = world.proxies
                sleeping_on = proxy.task_needed
        assert sleeping_on is not None and not sleeping_on.done()
        assert proxy.task_needed is sleeping_on  # the task slept through all five exchanges
        assert proxy.served == 5 and world.origin.connections == 1  # one conduit, reused
        assert world.tunnel.counters.answers[1] == 5
        assert world.counters.request_duration.observations == 5
        await world.stop()

    run(main)


def test_one_connection_reuses_its_answer_parser_only_where_llhttp_can_go_on():
    """Answers of every shape in a row on one connection: each parses as if its parser were new, and the
    parser is made again only after an answer llhttp could not go on from (a HEAD's, a split body's)."""
    scripts = {1: answer(b"one"), 2: answer(b"two"), 3: b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n",
               4: b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nfour\r\n0\r\n\r\n",
               5: answer(b"five")}

    async def main():
        world = await World.start(lambda n: scripts[n])
        reader, writer = await world.visitor()
        parsers = []
        for number, path in enumerate(["/1", "/2", "/head", "/4", "/5"], start=1):
            writer.write(get(path) if path != "/head" else b"HEAD / HTTP/1.1\r\nHost: %b\r\n\r\n" % HOST)
            if path == "/head":
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                assert head.startswith(b"HTTP/1.1 200 OK\r\n")
            elif path == "/4":
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                assert b"Transfer-Encoding: chunked" in head
                assert await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), 10) == b"4\r\nfour\r\n0\r\n\r\n"
            else:
                assert (await read_answer(reader))[2] == {1: b"one", 2: b"two", 5: b"five"}[number]
            parsers.append(world.proxies[0].answer_parser)
        assert parsers[0] is parsers[1] is parsers[2]  # the HEAD answer's parser is the reused one...
        assert parsers[3] is not parsers[2] and parsers[4] is parsers[3]  # ...and not used again after it
        assert world.proxies[0].served == 5 and world.origin.connections == 1
        await world.stop()
        await until(lambda: world.proxies[0].answer_parser._parser is None, "the connection's end to close it")

    run(main)


def test_pipelined_requests_are_answered_in_order():
    async def main():
        world = await World.start(lambda n: answer(b"answer %d" % n))
        reader, writer = await world.visitor()
        writer.write(get("/1") + get("/2") + get("/3"))
        bodies = [(await read_answer(reader))[2] for _ in range(3)]
        assert bodies == [b"answer 1", b"answer 2", b"answer 3"]
        await world.stop()

    run(main)


def test_a_request_with_a_body_goes_through_the_task_and_the_next_plain_one_inline_again():
    async def main():
        world = await World.start(lambda n: "echo")
        reader, writer = await world.visitor()
        writer.write(get("/a"))
        await read_answer(reader)
        (proxy,) = world.proxies
        first = proxy.task_needed
        writer.write(b"POST /upload HTTP/1.1\r\nHost: %b\r\nContent-Length: 5\r\n\r\nhello" % HOST)
        assert (await read_answer(reader))[2] == b"hello"
        await until(lambda: proxy.task_needed is not None and proxy.task_needed is not first,
                    "the task to hand the connection back to callbacks")
        second = proxy.task_needed
        writer.write(get("/b"))
        assert (await read_answer(reader))[0] == 200
        assert proxy.task_needed is second and not second.done()
        await world.stop()

    run(main)


def test_a_pooled_conduit_the_origin_closed_unanswered_is_retried_on_a_fresh_one():
    async def main():
        world = await World.start(lambda n: "close" if n == 2 else answer(b"answer %d" % n))
        reader, writer = await world.visitor()
        writer.write(get("/1"))
        assert (await read_answer(reader))[2] == b"answer 1"
        writer.write(get("/2"))  # its pooled conduit's origin connection closes on reading it
        assert (await read_answer(reader))[2] == b"answer 3"  # sent again on a fresh one
        assert world.origin.connections == 2
        writer.write(get("/4"))
        assert (await read_answer(reader))[2] == b"answer 4"
        assert world.proxies[0].served == 3
        await world.stop()

    run(main)


def test_an_origin_silent_past_the_response_timeout_gets_a_504_and_its_conduit_reset():
    async def main():
        world = await World.start(lambda n: answer(b"first") if n == 1 else "silent", response_timeout=0.3)
        reader, writer = await on_second_request(world)
        status, headers, body = await read_answer(reader)
        assert status == 504 and headers[b"connection"] == b"close" and b"did not answer within 0.3 s" in body
        assert await asyncio.wait_for(reader.read(), 10) == b""  # and the connection closes
        await until(lambda: world.origin.gone == 1, "the stream's reset to close the origin connection")
        assert not world.relay_side.streams and not world.tunnel.idle
        await world.stop()

    run(main)


def test_a_malformed_answer_is_a_502_and_the_connection_closes():
    async def main():
        world = await World.start(lambda n: answer(b"ok") if n == 1 else b"HTTP/1.1 2xx Nope\r\n\r\n")
        reader, writer = await on_second_request(world)
        status, headers, body = await read_answer(reader)
        assert status == 502 and headers[b"connection"] == b"close" and b"malformed response" in body
        assert await asyncio.wait_for(reader.read(), 10) == b""
        assert world.counters.protocol_errors["origin"] == 1
        await world.stop()

    run(main)


def test_an_answer_cut_short_by_the_origin_reaches_the_visitor_cut_short():
    async def main():
        world = await World.start(lambda n: answer(b"ok") if n == 1 else "reset")
        reader, writer = await on_second_request(world)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200 ") and b"Content-Length: 100" in head
        try:
            await asyncio.wait_for(reader.readexactly(100), 10)
            raise AssertionError("a cut-short answer reached the visitor looking complete")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # ended or reset before the 100 bytes it announced
        await world.stop()

    run(main)


def test_a_visitor_leaving_mid_exchange_resets_the_conduit():
    async def main():
        world = await World.start(lambda n: answer(b"ok") if n == 1 else "silent")
        reader, writer = await on_second_request(world)
        await until(lambda: world.origin.requests == 2, "the origin to read the second request")
        abort_with_reset(writer.transport)
        await until(lambda: world.origin.gone == 1, "the origin connection to be closed by the stream's reset")
        await until(lambda: not world.relay_side.streams, "the relay to forget the stream")
        assert not world.tunnel.idle
        await until(lambda: world.tasks[0].done(), "the connection's task to end")
        await world.stop()

    run(main)


def test_bytes_glued_to_an_answer_are_a_502_and_retire_the_conduit():
    async def main():
        world = await World.start(lambda n: answer(b"ok") + b"HTTP/1.1 200 OK\r\n" if n == 2 else answer(b"ok"))
        reader, writer = await on_second_request(world)
        status, headers, body = await read_answer(reader)
        assert status == 502 and b"bytes after its response ended" in body and headers[b"connection"] == b"close"
        await until(lambda: world.origin.gone == 1, "the conduit to be reset")
        assert not world.tunnel.idle
        await world.stop()

    run(main)


def test_bytes_after_an_answer_keep_its_conduit_out_of_the_pool():
    async def main():
        late = asyncio.Event()

        def script(number):
            if number == 2:
                async def surplus():
                    await late.wait()
                    writers[-1].write(b"HTTP/1.1 200 OK\r\n")
                asyncio.ensure_future(surplus())
            return answer(b"answer %d" % number)

        world = await World.start(script)
        writers = world.origin.writers
        reader, writer = await on_second_request(world)
        assert (await read_answer(reader))[2] == b"answer 2"
        late.set()
        await until(lambda: world.tunnel.idle and world.tunnel.idle[0].has_unread, "the surplus to reach the conduit")
        writer.write(get("/3"))
        assert (await read_answer(reader))[2] == b"answer 3"
        assert world.origin.connections == 2  # the first conduit was not reused
        await world.stop()

    run(main)


def test_a_large_answer_to_a_visitor_that_reads_late_arrives_whole_and_the_connection_goes_on():
    async def main():
        world = await World.start(lambda n: answer(BIG) if n == 2 else answer(b"warm"))
        reader, writer = await world.visitor()
        writer.write(get("/warm"))  # the first request opens the conduit (in the task); the next ones reuse it
        await read_answer(reader)
        writer.transport.pause_reading()
        writer.write(get("/big"))
        await until(lambda: world.proxies and (world.proxies[0].inline is not None
                                               and world.proxies[0].inline.credit_held > 0
                                               or world.proxies[0].draining_inline is not None),
                    "the relay to hold credit back for the full write buffer")
        writer.transport.resume_reading()
        status, _, body = await read_answer(reader)
        assert status == 200 and hashlib.sha256(body).digest() == hashlib.sha256(BIG).digest()
        writer.write(get("/next"))
        assert (await read_answer(reader))[2] == b"warm"
        assert world.origin.connections == 1
        await world.stop()

    run(main)
