"""Multiplexer behaviour: stream lifecycle, flow control, limits, keepalive and hostile peers. No I/O, no sleeps."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import random
from collections import defaultdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from portway.errors import MuxClosedError, ProtocolError
from portway.proto.events import (
    ConnectionTerminated,
    DataReceived,
    GoAwayReceived,
    LinkLost,
    LinkResumed,
    MoveRequested,
    PingAcked,
    StreamAccepted,
    StreamEnded,
    StreamOpened,
    StreamReset,
    WindowUpdated,
)
from portway.proto.frame import (
    HEADER_SIZE,
    INITIAL_LINK_WINDOW,
    INITIAL_STREAM_WINDOW,
    MAX_STREAM_ID,
    MAX_WINDOW_SIZE,
    Flag,
    Frame,
    FrameType,
    GoAwayCode,
)
from portway.proto.mux import (ASSUMED_RTT, GROWTH_ROUND_TRIPS, LINK_CONFIRM_EVERY, RTT_PROBE_INTERVAL, Mux, MuxConfig,
                               Role)

from .helpers import FrameFactory, MuxPair, decode_all, window_credit

KiB = 1024
MiB = 1024 * KiB
WINDOW = INITIAL_STREAM_WINDOW
SLOW = 1_000.0
"""A ``now`` long after every stream opened: consumption this late never earns window growth."""
EVENT_TYPES = (
    StreamOpened,
    StreamAccepted,
    DataReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
    PingAcked,
    GoAwayReceived,
)

f = FrameFactory()
both_roles = pytest.mark.parametrize("opener", [Role.CLIENT, Role.SERVER], ids=["agent-opens", "relay-opens"])


def settle(pair: MuxPair, first: Mux, now: float = 0.0) -> tuple[list, list]:
    """Transfer until quiescent; return (events seen by ``first``, events seen by its peer)."""
    client_events, server_events = pair.transfer(now)
    return (client_events, server_events) if first is pair.client else (server_events, client_events)


def sha256(*chunks: bytes) -> bytes:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.digest()


def received_bytes(events: list) -> int:
    return sum(len(event.data) for event in events if isinstance(event, DataReceived))


def started(role: Role, config: MuxConfig = MuxConfig(), now: float = 0.0) -> Mux:
    """A mux whose link-window announcement (queued as it starts) has already gone out."""
    mux = Mux(role, config, now=now)
    assert decode_all(mux.data_to_send()) == [
        Frame(FrameType.WINDOW_UPDATE, Flag(0), 0, config.link_window - INITIAL_LINK_WINDOW)
    ]
    return mux


# ---------------------------------------------------------------------------- configuration


def test_config_defaults() -> None:
    config = MuxConfig()
    assert (config.initial_window, config.max_window, config.max_frame_size) == (256 * KiB, 4 * MiB, 64 * KiB)
    assert (config.accept_backlog, config.max_streams, config.max_control_frames_per_second) == (256, 4096, 2000)
    assert (config.keepalive_interval, config.keepalive_timeout, config.ping_after) == (None, 10.0, 10.0 / 3)
    assert config.link_window == 32 * MiB


@pytest.mark.parametrize(
    "kwargs",
    [
        {"initial_window": WINDOW - 1},
        {"initial_window": 2 * MiB, "max_window": 1 * MiB},
        {"max_window": MAX_WINDOW_SIZE + 1},
        {"link_window": INITIAL_LINK_WINDOW - 1},
        {"link_window": 2 * MiB, "initial_window": 3 * MiB},
        {"link_window": MAX_WINDOW_SIZE + 1},
        {"max_frame_size": 0},
        {"max_frame_size": 2**31},
        {"accept_backlog": 0},
        {"max_streams": 0},
        {"max_control_frames_per_second": 0},
        {"keepalive_interval": 0.0},
        {"keepalive_timeout": -1.0},
        {"keepalive_timeout": float("nan")},
        {"keepalive_timeout": float("inf")},
        {"keepalive_interval": 10.0},  # not below the default timeout: no time left to answer
        {"keepalive_interval": 2.0, "keepalive_timeout": 1.0},
    ],
)
def test_config_rejects_nonsense(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        MuxConfig(**kwargs)


# ---------------------------------------------------------------------------- stream lifecycle


@both_roles
def test_open_accept_exchange_and_half_close_both_ways(opener: Role) -> None:
    pair = MuxPair()
    a = pair.side(opener)
    b = pair.peer(a)
    stream_id = a.open_stream()
    assert stream_id % 2 == (1 if opener is Role.CLIENT else 0)
    assert settle(pair, a) == ([], [StreamOpened(stream_id)])
    b.accept_stream(stream_id)
    assert settle(pair, a) == ([StreamAccepted(stream_id)], [])

    assert a.send_data(stream_id, b"request") == 7
    assert settle(pair, a) == ([], [DataReceived(stream_id, b"request")])
    assert b.send_data(stream_id, b"response", end_stream=True) == 8
    assert settle(pair, a) == ([DataReceived(stream_id, b"response"), StreamEnded(stream_id)], [])
    assert a.send_data(stream_id, b"more after their FIN") == 20  # half-close: our direction stays open
    a.end_stream(stream_id)
    assert settle(pair, a) == ([], [DataReceived(stream_id, b"more after their FIN"), StreamEnded(stream_id)])
    assert a.stream_count == b.stream_count == 0


@both_roles
def test_a_short_exchange_needs_no_round_trip_before_data(opener: Role) -> None:
    pair = MuxPair()
    a = pair.side(opener)
    b = pair.peer(a)
    stream_id = a.open_stream()
    a.send_data(stream_id, b"GET / HTTP/1.1\r\n\r\n", end_stream=True)
    assert settle(pair, a)[1] == [
        StreamOpened(stream_id),
        DataReceived(stream_id, b"GET / HTTP/1.1\r\n\r\n"),
        StreamEnded(stream_id),
    ]
    b.accept_stream(stream_id)
    b.send_data(stream_id, b"HTTP/1.1 204 No Content\r\n\r\n", end_stream=True)
    assert settle(pair, a)[0] == [
        StreamAccepted(stream_id),
        DataReceived(stream_id, b"HTTP/1.1 204 No Content\r\n\r\n"),
        StreamEnded(stream_id),
    ]
    assert a.stream_count == b.stream_count == 0


def test_stream_opened_with_syn_on_data_is_accepted() -> None:
    server = Mux(Role.SERVER)
    events = server.receive_data(f.data(1, b"hi", Flag.SYN | Flag.FIN), 0.0)
    assert events == [StreamOpened(1), DataReceived(1, b"hi"), StreamEnded(1)]


def test_api_misuse_raises_and_queues_nothing() -> None:
    pair = MuxPair()
    client, server = pair.client, pair.server
    stream_id = client.open_stream()
    pair.transfer()
    with pytest.raises(ValueError, match="can't send"):
        server.send_data(stream_id, b"before accepting")
    with pytest.raises(ValueError, match="not allowed"):
        server.end_stream(stream_id)
    server.accept_stream(stream_id)
    with pytest.raises(ValueError, match="not allowed"):
        server.accept_stream(stream_id)
    with pytest.raises(KeyError, match="not open"):
        client.send_data(99, b"x")
    with pytest.raises(KeyError, match="not open"):
        client.accept_stream(98)
    pair.transfer()
    client.end_stream(stream_id)
    assert client.data_to_send() == Frame(FrameType.WINDOW_UPDATE, Flag.FIN, stream_id, 0).encode()
    with pytest.raises(ValueError, match="can't send"):
        client.send_data(stream_id, b"after FIN")
    with pytest.raises(ValueError, match="not allowed"):
        client.end_stream(stream_id)
    assert client.data_to_send() == server.data_to_send() == b""
    assert client.send_window(stream_id) == 0
    assert client.send_window(12345) == 0


def test_send_data_splits_into_frames_and_puts_fin_on_the_last() -> None:
    pair = MuxPair(MuxConfig(max_frame_size=1000))
    stream_id = pair.open_stream()
    data = bytes(range(256)) * 10
    assert pair.client.send_data(stream_id, data, end_stream=True) == 2560
    frames = decode_all(pair.client.data_to_send(), max_frame_size=1000)
    assert [(fr.type, fr.flags, fr.length) for fr in frames] == [
        (FrameType.DATA, Flag(0), 1000),
        (FrameType.DATA, Flag(0), 1000),
        (FrameType.DATA, Flag.FIN, 560),
    ]
    assert b"".join(fr.payload for fr in frames) == data


def test_partial_send_never_half_closes() -> None:
    pair = MuxPair()
    stream_id = pair.open_stream()
    client = pair.client
    assert client.send_data(stream_id, b"x" * (WINDOW + 1), end_stream=True) == WINDOW
    assert not any(fr.flags & Flag.FIN for fr in decode_all(client.data_to_send()))
    assert client.send_data(stream_id, b"x", end_stream=True) == 0
    assert client.data_to_send() == b""


def test_empty_send_queues_nothing_unless_it_ends_the_stream() -> None:
    pair = MuxPair()
    stream_id = pair.open_stream()
    client = pair.client
    assert client.send_data(stream_id, b"") == 0
    assert client.data_to_send() == b""
    assert client.send_data(stream_id, b"", end_stream=True) == 0
    assert decode_all(client.data_to_send()) == [Frame(FrameType.WINDOW_UPDATE, Flag.FIN, stream_id, 0)]


@pytest.mark.parametrize(
    "make_buffer", [bytearray, lambda b: memoryview(bytearray(b))], ids=["bytearray", "memoryview"]
)
def test_mutable_buffers_are_copied_when_queued(make_buffer) -> None:
    pair = MuxPair()
    stream_id = pair.open_stream()
    buffer = make_buffer(b"original")
    assert pair.client.send_data(stream_id, buffer) == 8
    buffer[:] = b"mutated!"
    assert decode_all(pair.client.data_to_send())[0].payload == b"original"


def test_data_received_repr_shows_the_size_not_the_payload() -> None:
    assert repr(DataReceived(3, b"x" * 65536)) == "DataReceived(stream_id=3, data=<65536 bytes>)"


def test_views_of_immutable_bytes_are_sent_as_is() -> None:
    pair = MuxPair()
    stream_id = pair.open_stream()
    body = b"0123456789"
    assert pair.client.send_data(stream_id, memoryview(body)[3:7]) == 4
    assert decode_all(pair.client.data_to_send())[0].payload == b"3456"


def test_data_to_send_coalesces_everything_queued() -> None:
    pair = MuxPair()
    first, second = pair.open_stream(), pair.open_stream()
    client = pair.client
    client.send_data(first, b"one")
    client.send_data(second, b"two")
    client.ping(0.0)
    wire = client.data_to_send()
    assert [fr.type for fr in decode_all(wire)] == [FrameType.DATA, FrameType.DATA, FrameType.PING]
    assert client.data_to_send() == b""


# ---------------------------------------------------------------------------- flow control


def test_a_reader_that_stops_reading_stalls_the_sender_exactly_at_the_window() -> None:
    pair = MuxPair()
    client, server = pair.client, pair.server
    stream_id = pair.open_stream()
    big = b"x" * (10 * MiB)
    assert client.send_data(stream_id, big) == WINDOW
    assert client.send_window(stream_id) == 0
    assert client.send_data(stream_id, big) == 0
    wire = client.data_to_send()
    assert len(wire) == WINDOW + HEADER_SIZE * (WINDOW // MuxConfig().max_frame_size)  # nothing buffered beyond
    assert received_bytes(server.receive_data(wire, 0.0)) == WINDOW
    for _ in range(3):  # the reader never consumes: nothing more moves, nothing piles up
        assert client.send_data(stream_id, big) == 0
        assert pair.transfer() == ([], [])
    server.acknowledge_received(stream_id, WINDOW // 4, SLOW)
    assert server.data_to_send() == b"", "credit below half a window is batched"
    server.acknowledge_received(stream_id, WINDOW // 4, SLOW)
    # the credit goes out with an RTT probe, whose answer comes back at once here
    assert pair.transfer(SLOW) == ([WindowUpdated(stream_id)], [PingAcked(0.0)])
    assert client.send_window(stream_id) == WINDOW // 2


@settings(deadline=None, max_examples=50)
@given(
    initial_window=st.integers(WINDOW, 4 * WINDOW),
    reads=st.lists(st.integers(1, 200_000), min_size=1, max_size=30),
)
def test_credit_returned_equals_bytes_consumed(initial_window: int, reads: list[int]) -> None:
    pair = MuxPair(MuxConfig(initial_window=initial_window, max_window=initial_window))
    client, server = pair.client, pair.server
    stream_id = pair.open_stream()
    assert client.send_window(stream_id) == initial_window
    payload = memoryview(b"p" * (sum(reads) + initial_window))
    sent = received = consumed = credited = 0
    for read in reads:
        sent += client.send_data(stream_id, payload[sent:])
        received += received_bytes(server.receive_data(client.data_to_send(), SLOW))
        n = min(read, received - consumed)
        server.acknowledge_received(stream_id, n, SLOW)
        consumed += n
        wire = server.data_to_send()
        credited += window_credit(decode_all(wire), stream_id)
        client.receive_data(wire, SLOW)

        assert received == sent
        assert consumed - credited >= 0 and 2 * (consumed - credited) < initial_window
        assert client.send_window(stream_id) == initial_window - received + credited
        assert received - consumed <= initial_window  # the reader's memory is bounded by its window


def test_acknowledge_received_validates_its_count() -> None:
    pair = MuxPair()
    stream_id = pair.open_stream()
    pair.client.send_data(stream_id, b"12345")
    pair.transfer()
    with pytest.raises(ValueError, match="negative"):
        pair.server.acknowledge_received(stream_id, -1, 0.0)
    with pytest.raises(ValueError, match="only 5"):
        pair.server.acknowledge_received(stream_id, 6, 0.0)
    pair.server.acknowledge_received(stream_id, 0, 0.0)
    pair.server.acknowledge_received(777, 10, 0.0)  # a stream that is gone: nothing to credit
    assert pair.server.data_to_send() == b""


def test_has_data_to_send_tells_whether_a_flush_would_write_anything() -> None:
    pair = MuxPair()
    stream_id = pair.open_stream()
    pair.transfer()
    assert not pair.client.has_data_to_send
    pair.client.send_data(stream_id, b"x" * 1000)
    assert pair.client.has_data_to_send
    pair.transfer()
    assert not pair.client.has_data_to_send
    pair.server.acknowledge_received(stream_id, 1000, 0.0)  # far below half the window: credit waits
    assert not pair.server.has_data_to_send
    half = MuxConfig().initial_window // 2
    pair.client.send_data(stream_id, b"y" * half)
    pair.transfer()
    pair.server.acknowledge_received(stream_id, half, 0.0)
    assert pair.server.has_data_to_send


def test_no_credit_is_returned_after_the_peer_finished_sending() -> None:
    pair = MuxPair()
    stream_id = pair.open_stream()
    pair.client.send_data(stream_id, b"x" * WINDOW, end_stream=True)
    pair.transfer()
    pair.server.acknowledge_received(stream_id, WINDOW, 0.0)
    assert pair.server.data_to_send() == b""


def test_larger_initial_window_is_announced_in_syn_and_ack() -> None:
    config = MuxConfig(initial_window=1 * MiB)
    pair = MuxPair(config)
    stream_id = pair.client.open_stream()
    syn = Frame(FrameType.WINDOW_UPDATE, Flag.SYN | Flag.GROW, stream_id, 1 * MiB - WINDOW)
    assert decode_all(pair.client.data_to_send()) == [syn]
    pair.server.receive_data(syn.encode(), 0.0)
    pair.server.accept_stream(stream_id)
    assert pair.server.send_window(stream_id) == 1 * MiB
    ack = pair.server.data_to_send()
    assert decode_all(ack) == [Frame(FrameType.WINDOW_UPDATE, Flag.ACK | Flag.GROW, stream_id, 1 * MiB - WINDOW)]
    assert pair.client.send_window(stream_id) == WINDOW, "before the ACK only the base window is usable"
    pair.client.receive_data(ack, 0.0)
    assert pair.client.send_window(stream_id) == 1 * MiB


def test_mismatched_initial_windows_interoperate() -> None:
    pair = MuxPair(MuxConfig(initial_window=WINDOW), MuxConfig(initial_window=3 * WINDOW))
    stream_id = pair.open_stream()
    assert pair.client.send_window(stream_id) == 3 * WINDOW
    assert pair.server.send_window(stream_id) == WINDOW


# ---------------------------------------------------------------------------- link flow control

LINK = INITIAL_LINK_WINDOW
"""A link window at the protocol's base: no announcement, and four fresh streams' windows fill it."""
LINK_ONLY = MuxConfig(link_window=LINK)


def test_a_larger_link_window_is_announced_as_the_link_starts() -> None:
    assert Mux(Role.CLIENT, LINK_ONLY).data_to_send() == b""
    started(Role.SERVER, MuxConfig(link_window=5 * MiB))
    pair = MuxPair(MuxConfig(link_window=3 * MiB), MuxConfig(link_window=7 * MiB))
    assert (pair.client.link_send_window, pair.server.link_send_window) == (7 * MiB, 3 * MiB)


def streams_filling_the_link(pair: MuxPair, count: int) -> list[int]:
    """Open `count` streams from the client; each tries to send one stream window, in order."""
    ids = [pair.open_stream() for _ in range(count)]
    for stream_id in ids:
        pair.client.send_data(stream_id, b"x" * WINDOW)
    return ids


def test_the_link_window_bounds_all_streams_together() -> None:
    pair = MuxPair(LINK_ONLY)
    client = pair.client
    ids = streams_filling_the_link(pair, 6)
    assert [client.send_window(s) for s in ids] == [0] * 6
    assert client.link_send_window == 0
    _, server_events = pair.transfer()
    assert received_bytes(server_events) == LINK  # four whole windows; streams 5 and 6 sent nothing
    assert {e.stream_id for e in server_events if isinstance(e, DataReceived)} == set(ids[:4])
    assert client.send_data(ids[5], b"more") == 0


def test_streams_held_up_by_the_link_are_woken_in_order_as_credit_returns() -> None:
    pair = MuxPair(LINK_ONLY)
    client, server = pair.client, pair.server
    ids = streams_filling_the_link(pair, 8)  # 1-4 filled the link, 5-8 wait for it
    pair.transfer()

    def woken_waiters(events: list) -> list[int]:
        return [e.stream_id for e in events if isinstance(e, WindowUpdated) and e.stream_id in ids[4:]]

    server.acknowledge_received(ids[0], WINDOW, SLOW)
    events, _ = pair.transfer(SLOW)
    assert woken_waiters(events) == [ids[4]], "256 KiB of link credit serves one stream waiting to send 256 KiB"
    assert client.send_data(ids[4], b"x" * WINDOW) == WINDOW
    assert client.link_send_window == 0
    for stream_id in ids[1:3]:
        server.acknowledge_received(stream_id, WINDOW, SLOW)
    events, _ = pair.transfer(SLOW)
    assert woken_waiters(events) == [ids[5], ids[6]], "first held up, first served"
    assert client.send_data(ids[7], b"x") == 0, "the credit is set aside for the streams woken"
    for stream_id in ids[5:7]:
        assert client.send_data(stream_id, b"x" * WINDOW) == WINDOW
    server.acknowledge_received(ids[3], WINDOW, SLOW)
    events, _ = pair.transfer(SLOW)
    assert woken_waiters(events) == [ids[7]]


KEEPS_MORE = MuxConfig(link_window=2 * LINK)
"""A client whose own link window (which also bounds what it keeps to send again, see proto/resume.py) is
larger than the server's: the bare link credits below, with no stream credit, are all that holds it up."""


def test_a_credit_of_a_few_bytes_wakes_one_stream_not_all_of_them() -> None:
    pair = MuxPair(KEEPS_MORE, LINK_ONLY)
    client = pair.client
    ids = streams_filling_the_link(pair, 12)
    client.data_to_send()
    assert client.receive_data(f.window_update(0, 3), 0.0) == [WindowUpdated(ids[4])]
    assert client.send_data(ids[4], b"x" * WINDOW) == 3
    assert client.receive_data(f.window_update(0, 10), 0.0) == [WindowUpdated(ids[5])]
    # a stream that used less than it was woken for hands the rest on at the next opportunity
    assert client.send_data(ids[5], b"x" * 4) == 4
    assert client.get_timer() <= 0.0
    assert client.handle_timer(0.0) == [WindowUpdated(ids[6])]


def test_credit_set_aside_for_a_stream_reset_before_it_sent_goes_to_the_next_one() -> None:
    pair = MuxPair(KEEPS_MORE, LINK_ONLY)
    client = pair.client
    ids = streams_filling_the_link(pair, 6)
    client.data_to_send()
    assert client.receive_data(f.window_update(0, WINDOW), 0.0) == [WindowUpdated(ids[4])]
    assert client.get_timer() == MuxConfig().ping_after, "nothing is due while the woken stream may still use its credit"
    client.reset_stream(ids[4])
    assert client.get_timer() <= 0.0, "handle_timer is due at once"
    assert client.handle_timer(0.0) == [WindowUpdated(ids[5])]
    assert client.send_data(ids[5], b"x" * WINDOW) == WINDOW


def test_a_stream_held_up_by_its_own_window_too_is_woken_by_that_window() -> None:
    pair = MuxPair(LINK_ONLY)
    client, server = pair.client, pair.server
    ids = streams_filling_the_link(pair, 5)  # 1-4 used their whole windows, 5 waits for the link only
    pair.transfer()
    client.send_data(ids[0], b"x")  # stream 1 is held up by its own window: the link doesn't queue it
    for stream_id in ids[1:4]:
        server.acknowledge_received(stream_id, WINDOW, SLOW)
    events, _ = pair.transfer(SLOW)
    assert [e for e in events if isinstance(e, WindowUpdated)] == [WindowUpdated(s) for s in ids[1:4]] + [
        WindowUpdated(ids[4])
    ]
    server.acknowledge_received(ids[0], WINDOW, SLOW)
    events, _ = pair.transfer(SLOW)
    assert WindowUpdated(ids[0]) in events


def test_data_past_the_link_window_is_a_protocol_error() -> None:
    server = Mux(Role.SERVER, LINK_ONLY)
    wire = b"".join(f.syn(s) for s in (1, 3, 5, 7, 9))
    wire += b"".join(f.data(s, b"x" * 65536) for s in (1, 3, 5, 7) for _ in range(4))  # exactly the link window
    assert received_bytes(server.receive_data(wire, 0.0)) == LINK
    with pytest.raises(ProtocolError, match="link's receive window of 0"):
        server.receive_data(f.data(9, b"y"), 0.0)
    assert decode_all(server.data_to_send())[-1] == Frame(FrameType.GO_AWAY, Flag(0), 0, GoAwayCode.PROTOCOL_ERROR)


def link_bookkeeping(mux: Mux) -> int:
    """Check the link's receive-side invariant; return what the application still has to consume."""
    unconsumed = sum(stream.unacknowledged for stream in mux._streams.values())
    assert min(mux._link_receive_remaining, mux._link_unannounced, mux._link_send_window) >= 0
    assert mux._link_receive_remaining + unconsumed + mux._link_unannounced == mux.config.link_window
    assert mux._link_reserved == sum(mux._link_woken.values()) >= 0
    assert set(mux._link_waiting) | set(mux._link_woken) <= set(mux._streams)
    return unconsumed


# Every way the relay can end up dropping bytes it received without the application consuming them. Each
# takes the server after the client sent it a full link window on streams 1, 3, 5, 7 (nothing consumed).
DROPS = {
    "peer-resets": lambda pair, ids: pair.server.receive_data(b"".join(f.rst(s) for s in ids), 0.0),
    "we-reset": lambda pair, ids: [pair.server.reset_stream(s) for s in ids],
    "both-ended": lambda pair, ids: [
        [pair.client.end_stream(s) for s in ids],
        pair.server.receive_data(pair.client.data_to_send(), 0.0),
        [pair.server.end_stream(s) for s in ids],
    ],
}


@pytest.mark.parametrize("drop", DROPS.values(), ids=DROPS.keys())
def test_bytes_dropped_unconsumed_return_their_link_credit(drop) -> None:
    pair = MuxPair(LINK_ONLY)
    ids = streams_filling_the_link(pair, 4)
    pair.transfer()
    assert link_bookkeeping(pair.server) == LINK and pair.client.link_send_window == 0
    drop(pair, ids)
    assert link_bookkeeping(pair.server) == 0
    pair.transfer()
    assert pair.client.link_send_window == LINK


CHUNK = b"z" * 60_000
# Nine reads of 60 KB each (over half the link window, so credit must flow back), dropped as they arrive.
DROPPED_ON_ARRIVAL = {
    "stragglers-after-a-reset": [f.syn(1) + f.rst(1)] + [f.data(1, CHUNK)] * 9,
    "payload-on-the-rst": [f.data(s, CHUNK, Flag.SYN | Flag.RST) for s in range(1, 19, 2)],
    "payload-on-a-refused-syn": [b"".join(f.syn(s) for s in (1, 3, 5, 7)) + f.data(9, CHUNK, Flag.SYN)]
    + [f.data(9, CHUNK)] * 8,
}


@pytest.mark.parametrize("reads", DROPPED_ON_ARRIVAL.values(), ids=DROPPED_ON_ARRIVAL.keys())
def test_bytes_the_mux_drops_on_arrival_return_their_link_credit(reads: list[bytes]) -> None:
    server = Mux(Role.SERVER, MuxConfig(link_window=LINK, accept_backlog=4))
    credit = 0
    for wire in reads:
        assert not any(isinstance(e, DataReceived) for e in server.receive_data(wire, 0.0))
        assert link_bookkeeping(server) == 0
        credit += window_credit(decode_all(server.data_to_send()), 0)
    assert credit + server._link_unannounced == 9 * len(CHUNK)
    assert credit >= LINK // 2


def test_many_quiet_streams_get_their_consumption_confirmed_every_mib() -> None:
    """Pooled conduits carry small requests: each stream owes far less than half its window, so only the link's
    sweep confirms what was consumed, and what the sender keeps for a resend stays near LINK_CONFIRM_EVERY, not
    near half the link window (16 MiB by default)."""
    pair = MuxPair()
    ids = [pair.open_stream(Role.SERVER) for _ in range(64)]
    request = b"r" * 500
    peak = 0
    for _ in range(200):  # 64 streams x 100 KB: each below half its window, 6.4 MB in all
        for stream_id in ids:
            assert pair.server.send_data(stream_id, request) == len(request)
        pair.transfer(SLOW, acknowledge=True)
        peak = max(peak, pair.server.retransmit_size)
    assert peak < LINK_CONFIRM_EVERY + 64 * len(request) < 2 * MiB  # without the sweep: all 6.4 MB
    assert pair.server.retransmit_size < LINK_CONFIRM_EVERY
    assert all(pair.server.send_window(stream_id) > WINDOW // 2 for stream_id in ids)


def test_owed_link_credit_goes_out_when_slow_streams_hold_the_rest() -> None:
    pair = MuxPair(LINK_ONLY)
    client, server = pair.client, pair.server
    ids = streams_filling_the_link(pair, 4)
    pair.transfer()  # the server holds a whole link window, unconsumed

    def link_credit() -> int:
        wire = server.data_to_send()
        client.receive_data(wire, SLOW)
        return window_credit(decode_all(wire), 0)

    server.acknowledge_received(ids[0], 100 * KiB, SLOW)  # far below half the window, but the peer has nothing
    assert link_credit() == 100 * KiB
    server.acknowledge_received(ids[0], 80 * KiB, SLOW)
    assert link_credit() == 0, "the peer still has 100 KiB to send"
    # what is owed is weighed against what the peer has left as data arrives too, not only as it is consumed
    assert client.send_data(ids[0], b"x" * 100 * KiB) == 100 * KiB
    server.receive_data(client.data_to_send(), SLOW)
    assert link_credit() == 80 * KiB
    server.acknowledge_received(ids[0], 40 * KiB, SLOW)
    assert link_credit() == 0, "never in pieces under 64 KiB"
    assert client.link_send_window == 80 * KiB


def test_link_window_updates_are_checked_like_stream_ones() -> None:
    mux = Mux(Role.SERVER)
    for _ in range(MuxConfig().max_control_frames_per_second):
        mux.receive_data(f.window_update(0, 0), 0.5)  # empty: counted against the flood budget
    with pytest.raises(ProtocolError, match="flood"):
        mux.receive_data(f.window_update(0, 0), 0.5)
    mux = Mux(Role.SERVER)
    with pytest.raises(ProtocolError, match="overflows the link's send window"):
        mux.receive_data(f.window_update(0, MAX_WINDOW_SIZE - INITIAL_LINK_WINDOW + 1), 0.0)


@settings(deadline=None, max_examples=60)
@given(
    sizes=st.lists(st.integers(0, 400 * KiB), min_size=1, max_size=8),
    reads=st.lists(st.integers(16 * KiB, 300 * KiB), min_size=1, max_size=40),
    resets=st.sets(st.integers(0, 7), max_size=3),
)
def test_every_byte_arrives_however_the_link_window_is_shared(sizes: list[int], reads: list[int], resets) -> None:
    """Senders that retry on WindowUpdated (like the glue) and a reader consuming in random bites: whatever
    the link window holds up, every stream not reset gets all its bytes through, and no credit is lost."""
    # the clock stands still at SLOW: keepalive is out of this test's way
    pair = MuxPair(MuxConfig(link_window=LINK, max_window=1 * MiB, keepalive_timeout=10 * SLOW))
    client, server = pair.client, pair.server
    ids = [pair.open_stream() for _ in sizes]
    payloads = {s: bytes([i]) * size for i, (s, size) in enumerate(zip(ids, sizes, strict=True))}
    offsets = dict.fromkeys(ids, 0)
    received = {s: 0 for s in ids}
    unconsumed: list[tuple[int, int]] = []
    doomed = {ids[i] for i in resets if i < len(ids)}

    def try_send(stream_id: int) -> None:
        if stream_id in offsets and offsets[stream_id] < len(payloads[stream_id]):
            offsets[stream_id] += client.send_data(stream_id, payloads[stream_id][offsets[stream_id] :])

    for stream_id in ids:
        try_send(stream_id)
    for step in range(1000):
        for event in server.receive_data(client.data_to_send(), SLOW):
            if isinstance(event, DataReceived):
                received[event.stream_id] += len(event.data)
                unconsumed.append((event.stream_id, len(event.data)))
        bite = reads[step % len(reads)]
        while unconsumed and bite:
            stream_id, n = unconsumed.pop(0)
            server.acknowledge_received(stream_id, min(n, bite), SLOW)
            if n > bite:
                unconsumed.insert(0, (stream_id, n - bite))
            bite = max(0, bite - n)
        events = client.receive_data(server.data_to_send(), SLOW)
        if client.get_timer() <= SLOW:
            events += client.handle_timer(SLOW)
        for event in events:
            if isinstance(event, WindowUpdated):
                if event.stream_id in doomed:  # reset by the application instead of sending (a visitor left)
                    client.reset_stream(event.stream_id)
                    offsets.pop(event.stream_id, None)
                else:
                    try_send(event.stream_id)
        link_bookkeeping(client)
        link_bookkeeping(server)
        if all(received[s] == len(payloads[s]) for s in offsets) and not unconsumed:
            break
    else:
        pytest.fail(f"stalled: {received} of {[len(p) for p in payloads.values()]}")
    pair.transfer(SLOW, acknowledge=True)
    # nothing is lost: what the sender may send is the window less what the reader has yet to credit back
    assert client.link_send_window == LINK - link_bookkeeping(server) - server._link_unannounced


# ---------------------------------------------------------------------------- window growth


def fill_and_consume(pair: MuxPair, stream_id: int, times: list[float]) -> int:
    """Send one full window client→server and consume it in len(times) equal parts; return credit granted."""
    client, server = pair.client, pair.server
    window = client.send_window(stream_id)
    assert client.send_data(stream_id, b"x" * window) == window
    assert received_bytes(server.receive_data(client.data_to_send(), times[0])) == window
    parts = [window // len(times)] * len(times)
    parts[-1] += window - sum(parts)
    credit = 0
    for part, now in zip(parts, times, strict=True):
        server.acknowledge_received(stream_id, part, now)
        wire = server.data_to_send()
        credit += window_credit(decode_all(wire), stream_id)
        client.receive_data(wire, now)
    return credit


def test_window_doubles_when_half_a_window_is_consumed_within_two_rtts() -> None:
    pair = MuxPair(MuxConfig(max_window=1 * MiB))
    stream_id = pair.open_stream(now=0.0)
    # the first half's credit plus the growth; the second half's credit is owed (below half the new window)
    assert fill_and_consume(pair, stream_id, [0.05, 0.1]) == WINDOW // 2 + WINDOW
    assert pair.server._streams[stream_id].receive_window == 2 * WINDOW
    assert pair.client.send_window(stream_id) == WINDOW + WINDOW // 2


def test_window_stays_when_the_reader_is_slow() -> None:
    pair = MuxPair(MuxConfig(max_window=1 * MiB))
    stream_id = pair.open_stream(now=0.0)
    slow = GROWTH_ROUND_TRIPS * ASSUMED_RTT + 0.01  # each half takes longer than the round trips allowed
    assert fill_and_consume(pair, stream_id, [slow, 2 * slow]) == WINDOW
    assert pair.client.send_window(stream_id) == WINDOW


def test_window_growth_stops_at_max_window() -> None:
    pair = MuxPair(MuxConfig(max_window=3 * WINDOW))
    stream_id = pair.open_stream(now=0.0)
    windows = []
    for epoch in range(4):
        now = epoch * 0.01
        fill_and_consume(pair, stream_id, [now, now])
        windows.append(pair.server._streams[stream_id].receive_window)
    assert windows == [2 * WINDOW, 3 * WINDOW, 3 * WINDOW, 3 * WINDOW]


@pytest.mark.parametrize(("measured_rtt", "grows"), [(None, False), (1.0, True)])
def test_window_growth_uses_the_measured_rtt(measured_rtt: float | None, grows: bool) -> None:
    pair = MuxPair(MuxConfig(max_window=1 * MiB))
    stream_id = pair.open_stream(now=0.0)
    if measured_rtt is not None:
        pair.server.ping(0.0)
        pair.transfer(now=measured_rtt)
        assert pair.server.last_rtt == measured_rtt
    fill_and_consume(pair, stream_id, [1.5])  # a full window consumed at once, 1.5 s after the open
    assert pair.client.send_window(stream_id) == (2 * WINDOW if grows else WINDOW)


def test_window_growth_stops_at_half_the_link_window() -> None:
    """Streams that read fast and then stall (a paused video) keep their grown windows: together they may hold
    only half the link window above the base, the rest stays for every other stream."""
    pair = MuxPair(MuxConfig(max_window=1 * MiB, link_window=2 * MiB))
    first, second = pair.open_stream(), pair.open_stream()

    def grow(stream_id: int) -> int:
        for epoch in range(3):
            fill_and_consume(pair, stream_id, [epoch * 0.01] * 2)
        return pair.server._streams[stream_id].receive_window

    assert grow(first) == 1 * MiB  # 768 KiB above the base
    assert grow(second) == 2 * WINDOW  # only 256 KiB of the 1 MiB budget was left
    assert pair.server._link_growth == 1 * MiB
    pair.client.reset_stream(first)
    pair.transfer()
    assert grow(second) == 1 * MiB


def test_growth_on_a_stream_we_opened_is_timed_from_the_peers_accept() -> None:
    pair = MuxPair(MuxConfig(max_window=1 * MiB))
    client, server = pair.client, pair.server
    stream_id = client.open_stream()
    pair.transfer(now=0.0)
    server.accept_stream(stream_id)
    pair.transfer(now=5.0)  # the ACK arrives late; the epoch starts there, not at the open
    server.send_data(stream_id, b"y" * WINDOW)
    client.receive_data(server.data_to_send(), 5.0)
    client.acknowledge_received(stream_id, WINDOW, 5.1)
    server.receive_data(client.data_to_send(), 5.1)
    assert server.send_window(stream_id) == 2 * WINDOW


# ---------------------------------------------------------------------------- many streams


def test_a_thousand_interleaved_streams_arrive_intact() -> None:
    rng = random.Random(20261125)
    pair = MuxPair()
    client, server = pair.client, pair.server
    requests: dict[int, bytes] = {}
    responses: dict[int, bytes] = {}
    unsent = {client: {}, server: {}}  # mux -> stream id -> offset of the first byte not yet accepted
    received = {client: defaultdict(list), server: defaultdict(list)}
    ended = {client: set(), server: set()}
    to_open = 1000

    def pump(mux: Mux, payloads: dict[int, bytes]) -> None:
        pending = unsent[mux]
        for stream_id in rng.sample(sorted(pending), len(pending)):
            data, offset = payloads[stream_id], pending[stream_id]
            end = min(len(data), offset + rng.randrange(1, 20_000))
            accepted = mux.send_data(stream_id, data[offset:end], end_stream=end == len(data))
            if offset + accepted == len(data) and end == len(data):
                del pending[stream_id]
            else:
                pending[stream_id] = offset + accepted

    def deliver(receiver: Mux, data: bytes) -> None:
        for event in receiver.receive_data(data, 0.0):
            if isinstance(event, StreamOpened):
                receiver.accept_stream(event.stream_id)
                responses[event.stream_id] = rng.randbytes(rng.randrange(0, 30_000))
                unsent[receiver][event.stream_id] = 0
            elif isinstance(event, DataReceived):
                received[receiver][event.stream_id].append(event.data)
                receiver.acknowledge_received(event.stream_id, len(event.data), 0.0)
            elif isinstance(event, StreamEnded):
                ended[receiver].add(event.stream_id)
            else:
                assert isinstance(event, (StreamAccepted, WindowUpdated)), event

    for _ in range(1000):
        for _ in range(min(100, to_open)):  # waves of opens, so the accept backlog never overflows
            stream_id = client.open_stream()
            requests[stream_id] = rng.randbytes(rng.randrange(0, 40_000))
            unsent[client][stream_id] = 0
            to_open -= 1
        pump(client, requests)
        pump(server, responses)
        to_server = client.data_to_send()
        deliver(server, to_server)
        to_client = server.data_to_send()
        deliver(client, to_client)
        if not (to_open or unsent[client] or unsent[server] or to_server or to_client):
            break
    else:
        pytest.fail("streams never finished")

    assert len(requests) == len(responses) == 1000
    for stream_id in requests:
        assert sha256(*received[server][stream_id]) == sha256(requests[stream_id])
        assert sha256(*received[client][stream_id]) == sha256(responses[stream_id])
    assert ended[server] == ended[client] == set(requests)
    assert client.stream_count == server.stream_count == 0


# ---------------------------------------------------------------------------- reset


@pytest.mark.parametrize("resetter", [Role.CLIENT, Role.SERVER])
def test_reset_mid_transfer(resetter: Role) -> None:
    pair = MuxPair()
    stream_id = pair.open_stream()
    a = pair.side(resetter)
    b = pair.peer(a)
    a.send_data(stream_id, b"a" * 100_000)
    b.send_data(stream_id, b"b" * 100_000)
    assert settle(pair, a)[0][0] == DataReceived(stream_id, b"b" * 65536)

    a.reset_stream(stream_id)
    assert a.stream_count == 0
    b.send_data(stream_id, b"in flight")  # crosses the RST on the wire
    straggler = b.data_to_send()
    assert b.receive_data(a.data_to_send(), 0.0) == [StreamReset(stream_id)]
    assert a.receive_data(straggler, 0.0) == [], "late data for a reset stream is dropped silently"
    assert not a.is_closed

    with pytest.raises(KeyError):
        b.send_data(stream_id, b"x")
    assert b.send_window(stream_id) == 0
    b.reset_stream(stream_id)  # resets cross; the second one is a no-op
    b.acknowledge_received(stream_id, 1, 0.0)
    assert b.data_to_send() == b""

    other = pair.open_stream()
    a.send_data(other, b"still fine")
    assert settle(pair, a)[1] == [DataReceived(other, b"still fine")]


def test_refusing_a_stream_resets_it_for_the_opener() -> None:
    pair = MuxPair()
    stream_id = pair.client.open_stream()
    pair.transfer()
    pair.server.reset_stream(stream_id)
    client_events, _ = pair.transfer()
    assert client_events == [StreamReset(stream_id)]
    assert pair.server.stream_count == pair.client.stream_count == 0
    with pytest.raises(KeyError):
        pair.server.accept_stream(stream_id)


def test_stragglers_for_forgotten_streams_are_dropped() -> None:
    server = Mux(Role.SERVER)
    server.receive_data(f.syn(1) + f.syn(3), 0.0)
    server.reset_stream(1)
    local = server.open_stream()
    server.reset_stream(local)
    late = (
        f.data(1, b"late")
        + f.window_update(1, 100)
        + f.fin(1)
        + f.rst(1)
        + f.data(1)
        + f.ack(local, 10)
        + f.data(local, b"x")
    )
    assert server.receive_data(late, 0.0) == []
    assert not server.is_closed
    assert server.stream_count == 1


# ---------------------------------------------------------------------------- go-away


def test_go_away_refuses_new_streams_and_lets_existing_ones_drain() -> None:
    pair = MuxPair()
    client, server = pair.client, pair.server
    stream_id = pair.open_stream()
    client.send_data(stream_id, b"request")
    pair.transfer()
    server.go_away()
    assert pair.transfer() == ([GoAwayReceived(GoAwayCode.NORMAL)], [])
    for mux in (client, server):
        with pytest.raises(MuxClosedError):
            mux.open_stream()

    server.send_data(stream_id, b"response", end_stream=True)
    client.end_stream(stream_id)
    assert pair.transfer() == ([DataReceived(stream_id, b"response"), StreamEnded(stream_id)], [StreamEnded(stream_id)])
    assert client.stream_count == server.stream_count == 0
    assert not client.is_closed and not server.is_closed

    # A peer that opens anyway after reading the other side's GO_AWAY is refused.
    assert client.receive_data(f.syn(2), 0.0) == []
    assert decode_all(client.data_to_send()) == [Frame(FrameType.WINDOW_UPDATE, Flag.RST, 2, 0)]


def test_a_stream_that_crossed_our_go_away_is_served_and_none_after_the_peers() -> None:
    """The relay opens a stream for a visitor just as the agent (registered on another node) says GO_AWAY: the
    relay has not read it yet and counts on that stream, so the agent serves it rather than refuse it (the
    visitor would get a 502 for a request nobody saw). Once the relay has said GO_AWAY too, nothing of its can
    still be on its way, and a stream opened anyway is refused."""
    pair = MuxPair()
    agent, relay = pair.client, pair.server
    stream_id = relay.open_stream()
    relay.send_data(stream_id, b"GET / HTTP/1.1")
    agent.go_away()
    agent_events, relay_events = pair.transfer()  # both were on the wire at once: they crossed
    assert agent_events == [StreamOpened(stream_id), DataReceived(stream_id, b"GET / HTTP/1.1")]
    assert relay_events == [GoAwayReceived(GoAwayCode.NORMAL)]
    agent.accept_stream(stream_id)
    agent.send_data(stream_id, b"HTTP/1.1 200 OK", end_stream=True)
    relay.go_away()
    agent_events, relay_events = pair.transfer()
    assert relay_events == [StreamAccepted(stream_id), DataReceived(stream_id, b"HTTP/1.1 200 OK"),
                            StreamEnded(stream_id)]
    assert agent_events == [GoAwayReceived(GoAwayCode.NORMAL)]
    assert agent.receive_data(f.syn(stream_id + 2), 0.0) == []
    assert decode_all(agent.data_to_send()) == [Frame(FrameType.WINDOW_UPDATE, Flag.RST, stream_id + 2, 0)]


def test_go_away_is_sent_once_and_checks_its_code() -> None:
    mux = started(Role.SERVER)
    with pytest.raises(ValueError):
        mux.go_away(7)
    mux.go_away(GoAwayCode.INTERNAL_ERROR)
    mux.go_away()
    assert decode_all(mux.data_to_send()) == [Frame(FrameType.GO_AWAY, Flag(0), 0, GoAwayCode.INTERNAL_ERROR)]


def test_go_away_code_is_reported() -> None:
    assert Mux(Role.CLIENT).receive_data(f.go_away(2), 0.0) == [GoAwayReceived(2)]


# ---------------------------------------------------------------------------- move


def test_move_names_another_node_and_the_link_carries_on_until_the_agent_goes_away() -> None:
    pair = MuxPair()
    client, server = pair.client, pair.server
    stream_id = pair.open_stream()
    server.move("10.0.0.2:8000")
    assert pair.transfer() == ([MoveRequested("10.0.0.2:8000")], [])
    # both ways as before: the stream in flight, and new streams the relay opens while the agent moves
    server.send_data(stream_id, b"response", end_stream=True)
    assert pair.transfer()[0] == [DataReceived(stream_id, b"response"), StreamEnded(stream_id)]
    assert pair.open_stream(Role.SERVER) % 2 == 0
    client.go_away()  # the agent registered at the other node: no new streams here
    assert pair.transfer() == ([], [GoAwayReceived(GoAwayCode.NORMAL)])
    server.move("10.0.0.3:8000")  # too late: nobody to move
    assert server.data_to_send() == b""


def test_only_the_relay_sends_move_and_an_address_must_fit() -> None:
    with pytest.raises(ValueError, match="only the relay"):
        started(Role.CLIENT).move("10.0.0.2:8000")
    for address in ("", "x" * 256):
        with pytest.raises(ValueError, match="MOVE address"):
            started(Role.SERVER).move(address)
    relay = started(Role.SERVER)
    wire = FrameFactory.header(FrameType.MOVE, 0, 0, 4) + b"a:80"
    with pytest.raises(ProtocolError, match="only a relay"):
        relay.receive_data(wire, 0.0)
    agent = started(Role.CLIENT)
    with pytest.raises(ProtocolError, match="not ASCII"):
        agent.receive_data(FrameFactory.header(FrameType.MOVE, 0, 0, 2) + "é".encode(), 0.0)


# ---------------------------------------------------------------------------- limits


def test_backlog_full_refuses_with_rst_and_no_event() -> None:
    pair = MuxPair(MuxConfig(accept_backlog=2))
    client, server = pair.client, pair.server
    ids = [client.open_stream() for _ in range(3)]
    client_events, server_events = pair.transfer()
    assert server_events == [StreamOpened(ids[0]), StreamOpened(ids[1])]
    assert client_events == [StreamReset(ids[2])]
    assert server.stream_count == 2

    server.accept_stream(ids[0])  # frees a backlog slot
    again = client.open_stream()
    client_events, server_events = pair.transfer()
    assert client_events == [StreamAccepted(ids[0])]
    assert server_events == [StreamOpened(again)]


def test_streams_reset_before_acceptance_free_their_backlog_slot() -> None:
    pair = MuxPair(MuxConfig(accept_backlog=1))
    first = pair.client.open_stream()
    pair.transfer()
    pair.client.reset_stream(first)
    second = pair.client.open_stream()
    assert pair.transfer()[1] == [StreamReset(first), StreamOpened(second)]


def test_max_streams_refuses_with_rst() -> None:
    pair = MuxPair(MuxConfig(max_streams=3))
    client, server = pair.client, pair.server
    pair.open_stream(Role.CLIENT)
    pair.open_stream(Role.CLIENT)
    pair.open_stream(Role.SERVER)  # streams in either direction count
    refused = client.open_stream()
    client_events, server_events = pair.transfer()
    assert server_events == []
    assert client_events == [StreamReset(refused)]
    assert server.stream_count == 3


def test_stream_ids_run_out_cleanly() -> None:
    client = Mux(Role.CLIENT)
    client._next_local_id = MAX_STREAM_ID  # no public way to burn 2**31 ids in a test
    assert client.open_stream() == MAX_STREAM_ID
    with pytest.raises(MuxClosedError, match="exhausted"):
        client.open_stream()


# ---------------------------------------------------------------------------- keepalive


def test_keepalive_pings_a_quiet_peer_and_measures_rtt() -> None:
    pair = MuxPair(now=100.0)
    client, server = pair.client, pair.server
    ping_at = 100.0 + 10.0 / 3
    assert client.get_timer() == ping_at, "quiet for a third of keepalive_timeout: ping"
    assert client.handle_timer(ping_at - 0.01) == []
    assert client.data_to_send() == b""
    assert client.handle_timer(ping_at) == []
    (ping,) = decode_all(client.data_to_send())
    assert (ping.type, ping.flags, ping.stream_id) == (FrameType.PING, Flag.SYN, 0)
    assert client.get_timer() == 110.0, "after the ping, the next deadline is the silence bound itself"
    assert client.handle_timer(ping_at + 1) == [] and client.data_to_send() == b"", "one ping per silence"

    assert server.receive_data(ping.encode(), 104.0) == []
    answer = server.data_to_send()
    assert decode_all(answer) == [Frame(FrameType.PING, Flag.ACK, 0, ping.length)]
    assert client.receive_data(answer, 104.25) == [PingAcked(104.25 - ping_at)]
    assert client.last_rtt == 104.25 - ping_at
    assert client.get_timer() == 104.25 + 10.0 / 3, "anything received restarts the idle clock"


def test_keepalive_timeout_bounds_the_silence_from_the_peers_last_word() -> None:
    """The link dies keepalive_timeout after the peer was last heard: the bound a black-holed link or a frozen
    peer is noticed within, whenever our ping went out (here with streams that may not outlive the link)."""
    client = started(Role.CLIENT, now=0.0, config=MuxConfig(resume_window=0))
    client.handle_timer(10.0 / 3)
    ping_only = client.data_to_send()
    assert client.handle_timer(9.99) == []
    (event,) = client.handle_timer(10.0)
    assert isinstance(event, ConnectionTerminated)
    assert event.code == GoAwayCode.INTERNAL_ERROR and "keepalive timeout" in event.reason
    assert "nothing heard from the peer for 10s" in event.reason
    assert client.is_closed
    assert client.get_timer() is None
    assert client.handle_timer(100.0) == []
    assert [fr.type for fr in decode_all(ping_only)] == [FrameType.PING]
    assert client.data_to_send() == b"", "a dead peer is sent no GO_AWAY"


def test_a_late_timer_still_declares_the_link_dead_without_pinging_first() -> None:
    """A process that was descheduled (or frozen itself) past the whole bound does not grant the peer another
    round: silence is measured from the peer's last word, not from our ping."""
    client = started(Role.CLIENT, now=0.0)
    (event,) = client.handle_timer(25.0)
    assert isinstance(event, LinkLost) and "nothing heard from the peer for 10s" in event.reason
    assert client.data_to_send() == b""


def test_sending_does_not_keep_a_silent_link_alive() -> None:
    """Only what the peer says counts: a relay writing a request into a black hole learns nothing from it."""
    pair = MuxPair(now=0.0)
    client = pair.client
    stream_id = client.open_stream()
    client.send_data(stream_id, b"GET / HTTP/1.1\r\n\r\n")
    client.data_to_send()
    assert client.handle_timer(5.0) == []  # pings
    client.send_data(stream_id, b"more")
    assert client.get_timer() == 10.0
    (event,) = client.handle_timer(10.0)
    assert isinstance(event, LinkLost)  # the open stream is parked for a new link


def test_a_peer_that_answers_every_ping_keeps_an_idle_link_forever() -> None:
    pair = MuxPair(now=0.0)
    now = 0.0
    for _ in range(50):
        now = pair.client.get_timer()
        assert pair.client.handle_timer(now) == []
        assert pair.server.handle_timer(now) == []
        pair.transfer(now=now + 0.05)
    assert not pair.client.is_closed and not pair.server.is_closed
    assert now > 100.0


def test_an_explicit_keepalive_interval_sets_when_the_ping_goes_out() -> None:
    config = MuxConfig(keepalive_interval=1.0, keepalive_timeout=4.0)
    mux = Mux(Role.SERVER, config, now=0.0)
    mux.data_to_send()
    assert mux.get_timer() == 1.0
    mux.handle_timer(1.0)
    assert [fr.type for fr in decode_all(mux.data_to_send())] == [FrameType.PING]
    assert mux.get_timer() == 4.0


def test_explicit_ping_reports_rtt_and_unknown_answers_are_ignored() -> None:
    pair = MuxPair()
    assert pair.client.last_rtt is None
    pair.client.ping(5.0)
    client_events, _ = pair.transfer(now=5.25)
    assert client_events == [PingAcked(0.25)]
    assert pair.client.receive_data(f.ping(12345, Flag.ACK), 6.0) == []
    assert pair.client.last_rtt == 0.25


# ---------------------------------------------------------------------------- closed mux


def test_a_closed_mux_refuses_work_but_tolerates_cleanup() -> None:
    mux = started(Role.SERVER)
    mux.receive_data(f.syn(1), 0.0)
    with pytest.raises(ProtocolError):
        mux.receive_data(f.header(FrameType.DATA, 0, 1, 0, version=7), 0.0)
    assert mux.is_closed and mux.stream_count == 0
    assert mux.receive_data(f.ping(1), 0.0) == []
    refused = [
        mux.open_stream,
        lambda: mux.accept_stream(1),
        lambda: mux.send_data(1, b"x"),
        lambda: mux.end_stream(1),
        lambda: mux.ping(0.0),
    ]
    for call in refused:
        with pytest.raises(MuxClosedError):
            call()
    mux.reset_stream(1)
    mux.go_away()
    mux.acknowledge_received(1, 1, 0.0)
    assert mux.send_window(1) == 0
    assert mux.handle_timer(1e9) == [] and mux.get_timer() is None
    assert decode_all(mux.data_to_send()) == [Frame(FrameType.GO_AWAY, Flag(0), 0, GoAwayCode.PROTOCOL_ERROR)]


# ---------------------------------------------------------------------------- hostile peers


def victim() -> Mux:
    """A relay with stream 1 opened by the peer and accepted, and stream 2 opened by us but not yet accepted."""
    server = Mux(Role.SERVER)
    server.receive_data(f.syn(1), 0.0)
    server.accept_stream(1)
    assert server.open_stream() == 2
    server.data_to_send()
    return server


HOSTILE = {
    "malformed-frame": f.header(FrameType.DATA, 0, 1, 0, version=0),
    "data-beyond-window": b"".join(f.data(1, b"x" * 65536) for _ in range(5)),
    "window-overflow": f.window_update(1, MAX_WINDOW_SIZE),
    "syn-with-our-parity": f.syn(4),
    "syn-reusing-an-id": f.syn(1),
    "syn-ids-going-down": f.syn(7) + f.syn(5),
    "syn-window-overflow": f.syn(3, MAX_WINDOW_SIZE),
    "unopened-remote-id": f.data(9, b"x"),
    "unopened-local-id": f.window_update(4, 10),
    "data-after-fin": f.fin(1) + f.data(1, b"x"),
    "empty-data-after-fin": f.fin(1) + f.data(1),
    "second-fin": f.fin(1) + f.fin(1),
    "ack-for-a-stream-they-opened": f.ack(1),
    "second-ack": f.ack(2) + f.ack(2),
    "data-before-ack": f.data(2, b"x"),
    "fin-before-ack": f.fin(2),
    "syn-and-ack-together": f.window_update(3, 0, Flag.SYN | Flag.ACK),
    "ping-flood": f.ping(1) * 2001,
    "go-away-flood": f.go_away() * 2001,
    "empty-frame-flood": f.data(1) * 2001,
    "rst-then-updates-flood": f.rst(1) + f.window_update(1, 1) * 2000,
    "open-reset-flood": b"".join(f.syn(i) + f.rst(i) for i in range(3, 4006, 2)),
}


@pytest.mark.parametrize("attack", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_input_raises_protocol_error_and_queues_go_away(attack: bytes) -> None:
    server = victim()
    with pytest.raises(ProtocolError) as raised:
        server.receive_data(attack, 0.0)
    assert raised.value.code == GoAwayCode.PROTOCOL_ERROR
    assert server.is_closed
    assert decode_all(server.data_to_send())[-1] == Frame(FrameType.GO_AWAY, Flag(0), 0, GoAwayCode.PROTOCOL_ERROR)


def test_control_budget_refills_every_second() -> None:
    server = victim()
    for second in range(5):
        server.receive_data(f.ping(second) * 2000, float(second))
    assert not server.is_closed


# ---------------------------------------------------------------------------- property tests

stream_frames = st.builds(
    lambda frame_type, flags, stream_id, body: (
        FrameFactory.header(frame_type, flags, stream_id, len(body)) + body
        if frame_type is FrameType.DATA
        else FrameFactory.header(frame_type, flags, stream_id, len(body) * 4096)
    ),
    st.sampled_from([FrameType.DATA, FrameType.WINDOW_UPDATE]),
    st.integers(0, 15),
    st.integers(0, 12),  # stream 0: the link's WINDOW_UPDATE (or a malformed frame)
    st.binary(max_size=300),
)
session_frames = st.one_of(
    st.builds(f.ping, st.integers(0, 3), st.sampled_from([Flag.SYN, Flag.ACK])),
    st.builds(f.go_away, st.sampled_from(list(GoAwayCode))),
)


def check_window_bookkeeping(mux: Mux) -> None:
    for stream in mux._streams.values():
        owed = stream.unannounced + stream.unannounced_growth
        assert min(stream.receive_remaining, stream.unacknowledged, stream.unannounced, stream.unannounced_growth,
                   stream.send_window) >= 0
        assert stream.receive_remaining + stream.unacknowledged + owed == stream.receive_window
        assert len(stream.retransmit) <= stream.retransmit.end
        assert stream.receive_window <= mux.config.max_window
        assert stream.send_window <= MAX_WINDOW_SIZE
    link_bookkeeping(mux)
    assert mux._link_reserved <= mux._link_send_window <= MAX_WINDOW_SIZE
    kept = [*mux._streams.values(), *mux._retained.values()]
    assert mux.retransmit_size == sum(len(stream.retransmit) for stream in kept) <= mux.config.link_window
    assert mux._link_growth == sum(stream.receive_window - WINDOW for stream in mux._streams.values())


@settings(deadline=None)
@given(st.lists(stream_frames | session_frames, max_size=40), st.data())
def test_random_well_formed_frames_yield_only_events_or_protocol_error(frames: list[bytes], data) -> None:
    config = MuxConfig(
        accept_backlog=3, max_streams=5, max_control_frames_per_second=15, max_window=1 * MiB, link_window=LINK
    )
    server = Mux(Role.SERVER, config)
    server.open_stream()
    server.open_stream()
    now = 0.0
    for wire in frames:
        now += data.draw(st.sampled_from([0.0, 0.01, 0.5]))
        try:
            events = server.receive_data(wire, now)
        except ProtocolError:
            assert server.is_closed
            assert decode_all(server.data_to_send())[-1].type is FrameType.GO_AWAY
            return
        assert all(isinstance(event, EVENT_TYPES) for event in events)
        reset = {event.stream_id for event in events if isinstance(event, StreamReset)}  # SYN|RST frames
        for event in events:
            if isinstance(event, DataReceived) and data.draw(st.booleans()):
                server.acknowledge_received(event.stream_id, len(event.data), now)
            elif isinstance(event, StreamOpened) and event.stream_id not in reset and data.draw(st.booleans()):
                server.accept_stream(event.stream_id)
        check_window_bookkeeping(server)
        assert server.stream_count <= config.max_streams
        decode_all(server.data_to_send())  # whatever we answer is well-formed


class HonestPeers(RuleBasedStateMachine):
    """Two muxes driven through random API calls, legal or not, and links cut anywhere and resumed, must never
    see a protocol error.

    Calls the API refuses (KeyError for a stream that is gone, ValueError for one in the wrong state) must
    leave nothing queued, and after every transfer both ends must agree on each stream's window and on the
    link's. The link window is the protocol's base, which two streams' windows fill: streams wait for it.
    """

    server_link_window = LINK

    def __init__(self) -> None:
        super().__init__()
        config = MuxConfig(
            max_frame_size=16 * KiB, initial_window=2 * WINDOW, max_window=1 * MiB, accept_backlog=4, max_streams=8,
            link_window=LINK,
        )
        self.pair = MuxPair(config, dataclasses.replace(config, link_window=self.server_link_window))
        self.now = 0.0
        self.stream_ids: list[int] = []  # every id either side opened; ids are shared by both ends
        self.unconsumed: dict[tuple[Role, int], int] = defaultdict(int)
        self.waiting: dict[Role, list[int]] = {Role.CLIENT: [], Role.SERVER: []}  # opened by the peer

    sides = st.sampled_from([Role.CLIENT, Role.SERVER])
    picks = st.integers(0, 15)
    send_sizes = st.sampled_from([0, 100, 100 * KiB, WINDOW, 2 * WINDOW]) | st.integers(0, 600 * KiB)

    def pick(self, mux: Mux, index: int) -> int:
        """Mostly a stream the mux still has; sometimes any id ever used, to exercise refusals."""
        live = sorted(mux._streams)
        if live and index < 12:
            return live[index % len(live)]
        return self.stream_ids[index % len(self.stream_ids)] if self.stream_ids else 1

    @initialize()
    def open_a_few_streams(self) -> None:
        for opener in (Role.CLIENT, Role.SERVER, Role.CLIENT):
            self.stream_ids.append(self.pair.open_stream(opener))

    def refused_quietly(self, mux: Mux, call) -> None:
        queued = len(mux._outbound)
        try:
            call()
        except (KeyError, ValueError):
            assert len(mux._outbound) == queued, "a refused call queued frames"

    @rule(side=sides)
    def open_stream(self, side: Role) -> None:
        with contextlib.suppress(MuxClosedError):  # after a go-away
            self.stream_ids.append(self.pair.side(side).open_stream())

    @rule(side=sides, index=picks)
    def accept(self, side: Role, index: int) -> None:
        waiting = self.waiting[side]
        if waiting:
            self.pair.side(side).accept_stream(waiting.pop(index % len(waiting)))

    @rule(side=sides, index=picks, size=send_sizes, end=st.booleans())
    def send(self, side: Role, index: int, size: int, end: bool) -> None:
        mux = self.pair.side(side)
        stream_id = self.pick(mux, index)
        window = mux.send_window(stream_id)

        def send() -> None:
            assert mux.send_data(stream_id, b"s" * size, end_stream=end) == min(size, window)

        self.refused_quietly(mux, send)

    @rule(side=sides)
    def burst(self, side: Role) -> None:
        """Every stream of one side sends a lot at once: the link window runs out, streams queue for it."""
        mux = self.pair.side(side)
        for stream_id in sorted(mux._streams):
            window = mux.send_window(stream_id)
            with contextlib.suppress(ValueError):  # a stream that can't send (not accepted yet, or ended)
                assert mux.send_data(stream_id, b"b" * 2 * WINDOW) == min(2 * WINDOW, window)

    @rule(side=sides)
    def woken_streams_send(self, side: Role) -> None:
        """Streams woken by link credit send, as the glue does on WindowUpdated."""
        mux = self.pair.side(side)
        for stream_id in list(mux._link_woken):
            window = mux.send_window(stream_id)
            assert window >= mux._link_woken[stream_id]  # what was set aside for it is there
            assert mux.send_data(stream_id, b"w" * WINDOW) == min(WINDOW, window)

    @rule(side=sides, index=picks)
    def end(self, side: Role, index: int) -> None:
        mux = self.pair.side(side)
        self.refused_quietly(mux, lambda: mux.end_stream(self.pick(mux, index)))

    @rule(side=sides, index=picks)
    def reset(self, side: Role, index: int) -> None:
        mux = self.pair.side(side)
        stream_id = self.pick(mux, index)
        mux.reset_stream(stream_id)
        self.waiting[side] = [s for s in self.waiting[side] if s != stream_id]

    @rule(side=sides, index=picks, share=st.sampled_from([0.25, 0.5, 1.0]))
    def consume(self, side: Role, index: int, share: float) -> None:
        mux = self.pair.side(side)
        stream_id = self.pick(mux, index)
        n = int(self.unconsumed[side, stream_id] * share)
        mux.acknowledge_received(stream_id, n, self.now)
        self.unconsumed[side, stream_id] -= n

    @rule(side=sides)
    def ping(self, side: Role) -> None:
        self.pair.side(side).ping(self.now)

    @precondition(lambda self: len(self.stream_ids) >= 4)  # late, or it would starve most runs of streams
    @rule(side=sides)
    def go_away(self, side: Role) -> None:
        self.pair.side(side).go_away()

    @rule(elapsed=st.sampled_from([0.0, 0.01, 0.3]), eager_readers=st.booleans())
    def transfer(self, elapsed: float, eager_readers: bool) -> None:
        self.now += elapsed
        client_events, server_events = self.pair.transfer(self.now, acknowledge=eager_readers)
        self.record(Role.CLIENT, client_events, eager_readers)
        self.record(Role.SERVER, server_events, eager_readers)
        self.check_agreement()

    @rule(cut=st.tuples(st.floats(0, 1), st.floats(0, 1)),
          exchange_cut=st.none() | st.tuples(st.floats(0, 1), st.floats(0, 1)))
    def cut_and_resume(self, cut: tuple[float, float], exchange_cut: tuple[float, float] | None) -> None:
        """The link dies with part of what was in flight delivered (a frame may be cut in half); both ends
        park and resume on a new link, which may die too during the resume exchange."""
        for fractions in (cut, exchange_cut):
            if fractions is None:
                continue
            for (sender, receiver), fraction in zip(((Role.CLIENT, Role.SERVER), (Role.SERVER, Role.CLIENT)), fractions):
                wire = self.pair.side(sender).data_to_send()
                delivered = wire[: round(len(wire) * fraction)]
                self.record(receiver, self.pair.side(receiver).receive_data(delivered, self.now), False)
            for mux in (self.pair.client, self.pair.server):
                mux.park(self.now)
            for mux in (self.pair.client, self.pair.server):
                mux.resume(self.now)
        self.transfer(0.0, eager_readers=False)

    def record(self, side: Role, events: list, eager_readers: bool) -> None:
        for event in events:
            assert isinstance(event, (*EVENT_TYPES, LinkResumed)), event
            if isinstance(event, StreamOpened):
                self.waiting[side].append(event.stream_id)
            elif isinstance(event, DataReceived) and not eager_readers:
                self.unconsumed[side, event.stream_id] += len(event.data)
            elif isinstance(event, StreamReset):
                self.unconsumed.pop((side, event.stream_id), None)
                self.waiting[side] = [s for s in self.waiting[side] if s != event.stream_id]

    def check_agreement(self) -> None:
        client, server = self.pair.client, self.pair.server
        for sender, receiver in ((client, server), (server, client)):
            for stream_id, stream in sender._streams.items():
                peer_stream = receiver._streams.get(stream_id)
                if peer_stream is not None:
                    assert stream.send_window == peer_stream.receive_remaining
            assert sender.link_send_window == receiver._link_receive_remaining
            # link credit free beyond what woken streams hold has been handed to the streams waiting for it
            assert not sender._link_waiting or sender._sendable_link() <= sender._link_reserved

    @invariant()
    def healthy(self) -> None:
        for mux in (self.pair.client, self.pair.server):
            assert not mux.is_closed
            check_window_bookkeeping(mux)


TestHonestPeers = HonestPeers.TestCase
TestHonestPeers.settings = settings(max_examples=100, stateful_step_count=60, deadline=None)


class HonestPeersOfUnequalWindows(HonestPeers):
    """The same, with a server whose link window is four times the client's: what the client keeps to send again
    is then capped by its own window before the server's credit runs out (proto/resume.py)."""

    server_link_window = 4 * LINK


TestHonestPeersOfUnequalWindows = HonestPeersOfUnequalWindows.TestCase
TestHonestPeersOfUnequalWindows.settings = settings(max_examples=100, stateful_step_count=60, deadline=None)


def test_buffers_to_send_hands_over_the_queued_frames_without_joining():
    client = Mux(Role.CLIENT)
    stream_id = client.open_stream()
    payload = b"x" * 1000
    client.send_data(stream_id, payload)
    buffers = client.buffers_to_send()
    assert len(buffers) >= 3 and b"".join(buffers).endswith(payload)
    assert client.buffers_to_send() == [] and client.data_to_send() == b""


def test_resetting_streams_after_a_full_exchange_is_not_a_flood():
    """A relay trimming its keep-alive pool resets answered streams at request rate; that must not kill the link."""
    f = FrameFactory()
    agent = Mux(Role.CLIENT)
    for stream_id in range(2, 2 + 2 * 3000, 2):
        agent.receive_data(f.syn(stream_id) + f.data(stream_id, b"GET"), 0.5)
        agent.accept_stream(stream_id)
        agent.send_data(stream_id, b"200 OK")
        agent.receive_data(f.rst(stream_id), 0.5)
    assert not agent.is_closed


def test_rapid_reset_of_unanswered_streams_is_still_a_flood():
    f = FrameFactory()
    agent = Mux(Role.CLIENT)
    with pytest.raises(ProtocolError):
        for stream_id in range(2, 2 + 2 * 3000, 2):
            agent.receive_data(f.syn(stream_id) + f.rst(stream_id), 0.5)
