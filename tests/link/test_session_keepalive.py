"""MuxSession drives the mux's keepalive from the event loop's clock: a quiet link is pinged, a silent one is
ended, a peer that answers keeps it. The protocol's own rules are tested with `now` passed in (tests/proto);
these check that the glue actually arms the timer the mux asks for."""

from __future__ import annotations

import asyncio

from portway.link.session import MuxSession
from portway.proto import events as ev
from portway.proto.frame import HEADER_SIZE, FrameType
from portway.proto.mux import Mux, MuxConfig, Role

from .test_session_delivery import LinkTransport

INTERVAL = 0.03
TIMEOUT = 0.1
CONFIG = MuxConfig(keepalive_interval=INTERVAL, keepalive_timeout=TIMEOUT, resume_window=0)  # streams end with it
WAIT = 5.0  # bound for each wait on a condition; the conditions come true in a few INTERVALs


class ClosableTransport(LinkTransport):
    def __init__(self) -> None:
        super().__init__()
        self.closed = False

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


def frame_types(wire: bytes) -> list[FrameType]:
    """The types of the header-only frames (no DATA) the session wrote."""
    types = []
    for at in range(0, len(wire), HEADER_SIZE):
        types.append(FrameType(wire[at + 1]))
    return types


def test_silent_peer_is_pinged_then_the_link_is_ended():
    async def main():
        loop = asyncio.get_running_loop()
        session = MuxSession(Role.SERVER, CONFIG)
        link = ClosableTransport()
        started = loop.time()
        session.connection_made(link)
        reason = await asyncio.wait_for(asyncio.shield(session.closed), WAIT)
        return reason, loop.time() - started, bytes(link.sent), link.closed

    reason, elapsed, sent, transport_closed = asyncio.run(main())
    assert reason.startswith("keepalive timeout")
    # one ping, and no GO_AWAY into a dead link (window updates for the link as a whole may precede it)
    assert [kind for kind in frame_types(sent) if kind is not FrameType.WINDOW_UPDATE] == [FrameType.PING]
    assert transport_closed
    # never before the peer had its chance: silent for TIMEOUT (loop clock, no slack), pinged after INTERVAL
    assert elapsed >= TIMEOUT


def test_peer_that_answers_pings_keeps_the_link():
    async def main():
        session = MuxSession(Role.SERVER, CONFIG)
        link = ClosableTransport()
        session.connection_made(link)
        peer = Mux(Role.CLIENT, MuxConfig(), now=0.0)  # its own keepalive never fires in this test
        answered = 0
        loop = asyncio.get_running_loop()
        end = loop.time() + WAIT
        while answered < 10:  # ten pings, each answered: the link lives through 10 × INTERVAL, 3 × TIMEOUT
            assert loop.time() < end and not session.closed.done(), "the session stopped pinging or ended"
            if link.sent:
                wire, link.sent = bytes(link.sent), bytearray()
                events = peer.receive_data(wire, 0.0)
                assert events == [] or all(isinstance(e, ev.PingAcked) for e in events)
                answered += frame_types(wire).count(FrameType.PING)
                session.data_received(peer.data_to_send())
            await asyncio.sleep(INTERVAL / 5)  # the loop turns; the condition above is what the test waits on
        alive = not session.closed.done()
        session.close()
        return alive

    assert asyncio.run(main())
