"""What a stream's sink (link.bridge) gets from MuxSession: the frames one link read brought for a stream
arrive as one list, so they leave in one vectored write, and in order with the stream's end and reset."""

from __future__ import annotations

import asyncio

from portway.link.session import MuxSession
from portway.proto import events as ev
from portway.proto.mux import Mux, MuxConfig, Role


class LinkTransport:
    """Collects what the session writes to the link."""

    def __init__(self) -> None:
        self.sent = bytearray()

    def write(self, data) -> None:
        self.sent += data

    def writelines(self, buffers) -> None:
        for buffer in buffers:
            self.sent += buffer

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass


class RecordingSink:
    def __init__(self) -> None:
        self.calls: list[object] = []

    def stream_data(self, chunks: list[bytes]) -> None:
        self.calls.append([bytes(chunk) for chunk in chunks])

    def stream_ended(self) -> None:
        self.calls.append("ended")

    def stream_reset(self) -> None:
        self.calls.append("reset")

    def window_opened(self) -> None:
        pass


def linked(config: MuxConfig, streams: int):
    """A relay-side session that opened `streams` streams, and the agent's mux (sans-I/O) as its peer, which
    accepted them; the session runs inside the calling coroutine's loop."""
    session = MuxSession(Role.SERVER, config)
    link = LinkTransport()
    session.connection_made(link)
    opened = [session.open_stream() for _ in range(streams)]
    session._flush_now()
    peer = Mux(Role.CLIENT, config, now=0.0)
    for event in peer.receive_data(bytes(link.sent), 0.0):
        if isinstance(event, ev.StreamOpened):
            peer.accept_stream(event.stream_id)
    link.sent.clear()
    return session, link, peer, opened


def run_with_peer(script):
    """Two streams with a recording sink each; `script(peer, ids)` queues the peer's frames, which then reach
    the session in one read."""

    async def main():
        session, _, peer, streams = linked(MuxConfig(), 2)
        sinks = [RecordingSink(), RecordingSink()]
        for stream, sink in zip(streams, sinks):
            stream.attach(sink)
        script(peer, [stream.stream_id for stream in streams])
        session.data_received(peer.data_to_send())
        session.close()
        return sinks

    return asyncio.run(main())


def test_the_frames_of_one_read_reach_the_sink_as_one_list():
    def script(peer, ids):
        for piece in (b"one", b"two", b"three"):
            peer.send_data(ids[0], piece)

    first, second = run_with_peer(script)
    assert first.calls[0] == [b"one", b"two", b"three"]
    assert second.calls == ["reset"]  # closing the session resets what is still open


def test_data_reaches_the_sink_before_the_end_and_streams_stay_apart():
    def script(peer, ids):
        peer.send_data(ids[0], b"a1")
        peer.send_data(ids[1], b"b1")
        peer.send_data(ids[0], b"a2", end_stream=True)
        peer.send_data(ids[1], b"b2")
        peer.reset_stream(ids[1])

    first, second = run_with_peer(script)
    assert first.calls == [[b"a1", b"a2"], "ended", "reset"]  # our half was still open when the session closed
    assert second.calls == [[b"b1", b"b2"], "reset"]


def test_a_reader_takes_at_most_its_budget_and_returns_credit_only_for_that():
    """A window grown large (1 MiB here) that arrived at once must not all leave the stream in one read: credit
    goes back for what is taken, and the relay's HTTP path hands what it takes to a visitor that may be slow."""

    async def main():
        session, link, peer, (stream,) = linked(MuxConfig(initial_window=1 << 20, max_window=1 << 20), 1)
        window = peer.send_window(stream.stream_id)
        assert window > stream.READ_BUDGET
        pieces = [bytes([i]) * (64 * 1024) for i in range(window // (64 * 1024))]
        for piece in pieces:
            peer.send_data(stream.stream_id, piece)
        session.data_received(peer.data_to_send())  # a whole window at once, as if the visitor had stalled

        taken = await stream.read_chunks()
        assert 0 < sum(map(len, taken)) <= stream.READ_BUDGET
        session._flush_now()
        peer.receive_data(bytes(link.sent), 0.0)
        assert peer.send_window(stream.stream_id) <= sum(map(len, taken))  # no credit for what is still here

        received = b"".join(taken)
        while len(received) < window:
            received += b"".join(await stream.read_chunks())
        assert received == b"".join(pieces)
        session.close()

    asyncio.run(main())


def test_a_burst_of_streams_opened_in_one_read_is_accepted_whole():
    """A session accepts each stream as its open is dispatched, so many opened in one read (a burst of visitors,
    here more than the mux's default accept backlog) are all served, none refused with a reset."""
    burst = 3 * MuxConfig().accept_backlog

    async def main():
        served: list[int] = []

        async def serve(stream):
            served.append(stream.stream_id)

        session = MuxSession(Role.CLIENT, MuxConfig(), on_stream=serve)
        link = LinkTransport()
        session.connection_made(link)
        relay = Mux(Role.SERVER, MuxConfig(), now=0.0)
        relay.receive_data(bytes(link.sent), 0.0)
        link.sent.clear()
        opened = [relay.open_stream() for _ in range(burst)]
        session.data_received(relay.data_to_send())
        await asyncio.sleep(0)  # the streams' tasks run
        session._flush_now()
        answers = relay.receive_data(bytes(link.sent), 0.0)
        session.close()
        return opened, served, answers

    opened, served, answers = asyncio.run(main())
    assert sorted(served) == opened
    assert [e.stream_id for e in answers if isinstance(e, ev.StreamAccepted)] == opened
    assert not any(isinstance(e, ev.StreamReset) for e in answers)
