"""Streams that outlive their link: two muxes, a link cut anywhere, a resume on a new link, byte-exact results.

No sockets: the link is two byte queues. A cut delivers part of what was in flight each way (a frame may be
cut in half) and drops the rest; both sides park, and resume on a "new link" (fresh queues). Hypothesis picks
the streams, their sizes, who opens them, when each side consumes, where the cut falls, and whether a second
cut hits the resume exchange itself.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from portway.errors import MuxClosedError, ProtocolError
from portway.proto.events import (
    ConnectionTerminated,
    DataReceived,
    LinkLost,
    LinkResumed,
    StreamAccepted,
    StreamEnded,
    StreamOpened,
    StreamReset,
)
from portway.proto.frame import INITIAL_LINK_WINDOW, INITIAL_STREAM_WINDOW, Flag, Frame, FrameType
from portway.proto.mux import Mux, MuxConfig, Role
from portway.proto.resume import (
    ENTRY,
    RESUME_HEADER,
    RetransmitBuffer,
    RetransmitTally,
    ResumeEntry,
    ResumeList,
    decode_resume,
    encode_resume,
)

from .helpers import FrameFactory, MuxPair, decode_all

f = FrameFactory()
FRAME = 16 * 1024
"""Small frames: more frame boundaries for a cut to fall on or between."""
CONFIG = MuxConfig(link_window=INITIAL_LINK_WINDOW, max_frame_size=FRAME, resume_window=30.0)
MAX_ROUNDS = 2_000


# ---------------------------------------------------------------------------- the wire format

entries = st.builds(
    ResumeEntry,
    stream_id=st.integers(1, 2**32 - 1),
    accepted=st.booleans(),
    received=st.integers(0, 2**40),
    limit=st.integers(0, 2**40),
    window=st.integers(0, 2**31 - 1),
).filter(lambda e: e.received <= e.limit + 1 and e.window <= e.limit)


@given(
    highest=st.integers(0, 2**32 - 1),
    link_window=st.integers(0, 2**31 - 1),
    listed=st.lists(entries, max_size=300, unique_by=lambda e: e.stream_id),
    frame_size=st.sampled_from([RESUME_HEADER.size + ENTRY.size, 1000, FRAME]),
)
def test_resume_lists_round_trip_over_as_many_frames_as_they_need(highest, link_window, listed, frame_size) -> None:
    resume = ResumeList(highest, link_window, tuple(listed))
    payloads = encode_resume(resume, frame_size)
    assert all(len(payload) <= frame_size for payload in payloads)
    assert decode_resume(payloads) == resume


MALFORMED_RESUMES = {
    "no-frames": [],
    "short-header": [b"\x00" * 7],
    "partial-entry": [RESUME_HEADER.pack(0, 0) + b"\x00" * (ENTRY.size - 1)],
    "stream-0": [RESUME_HEADER.pack(0, 0) + ENTRY.pack(0, 0, 0, 0, 0)],
    "listed-twice": [RESUME_HEADER.pack(0, 0) + ENTRY.pack(1, 0, 0, 0, 0) * 2],
    "unknown-entry-flags": [RESUME_HEADER.pack(0, 0) + ENTRY.pack(1, 2, 0, 0, 0)],
    "received-past-the-limit": [RESUME_HEADER.pack(0, 0) + ENTRY.pack(1, 0, 10, 5, 0)],
    "window-above-the-limit": [RESUME_HEADER.pack(0, 0) + ENTRY.pack(1, 0, 0, 5, 6)],
    "headers-disagree": [RESUME_HEADER.pack(0, 0), RESUME_HEADER.pack(0, 1)],
}


@pytest.mark.parametrize("payloads", MALFORMED_RESUMES.values(), ids=MALFORMED_RESUMES.keys())
def test_malformed_resume_lists_are_protocol_errors(payloads) -> None:
    with pytest.raises(ProtocolError):
        decode_resume(payloads)


@given(
    chunks=st.lists(st.tuples(st.binary(min_size=0, max_size=50), st.booleans()), max_size=20),
    operations=st.lists(st.tuples(st.sampled_from(["trim", "since"]), st.floats(0, 1)), max_size=20),
)
def test_the_retransmit_buffer_keeps_exactly_the_unconfirmed_bytes(chunks, operations) -> None:
    tally = RetransmitTally()
    buffer = RetransmitBuffer(tally)
    sent = b""
    for chunk, whole in chunks:  # the mux keeps small payloads whole (bytes), larger ones as views
        buffer.append(chunk if whole else memoryview(chunk))
        sent += chunk
    for operation, where in operations:
        position = buffer.start + round(where * len(buffer))
        if operation == "trim":
            buffer.trim(position)
            assert (buffer.start, len(buffer)) == (position, len(sent) - position)
        assert b"".join(buffer.since(position)) == sent[position:]
        assert tally.held == len(buffer)
    buffer.clear()
    assert tally.held == 0 and buffer.since(buffer.end) == []
    with pytest.raises(ValueError):
        buffer.since(buffer.end + 1)
    with pytest.raises(ValueError):
        buffer.trim(buffer.end + 1)


def test_a_small_payload_is_kept_for_a_resend_as_it_is_and_a_large_one_as_a_view() -> None:
    # a relay keeps thousands of request heads until the agent confirms them: a view of each would cost more than
    # the head itself
    pair = MuxPair()
    stream_id = pair.open_stream()
    head = b"GET / HTTP/1.1\r\nHost: a.x\r\n\r\n"
    body = bytes(MuxConfig().max_frame_size + 1)  # two frames: sent as views of it, never copied
    assert pair.client.send_data(stream_id, head) == len(head)
    assert pair.client.send_data(stream_id, body) == len(body)
    kept = list(pair.client._streams[stream_id].retransmit._chunks)
    assert kept[0] is head
    assert isinstance(kept[1], memoryview) and kept[1].obj is body
    _, server_events = pair.transfer()
    assert b"".join(bytes(e.data) for e in server_events if isinstance(e, DataReceived)) == head + body


# ---------------------------------------------------------------------------- the simulation


@dataclass
class Plan:
    """One stream: who opens it, what each side sends on it, whether each side ends it."""

    opener: Role
    opener_sends: bytes
    acceptor_sends: bytes
    opener_ends: bool = True
    acceptor_ends: bool = True


@dataclass
class Side:
    """A mux and the application using it: sends its planned bytes as windows allow, records what arrives."""

    mux: Mux
    plans: dict[int, Plan] = field(default_factory=dict)
    consume_at_once: bool = True
    consuming: bool = True  # False: a slow reader holds what arrives
    sent: dict[int, int] = field(default_factory=dict)
    ended: set[int] = field(default_factory=set)
    received: dict[int, bytearray] = field(default_factory=dict)
    unconsumed: dict[int, int] = field(default_factory=dict)
    peer_ended: dict[int, int] = field(default_factory=dict)  # how many StreamEnded each stream saw
    resets: set[int] = field(default_factory=set)
    to_accept: list[int] = field(default_factory=list)
    resumed: int = 0
    terminated: list[ConnectionTerminated] = field(default_factory=list)

    def outgoing(self, stream_id: int) -> tuple[bytes, bool]:
        plan = self.plans[stream_id]
        if (stream_id % 2 == 1) == (self.mux.role is Role.CLIENT):
            return plan.opener_sends, plan.opener_ends
        return plan.acceptor_sends, plan.acceptor_ends

    def handle(self, events, now: float) -> None:
        for event in events:
            if isinstance(event, StreamOpened):
                self.to_accept.append(event.stream_id)
            elif isinstance(event, DataReceived):
                self.received.setdefault(event.stream_id, bytearray()).extend(event.data)
                if self.consume_at_once:
                    self.mux.acknowledge_received(event.stream_id, len(event.data), now)
                else:
                    self.unconsumed[event.stream_id] = self.unconsumed.get(event.stream_id, 0) + len(event.data)
            elif isinstance(event, StreamEnded):
                self.peer_ended[event.stream_id] = self.peer_ended.get(event.stream_id, 0) + 1
            elif isinstance(event, StreamReset):
                self.resets.add(event.stream_id)
            elif isinstance(event, LinkResumed):
                self.resumed += 1
            elif isinstance(event, ConnectionTerminated):
                self.terminated.append(event)

    def work(self, now: float, accept: bool = True, consume: bool = True) -> None:
        """What the application does on its own: accept opens, consume held bytes, send what windows allow."""
        mux = self.mux
        if mux.is_closed:
            return
        if accept:
            for stream_id in self.to_accept:
                if stream_id not in self.resets:
                    mux.accept_stream(stream_id)
                    self.sent.setdefault(stream_id, 0)
            self.to_accept.clear()
        if consume and self.consuming:
            for stream_id, count in self.unconsumed.items():
                mux.acknowledge_received(stream_id, count, now)
            self.unconsumed.clear()
        for stream_id, position in list(self.sent.items()):
            if stream_id in self.ended or stream_id in self.resets:
                continue
            data, ends = self.outgoing(stream_id)
            if position < len(data):
                accepted = mux.send_data(stream_id, memoryview(data)[position:], end_stream=ends)
                self.sent[stream_id] = position = position + accepted
                if position == len(data) and ends:
                    self.ended.add(stream_id)
            elif ends:
                mux.end_stream(stream_id)
                self.ended.add(stream_id)

    def open(self, stream_id: int) -> None:
        assert self.mux.open_stream() == stream_id
        self.sent[stream_id] = 0


class Link:
    """Two sides joined by byte queues that can be cut."""

    def __init__(self, plans: dict[int, Plan], client_consumes_at_once: bool = True,
                 server_consumes_at_once: bool = True, server_config: MuxConfig = CONFIG) -> None:
        self.client = Side(Mux(Role.CLIENT, CONFIG), plans, client_consumes_at_once)
        self.server = Side(Mux(Role.SERVER, server_config), plans, server_consumes_at_once)
        self.now = 0.0
        self.cuts = 0
        self.peak_retransmit = 0
        for stream_id, plan in sorted(plans.items()):
            (self.client if plan.opener is Role.CLIENT else self.server).open(stream_id)

    def sides(self) -> tuple[Side, Side]:
        return self.client, self.server

    def round(self, cut_fractions: tuple[float, float] | None = None) -> bool:
        """Each side works, then what it wrote is delivered (all of it, or with a cut, a part of it); True
        while anything moved."""
        moved = False
        wires = []
        for side in self.sides():
            side.work(self.now)
            wires.append(side.mux.data_to_send())
        for (receiver, wire), fraction in zip(
            ((self.server, wires[0]), (self.client, wires[1])), cut_fractions or (1.0, 1.0)
        ):
            part = wire[: round(len(wire) * fraction)]
            if part:
                moved = True
                receiver.handle(receiver.mux.receive_data(part, self.now), self.now)
        self.check_bounds()
        if cut_fractions is not None:
            self.cut()
        return moved or any(side.mux.has_data_to_send for side in self.sides())

    def cut(self) -> None:
        self.cuts += 1
        for side in self.sides():
            side.mux.park(self.now)

    def reconnect(self) -> None:
        for side in self.sides():
            side.mux.resume(self.now)

    def check_bounds(self) -> None:
        """What each side keeps to send again never exceeds what the peer's windows allow."""
        for side, peer in ((self.client, self.server), (self.server, self.client)):
            total = side.mux.retransmit_size
            kept = [*side.mux._streams.values(), *side.mux._retained.values()]
            assert total == sum(len(stream.retransmit) for stream in kept)
            self.peak_retransmit = max(self.peak_retransmit, total)
            assert total <= min(peer.mux.config.link_window, side.mux.config.link_window)
            for stream_id, stream in side.mux._streams.items():
                peer_stream = peer.mux._streams.get(stream_id)
                window = peer_stream.receive_window if peer_stream is not None else CONFIG.max_window
                assert len(stream.retransmit) <= window

    def run(self, rounds: int = MAX_ROUNDS) -> None:
        for _ in range(rounds):
            if not self.round():
                return
        raise AssertionError("the link never settled")

    def assert_delivered_exactly(self, plans: dict[int, Plan]) -> None:
        for side, peer in ((self.client, self.server), (self.server, self.client)):
            assert not side.resets and not side.terminated
            for stream_id in plans:
                expected, ends = peer.outgoing(stream_id)
                assert bytes(side.received.get(stream_id, b"")) == expected, f"stream {stream_id}"
                assert side.peer_ended.get(stream_id, 0) == (1 if ends else 0), f"stream {stream_id} FIN"
        for side in self.sides():
            if all(plan.opener_ends and plan.acceptor_ends for plan in plans.values()):
                # every stream finished both ways and every FIN was confirmed: nothing is kept any more
                assert side.mux.stream_count == 0 and not side.mux._retained
                assert side.mux.retransmit_size == 0


def payload(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


@st.composite
def stream_plans(draw, max_streams: int = 5, max_size: int = 700_000) -> dict[int, Plan]:
    plans: dict[int, Plan] = {}
    next_id = {Role.CLIENT: 1, Role.SERVER: 2}
    for index in range(draw(st.integers(1, max_streams))):
        opener = draw(st.sampled_from([Role.CLIENT, Role.SERVER]))
        stream_id = next_id[opener]
        next_id[opener] += 2
        sizes = draw(st.tuples(st.integers(0, max_size), st.integers(0, max_size)))
        plans[stream_id] = Plan(
            opener, payload(index * 2, sizes[0]), payload(index * 2 + 1, sizes[1]),
            opener_ends=draw(st.booleans()), acceptor_ends=draw(st.booleans()),
        )
    return plans


@settings(deadline=None, max_examples=150)
@given(
    plans=stream_plans(),
    rounds_before_cut=st.integers(0, 8),  # later cuts mostly fall after the streams finished
    cut=st.tuples(st.floats(0, 1), st.floats(0, 1)),
    exchange_cut=st.none() | st.tuples(st.integers(0, 3), st.floats(0, 1), st.floats(0, 1)),
    consume=st.tuples(st.booleans(), st.booleans()),
    work_while_parked=st.booleans(),
    server_config=st.sampled_from([CONFIG, MuxConfig(link_window=4 * INITIAL_LINK_WINDOW, max_frame_size=FRAME)]),
)
def test_streams_carry_on_byte_exact_after_a_cut_anywhere(
    plans, rounds_before_cut, cut, exchange_cut, consume, work_while_parked, server_config
) -> None:
    """(With the second server config the two ends' link windows differ, and the client's own one caps what it
    keeps below what the server would take.)"""
    link = Link(plans, *consume, server_config=server_config)
    for _ in range(rounds_before_cut):
        link.round()
    link.round(cut_fractions=cut)
    if work_while_parked:  # the applications go on: accept, consume, end; nothing can be sent
        for side in link.sides():
            side.work(link.now)
            assert not any(side.mux.send_window(stream_id) for stream_id in side.sent)
    link.now += 5.0
    link.reconnect()
    if exchange_cut is not None:  # the new link dies too, during or right after the resume exchange
        rounds, *fractions = exchange_cut
        for _ in range(rounds):
            link.round()
        link.round(cut_fractions=tuple(fractions))
        link.now += 5.0
        link.reconnect()
    link.run()
    link.assert_delivered_exactly(plans)
    assert all(side.resumed >= 1 for side in link.sides())


# ---------------------------------------------------------------------------- pinned cases


def two_way(size: int = 600_000, ends: bool = True) -> dict[int, Plan]:
    return {1: Plan(Role.CLIENT, payload(1, size), payload(2, size), ends, ends),
            2: Plan(Role.SERVER, payload(3, size), payload(4, size), ends, ends)}


def bytes_in_flight_cut(link: Link, fraction: float, rounds: int) -> None:
    for _ in range(rounds):
        link.round()
    link.round(cut_fractions=(fraction, fraction))


@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5, 0.999, 1.0])
@pytest.mark.parametrize("rounds", [0, 1, 2, 5, 12])
def test_data_in_flight_both_ways_is_resent_once(fraction: float, rounds: int) -> None:
    plans = two_way()
    link = Link(plans)
    bytes_in_flight_cut(link, fraction, rounds)
    link.reconnect()
    link.run()
    link.assert_delivered_exactly(plans)


def test_an_open_lost_with_the_link_is_sent_again_with_all_its_data() -> None:
    plans = {1: Plan(Role.CLIENT, b"request", b"response")}
    link = Link(plans)
    link.round(cut_fractions=(0.0, 0.0))  # the SYN, the request and its FIN never arrived
    link.reconnect()
    link.run()
    link.assert_delivered_exactly(plans)
    assert link.server.to_accept == []


def test_a_stream_accepted_while_parked_is_accepted_on_the_new_link() -> None:
    plans = {2: Plan(Role.SERVER, b"ping" * 1000, b"pong" * 1000)}
    link = Link(plans)
    link.round()
    assert link.client.to_accept == [2]
    link.cut()
    link.client.work(link.now)  # accepts: its ACK can only go on the new link
    link.reconnect()
    link.run()
    link.assert_delivered_exactly(plans)


def test_an_ack_lost_with_the_link_is_replayed_by_the_resume_list() -> None:
    plans = {2: Plan(Role.SERVER, b"", b"x" * 100)}
    link = Link(plans)
    link.round()  # SYN (and FIN) to the client
    link.client.work(0.0)
    assert link.client.mux.data_to_send()  # its ACK, lost with the link
    link.cut()
    link.reconnect()
    server_events = link.server.mux.receive_data(link.client.mux.data_to_send(), 0.0)
    assert StreamAccepted(2) in server_events
    link.client.mux.receive_data(link.server.mux.data_to_send(), 0.0)
    link.run()
    link.assert_delivered_exactly(plans)


def test_a_fin_ack_lost_with_the_link_lets_the_stream_go_on_resume() -> None:
    plans = {1: Plan(Role.CLIENT, b"a" * 10, b"b" * 10)}
    link = Link(plans)
    link.round()  # the client's SYN, request and FIN arrive
    link.round(cut_fractions=(1.0, 0.0))  # the server's ACK, answer, FIN and FIN_ACK are lost
    assert link.client.mux._streams[1].retransmit.end == 10 and not link.client.mux._streams[1].fin_acked
    link.reconnect()
    link.run()
    link.assert_delivered_exactly(plans)


def test_retransmit_buffers_stay_within_the_peer_link_window_with_slow_readers() -> None:
    plans = {stream_id: Plan(Role.CLIENT, payload(stream_id, 800_000), b"") for stream_id in (1, 3, 5, 7, 9, 11)}
    link = Link(plans, server_consumes_at_once=False)
    link.server.consuming = False  # six streams' windows are more than the link window: the link holds them
    for _ in range(30):
        link.round()
    assert link.peak_retransmit == CONFIG.link_window  # check_bounds asserted it at every round too
    link.server.consuming = True
    link.round(cut_fractions=(0.5, 0.5))
    link.reconnect()
    link.run()
    link.assert_delivered_exactly(plans)


def test_a_peer_announcing_a_huge_link_window_gets_no_more_kept_than_our_own() -> None:
    """The peer chooses its windows; what we keep for it is bounded by our own link window all the same."""
    plans = {stream_id: Plan(Role.CLIENT, payload(stream_id, 800_000), b"") for stream_id in (1, 3, 5, 7, 9, 11)}
    greedy = MuxConfig(link_window=64 * 1024 * 1024, max_frame_size=FRAME)
    link = Link(plans, server_consumes_at_once=False, server_config=greedy)
    link.server.consuming = False  # it takes everything and consumes nothing
    for _ in range(30):
        link.round()
    assert link.client.mux.link_send_window > CONFIG.link_window  # the peer would take more...
    assert link.peak_retransmit == CONFIG.link_window  # ...but we stop at what we can keep
    link.server.consuming = True
    link.run()
    link.assert_delivered_exactly(plans)


def test_retransmit_buffer_of_a_stream_stays_within_its_window_as_it_grows() -> None:
    config = MuxConfig(max_frame_size=FRAME)  # the default 32 MiB link window: streams grow to 4 MiB
    client, server = Mux(Role.CLIENT, config), Mux(Role.SERVER, config)
    server.receive_data(client.data_to_send(), 0.0)
    client.receive_data(server.data_to_send(), 0.0)
    stream_id = client.open_stream()
    data = payload(7, 40_000_000)
    sent = received = 0
    peak = 0
    now = 0.0
    while received < len(data):
        sent += client.send_data(stream_id, memoryview(data)[sent:])
        peak = max(peak, len(client._streams[stream_id].retransmit))
        for event in server.receive_data(client.data_to_send(), now):
            if isinstance(event, StreamOpened):
                server.accept_stream(stream_id)
            elif isinstance(event, DataReceived):
                received += len(event.data)
                server.acknowledge_received(stream_id, len(event.data), now)
        client.receive_data(server.data_to_send(), now)
        assert len(client._streams[stream_id].retransmit) <= server._streams[stream_id].receive_window
        now += 0.001
    assert server._streams[stream_id].receive_window == config.max_window  # it grew all the way
    assert config.max_window // 2 < peak <= config.max_window


# ---------------------------------------------------------------------------- failing visibly


def parked_pair(plans: dict[int, Plan]) -> Link:
    link = Link(plans)
    link.round()
    link.round()
    link.cut()
    return link


def test_past_the_resume_window_every_parked_stream_is_reset() -> None:
    link = parked_pair(two_way(1000, ends=False))
    client = link.client.mux
    assert client.get_timer() == CONFIG.resume_window
    assert client.handle_timer(CONFIG.resume_window - 0.001) == []
    events = client.handle_timer(CONFIG.resume_window)
    assert events[:2] == [StreamReset(1), StreamReset(2)]
    assert isinstance(events[2], ConnectionTerminated) and "not resumed within 30s" in events[2].reason
    assert client.is_closed and client.get_timer() is None
    with pytest.raises(MuxClosedError):
        client.resume(CONFIG.resume_window)


def test_a_link_lost_again_during_the_exchange_keeps_the_first_deadline() -> None:
    link = parked_pair(two_way(1000, ends=False))
    link.now = 20.0
    link.reconnect()
    link.cut()  # before either RESUME arrived
    assert link.client.mux.get_timer() == CONFIG.resume_window
    assert link.client.mux.handle_timer(CONFIG.resume_window)[-1].reason.startswith("the link was not resumed")


def test_a_new_deadline_starts_once_a_resume_has_finished() -> None:
    link = parked_pair(two_way(1000, ends=False))
    link.now = 20.0
    link.reconnect()
    link.run()
    link.now = 40.0
    link.cut()
    assert link.client.mux.get_timer() == 40.0 + CONFIG.resume_window


def test_a_peer_that_lost_its_state_resets_every_parked_stream() -> None:
    link = parked_pair(two_way(1000, ends=False))
    events = link.client.mux.abandon()
    assert events[:2] == [StreamReset(1), StreamReset(2)] and isinstance(events[2], ConnectionTerminated)
    assert link.client.mux.is_closed


def test_a_stream_reset_during_the_outage_is_reset_on_the_other_side() -> None:
    plans = two_way(1000, ends=False)
    link = parked_pair(plans)
    link.server.mux.reset_stream(1)
    link.server.resets.add(1)
    link.reconnect()
    link.run()
    assert link.client.resets == {1}  # the client learns it from the server's resume list
    assert bytes(link.client.received[2]) == plans[2].opener_sends and bytes(link.server.received[2]) == (
        plans[2].acceptor_sends)


def test_a_stream_the_peer_does_not_list_is_reset() -> None:
    link = parked_pair({1: Plan(Role.CLIENT, b"x" * 100, b"y" * 100, acceptor_ends=False)})
    link.client.mux.resume(link.now)
    events = link.client.mux.receive_data(Frame(FrameType.RESUME, Flag.FIN, 0, 8, RESUME_HEADER.pack(1, 0)).encode(),
                                          link.now)
    assert events == [StreamReset(1), LinkResumed(0, 0)]


def test_parked_muxes_open_nothing_and_send_nothing() -> None:
    link = parked_pair(two_way(1000, ends=False))
    client = link.client.mux
    with pytest.raises(MuxClosedError):
        client.open_stream()
    with pytest.raises(MuxClosedError):
        client.ping(0.0)
    with pytest.raises(ValueError):
        client.receive_data(b"x", 0.0)
    assert client.send_data(1, b"more") == 0
    client.resume(0.0)
    assert client.send_data(1, b"more") == 0, "no window until the peer's RESUME says what it holds"
    with pytest.raises(ValueError):
        client.resume(0.0)


HOSTILE_RESUMES = {
    "resume-on-a-live-link": lambda mux: mux.receive_data(
        Frame(FrameType.RESUME, Flag.FIN, 0, 8, RESUME_HEADER.pack(0, 0)).encode(), 0.0),
    "data-before-resume": lambda mux: (mux.park(0.0), mux.resume(0.0), mux.receive_data(f.data(2, b"x"), 0.0)),
    "claims-bytes-never-sent": lambda mux: (mux.park(0.0), mux.resume(0.0), mux.receive_data(Frame(
        FrameType.RESUME, Flag.FIN, 0, 8 + ENTRY.size,
        RESUME_HEADER.pack(0, 1 << 20) + ENTRY.pack(1, 0, 10**6, 10**6, 0)).encode(), 0.0)),
    "shrinks-the-window": lambda mux: (mux.park(0.0), mux.resume(0.0), mux.receive_data(Frame(
        FrameType.RESUME, Flag.FIN, 0, 8 + ENTRY.size,
        RESUME_HEADER.pack(0, 1 << 20) + ENTRY.pack(1, 0, 0, 10, 10)).encode(), 0.0)),
    "credit-for-bytes-never-sent": lambda mux: mux.receive_data(f.window_update(1, 101), 0.0),
    "fin-ack-without-fin": lambda mux: mux.receive_data(Frame(FrameType.FIN_ACK, Flag(0), 1, 0).encode(), 0.0),
}


@pytest.mark.parametrize("attack", HOSTILE_RESUMES.values(), ids=HOSTILE_RESUMES.keys())
def test_a_peer_lying_about_what_it_holds_is_a_protocol_error(attack) -> None:
    link = Link({1: Plan(Role.CLIENT, b"x" * 100, b"", opener_ends=False, acceptor_ends=False)})
    link.run()
    with pytest.raises(ProtocolError):
        attack(link.client.mux)
    assert link.client.mux.is_closed


def test_growth_and_consumption_credit_are_told_apart_on_the_wire() -> None:
    client, server = Mux(Role.CLIENT), Mux(Role.SERVER)
    server.receive_data(client.data_to_send(), 0.0)
    client.receive_data(server.data_to_send(), 0.0)
    stream_id = client.open_stream()
    server.receive_data(client.data_to_send(), 0.0)
    server.accept_stream(stream_id)
    client.receive_data(server.data_to_send(), 0.0)
    client.send_data(stream_id, b"x" * INITIAL_STREAM_WINDOW)
    server.receive_data(client.data_to_send(), 0.0)
    server.acknowledge_received(stream_id, INITIAL_STREAM_WINDOW, 0.01)  # fast: the window doubles
    updates = [frame for frame in decode_all(server.data_to_send()) if frame.stream_id == stream_id]
    assert updates == [
        Frame(FrameType.WINDOW_UPDATE, Flag.GROW, stream_id, INITIAL_STREAM_WINDOW),
        Frame(FrameType.WINDOW_UPDATE, Flag(0), stream_id, INITIAL_STREAM_WINDOW),
    ]


def test_a_keepalive_timeout_parks_the_streams_instead_of_closing() -> None:
    link = Link(two_way(1000, ends=False))
    link.run()
    client = link.client.mux
    client.handle_timer(CONFIG.ping_after)  # a quiet link: ping
    client.data_to_send()  # into the void
    deadline = CONFIG.keepalive_timeout  # of silence since the peer was last heard (the run ended at 0)
    (lost,) = client.handle_timer(deadline)
    assert isinstance(lost, LinkLost) and "keepalive timeout" in lost.reason
    assert client.is_parked and not client.is_closed and client.stream_count == 2
    assert client.get_timer() == deadline + CONFIG.resume_window


def test_links_that_said_go_away_do_not_park() -> None:
    link = Link(two_way(1000, ends=False))
    link.run()
    link.client.mux.go_away()
    link.run()
    assert not link.client.mux.can_park and not link.server.mux.can_park
    assert not Mux(Role.CLIENT, MuxConfig(resume_window=0)).can_park


@settings(deadline=None, max_examples=200)
@given(
    listed=st.lists(
        st.builds(ResumeEntry, stream_id=st.integers(1, 12), accepted=st.booleans(),
                  received=st.integers(0, 3000), limit=st.integers(0, 600_000), window=st.integers(0, 600_000)),
        max_size=8, unique_by=lambda e: e.stream_id),
    highest=st.integers(0, 12),
    link_window=st.integers(0, 2**31 - 1),
    garbage=st.binary(max_size=40),
)
def test_any_resume_list_yields_events_or_a_protocol_error(listed, highest, link_window, garbage) -> None:
    """Whatever a peer claims in its RESUME (or sends after it), the mux resumes consistently or closes the
    link with a protocol error: never another exception, never a stream the peer can push past its window."""
    link = Link({1: Plan(Role.CLIENT, b"x" * 2000, b"y" * 1000, opener_ends=False),
                 2: Plan(Role.SERVER, b"z" * 1500, b"", acceptor_ends=False),
                 3: Plan(Role.CLIENT, b"w" * 10, b"v" * 10)})
    link.round()
    link.round(cut_fractions=(0.5, 0.5))
    mux = link.client.mux
    mux.resume(link.now)
    resume = ResumeList(highest, link_window, tuple(e for e in listed if e.received <= e.limit + 1
                                                    and e.window <= e.limit))
    wire = b"".join(Frame(FrameType.RESUME, Flag.FIN if last else Flag(0), 0, len(p), p).encode()
                    for last, p in ((i == len(ps) - 1, p) for ps in [encode_resume(resume, FRAME)]
                                    for i, p in enumerate(ps)))
    try:
        events = mux.receive_data(wire + garbage, link.now)
    except ProtocolError:
        assert mux.is_closed
        return
    assert not mux.is_parked and any(isinstance(event, LinkResumed) for event in events)
    for stream_id, stream in mux._streams.items():
        assert stream.send_window >= 0 and stream.retransmit.start <= stream.retransmit.end
    assert mux.link_send_window >= 0
    assert mux.retransmit_size == sum(len(s.retransmit) for s in (*mux._streams.values(), *mux._retained.values()))


def test_a_resume_list_longer_than_a_link_may_hold_is_refused() -> None:
    mux = Mux(Role.CLIENT, MuxConfig(max_streams=4))
    mux.park(0.0)
    mux.resume(0.0)
    entries = tuple(ResumeEntry(stream_id, False, 0, 0, 0) for stream_id in range(2, 2 + 2 * 9, 2))
    payloads = encode_resume(ResumeList(0, 0, entries), 2 * ENTRY.size + RESUME_HEADER.size)
    wire = b"".join(Frame(FrameType.RESUME, Flag(0), 0, len(p), p).encode() for p in payloads)
    with pytest.raises(ProtocolError, match="more streams than a link may hold"):
        mux.receive_data(wire, 0.0)


def test_streams_opened_into_the_silence_are_the_unanswered_ones() -> None:
    """What a relay fails at once when the link is lost rather than park: its opens the agent never accepted."""
    pair = MuxPair(now=0.0)
    client, server = pair.client, pair.server
    answered = client.open_stream()
    pair.transfer()
    server.accept_stream(answered)
    pair.transfer()
    opened_by_peer = server.open_stream()
    pair.transfer()
    unanswered = client.open_stream()  # its SYN goes nowhere: the link is lost
    client.data_to_send()
    client.park(1.0)
    assert client.unanswered_streams() == [unanswered]
    assert server.unanswered_streams() == [opened_by_peer]  # the client never accepted it either
