"""Window auto-tuning against the round trip under load: RTT probes, the smoothed RTT, and the bounds growth
keeps (a stream's ``max_window``, half the link window for all streams, the link window for what a relay holds).
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from portway.proto.events import DataReceived, PingAcked
from portway.proto.frame import INITIAL_STREAM_WINDOW, Flag, FrameType
from portway.proto.mux import ASSUMED_RTT, GROWTH_ROUND_TRIPS, RTT_PROBE_INTERVAL, MuxConfig

from .helpers import MuxPair, decode_all

KiB = 1024
MiB = 1024 * KiB
WINDOW = INITIAL_STREAM_WINDOW


def pings_sent(wire: bytes) -> int:
    return sum(1 for f in decode_all(wire) if f.type is FrameType.PING and f.flags & Flag.SYN)


def received(events: list) -> int:
    return sum(len(event.data) for event in events if isinstance(event, DataReceived))


class LoadedLink:
    """An agent (client) sending one stream to a relay (server) as fast as the window allows, over a link whose
    round trip under load is ``loaded_rtt``: the agent's answers to the relay's pings arrive that long after the
    ping, while data and credit move at once (the time data takes is the reader's epoch, set by the test)."""

    def __init__(self, loaded_rtt: float, idle_rtt: float = 0.1) -> None:
        self.pair = MuxPair(MuxConfig(max_window=4 * MiB))
        self.client, self.server = self.pair.client, self.pair.server
        self.loaded_rtt = loaded_rtt
        self.stream_id = self.pair.open_stream()
        self.server.ping(0.0)  # a keepalive ping on the idle link
        self.pair.transfer(now=idle_rtt)
        assert self.server.last_rtt == idle_rtt
        self.now = idle_rtt
        self.answers: list[tuple[float, bytes]] = []  # the agent's ping answers on their way

    def epoch(self, seconds: float) -> int:
        """The agent fills the window; the relay's reader consumes it in two halves over ``seconds``; return
        the relay's receive window afterwards."""
        client, server = self.client, self.server
        window = client.send_window(self.stream_id)
        assert client.send_data(self.stream_id, b"x" * window) == window
        assert received(server.receive_data(client.data_to_send(), self.now)) == window
        for half in (window // 2, window - window // 2):
            self.now += seconds / 2
            self.deliver_answers()
            server.acknowledge_received(self.stream_id, half, self.now)
            client.receive_data(server.data_to_send(), self.now)  # credit (and a probe) reach the agent
            answer = client.data_to_send()
            if answer:
                self.answers.append((self.now + self.loaded_rtt, answer))
        return server._streams[self.stream_id].receive_window

    def deliver_answers(self) -> None:
        due = [(at, wire) for at, wire in self.answers if at <= self.now]
        self.answers = [(at, wire) for at, wire in self.answers if at > self.now]
        for at, wire in due:
            self.server.receive_data(wire, at)


def test_a_window_grows_on_a_link_whose_loaded_round_trip_is_longer_than_its_idle_one() -> None:
    """Idle, the link answers pings in 0.1 s; loaded (queues, losses recovered), in 0.3 s, and a reader
    consuming a window every 0.6 s is held by the window, not by itself. Compared with the idle RTT each half
    window looks slow (0.3 s > 2 x 0.1 s); the probes sent with the credit measure the loaded round trip and
    the window grows."""
    link = LoadedLink(loaded_rtt=0.3)
    windows = [link.epoch(0.6) for _ in range(8)]
    assert GROWTH_ROUND_TRIPS * 0.1 < 0.3 < GROWTH_ROUND_TRIPS * link.server.smoothed_rtt
    assert windows[-1] > WINDOW, windows
    assert windows == sorted(windows)


def test_a_window_stays_when_the_reader_is_slow_even_under_load() -> None:
    link = LoadedLink(loaded_rtt=0.3)
    windows = [link.epoch(2 * GROWTH_ROUND_TRIPS * 0.3 + 0.2) for _ in range(8)]  # each half: 0.7 s > 2 x 0.3 s
    assert windows == [WINDOW] * 8


def test_without_load_the_idle_round_trip_decides() -> None:
    link = LoadedLink(loaded_rtt=0.1)
    assert [link.epoch(0.6) for _ in range(6)] == [WINDOW] * 6


def test_probes_ride_with_credit_one_at_a_time_and_no_more_often_than_the_interval() -> None:
    pair = MuxPair(MuxConfig(max_window=4 * MiB))
    client, server = pair.client, pair.server
    stream_id = pair.open_stream()
    assert client.send_data(stream_id, b"x" * WINDOW) == WINDOW
    server.receive_data(client.data_to_send(), 1.0)
    server.acknowledge_received(stream_id, WINDOW // 4, 1.0)
    assert server.data_to_send() == b""  # batched credit: nothing goes out, no probe either
    server.acknowledge_received(stream_id, WINDOW // 4, 1.0)
    wire = server.data_to_send()
    assert pings_sent(wire) == 1
    client.receive_data(wire, 1.0)
    answer = client.data_to_send()
    assert client.send_data(stream_id, b"x" * (WINDOW // 2)) == WINDOW // 2
    server.receive_data(client.data_to_send(), 1.0)
    server.acknowledge_received(stream_id, WINDOW // 2, 1.0 + 3 * RTT_PROBE_INTERVAL)
    wire = server.data_to_send()
    assert pings_sent(wire) == 0, "the first probe is still unanswered"
    client.receive_data(wire, 1.3)
    assert server.receive_data(answer, 1.5) == [PingAcked(0.5)]
    assert client.send_data(stream_id, b"x" * (WINDOW // 2)) == WINDOW // 2
    server.receive_data(client.data_to_send(), 1.5)
    server.acknowledge_received(stream_id, WINDOW // 2, 1.5)
    assert pings_sent(server.data_to_send()) == 1, "answered, and the interval has passed"


def test_the_smoothed_rtt_starts_at_the_first_sample_and_moves_an_eighth_per_sample() -> None:
    pair = MuxPair()
    server = pair.server
    assert server.smoothed_rtt is None
    server.ping(0.0)
    pair.transfer(now=0.2)
    assert server.smoothed_rtt == 0.2
    server.ping(1.0)
    pair.transfer(now=2.0)
    assert server.last_rtt == 1.0
    assert abs(server.smoothed_rtt - (0.2 + (1.0 - 0.2) / 8)) < 1e-9


def test_growth_assumes_a_typical_wan_rtt_until_a_ping_is_answered() -> None:
    pair = MuxPair(MuxConfig(max_window=4 * MiB))
    client, server = pair.client, pair.server
    stream_id = pair.open_stream(now=0.0)
    assert server.smoothed_rtt is None
    assert client.send_data(stream_id, b"x" * WINDOW) == WINDOW
    server.receive_data(client.data_to_send(), 0.0)
    server.acknowledge_received(stream_id, WINDOW, GROWTH_ROUND_TRIPS * ASSUMED_RTT - 0.01)
    assert server._streams[stream_id].receive_window == 2 * WINDOW


# ---------------------------------------------------------------------------- bounds, whatever the timing


@settings(deadline=None, max_examples=150)
@given(
    streams=st.integers(1, 6),
    steps=st.lists(
        st.tuples(
            st.sampled_from([0.0, 0.001, 0.02, 0.1, 0.4]),  # time passing before the step
            st.lists(st.sampled_from([0.0, 0.25, 0.5, 1.0]), min_size=6, max_size=6),  # share each reader takes
            st.integers(0, 3),  # how many steps the agent's answers (ping answers, data) are held back
        ),
        min_size=1,
        max_size=60,
    ),
)
def test_auto_tuned_windows_stay_within_their_bounds_and_the_relay_holds_at_most_the_link_window(
    streams: int, steps: list[tuple[float, list[float], int]]
) -> None:
    """An agent sending on several streams as fast as the windows allow, a relay whose readers consume at
    random paces, answers (and data) from the agent delayed at random: growth happens, but no stream's
    window passes ``max_window``, the streams' growth together stays within half the link window, the bytes
    the relay holds unconsumed never pass the link window, and at most one RTT probe is ever outstanding."""
    config = MuxConfig(max_window=1 * MiB, link_window=2 * MiB)
    pair = MuxPair(config)
    client, server = pair.client, pair.server
    stream_ids = [pair.open_stream() for _ in range(streams)]
    unconsumed = dict.fromkeys(stream_ids, 0)
    in_flight: list[tuple[int, bytes]] = []  # (steps left, wire) from the agent to the relay
    now = 0.0
    probes_at: list[float] = []
    for elapsed, shares, hold in steps:
        now += elapsed
        for stream_id in stream_ids:
            window = client.send_window(stream_id)
            if window:
                assert client.send_data(stream_id, b"d" * window) == window
        in_flight.append((hold, client.data_to_send()))
        arriving = [wire for left, wire in in_flight if left == 0]
        in_flight = [(left - 1, wire) for left, wire in in_flight if left > 0]
        for wire in arriving:
            for event in server.receive_data(wire, now):
                if isinstance(event, DataReceived):
                    unconsumed[event.stream_id] += len(event.data)
        for stream_id, share in zip(stream_ids, shares):
            n = int(unconsumed[stream_id] * share)
            server.acknowledge_received(stream_id, n, now)
            unconsumed[stream_id] -= n
        wire = server.data_to_send()
        if pings_sent(wire):
            probes_at.append(now)
        client.receive_data(wire, now)

        assert len(server._pings) <= 1
        receive_windows = [stream.receive_window for stream in server._streams.values()]
        assert max(receive_windows) <= config.max_window
        assert sum(w - WINDOW for w in receive_windows) <= config.link_window // 2
        assert sum(unconsumed.values()) <= config.link_window  # what the relay holds for this link
        assert sum(stream.unacknowledged for stream in server._streams.values()) == sum(unconsumed.values())
    assert all(b - a >= RTT_PROBE_INTERVAL - 1e-9 for a, b in zip(probes_at, probes_at[1:]))


def fast_readers(config: MuxConfig, streams: int) -> tuple[list[int], int]:
    """Agent streams sending flat out to relay readers that consume at once, a millisecond per round;
    return the relay's receive windows, sorted, and its window growth counter."""
    pair = MuxPair(config)
    client, server = pair.client, pair.server
    stream_ids = [pair.open_stream() for _ in range(streams)]
    for step in range(60):
        now = step * 0.001
        for stream_id in stream_ids:
            window = client.send_window(stream_id)
            if window:
                client.send_data(stream_id, b"d" * window)
        for event in server.receive_data(client.data_to_send(), now):
            if isinstance(event, DataReceived):
                server.acknowledge_received(event.stream_id, len(event.data), now)
        client.receive_data(server.data_to_send(), now)
        server.receive_data(client.data_to_send(), now)
    return sorted(stream.receive_window for stream in server._streams.values()), server.window_growth_total


def test_fast_readers_take_a_window_to_max_window_and_no_further() -> None:
    """The bounds property above is not vacuous: windows do reach their limits."""
    assert fast_readers(MuxConfig(max_window=1 * MiB), streams=2) == ([1 * MiB, 1 * MiB], 2 * (1 * MiB - WINDOW))


def test_fast_readers_together_grow_by_half_the_link_window_and_no_further() -> None:
    config = MuxConfig(max_window=1 * MiB, link_window=2 * MiB)
    windows, growth_total = fast_readers(config, streams=3)
    assert sum(w - WINDOW for w in windows) == growth_total == config.link_window // 2
