"""Two connections joined by SocketPipe (link/pipe.py) over loopback: bytes both ways intact, each direction
ending on its own, a reset passed on, and a full write buffer on one side pausing reads on the other."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket

from portway.link.connection import Connection
from portway.link.pipe import SocketPipe

TIMEOUT = 10.0


async def joined():
    """Two clients whose server-side connections are joined; returns the clients and the pipe."""
    loop = asyncio.get_running_loop()
    accepted: list[Connection] = []
    server = await loop.create_server(lambda: accepted.append(Connection()) or accepted[-1], "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    first = await asyncio.open_connection("127.0.0.1", port)
    second = await asyncio.open_connection("127.0.0.1", port)
    while len(accepted) < 2 or any(conn.transport is None for conn in accepted):
        await asyncio.sleep(0.01)
    first[1].write(b"early")  # sent before the switch: must still arrive first
    while not accepted[0].has_unread:
        await asyncio.sleep(0.01)
    pipe = SocketPipe.take_over(accepted[0], accepted[1], a_unread=b"unread:")
    server.close()
    return first, second, pipe, accepted


def test_bytes_cross_both_ways_intact_and_each_direction_ends_on_its_own():
    async def main():
        (r1, w1), (r2, w2), pipe, _ = await joined()
        payload = os.urandom(3 * 1024 * 1024)
        w1.write(payload)
        w1.write_eof()  # one direction ends ...
        received = await asyncio.wait_for(r2.read(), TIMEOUT)  # ... and the other side sees its end
        assert received[:12] == b"unread:early"
        assert hashlib.sha256(received[12:]).digest() == hashlib.sha256(payload).digest()
        w2.write(b"the answer after the question ended")  # the other direction still works
        w2.write_eof()
        assert await asyncio.wait_for(r1.read(), TIMEOUT) == b"the answer after the question ended"
        await asyncio.wait_for(pipe.closed, TIMEOUT)
        w1.close()
        w2.close()

    asyncio.run(main())


def test_a_reset_on_one_side_resets_the_other():
    async def main():
        (r1, w1), (r2, w2), pipe, _ = await joined()
        sock = w2.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        w2.transport.abort()
        try:
            data = await asyncio.wait_for(r1.read(), TIMEOUT)
            assert data == b"", "a reset must not look like more data"
            reset = False
        except ConnectionResetError:
            reset = True
        assert reset, "the other side must see a reset, not a clean end"
        await asyncio.wait_for(pipe.closed, TIMEOUT)
        w1.close()

    asyncio.run(main())


def test_a_reader_that_stops_reading_pauses_the_sender():
    async def main():
        (r1, w1), (r2, w2), pipe, accepted = await joined()
        sender_side = accepted[0].transport  # the relay's end of the connection bytes come in on
        chunk = b"x" * 65536
        for _ in range(1024):  # up to 64 MiB (kept in our own write buffer) while nobody reads the other end
            if not sender_side.is_reading():
                break
            w1.write(chunk)
            await asyncio.sleep(0)  # one loop pass: the relay's ends read and write what they can
        assert not sender_side.is_reading(), "the full side's buffer must pause reading the other side"
        drained = 0
        while not sender_side.is_reading():  # reading the far end lets bytes flow again
            drained += len(await asyncio.wait_for(r2.read(1 << 20), TIMEOUT))
        assert drained > 0
        for writer in (w1, w2):
            writer.close()
        await asyncio.wait_for(pipe.closed, TIMEOUT)

    asyncio.run(main())
