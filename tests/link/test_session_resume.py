"""MuxSession keeps its streams through a lost link: writers and readers wait, a new link carries them on, and
past the resume window they fail visibly. Real sockets on 127.0.0.1; the resume protocol itself is tested
without them in tests/proto/test_resume.py."""

from __future__ import annotations

import asyncio
import hashlib
import random

import pytest

from portway.errors import ConduitReset, MuxClosedError
from portway.link.session import MuxSession, MuxStream
from portway.proto.mux import MuxConfig, Role

WAIT = 20.0  # bound on every wait: the transfers below take well under a second on loopback
SIZE = 8 * 1024 * 1024


class Handover(asyncio.Protocol):
    """Accepts a new link and hands it to a parked session to resume on."""

    def __init__(self, session: MuxSession) -> None:
        self.session = session

    def connection_made(self, transport) -> None:
        self.session.resume_on(transport)


async def linked_pair(config: MuxConfig):
    """A client and a server session joined by a loopback TCP connection; the server echoes nothing, it
    collects: every stream the client opens is handed to `accepted`."""
    loop = asyncio.get_running_loop()
    accepted: asyncio.Queue[MuxStream] = asyncio.Queue()

    async def on_stream(stream: MuxStream) -> None:
        await accepted.put(stream)

    server_session = MuxSession(Role.SERVER, config, on_stream=on_stream)
    listener = await loop.create_server(lambda: server_session, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    _, client_session = await loop.create_connection(lambda: MuxSession(Role.CLIENT, config), "127.0.0.1", port)
    return client_session, server_session, listener, accepted


async def read_all(stream: MuxStream) -> bytes:
    received = bytearray()
    while chunks := await stream.read_chunks():
        for chunk in chunks:
            received += chunk
    return bytes(received)


async def send_all(stream: MuxStream, data: bytes) -> None:
    view = memoryview(data)
    for start in range(0, len(data), 1 << 20):
        await stream.send(bytes(view[start : start + (1 << 20)]))
    stream.write_eof()


async def wait_for(condition, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while not condition():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


def test_streams_carry_on_byte_exact_over_a_new_link():
    async def main():
        loop = asyncio.get_running_loop()
        client, server, listener, accepted = await linked_pair(MuxConfig(resume_window=10.0))
        up, down = random.Random(1).randbytes(SIZE), random.Random(2).randbytes(SIZE)
        stream = client.open_stream()
        await stream.send(b"x")  # the open and a first byte
        remote = await asyncio.wait_for(accepted.get(), WAIT)
        assert await remote.read_chunks() == [b"x"]
        tasks = [loop.create_task(coro) for coro in (
            send_all(stream, up), read_all(remote), send_all(remote, down), read_all(stream))]
        sent = client.mux._streams[stream.stream_id].retransmit
        await wait_for(lambda: sent.end > SIZE // 4, "a quarter of the upload to leave")
        client.transport.abort()  # the link dies under both transfers
        await wait_for(lambda: client.parked and server.parked, "both ends to park")
        assert not any(task.done() for task in tasks), "a transfer ended with the link"
        listener.close()
        listener = await loop.create_server(lambda: Handover(server), "127.0.0.1", 0)
        port = listener.sockets[0].getsockname()[1]
        await loop.create_connection(lambda: Handover(client), "127.0.0.1", port)
        _, got_up, _, got_down = await asyncio.wait_for(asyncio.gather(*tasks), WAIT)
        listener.close()
        client.close()
        server.close()
        return got_up, got_down, up, down

    got_up, got_down, up, down = asyncio.run(main())
    assert hashlib.sha256(got_up).digest() == hashlib.sha256(up).digest()
    assert hashlib.sha256(got_down).digest() == hashlib.sha256(down).digest()


def test_past_the_resume_window_parked_streams_are_reset():
    async def main():
        loop = asyncio.get_running_loop()
        client, server, listener, accepted = await linked_pair(MuxConfig(resume_window=0.2))
        stream = client.open_stream()
        await stream.send(b"request")
        remote = await asyncio.wait_for(accepted.get(), WAIT)
        reader = loop.create_task(read_all(stream))
        client.transport.abort()
        await wait_for(lambda: client.parked, "the client to park")
        with pytest.raises(ConduitReset):
            await asyncio.wait_for(reader, WAIT)
        reason = await asyncio.wait_for(client.closed, WAIT)
        await asyncio.wait_for(server.closed, WAIT)
        with pytest.raises(ConduitReset):
            await read_all(remote)  # what arrived before is still readable, then the reset shows
        listener.close()
        return reason

    assert "not resumed within 0.2s" in asyncio.run(main())


def test_a_session_told_the_peer_lost_its_streams_resets_them_at_once():
    async def main():
        client, server, listener, accepted = await linked_pair(MuxConfig(resume_window=10.0))
        stream = client.open_stream()
        await stream.send(b"request")
        await asyncio.wait_for(accepted.get(), WAIT)
        client.transport.abort()
        await wait_for(lambda: client.parked, "the client to park")
        client.abandon()
        with pytest.raises(ConduitReset):
            await stream.read_chunks()
        assert client.closed.done()
        listener.close()
        server.close()

    asyncio.run(main())


def test_a_link_closed_after_go_away_does_not_park():
    async def main():
        client, server, listener, accepted = await linked_pair(MuxConfig(resume_window=10.0))
        stream = client.open_stream()
        await stream.send(b"request")
        await asyncio.wait_for(accepted.get(), WAIT)
        client.go_away()
        await wait_for(lambda: server.go_away_received, "the GO_AWAY to arrive")
        client.transport.abort()
        await asyncio.wait_for(server.closed, WAIT)
        listener.close()
        assert not server.parked

    asyncio.run(main())


def test_a_stream_opened_during_the_resume_exchange_waits_for_it():
    async def main():
        loop = asyncio.get_running_loop()
        client, server, listener, accepted = await linked_pair(MuxConfig(resume_window=10.0))
        first = client.open_stream()
        await first.send(b"before")
        await asyncio.wait_for(accepted.get(), WAIT)
        client.transport.abort()
        await wait_for(lambda: client.parked and server.parked, "both ends to park")
        listener.close()
        listener = await loop.create_server(lambda: Handover(server), "127.0.0.1", 0)
        port = listener.sockets[0].getsockname()[1]
        await loop.create_connection(lambda: Handover(client), "127.0.0.1", port)
        assert client.resuming  # its RESUME is out, the server's is not in yet
        with pytest.raises(MuxClosedError):
            client.open_stream()
        await asyncio.wait_for(client.until_resumed(), WAIT)
        assert not client.resuming and not client.parked
        second = client.open_stream()
        await second.send(b"after")
        remote = await asyncio.wait_for(accepted.get(), WAIT)
        assert await remote.read_chunks() == [b"after"]
        listener.close()
        client.close()
        server.close()

    asyncio.run(main())
