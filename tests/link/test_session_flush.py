"""When MuxSession writes to the link: what one link read makes the streams send leaves in one write at the end
of that read; sends from elsewhere are batched per loop pass, unless the streams take turns (one send per pass,
a WebSocket's messages), when the first send after each link read leaves at once. Every byte arrives, in order."""

from __future__ import annotations

import asyncio

from portway.link import session as session_module
from portway.link.session import MuxSession
from portway.proto import events as ev
from portway.proto.mux import Mux, MuxConfig, Role

LONE_PASSES = session_module._LONE_PASSES_BEFORE_WRITING_AT_ONCE


class CountingTransport:
    """Keeps each write to the link apart, to count them."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data) -> None:
        self.writes.append(bytes(data))

    def writelines(self, buffers) -> None:
        self.writes.append(b"".join(bytes(buffer) for buffer in buffers))

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass


class Peer:
    """The agent's side, sans-I/O: reads what the session wrote, keeps every stream's bytes."""

    def __init__(self, config: MuxConfig) -> None:
        self.mux = Mux(Role.CLIENT, config, now=0.0)
        self.received: dict[int, bytearray] = {}

    def read(self, link: CountingTransport) -> None:
        for event in self.mux.receive_data(b"".join(link.writes), 0.0):
            if isinstance(event, ev.StreamOpened):
                self.mux.accept_stream(event.stream_id)
                self.received[event.stream_id] = bytearray()
            elif isinstance(event, ev.DataReceived):
                self.received[event.stream_id] += event.data
        link.writes.clear()


async def linked(streams: int):
    session = MuxSession(Role.SERVER, MuxConfig())
    link = CountingTransport()
    session.connection_made(link)
    opened = [session.open_stream() for _ in range(streams)]
    await asyncio.sleep(0)  # the pass ends: the opens leave
    peer = Peer(MuxConfig())
    peer.read(link)
    session.data_received(peer.mux.data_to_send())  # the accepts: a link read
    link.writes.clear()
    return session, link, peer, opened


class Replier:
    """A stream's sink that answers each delivery on its stream."""

    def __init__(self, stream) -> None:
        self.stream = stream

    def stream_data(self, chunks) -> None:
        assert self.stream.send_now(b"re:" + b"".join(bytes(chunk) for chunk in chunks))

    def stream_ended(self) -> None:
        pass

    def stream_reset(self) -> None:
        pass

    def window_opened(self) -> None:
        pass


def test_what_a_link_read_makes_the_streams_send_leaves_in_one_write_at_its_end():
    async def main():
        session, link, peer, streams = await linked(3)
        for stream in streams:
            stream.attach(Replier(stream))
        for n, stream in enumerate(streams):
            peer.mux.send_data(stream.stream_id, b"q%d" % n)
        session.data_received(peer.mux.data_to_send())
        assert len(link.writes) == 1  # the three answers, written once the read was dispatched
        await asyncio.sleep(0)
        assert len(link.writes) == 1  # and no batch was left for the pass
        peer.read(link)
        session.close()
        return peer, streams

    peer, streams = asyncio.run(main())
    assert [bytes(peer.received[s.stream_id]) for s in streams] == [b"re:q0", b"re:q1", b"re:q2"]


def test_the_sends_of_one_pass_leave_in_one_write():
    async def main():
        session, link, peer, streams = await linked(3)
        for round_ in range(3 * LONE_PASSES):  # streams sending together never look like taking turns
            for stream in streams:
                assert stream.send_now(b"%d," % round_)
            assert link.writes == []
            await asyncio.sleep(0)
            assert len(link.writes) == 1
            peer.read(link)
        session.close()
        return peer, streams

    peer, streams = asyncio.run(main())
    expected = b"".join(b"%d," % n for n in range(3 * LONE_PASSES))
    assert all(bytes(peer.received[s.stream_id]) == expected for s in streams)


def test_streams_taking_turns_have_the_first_send_after_each_link_read_written_at_once():
    async def main():
        session, link, peer, (stream,) = await linked(1)
        sent = bytearray()
        writes_at_once = []
        for turn in range(2 * LONE_PASSES + 2):
            message = b"m%d;" % turn
            assert stream.send_now(message)
            sent += message
            writes_at_once.append(len(link.writes))
            await asyncio.sleep(0)
            assert len(link.writes) == 1
            peer.read(link)
            peer.mux.send_data(stream.stream_id, b"echo")
            session.data_received(peer.mux.data_to_send())  # the answer: the turn passes back
        session.close()
        return writes_at_once, bytes(peer.received[stream.stream_id]), bytes(sent)

    writes_at_once, received, sent = asyncio.run(main())
    # batched at first (the open counted as a lone pass too), at once within LONE_PASSES turns, and from then on
    assert writes_at_once[0] == 0 and writes_at_once.count(0) <= LONE_PASSES
    assert writes_at_once == sorted(writes_at_once) and set(writes_at_once) == {0, 1}
    assert received == sent


def test_a_second_send_before_the_next_link_read_waits_for_the_batch_again():
    async def main():
        session, link, peer, (first, second) = await linked(2)
        for turn in range(LONE_PASSES):
            assert first.send_now(b"t%d;" % turn)
            await asyncio.sleep(0)
            peer.read(link)
            session.data_received(peer.mux.data_to_send())
        assert first.send_now(b"a;")
        assert len(link.writes) == 1  # taking turns: at once
        assert second.send_now(b"b;")
        assert len(link.writes) == 1  # the other stream sends too: it waits for the batch
        await asyncio.sleep(0)
        assert len(link.writes) == 2
        peer.read(link)
        session.data_received(peer.mux.data_to_send())
        assert first.send_now(b"c;")
        assert link.writes == []  # no longer taking turns: the next send waits for its pass
        await asyncio.sleep(0)
        peer.read(link)
        session.close()
        return bytes(peer.received[first.stream_id]), bytes(peer.received[second.stream_id])

    first_bytes, second_bytes = asyncio.run(main())
    assert first_bytes == b"".join(b"t%d;" % n for n in range(LONE_PASSES)) + b"a;c;"
    assert second_bytes == b"b;"


def test_a_sink_failing_during_a_link_read_leaves_later_sends_flushed():
    """A read whose dispatch raised still ends with its write, and the session goes on batching."""

    class Failing(Replier):
        def stream_data(self, chunks) -> None:
            super().stream_data(chunks)
            raise RuntimeError("a sink's bug")

    async def main():
        session, link, peer, (stream,) = await linked(1)
        stream.attach(Failing(stream))
        peer.mux.send_data(stream.stream_id, b"x")
        try:
            session.data_received(peer.mux.data_to_send())
        except RuntimeError:
            pass
        assert len(link.writes) == 1
        stream.detach()
        assert stream.send_now(b"later")
        await asyncio.sleep(0)
        assert len(link.writes) == 2
        peer.read(link)
        session.close()
        return bytes(peer.received[stream.stream_id])

    assert asyncio.run(main()) == b"re:xlater"
