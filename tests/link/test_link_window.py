"""The link window through the asyncio glue: streams the link window holds up resume and deliver every byte, in
both directions over real loopback sessions, and a stream reader's credit follows what it has finished with."""

from __future__ import annotations

import asyncio
import hashlib

from portway.link.session import MuxSession, MuxStream
from portway.proto.frame import INITIAL_LINK_WINDOW
from portway.proto.mux import MuxConfig, Role

from .test_session_delivery import linked

STREAMS = 8
SIZE = 3 * 512 * 1024  # per stream and direction: eight streams want 12 MiB through a 1 MiB link window
TIGHT = MuxConfig(link_window=INITIAL_LINK_WINDOW)


def payload(index: int, direction: bytes) -> bytes:
    return hashlib.sha256(direction + bytes([index])).digest() * (SIZE // 32)


async def read_all(stream: MuxStream) -> bytes:
    received = []
    while chunks := await stream.read_chunks():
        received += chunks
    return b"".join(received)


def test_streams_held_up_by_the_link_window_resume_and_deliver_everything_both_ways():
    async def main():
        loop = asyncio.get_running_loop()
        served: list[asyncio.Future[bytes]] = []

        async def serve(stream: MuxStream) -> None:  # the agent: read the request whole, then answer
            request = await read_all(stream)
            served.append(request)
            await stream.send(payload(len(served), b"answer") + request[:32])
            stream.write_eof()

        agent_sides: list[MuxSession] = []
        server = await loop.create_server(lambda: agent_sides.append(MuxSession(Role.CLIENT, TIGHT, serve))
                                          or agent_sides[-1], "127.0.0.1", 0)
        _, relay = await loop.create_connection(lambda: MuxSession(Role.SERVER, TIGHT), "127.0.0.1",
                                                server.sockets[0].getsockname()[1])

        async def exchange(index: int) -> bytes:
            stream = relay.open_stream()
            await stream.send(payload(index, b"request"))
            stream.write_eof()
            return await read_all(stream)

        answers = await asyncio.wait_for(asyncio.gather(*(exchange(i) for i in range(STREAMS))), 60)
        requests = {hashlib.sha256(request).digest() for request in served}
        assert requests == {hashlib.sha256(payload(i, b"request")).digest() for i in range(STREAMS)}
        for answer in answers:
            assert len(answer) == SIZE + 32 and answer[:SIZE] in {payload(i, b"answer") for i in range(1, 9)}
        assert relay.mux.link_waits, "the relay's streams never had to wait for the agent's link window"
        # nothing is left waiting or set aside on either side
        for session in (relay, agent_sides[0]):
            mux = session.mux
            assert not mux._link_waiting and not mux._link_woken
        relay.close()
        agent_sides[0].close()
        server.close()

    asyncio.run(main())


def test_credit_for_what_a_reader_took_returns_once_it_comes_back_or_is_done():
    async def main():
        session, link, peer, (first, second) = linked(MuxConfig(), 2)
        for stream in (first, second):
            peer.send_data(stream.stream_id, b"x" * (256 * 1024))
        session.data_received(peer.data_to_send())

        def credit_seen() -> dict[int, int]:
            session._flush_now()
            sent = bytes(link.sent)
            link.sent.clear()
            peer.receive_data(sent, 0.0)
            return {stream.stream_id: peer.send_window(stream.stream_id) for stream in (first, second)}

        taken = sum(map(len, await first.read_chunks()))  # the whole window: written to a slow visitor, say
        assert taken == 256 * 1024
        assert credit_seen()[first.stream_id] == 0, "nothing goes back while the reader may still hold it"
        assert peer.send_data(first.stream_id, b"y") == 0  # the window is spent
        reader = asyncio.ensure_future(first.read_chunks())  # the reader comes back for more: it is done
        await asyncio.sleep(0)
        assert credit_seen()[first.stream_id] >= 256 * 1024  # (doubled, if the window grew: it was read fast)
        reader.cancel()

        chunks = await second.read_chunks()
        second.put_back(chunks[1:])  # bytes it will not use after all are not credited
        second.reader_done()  # back in the pool: what it did use is credited at once
        assert credit_seen()[second.stream_id] == 0, "64 KiB owed: under half the window, credit waits"
        assert session.mux._streams[second.stream_id].unannounced == len(chunks[0])
        session.close()

    asyncio.run(main())
