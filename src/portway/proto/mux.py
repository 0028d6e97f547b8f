"""Sans-I/O stream multiplexer for the agent link: bytes and API calls in, events and bytes out.

A :class:`Mux` has three inputs, like aioquic's connection: API calls, :meth:`Mux.receive_data` and
:meth:`Mux.handle_timer`. It never reads a clock (every entry point that needs time takes ``now`` in seconds),
never touches a socket and never buffers application data beyond what flow control allows: output is pulled
with :meth:`Mux.data_to_send` and the next deadline is exposed by :meth:`Mux.get_timer`.

Streams follow yamux: the agent (CLIENT) opens odd ids, the relay (SERVER) even ids. A stream is opened by
WINDOW_UPDATE|SYN, accepted by WINDOW_UPDATE|ACK or refused by RST, half-closed by FIN and abandoned by RST.
Every stream starts with a 256 KiB window in each direction; a side that wants more announces it in its
SYN or ACK. Credit flows back only when the application says it consumed data (:meth:`Mux.acknowledge_received`),
so a slow reader slows its sender instead of filling memory.

On top of the streams' windows the link has one of its own, as in HTTP/2: every DATA byte on any stream also
counts against it, so what a peer can make us hold, over all its streams together, is bounded by
``MuxConfig.link_window`` (not by streams x window). Both sides start at the protocol's ``INITIAL_LINK_WINDOW``
and announce a larger one with a stream-0 WINDOW_UPDATE as the link starts. Link credit comes back as the
application consumes bytes, and for bytes the mux drops unread (data for a stream already reset or closed, or
still unconsumed when the stream goes); a peer that sends past the link window gets GO_AWAY(PROTOCOL_ERROR).
:meth:`Mux.send_data` accepts at most the smaller of the two windows; when link credit comes back, the streams
the link window held up get ``WindowUpdated`` in the order they were held up, as many as the credit can serve.

Errors are split by fault. Anything the peer does wrong raises :class:`~portway.errors.ProtocolError` from
``receive_data`` after queuing a GO_AWAY and closing the mux, because a peer that breaks the protocol on one
stream can't be trusted on the others. Misuse of the API raises KeyError (no such stream: never opened, or
already closed or reset, which races with the peer make routine), ValueError (a bad argument, or a call the
stream's state forbids) or :class:`~portway.errors.MuxClosedError` (the link is closed or going away).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

from portway.errors import MuxClosedError, ProtocolError
from portway.proto.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    GoAwayReceived,
    PingAcked,
    StreamAccepted,
    StreamEnded,
    StreamOpened,
    StreamReset,
    WindowUpdated,
)
from portway.proto.frame import (
    DEFAULT_MAX_FRAME_SIZE,
    HEADER,
    INITIAL_LINK_WINDOW,
    INITIAL_STREAM_WINDOW,
    MAX_STREAM_ID,
    MAX_WINDOW_SIZE,
    PROTOCOL_VERSION,
    Frame,
    FrameDecoder,
    FrameType,
    GoAwayCode,
)

__all__ = ["ASSUMED_RTT", "Mux", "MuxConfig", "Role", "StreamState"]

ASSUMED_RTT = 0.1
"""Round-trip time (seconds) window growth assumes until a ping has measured one: a typical WAN path.

Guessing is safe in both directions: growth also needs the application to consume a whole window that fast,
so a slow reader never earns a bigger window whatever the RTT.
"""

# Plain ints for the flag bits: the Flag enum's operators run in Python and this module tests flags per frame.
_SYN, _ACK, _FIN, _RST = 0x1, 0x2, 0x4, 0x8
_DATA = FrameType.DATA
_WINDOW_UPDATE = FrameType.WINDOW_UPDATE
_PING = FrameType.PING
_pack_header = HEADER.pack
_PING_TOKEN_MASK = 0xFFFFFFFF
_CONTROL_BUDGET_PERIOD = 1.0
_LINK_UPDATE_MIN = 64 * 1024
"""Link credit owed is returned once it reaches half the link window, or earlier once it is at least what the
peer has left, but never in pieces smaller than this: slow readers holding most of the window must not turn
every consumed frame into a WINDOW_UPDATE."""


class Role(Enum):
    CLIENT = "client"
    """The agent: dials the relay and opens odd stream ids."""
    SERVER = "server"
    """The relay: accepts the agent's link and opens even stream ids."""


@dataclass(frozen=True)
class MuxConfig:
    """Every tunable of the multiplexer, checked once when built (ValueError on nonsense)."""

    initial_window: int = 256 * 1024
    """Receive window granted to each new stream; at least the protocol's 256 KiB base (it is announced as an
    increase in the SYN or ACK, and a window can't be announced smaller)."""
    max_window: int = 4 * 1024 * 1024  # 4 MiB per stream fills ~300 Mbit/s at 100 ms RTT, and bounds memory
    """Ceiling for a stream's receive window as auto-growth doubles it for fast readers."""
    link_window: int = 32 * 1024 * 1024
    """Receive window of the whole link: bytes the peer may have sent, on all streams together, that the
    application has not consumed yet; what a peer can make us buffer. At least the protocol's 1 MiB base
    (announced as an increase when the link starts) and at least ``initial_window``. 32 MiB lets four streams
    grow to the full ``max_window`` (growth stops at half the link window) with room to spare for 64 more at
    the base window, so one fast stream is never held up by it, and holds a relay's memory per agent link to
    tens of MiB where 4,096 streams x their windows would allow a GiB or more."""
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    """Largest DATA payload we send and accept; both ends of a link must agree on it."""
    accept_backlog: int = 256
    """Streams the peer opened that the application has not accepted yet; further opens are refused (RST)."""
    max_streams: int = 4096
    """Streams alive at once, both directions together; further peer opens are refused (RST)."""
    keepalive_timeout: float = 10.0
    """Seconds the peer may stay silent (nothing at all received from it) before the link is declared dead: the
    bound, from the moment a link is black-holed or its peer frozen, to our noticing."""
    keepalive_interval: float | None = None
    """Seconds of silence before we ping the peer, so that a live but idle peer has something to answer; below
    ``keepalive_timeout``, which leaves the peer the rest to answer in. None: a third of ``keepalive_timeout``."""
    max_control_frames_per_second: int = 2000
    """Budget for frames that cost us work but carry no data (pings, go-aways, resets, empty frames, updates
    for closed streams); a peer that exceeds it is flooding us and the link is closed."""

    def __post_init__(self) -> None:
        if not INITIAL_STREAM_WINDOW <= self.initial_window <= self.max_window:
            raise ValueError(
                f"initial_window must be between {INITIAL_STREAM_WINDOW} and max_window ({self.max_window}),"
                f" got {self.initial_window}"
            )
        if self.max_window > MAX_WINDOW_SIZE:
            raise ValueError(f"max_window must be at most {MAX_WINDOW_SIZE}, got {self.max_window}")
        if not max(INITIAL_LINK_WINDOW, self.initial_window) <= self.link_window <= MAX_WINDOW_SIZE:
            raise ValueError(
                f"link_window must be between {max(INITIAL_LINK_WINDOW, self.initial_window)} (the protocol's base"
                f" and initial_window) and {MAX_WINDOW_SIZE}, got {self.link_window}"
            )
        if not 0 < self.max_frame_size <= MAX_WINDOW_SIZE:
            raise ValueError(f"max_frame_size must be in 1..{MAX_WINDOW_SIZE}, got {self.max_frame_size}")
        for name in ("accept_backlog", "max_streams", "max_control_frames_per_second"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("keepalive_interval", "keepalive_timeout"):
            value = getattr(self, name)
            if value is not None and not 0 < value < math.inf:
                raise ValueError(f"{name} must be positive, got {value}")
        if not self.ping_after < self.keepalive_timeout:
            raise ValueError(
                f"keepalive_interval ({self.keepalive_interval}) must be below keepalive_timeout"
                f" ({self.keepalive_timeout}): a pinged peer needs time to answer before the link is declared dead"
            )

    @property
    def ping_after(self) -> float:
        """Seconds of silence after which a keepalive ping goes out (``keepalive_interval`` or its default)."""
        if self.keepalive_interval is None:
            return self.keepalive_timeout / 3
        return self.keepalive_interval


class StreamState(Enum):
    """Where a stream is in its life. FIN may be sent or received before the open is acknowledged (a short
    request can open, carry its data and half-close in one burst), hence the two combined states."""

    IDLE = "idle"
    SYN_SENT = "syn_sent"
    SYN_SENT_LOCAL_CLOSED = "syn_sent_local_closed"
    SYN_RECEIVED = "syn_received"
    SYN_RECEIVED_REMOTE_CLOSED = "syn_received_remote_closed"
    ESTABLISHED = "established"
    LOCAL_CLOSED = "local_closed"
    REMOTE_CLOSED = "remote_closed"
    CLOSED = "closed"


class _Input(Enum):
    SEND_SYN = "send_syn"
    RECV_SYN = "recv_syn"
    SEND_ACK = "send_ack"
    RECV_ACK = "recv_ack"
    SEND_DATA = "send_data"
    RECV_DATA = "recv_data"
    SEND_FIN = "send_fin"
    RECV_FIN = "recv_fin"


_S = StreamState
_I = _Input
# Every legal (state, input) pair and the state it leads to; anything missing is illegal: the peer's fault if
# the input came off the wire, the application's otherwise. RST is legal in every state and simply forgets the
# stream, so it has no rows. Reaching CLOSED forgets the stream too.
_TRANSITIONS: dict[tuple[StreamState, _Input], StreamState] = {
    (_S.IDLE, _I.SEND_SYN): _S.SYN_SENT,
    (_S.IDLE, _I.RECV_SYN): _S.SYN_RECEIVED,
    (_S.SYN_SENT, _I.SEND_DATA): _S.SYN_SENT,
    (_S.SYN_SENT, _I.SEND_FIN): _S.SYN_SENT_LOCAL_CLOSED,
    (_S.SYN_SENT, _I.RECV_ACK): _S.ESTABLISHED,
    (_S.SYN_SENT_LOCAL_CLOSED, _I.RECV_ACK): _S.LOCAL_CLOSED,
    (_S.SYN_RECEIVED, _I.SEND_ACK): _S.ESTABLISHED,
    (_S.SYN_RECEIVED, _I.RECV_DATA): _S.SYN_RECEIVED,
    (_S.SYN_RECEIVED, _I.RECV_FIN): _S.SYN_RECEIVED_REMOTE_CLOSED,
    (_S.SYN_RECEIVED_REMOTE_CLOSED, _I.SEND_ACK): _S.REMOTE_CLOSED,
    (_S.ESTABLISHED, _I.SEND_DATA): _S.ESTABLISHED,
    (_S.ESTABLISHED, _I.RECV_DATA): _S.ESTABLISHED,
    (_S.ESTABLISHED, _I.SEND_FIN): _S.LOCAL_CLOSED,
    (_S.ESTABLISHED, _I.RECV_FIN): _S.REMOTE_CLOSED,
    (_S.LOCAL_CLOSED, _I.RECV_DATA): _S.LOCAL_CLOSED,
    (_S.LOCAL_CLOSED, _I.RECV_FIN): _S.CLOSED,
    (_S.REMOTE_CLOSED, _I.SEND_DATA): _S.REMOTE_CLOSED,
    (_S.REMOTE_CLOSED, _I.SEND_FIN): _S.CLOSED,
}
_REMOTE_INPUTS = frozenset((_I.RECV_SYN, _I.RECV_ACK, _I.RECV_DATA, _I.RECV_FIN))
# Data never changes a stream's state, so the hot paths test these flags instead of looking up the table.
_SENDING_STATES = frozenset(state for state, stream_input in _TRANSITIONS if stream_input is _I.SEND_DATA)
_RECEIVING_STATES = frozenset(state for state, stream_input in _TRANSITIONS if stream_input is _I.RECV_DATA)
_UNACCEPTED_STATES = frozenset(state for state, stream_input in _TRANSITIONS if stream_input is _I.SEND_ACK)


class _Stream:
    """Per-stream state and flow-control counters.

    On the receive side ``receive_remaining + unacknowledged + unannounced == receive_window`` always holds:
    every byte the window grants is either still usable by the peer, delivered but not yet consumed by the
    application, or consumed but not yet credited back in a WINDOW_UPDATE.
    """

    __slots__ = (
        "state",
        "may_send",
        "may_receive",
        "send_window",
        "receive_window",
        "receive_remaining",
        "unacknowledged",
        "unannounced",
        "epoch_started_at",
        "epoch_consumed",
        "sent_any",
    )

    def __init__(self, receive_window: int, epoch_started_at: float) -> None:
        self.state = StreamState.IDLE
        self.may_send = False
        self.may_receive = False
        self.send_window = INITIAL_STREAM_WINDOW
        self.receive_window = receive_window
        self.receive_remaining = INITIAL_STREAM_WINDOW
        self.unacknowledged = 0
        self.unannounced = receive_window - INITIAL_STREAM_WINDOW
        self.sent_any = False  # a stream we answered on did real work; resetting it is no flood
        # Window auto-growth measures how long the application takes to consume a full window ("epoch").
        self.epoch_started_at = epoch_started_at
        self.epoch_consumed = 0

    def enter(self, state: StreamState) -> None:
        self.state = state
        self.may_send = state in _SENDING_STATES
        self.may_receive = state in _RECEIVING_STATES


class Mux:
    """One end of a multiplexed agent link. See the module docstring for the contract."""

    def __init__(self, role: Role, config: MuxConfig = MuxConfig(), now: float = 0.0) -> None:
        self.role = role
        self.config = config
        self._decoder = FrameDecoder(config.max_frame_size)
        self._streams: dict[int, _Stream] = {}
        self._next_local_id = 1 if role is Role.CLIENT else 2
        self._remote_parity = 0 if role is Role.CLIENT else 1
        self._highest_remote_id = 0
        self._unaccepted = 0
        self._outbound: list[bytes | memoryview] = []
        self._closed = False
        self._go_away_sent = False
        self._go_away_received = False
        self._pings: dict[int, float] = {}  # token -> sent at; insertion order makes the first the oldest
        self._next_ping_token = 0
        self._last_rtt: float | None = None
        self._last_received_at = now
        self._pinged_since_heard = False  # a keepalive ping went out since the peer was last heard
        self._control_period_started_at = now
        self._control_frames_in_period = 0
        # Link-level flow control. Receive side: ``_link_receive_remaining`` + the unacknowledged bytes of every
        # stream + ``_link_unannounced`` == ``config.link_window`` always holds.
        self._link_window = config.link_window
        self._link_send_window = INITIAL_LINK_WINDOW
        self._link_receive_remaining = INITIAL_LINK_WINDOW
        self._link_unannounced = config.link_window - INITIAL_LINK_WINDOW
        # Streams send_data could not serve in full because of the link window, in the order they were held up,
        # with how many bytes each was left holding; and those woken since, with the credit set aside for each.
        self._link_waiting: dict[int, int] = {}
        self._link_woken: dict[int, int] = {}
        self._link_reserved = 0
        # How far the streams' receive windows are above the protocol's base, all together. Auto-growth stops
        # at half the link window: a few streams that read fast, then stalled (a paused video) must not hold
        # all of it, or every other stream of the link would wait for them.
        self._link_growth = 0
        if self._link_unannounced:
            self._announce_link()

    # ------------------------------------------------------------------ properties

    @property
    def is_closed(self) -> bool:
        """True after a protocol error or a keepalive timeout: nothing more can happen on this link."""
        return self._closed

    @property
    def going_away(self) -> bool:
        """True once either end sent GO_AWAY: the streams open now may finish, no new one can open."""
        return self._go_away_sent or self._go_away_received

    @property
    def stream_count(self) -> int:
        """Streams alive in either direction, including those still waiting to be accepted."""
        return len(self._streams)

    @property
    def last_rtt(self) -> float | None:
        """Round-trip time measured by the latest answered ping, or None before the first answer."""
        return self._last_rtt

    @property
    def link_send_window(self) -> int:
        """Bytes we may still send on all streams together before the peer returns link credit."""
        return self._link_send_window

    # ------------------------------------------------------------------ input from the peer

    def receive_data(self, data: bytes | bytearray | memoryview, now: float) -> list[Event]:
        """Consume bytes from the link and return the events they cause, in order.

        Raises ProtocolError if the peer broke the protocol; a GO_AWAY carrying the error's code is queued
        and the mux is closed first, so the caller only has to flush ``data_to_send()`` and hang up (events
        from earlier frames in the same call are dropped with the link). Bytes arriving after the mux closed
        are ignored, since the caller may still be draining its socket.
        """
        if self._closed:
            return []
        if data:
            self._last_received_at = now
            self._pinged_since_heard = False
        decoder = self._decoder
        decoder.feed(data)
        events: list[Event] = []
        streams = self._streams
        link_remaining = self._link_receive_remaining  # kept in a local while frames take the fast path
        try:
            for frame in decoder:
                frame_type, flags, stream_id, length, payload = frame
                # Fast path: payload on a stream that may receive it, within its window and the link's.
                if frame_type is _DATA and not flags:
                    stream = streams.get(stream_id)
                    if (
                        stream is not None
                        and stream.may_receive
                        and 0 < length <= stream.receive_remaining
                        and length <= link_remaining
                    ):
                        stream.receive_remaining -= length
                        stream.unacknowledged += length
                        link_remaining -= length
                        events.append(DataReceived(stream_id, payload))
                        continue
                self._link_receive_remaining = link_remaining
                self._receive_frame(frame, now, events)
                link_remaining = self._link_receive_remaining
        except ProtocolError as error:
            self._close(go_away_code=error.code)
            raise
        self._link_receive_remaining = link_remaining
        owed = self._link_unannounced
        if owed >= self._link_receive_remaining and owed >= _LINK_UPDATE_MIN:
            self._announce_link()  # what the peer has left fell below what we owe while no one was consuming
        if self._link_waiting and self._link_send_window > self._link_reserved:
            self._wake_link_waiters(events)
        return events

    def _receive_frame(self, frame: Frame, now: float, events: list[Event]) -> None:
        frame_type, flags, stream_id, length, payload = frame
        if frame_type is _PING:
            self._receive_ping(int(flags), length, now, events)
        elif frame_type is FrameType.GO_AWAY:
            self._count_control_frame(now)
            self._go_away_received = True
            events.append(GoAwayReceived(length))
        elif stream_id == 0:  # WINDOW_UPDATE for the link; the decoder let it through with no flags only
            self._receive_link_credit(length, now)
        else:
            self._receive_stream_frame(frame_type, int(flags), stream_id, length, payload, now, events)

    def _receive_link_credit(self, delta: int, now: float) -> None:
        """The peer returned link credit; the streams it held up are woken once the whole read is processed."""
        if not delta:
            self._count_control_frame(now)
            return
        window = self._link_send_window + delta
        if window > MAX_WINDOW_SIZE:
            raise ProtocolError("WINDOW_UPDATE overflows the link's send window")
        self._link_send_window = window

    def _receive_stream_frame(
        self,
        frame_type: FrameType,
        flags: int,
        stream_id: int,
        length: int,
        payload: bytes,
        now: float,
        events: list[Event],
    ) -> None:
        """Apply a DATA or WINDOW_UPDATE frame: flags in the order SYN, ACK, RST, then the body, then FIN.

        Every DATA byte counts against the link's window, whether it is delivered or dropped; dropped bytes
        (for a stream refused, reset or already forgotten) are credited back at once.
        """
        dropped = 0
        if frame_type is _DATA and length:
            if length > self._link_receive_remaining:
                raise ProtocolError(
                    f"{length} bytes on stream {stream_id} exceed the link's receive window of"
                    f" {self._link_receive_remaining}"
                )
            self._link_receive_remaining -= length
            dropped = length  # until the bytes are delivered below
        stream = self._streams.get(stream_id)
        if flags & _SYN:
            stream = self._receive_syn(stream_id, now, events)
            if stream is None:
                if dropped:
                    self._credit_link(dropped)
                return
        elif stream is None:
            self._check_was_opened(stream_id)
            # Stragglers for a stream we already forgot are normal after a reset or close; only payload that
            # was in flight is free, anything else counts against the flood budget.
            if frame_type is _WINDOW_UPDATE or flags or not length:
                self._count_control_frame(now)
            if dropped:
                self._credit_link(dropped)
            return
        elif (flags & _RST and not stream.sent_any) or not (flags or length):
            # "rapid reset" opens and resets streams that cost us work but got no answer; a peer closing a
            # stream after a full exchange (a relay trimming its keep-alive pool) is ordinary traffic
            self._count_control_frame(now)
        if flags & _ACK:
            self._transition(stream_id, stream, _I.RECV_ACK)
            stream.epoch_started_at = now  # the peer can only start sending once it has accepted
            events.append(StreamAccepted(stream_id))
        if flags & _RST:
            self._forget(stream_id, stream)
            events.append(StreamReset(stream_id))
            if dropped:
                self._credit_link(dropped)
            return
        if frame_type is _DATA:
            if not stream.may_receive:
                raise ProtocolError(f"DATA on stream {stream_id} in state {stream.state.value}")
            if length > stream.receive_remaining:
                raise ProtocolError(
                    f"{length} bytes on stream {stream_id} exceed its receive window of {stream.receive_remaining}"
                )
            stream.receive_remaining -= length
            stream.unacknowledged += length
            if length:
                events.append(DataReceived(stream_id, payload))
        elif length:
            window = stream.send_window + length
            if window > MAX_WINDOW_SIZE:
                raise ProtocolError(f"WINDOW_UPDATE overflows the send window of stream {stream_id}")
            stream.send_window = window
            if stream.may_send:
                events.append(WindowUpdated(stream_id))
        if flags & _FIN:
            self._transition(stream_id, stream, _I.RECV_FIN)
            events.append(StreamEnded(stream_id))

    def _receive_syn(self, stream_id: int, now: float, events: list[Event]) -> _Stream | None:
        """Register a stream the peer opens, or refuse it with RST (no event) when we are at a limit."""
        if stream_id % 2 != self._remote_parity:
            raise ProtocolError(f"peer opened stream {stream_id}, an id from our half of the space")
        if stream_id <= self._highest_remote_id:
            raise ProtocolError(f"peer reopened stream {stream_id}; ids must increase")
        self._highest_remote_id = stream_id
        if (
            self._go_away_sent
            or self._go_away_received
            or self._unaccepted >= self.config.accept_backlog
            or len(self._streams) >= self.config.max_streams
        ):
            self._queue_header(_WINDOW_UPDATE, _RST, stream_id, 0)
            return None
        stream = _Stream(INITIAL_STREAM_WINDOW, epoch_started_at=now)
        self._streams[stream_id] = stream
        self._transition(stream_id, stream, _I.RECV_SYN)
        events.append(StreamOpened(stream_id))
        return stream

    def _check_was_opened(self, stream_id: int) -> None:
        """Ids are handed out in increasing order, so an unknown id above the high-water mark never existed."""
        if stream_id % 2 == self._remote_parity:
            was_opened = stream_id <= self._highest_remote_id
        else:
            was_opened = stream_id < self._next_local_id
        if not was_opened:
            raise ProtocolError(f"frame for stream {stream_id}, which was never opened")

    def _receive_ping(self, flags: int, token: int, now: float, events: list[Event]) -> None:
        self._count_control_frame(now)
        if flags == _SYN:
            self._queue_header(_PING, _ACK, 0, token)
            return
        sent_at = self._pings.pop(token, None)
        if sent_at is not None:  # answers to pings we didn't send (or already timed out) mean nothing
            self._last_rtt = now - sent_at
            events.append(PingAcked(self._last_rtt))

    def _count_control_frame(self, now: float) -> None:
        if now - self._control_period_started_at >= _CONTROL_BUDGET_PERIOD:
            self._control_period_started_at = now
            self._control_frames_in_period = 0
        self._control_frames_in_period += 1
        if self._control_frames_in_period > self.config.max_control_frames_per_second:
            raise ProtocolError(
                f"control frame flood: more than {self.config.max_control_frames_per_second} in one second"
            )

    # ------------------------------------------------------------------ stream API

    def open_stream(self) -> int:
        """Open a stream and return its id. Data may be sent at once, before the peer accepts it."""
        if self._closed or self._go_away_sent or self._go_away_received:
            raise MuxClosedError("the link is closed or going away; no new streams")
        stream_id = self._next_local_id
        if stream_id > MAX_STREAM_ID:
            raise MuxClosedError("stream ids are exhausted on this link; open a new one")
        self._next_local_id = stream_id + 2
        stream = _Stream(self.config.initial_window, epoch_started_at=0.0)  # the epoch starts at the ACK
        self._link_growth += self.config.initial_window - INITIAL_STREAM_WINDOW
        self._streams[stream_id] = stream
        self._transition(stream_id, stream, _I.SEND_SYN)
        self._announce_window(stream_id, stream, _SYN)
        return stream_id

    def accept_stream(self, stream_id: int) -> None:
        """Accept a stream the peer opened (after StreamOpened); only then may we send on it."""
        stream = self._local_stream(stream_id)
        self._transition(stream_id, stream, _I.SEND_ACK)
        # Top the window up to the configured size; auto-growth may already have taken it higher.
        extra = max(0, self.config.initial_window - stream.receive_window)
        stream.receive_window += extra
        stream.unannounced += extra
        self._link_growth += extra
        self._announce_window(stream_id, stream, _ACK)

    def send_data(self, stream_id: int, data: bytes | bytearray | memoryview, end_stream: bool = False) -> int:
        """Queue as much of ``data`` as the send window allows and return how many bytes that was.

        Nothing beyond the window is buffered: send the rest after a WindowUpdated event. ``end_stream`` adds
        FIN to the last frame, but only if every byte was accepted, so a partial send never half-closes.
        The window is the stream's or the link's, whichever is smaller; link credit set aside for streams woken
        after waiting for it is theirs, so a stream held up by the link never loses its turn to one that came
        later.
        """
        stream = self._local_stream(stream_id)
        if not stream.may_send:
            raise ValueError(f"stream {stream_id} can't send in state {stream.state.value}")
        size = len(data)
        window = stream.send_window
        link_window = self._link_send_window
        if self._link_reserved:  # credit set aside for woken streams is theirs: no one overtakes them
            link_window -= self._link_reserved - self._link_woken.get(stream_id, 0)
        if link_window < window:
            window = link_window
        accepted = size if size <= window else window
        if self._link_waiting or self._link_woken or (size > link_window < stream.send_window):
            self._track_link_wait(stream_id, stream, size, accepted, link_window)
        fin = _FIN if end_stream and accepted == size else 0
        if not accepted:
            if fin:
                self.end_stream(stream_id)
            return 0
        view = memoryview(data)[:accepted]
        if type(view.obj) is not bytes:
            # Queued frames reference the payload until data_to_send(); a mutable buffer must be frozen first.
            view = memoryview(bytes(view))
        frame_size = self.config.max_frame_size
        outbound = self._outbound
        for start in range(0, accepted, frame_size):
            chunk = view[start : start + frame_size]
            last = start + frame_size >= accepted
            outbound.append(_pack_header(PROTOCOL_VERSION, _DATA, fin if last else 0, stream_id, len(chunk)))
            outbound.append(chunk)
        stream.send_window -= accepted
        self._link_send_window -= accepted
        stream.sent_any = True
        if fin:
            self._transition(stream_id, stream, _I.SEND_FIN)
        return accepted

    def send_window(self, stream_id: int) -> int:
        """How many bytes ``send_data`` would accept right now (the stream's window or the link's, whichever
        is smaller); 0 for a stream that can't send or is gone."""
        stream = self._streams.get(stream_id)
        if stream is None or not stream.may_send:
            return 0
        link_window = self._link_send_window - self._link_reserved + self._link_woken.get(stream_id, 0)
        return min(stream.send_window, link_window)

    def end_stream(self, stream_id: int) -> None:
        """Half-close: we send no more data, the peer may still send."""
        stream = self._local_stream(stream_id)
        self._transition(stream_id, stream, _I.SEND_FIN)
        self._queue_header(_WINDOW_UPDATE, _FIN, stream_id, 0)
        if self._link_waiting or self._link_woken:
            self._leave_link_line(stream_id)  # it will send nothing more

    def reset_stream(self, stream_id: int) -> None:
        """Abandon a stream in either direction (or refuse one the peer opened) and forget it.

        Resetting a stream that is already gone, or on a closed link, does nothing: resets from both ends
        routinely cross on the wire.
        """
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        self._queue_header(_WINDOW_UPDATE, _RST, stream_id, 0)
        self._forget(stream_id, stream)

    def acknowledge_received(self, stream_id: int, n: int, now: float) -> None:
        """Report that the application consumed ``n`` bytes of the stream's data, returning credit to the peer.

        Credit is batched: a WINDOW_UPDATE goes out once at least half the window is owed, so tiny reads don't
        cost a frame each. Auto-growth doubles the window (up to ``max_window``) when the application consumed
        a whole window within two round trips of finishing the previous one (or of the peer being able to
        start sending: its SYN, or its ACK of our open): the window, not the reader, was then limiting
        throughput. Until a ping has measured the RTT, ``ASSUMED_RTT`` stands in. Growth stops once the windows of
        all the link's streams together are half the link window above the protocol's base.
        Acknowledging for a stream that is already gone does nothing (its bytes' link credit went back when it
        went). Link credit is batched likewise: it goes out once half the link window is owed, or once what is
        owed is at least what the peer has left (slow streams holding the rest), in pieces of 64 KiB or more.
        """
        if n < 0:
            raise ValueError(f"can't acknowledge a negative byte count ({n})")
        stream = self._streams.get(stream_id)
        if stream is None or not n:
            return
        if n > stream.unacknowledged:
            raise ValueError(
                f"acknowledged {n} bytes on stream {stream_id}, but only {stream.unacknowledged} are unconsumed"
            )
        stream.unacknowledged -= n
        stream.unannounced += n
        owed = self._link_unannounced + n  # _credit_link(n), inlined: this runs for every read
        self._link_unannounced = owed
        if owed * 2 >= self._link_window or (owed >= self._link_receive_remaining and owed >= _LINK_UPDATE_MIN):
            self._announce_link()
        if not stream.may_receive:
            return  # the peer has finished sending, stream credit would be wasted (link credit is not)
        stream.epoch_consumed += n
        if stream.epoch_consumed >= stream.receive_window:
            rtt = ASSUMED_RTT if self._last_rtt is None else self._last_rtt
            if now - stream.epoch_started_at < 2 * rtt and stream.receive_window < self.config.max_window:
                growth = min(stream.receive_window, self.config.max_window - stream.receive_window,
                             self._link_window // 2 - self._link_growth)
                if growth > 0:
                    stream.unannounced += growth  # doubling owes >= half: announced below
                    stream.receive_window += growth
                    self._link_growth += growth
            stream.epoch_started_at = now
            stream.epoch_consumed = 0
        if stream.unannounced * 2 >= stream.receive_window:
            self._announce_window(stream_id, stream, 0)

    # ------------------------------------------------------------------ link API

    def ping(self, now: float) -> None:
        """Ask the peer for a PING answer; it comes back as PingAcked with the round-trip time.

        Its answer, like anything else the peer sends, keeps the link alive (see ``handle_timer``).
        """
        if self._closed:
            raise MuxClosedError("the link is closed")
        token = self._next_ping_token
        self._next_ping_token = (token + 1) & _PING_TOKEN_MASK
        self._pings[token] = now
        self._queue_header(_PING, _SYN, 0, token)

    def go_away(self, code: int = GoAwayCode.NORMAL) -> None:
        """Tell the peer no new streams will be accepted or opened; existing streams drain normally."""
        code = GoAwayCode(code)
        if self._closed or self._go_away_sent:
            return
        self._go_away_sent = True
        self._queue_header(FrameType.GO_AWAY, 0, 0, code)

    @property
    def has_data_to_send(self) -> bool:
        return bool(self._outbound)

    def buffers_to_send(self) -> list[bytes | memoryview]:
        """Everything queued for the peer since the last call, as separate buffers for a vectored write
        (no copy of the payloads); the caller must write them before the payloads' owners change them."""
        outbound = self._outbound
        self._outbound = []
        return outbound

    def data_to_send(self) -> bytes:
        """Everything queued for the peer since the last call, coalesced into one write."""
        outbound = self._outbound
        if not outbound:
            return b""
        data = b"".join(outbound)
        outbound.clear()
        return data

    def get_timer(self) -> float | None:
        """When ``handle_timer`` must next be called, or None once closed."""
        if self._closed:
            return None
        if self._link_waiting and self._link_send_window > self._link_reserved:
            # link credit a woken stream gave up (it was reset before sending) is waiting to be handed on: now
            return self._last_received_at
        if self._pinged_since_heard:
            return self._last_received_at + self.config.keepalive_timeout
        return self._last_received_at + self.config.ping_after

    def handle_timer(self, now: float) -> list[Event]:
        """Run keepalive: ping a peer quiet for ``ping_after``, and declare the link dead once the peer has
        been silent for ``keepalive_timeout``, whatever we sent meanwhile: a black-holed link or a frozen peer
        is noticed within that bound of its last word, and a live peer, pinged well before, always has
        something to say in time.

        A dead link queues no GO_AWAY (nobody would read it); the mux just closes and reports
        ConnectionTerminated. Calling this early is harmless.
        """
        if self._closed:
            return []
        # deadlines as get_timer computes them, so a timer armed for one finds it due (floats don't round-trip)
        if now >= self._last_received_at + self.config.keepalive_timeout:
            self._close(go_away_code=None)
            reason = f"keepalive timeout: nothing heard from the peer for {self.config.keepalive_timeout:g}s"
            return [ConnectionTerminated(GoAwayCode.INTERNAL_ERROR, reason)]
        if not self._pinged_since_heard and now >= self._last_received_at + self.config.ping_after:
            self.ping(now)
            self._pinged_since_heard = True
        events: list[Event] = []
        if self._link_waiting and self._link_send_window > self._link_reserved:
            self._wake_link_waiters(events)  # credit a woken stream gave up (see get_timer)
        return events

    # ------------------------------------------------------------------ internals

    def _local_stream(self, stream_id: int) -> _Stream:
        if self._closed:
            raise MuxClosedError("the link is closed")
        stream = self._streams.get(stream_id)
        if stream is None:
            raise KeyError(f"stream {stream_id} is not open (never opened, closed or reset)")
        return stream

    def _transition(self, stream_id: int, stream: _Stream, stream_input: _Input) -> None:
        state = stream.state
        new_state = _TRANSITIONS.get((state, stream_input))
        if new_state is None:
            message = f"{stream_input.value} is not allowed on stream {stream_id} in state {state.value}"
            if stream_input in _REMOTE_INPUTS:
                raise ProtocolError(message)
            raise ValueError(message)
        if new_state is StreamState.CLOSED:
            self._forget(stream_id, stream)
            return
        self._unaccepted += (new_state in _UNACCEPTED_STATES) - (state in _UNACCEPTED_STATES)
        stream.enter(new_state)

    def _forget(self, stream_id: int, stream: _Stream) -> None:
        del self._streams[stream_id]
        self._link_growth -= stream.receive_window - INITIAL_STREAM_WINDOW
        if stream.state in _UNACCEPTED_STATES:
            self._unaccepted -= 1
        if stream.unacknowledged:
            # the application will never consume these now: their link credit goes back
            self._credit_link(stream.unacknowledged)
            stream.unacknowledged = 0
        if self._link_waiting or self._link_woken:
            self._leave_link_line(stream_id)

    # ------------------------------------------------------------------ link flow control

    def _credit_link(self, n: int) -> None:
        """``n`` received bytes are done with (consumed or dropped): owe the peer their link credit."""
        owed = self._link_unannounced + n
        self._link_unannounced = owed
        if owed * 2 >= self._link_window or (owed >= self._link_receive_remaining and owed >= _LINK_UPDATE_MIN):
            self._announce_link()

    def _announce_link(self) -> None:
        """Queue a stream-0 WINDOW_UPDATE returning all link credit owed."""
        delta = self._link_unannounced
        self._link_unannounced = 0
        self._link_receive_remaining += delta
        self._queue_header(_WINDOW_UPDATE, 0, 0, delta)

    def _track_link_wait(self, stream_id: int, stream: _Stream, size: int, accepted: int, link_window: int) -> None:
        """Book a send_data call while streams wait for link credit or this one is held up by it."""
        reserved = self._link_woken.pop(stream_id, None)
        if reserved is not None:
            self._link_reserved -= reserved
        if size > link_window < stream.send_window:
            self._link_waiting[stream_id] = size - accepted  # a stream already waiting keeps its place
        else:
            self._link_waiting.pop(stream_id, None)

    def _leave_link_line(self, stream_id: int) -> None:
        self._link_waiting.pop(stream_id, None)
        reserved = self._link_woken.pop(stream_id, None)
        if reserved is not None:
            self._link_reserved -= reserved

    def _wake_link_waiters(self, events: list[Event]) -> None:
        """Wake streams held up by the link window, first held first, as long as the link credit not yet set
        aside for streams woken earlier can serve them: a credit of a few bytes wakes one stream, never all."""
        available = self._link_send_window - self._link_reserved
        waiting = self._link_waiting
        woken = self._link_woken
        streams = self._streams
        while waiting and available > 0:
            stream_id = next(iter(waiting))
            wanted = waiting.pop(stream_id)
            stream = streams.get(stream_id)
            if stream is None or not stream.may_send or not stream.send_window:
                continue  # gone, or held up by its own window too: that window's WINDOW_UPDATE wakes it
            share = min(wanted, stream.send_window, available)
            woken[stream_id] = woken.get(stream_id, 0) + share
            self._link_reserved += share
            available -= share
            events.append(WindowUpdated(stream_id))

    def _announce_window(self, stream_id: int, stream: _Stream, flags: int) -> None:
        """Queue a WINDOW_UPDATE returning all credit owed (it may also carry SYN or ACK)."""
        delta = stream.unannounced
        stream.unannounced = 0
        stream.receive_remaining += delta
        self._queue_header(_WINDOW_UPDATE, flags, stream_id, delta)

    def _queue_header(self, frame_type: FrameType, flags: int, stream_id: int, length: int) -> None:
        self._outbound.append(_pack_header(PROTOCOL_VERSION, frame_type, flags, stream_id, length))

    def _close(self, go_away_code: int | None) -> None:
        if go_away_code is not None:
            self._queue_header(FrameType.GO_AWAY, 0, 0, go_away_code)
        self._closed = True
        self._streams.clear()
        self._pings.clear()
        self._unaccepted = 0
        self._link_waiting.clear()
        self._link_woken.clear()
        self._link_reserved = 0
