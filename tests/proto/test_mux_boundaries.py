"""Multiplexer edges that mutation testing (scripts/mutate.sh) found untested: the limits of each setting, what
counts against the control-frame budget, backlog and credit bookkeeping, and exact wire forms. No I/O."""

from __future__ import annotations

import pytest

from portway.errors import ProtocolError
from portway.proto.events import DataReceived, StreamOpened, StreamReset
from portway.proto.frame import INITIAL_STREAM_WINDOW, MAX_WINDOW_SIZE, Flag, Frame, FrameType
from portway.proto.mux import Mux, MuxConfig, Role

from .helpers import FrameFactory, MuxPair, decode_all, window_credit

f = FrameFactory()
WINDOW = INITIAL_STREAM_WINDOW
CLOCK = 86_400.0
"""A ``now`` like a real event loop's, a day after it started: nothing may assume the clock starts at zero."""
FLOOD = 2500  # over the default budget of 2000 control frames per second


# ---------------------------------------------------------------------------- configuration

@pytest.mark.parametrize("kwargs", [
    {"max_frame_size": 1},
    {"max_frame_size": MAX_WINDOW_SIZE},
    {"max_window": MAX_WINDOW_SIZE},
    {"initial_window": WINDOW, "max_window": WINDOW},
    {"accept_backlog": 1, "max_streams": 1, "max_control_frames_per_second": 1},
    {"keepalive_interval": 0.25, "keepalive_timeout": 0.5},
])
def test_config_accepts_the_limits_of_each_setting(kwargs: dict) -> None:
    config = MuxConfig(**kwargs)
    assert all(getattr(config, name) == value for name, value in kwargs.items())


@pytest.mark.parametrize("kwargs, message", [
    ({"initial_window": WINDOW - 1}, f"initial_window must be between {WINDOW} and max_window"),
    ({"max_window": MAX_WINDOW_SIZE + 1}, f"max_window must be at most {MAX_WINDOW_SIZE}"),
    ({"max_frame_size": 0}, f"max_frame_size must be in 1..{MAX_WINDOW_SIZE}, got 0"),
    ({"accept_backlog": 0}, "accept_backlog must be at least 1, got 0"),
    ({"max_streams": 0}, "max_streams must be at least 1, got 0"),
    ({"keepalive_timeout": 0.0}, "keepalive_timeout must be positive, got 0.0"),
    ({"keepalive_interval": 1.0, "keepalive_timeout": 1.0}, "keepalive_interval (1.0) must be below keepalive_timeout (1.0)"),
])
def test_config_refusals_name_the_setting(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as refused:
        MuxConfig(**kwargs)
    assert str(refused.value).startswith(message)


def test_a_mux_knows_its_role() -> None:
    assert Mux(Role.CLIENT).role is Role.CLIENT and Mux(Role.SERVER).role is Role.SERVER


# ---------------------------------------------------------------------------- the control-frame budget

def test_the_flood_budget_holds_with_a_real_clock() -> None:
    """The budget is per second of `now`; with a clock far from zero (as a loop's is) a flood is still one."""
    relay = Mux(Role.SERVER, now=CLOCK)
    with pytest.raises(ProtocolError, match="control frame flood"):
        relay.receive_data(f.ping(1) * FLOOD, CLOCK + 0.5)
    quiet = Mux(Role.SERVER, now=CLOCK)
    for second in range(3):  # and it refills: 2000 a second, second after second, is allowed
        quiet.receive_data(f.ping(1) * 2000, CLOCK + second)
    assert not quiet.is_closed


def forgotten_stream() -> tuple[Mux, int]:
    """An agent with relay stream 2 opened, answered and then reset by the agent itself: the mux forgot it."""
    agent = Mux(Role.CLIENT, now=CLOCK)
    agent.receive_data(f.syn(2), CLOCK)
    agent.accept_stream(2)
    agent.reset_stream(2)
    agent.data_to_send()
    return agent, 2


def test_payload_in_flight_for_a_forgotten_stream_is_free() -> None:
    agent, stream_id = forgotten_stream()
    assert agent.receive_data(f.data(stream_id, b"x") * FLOOD, CLOCK) == []
    assert not agent.is_closed


@pytest.mark.parametrize("straggler", [
    f.data(2),  # an empty DATA frame carries nothing in flight
    f.data(2, b"x", Flag.FIN),  # flags on a stream that is gone are no payload
    f.window_update(2, 1),
], ids=["empty-data", "data-with-fin", "window-update"])
def test_anything_else_for_a_forgotten_stream_counts_against_the_budget(straggler: bytes) -> None:
    agent, _ = forgotten_stream()
    with pytest.raises(ProtocolError, match="control frame flood"):
        agent.receive_data(straggler * FLOOD, CLOCK)


def test_a_large_upload_before_any_answer_is_no_flood() -> None:
    """Many small DATA frames on a stream we have not answered yet are a request body, not rapid reset."""
    agent = Mux(Role.CLIENT, now=CLOCK)
    events = agent.receive_data(f.syn(2) + f.data(2, b"x") * FLOOD, CLOCK)
    assert events[0] == StreamOpened(2) and sum(len(e.data) for e in events[1:] if isinstance(e, DataReceived)) == FLOOD
    assert not agent.is_closed


# ---------------------------------------------------------------------------- backlog and credit bookkeeping

def test_a_stream_reset_before_acceptance_frees_exactly_one_backlog_slot() -> None:
    relay = Mux(Role.SERVER, MuxConfig(accept_backlog=2))
    relay.receive_data(f.syn(1) + f.syn(3) + f.rst(1), 0.0)  # two waiting, one of them gone again
    events = relay.receive_data(f.syn(5) + f.syn(7), 0.0)  # room for one more only
    assert events == [StreamOpened(5)]
    assert Frame(FrameType.WINDOW_UPDATE, Flag.RST, 7, 0) in decode_all(relay.data_to_send())


def test_credit_for_data_consumed_before_acceptance_follows_the_ack() -> None:
    relay = Mux(Role.SERVER)
    events = relay.receive_data(f.syn(1) + f.data(1, b"x" * 1000), 0.0)
    assert events == [StreamOpened(1), DataReceived(1, b"x" * 1000)]
    relay.acknowledge_received(1, 1000, 0.0)  # consumed while still waiting to be accepted
    relay.accept_stream(1)
    ack, credit = [frame for frame in decode_all(relay.data_to_send()) if frame.stream_id == 1]
    assert ack == Frame(FrameType.WINDOW_UPDATE, Flag.ACK | Flag.GROW, 1, 0)  # the window did not grow
    assert credit == Frame(FrameType.WINDOW_UPDATE, Flag(0), 1, 1000)  # every consumed byte is credited back


def test_credit_goes_back_once_half_the_window_is_owed() -> None:
    pair = MuxPair()
    stream_id = pair.open_stream()
    half = WINDOW // 2
    pair.client.send_data(stream_id, b"x" * WINDOW)
    pair.transfer(1_000.0)
    pair.server.acknowledge_received(stream_id, half - 1, 1_000.0)
    assert not pair.server.has_data_to_send  # a third, a quarter...: still batched
    pair.server.acknowledge_received(stream_id, 1, 1_000.0)
    assert window_credit(decode_all(pair.server.data_to_send()), stream_id) == half


def test_a_window_update_may_fill_the_send_window_to_the_protocol_maximum() -> None:
    pair = MuxPair()
    stream_id = pair.open_stream()
    assert pair.client.receive_data(f.window_update(stream_id, MAX_WINDOW_SIZE - WINDOW, Flag.GROW), 0.0) != []
    assert not pair.client.is_closed
    with pytest.raises(ProtocolError, match="overflows the send window"):
        pair.client.receive_data(f.window_update(stream_id, 1, Flag.GROW), 0.0)


def test_reset_is_a_window_update_with_rst_and_no_credit() -> None:
    pair = MuxPair()
    stream_id = pair.open_stream()
    pair.client.reset_stream(stream_id)
    wire = pair.client.data_to_send()
    assert wire == f.rst(stream_id)
    assert pair.server.receive_data(wire, 0.0) == [StreamReset(stream_id)]
