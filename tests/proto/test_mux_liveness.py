"""Liveness of the two flow-control windows (each stream's and the link's) under random interleavings.

Two muxes joined by an in-memory link are driven the way link/session.py drives them, and no more: a mux reads
only when bytes arrive (in pieces of any size), its timer is re-armed only where the session re-arms it (after a
read, after the timer fired, after the application reset a stream) and fires only once due, and a sender retries
only when WindowUpdated names its stream: at once inside the read (the bridge's window_opened), or on a later
loop pass after whatever else happened meanwhile (a MuxStream.send task woken by its future).

Whatever the application did (sending, consuming in any bites, half-closing, resetting), from every state it
reaches, consuming everything and letting the link run is enough: once the link goes quiet every stream not reset
has sent all it wanted, nobody still waits for credit, and no credit is lost, on the streams or on the link.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from portway.proto.events import DataReceived, Event, StreamReset, WindowUpdated
from portway.proto.frame import INITIAL_LINK_WINDOW, INITIAL_STREAM_WINDOW
from portway.proto.mux import Mux, MuxConfig, Role

KiB = 1024
STREAMS = 3  # the even ones are bridges (they retry inside the read), the odd one a task (on a later pass)
PAYLOAD = memoryview(b"p" * 1024 * KiB)  # what every send draws on
CONFIGS = {
    # the protocol's base windows: four streams' windows fill the link's; a stream's window grows when read fast
    "base-windows": MuxConfig(link_window=INITIAL_LINK_WINDOW, max_window=2 * INITIAL_STREAM_WINDOW,
                              max_frame_size=16 * KiB),
    # one stream alone can use up the link window, so link credit is what streams wait for most
    "stream-as-large-as-link": MuxConfig(link_window=INITIAL_LINK_WINDOW, initial_window=INITIAL_LINK_WINDOW,
                                         max_window=INITIAL_LINK_WINDOW, max_frame_size=16 * KiB),
}
STEP = 0.001  # seconds each action takes: the whole run stays far below the keepalive interval
SHORT = 1.0  # a timer due within this is "soon"; the keepalive (30 s) would be a stall a visitor sees


@dataclass
class Side:
    """One end as its session sees it: the mux, the timer it armed, and its application's streams."""

    mux: Mux
    timer_at: float | None = None
    wants: dict[int, int] = field(default_factory=dict)  # stream -> bytes the application still has to send
    ending: set[int] = field(default_factory=set)  # streams to half-close once everything is sent
    unconsumed: dict[int, int] = field(default_factory=dict)  # stream -> delivered, not yet consumed
    received: dict[int, int] = field(default_factory=dict)
    sent: dict[int, int] = field(default_factory=dict)
    inbox: bytearray = field(default_factory=bytearray)  # bytes on the wire towards this side
    woken_tasks: list[int] = field(default_factory=list)  # senders told WindowUpdated, to retry on the next pass

    def rearm(self) -> None:
        """MuxSession._rearm_timer: only ever moves the armed timer earlier."""
        when = self.mux.get_timer()
        if when is not None and self.timer_at is not None and when >= self.timer_at:
            return
        self.timer_at = when


class Link:
    def __init__(self, config: MuxConfig) -> None:
        self.now = 0.0
        self.config = config
        self.client = Side(Mux(Role.CLIENT, config, now=0.0))
        self.server = Side(Mux(Role.SERVER, config, now=0.0))
        for side in (self.client, self.server):
            side.rearm()  # connection_made
        self.reset: set[int] = set()
        self.ids: list[int] = []
        for _ in range(STREAMS):
            stream_id = self.client.mux.open_stream()
            self.flush(self.client)
            self.deliver(self.server, None)
            self.server.mux.accept_stream(stream_id)
            self.flush(self.server)
            self.deliver(self.client, None)
            self.ids.append(stream_id)
            for side in (self.client, self.server):
                side.wants[stream_id] = side.unconsumed[stream_id] = side.received[stream_id] = 0
                side.sent[stream_id] = 0

    def peer(self, side: Side) -> Side:
        return self.server if side is self.client else self.client

    def flush(self, side: Side) -> None:
        self.peer(side).inbox += side.mux.data_to_send()

    def try_send(self, side: Side, stream_id: int) -> None:
        """A sender's attempt (the bridge's _send, MuxStream.send): all it wants, or what the windows take."""
        want = side.wants.get(stream_id, 0)
        if stream_id in self.reset or stream_id not in side.mux._streams:
            return
        end = stream_id in side.ending
        if not want and end:
            side.mux.end_stream(stream_id)
            side.ending.discard(stream_id)
        while want:  # in PAYLOAD-sized pieces, as long as the windows take each whole, FIN with the last one
            piece = min(want, len(PAYLOAD))
            last = piece == want
            sent = side.mux.send_data(stream_id, PAYLOAD[:piece], end_stream=end and last)
            want -= sent
            side.wants[stream_id] = want
            side.sent[stream_id] += sent
            if sent == piece and last and end:
                side.ending.discard(stream_id)
            if sent < piece:
                break
        self.flush(side)

    def dispatch(self, side: Side, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, DataReceived):
                side.unconsumed[event.stream_id] += len(event.data)
                side.received[event.stream_id] += len(event.data)
            elif isinstance(event, StreamReset):
                self.forget(event.stream_id)
            elif isinstance(event, WindowUpdated) and side.wants.get(event.stream_id):
                if self.ids.index(event.stream_id) % 2:
                    side.woken_tasks.append(event.stream_id)  # a task: it runs on a later loop pass
                else:
                    self.try_send(side, event.stream_id)  # a bridge: it sends inside the callback

    def forget(self, stream_id: int) -> None:
        self.reset.add(stream_id)
        for side in (self.client, self.server):
            side.wants[stream_id] = 0
            side.unconsumed[stream_id] = 0
            side.ending.discard(stream_id)

    def deliver(self, side: Side, size: int | None) -> None:
        """Bytes arrive at `side` (all of them, or the first `size`): MuxSession.data_received."""
        inbox = side.inbox
        size = len(inbox) if size is None else min(size, len(inbox))
        if not size:
            return  # a transport never calls data_received without bytes
        data = bytes(inbox[:size])
        del inbox[:size]
        self.dispatch(side, side.mux.receive_data(data, self.now))
        self.flush(side)
        side.rearm()

    def fire_due_timer(self, side: Side, horizon: float) -> bool:
        """MuxSession._on_timer, if the armed timer is due by `horizon`."""
        if side.timer_at is None or side.timer_at > horizon:
            return False
        self.now = max(self.now, side.timer_at)
        side.timer_at = None
        self.dispatch(side, side.mux.handle_timer(self.now))
        self.flush(side)
        side.rearm()
        return True

    def run_woken_tasks(self) -> bool:
        ran = False
        for side in (self.client, self.server):
            woken, side.woken_tasks = side.woken_tasks, []
            for stream_id in woken:
                self.try_send(side, stream_id)
                ran = True
        return ran

    def consume(self, side: Side, stream_id: int, share: float) -> None:
        n = int(side.unconsumed.get(stream_id, 0) * share)
        if stream_id not in side.mux._streams:
            side.unconsumed[stream_id] = 0  # closed both ways: the mux returned the link credit as it forgot it
        elif n:
            side.mux.acknowledge_received(stream_id, n, self.now)
            side.unconsumed[stream_id] -= n
            self.flush(side)  # MuxSession.consumed schedules a flush when credit is due

    def app_reset(self, side: Side, stream_id: int) -> None:
        """MuxStream.abort: reset, flush, and re-arm the timer (credit set aside for the stream may be due)."""
        if stream_id in self.reset:
            return
        side.mux.reset_stream(stream_id)
        self.flush(side)
        side.rearm()
        self.forget(stream_id)


sides = st.sampled_from(["client", "server"])
streams = st.integers(0, STREAMS - 1)
actions = st.one_of(
    st.tuples(st.just("send"), sides, streams, st.sampled_from([1, 100, 16 * KiB, 300 * KiB, 700 * KiB])),
    st.tuples(st.just("send"), sides, streams, st.just(1024 * KiB)),  # a whole link window
    st.tuples(st.just("deliver"), sides, st.sampled_from([1, 7, 12, 100, 16 * KiB + 12, 64 * KiB])),
    st.tuples(st.just("deliver"), sides, st.just(1 << 30)),  # everything on the wire
    st.tuples(st.just("consume"), sides, streams, st.sampled_from([0.3, 0.5, 1.0])),
    st.tuples(st.just("end"), sides, streams),
    st.tuples(st.just("reset"), sides, streams),
    st.tuples(st.just("loop_pass"),),
    st.tuples(st.just("tick"),),
)


def run(link: Link, script: list[tuple]) -> None:
    for action in script:
        link.now += STEP
        kind = action[0]
        if kind == "loop_pass":
            link.run_woken_tasks()
            continue
        if kind == "tick":
            for side in (link.client, link.server):
                link.fire_due_timer(side, link.now)
            continue
        side = link.client if action[1] == "client" else link.server
        if kind == "send":
            stream_id = link.ids[action[2]]
            if stream_id in link.reset or stream_id not in side.mux._streams or not side.mux._streams[stream_id].may_send:
                continue
            already_waiting = side.wants[stream_id] > 0
            side.wants[stream_id] += action[3]
            if not already_waiting:  # a sender still waiting for WindowUpdated does not try again on its own
                link.try_send(side, stream_id)
        elif kind == "deliver":
            link.deliver(side, action[2])
        elif kind == "consume":
            link.consume(side, link.ids[action[2]], action[3])
        elif kind == "end":
            stream_id = link.ids[action[2]]
            if stream_id not in link.reset and stream_id in side.mux._streams and side.mux._streams[stream_id].may_send:
                side.ending.add(stream_id)
                if not side.wants[stream_id]:
                    link.try_send(side, stream_id)
        elif kind == "reset":
            link.app_reset(side, link.ids[action[2]])


def drain(link: Link) -> None:
    """The application consumes everything as it arrives; the link runs until quiet, timers fire if due soon."""
    for _ in range(10_000):
        link.now += STEP
        busy = link.run_woken_tasks()
        for side in (link.client, link.server):
            if side.inbox:
                link.deliver(side, None)
                busy = True
            for stream_id in link.ids:
                if side.unconsumed.get(stream_id):
                    link.consume(side, stream_id, 1.0)
                    busy = True
            busy |= link.fire_due_timer(side, link.now + SHORT)
        if not busy:
            return
    raise AssertionError("the link never went quiet (a timer firing again and again without effect?)")


def assert_live(link: Link) -> None:
    for side in (link.client, link.server):
        mux, peer = side.mux, link.peer(side)
        stalled = {s: (w, mux.send_window(s)) for s, w in side.wants.items() if w and s not in link.reset}
        assert not stalled, f"{mux.role.value}: streams still want to send (want, window): {stalled}"
        assert not mux._link_waiting and not mux._link_woken and mux._link_reserved == 0
        for stream_id in link.ids:
            if stream_id not in link.reset:
                assert peer.received[stream_id] == side.sent[stream_id]
        # no credit lost: what this side may send is the window less what the peer owes but has not announced
        # yet (credit goes back in batches), and the peer owes less than a batch
        for stream_id, stream in mux._streams.items():
            peer_stream = peer.mux._streams.get(stream_id)
            if peer_stream is not None and peer_stream.may_receive:
                assert stream.send_window + peer_stream.unannounced == peer_stream.receive_window
                assert peer_stream.unannounced * 2 < peer_stream.receive_window
        window = link.config.link_window
        assert mux.link_send_window + peer.mux._link_unannounced == window
        assert peer.mux._link_unannounced * 2 < window


@settings(deadline=None, max_examples=200)
@given(st.lists(actions, max_size=60))
# Random scripts rarely line this one up: stream 1 (a task) is woken with all the link credit there is, and is
# reset before it runs; only the timer the reset re-arms can hand that credit on to stream 2, which waits too.
@example([("send", "client", 0, 1024 * KiB), ("send", "client", 1, 1024 * KiB), ("send", "client", 2, 100),
          ("deliver", "server", 1 << 30), ("consume", "server", 0, 1.0), ("deliver", "client", 1 << 30),
          ("reset", "client", 1)])
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_every_sender_finishes_and_no_credit_is_lost(config: MuxConfig, script: list[tuple]) -> None:
    # From every state the script passes through, the application consuming and the link delivering must be
    # enough to finish: a state that only some further action would get going again (a lost wake-up) fails.
    for steps in range(len(script) + 1):
        link = Link(config)
        run(link, script[:steps])
        drain(link)
        assert_live(link)
