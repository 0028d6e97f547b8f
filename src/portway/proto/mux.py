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
from typing import Final

from portway.errors import MuxClosedError, ProtocolError
from portway.proto.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    GoAwayReceived,
    MoveRequested,
    LinkLost,
    LinkResumed,
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
    MAX_MOVE_ADDRESS,
    MAX_STREAM_ID,
    MAX_WINDOW_SIZE,
    PROTOCOL_VERSION,
    Frame,
    FrameDecoder,
    FrameType,
    GoAwayCode,
    encode_data_header,
)
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

__all__ = ["ASSUMED_RTT", "GROWTH_ROUND_TRIPS", "RTT_PROBE_INTERVAL", "Mux", "MuxConfig", "Role", "StreamState"]

ASSUMED_RTT: Final = 0.1
"""Round-trip time (seconds) window growth assumes until a ping has measured one: a typical WAN path.

Guessing is safe in both directions: growth also needs the application to consume half a window that fast,
so a slow reader never earns a bigger window whatever the RTT.
"""

RTT_PROBE_INTERVAL: Final = 0.1
"""While a stream's data is being consumed, a ping goes out with its credit (WINDOW_UPDATE) at most this often
(seconds), and only once the previous one was answered, so that window growth compares with the round trip the
link has *under load*. A keepalive ping measures an idle link; loaded, the peer's answer waits behind the data it
already queued, and on a lossy link behind TCP's loss recovery, just as the data our credit lets it send does.
At most 10 pings a second each way: far below any peer's control-frame budget."""

GROWTH_ROUND_TRIPS: Final = 2
"""A stream's window doubles when the application consumed half a window within this many round trips: the
peer then sent at least a quarter of the window per round trip, and credit returned at half a window, after
a round trip and after the stalls of TCP's loss recovery, would hold it at about that. QUIC stacks grow theirs
on the same pace. Deciding every half window rather than every whole one takes a stream from the base window
to 4 MiB after 1.9 MB instead of 3.75 MB: on a long link, most of a transfer of a few MB."""

_MIN_GROWTH_RTT: Final = 0.001
"""Growth takes the round trip as at least this (seconds): on loopback, or with a coarse clock, a ping can come
back within the same clock reading, and a round trip of 0 would never let a window grow."""

_RTT_GAIN: Final = 1 / 8
"""Weight of a new round-trip sample in the smoothed RTT, as TCP's (RFC 6298): one slow answer (a loss
recovered) moves it by an eighth, a link that stays slower moves it within a second or two of probes."""

# Plain ints for the flag bits: the Flag enum's operators run in Python and this module tests flags per frame.
_SYN: Final = 0x1
_ACK: Final = 0x2
_FIN: Final = 0x4
_RST: Final = 0x8
_GROW: Final = 0x10
_DATA: Final = FrameType.DATA
_WINDOW_UPDATE: Final = FrameType.WINDOW_UPDATE
_PING: Final = FrameType.PING
_pack_header: Final = HEADER.pack
_PING_TOKEN_MASK: Final = 0xFFFFFFFF
_CONTROL_BUDGET_PERIOD: Final = 1.0
_LINK_UPDATE_MIN: Final = 64 * 1024
"""Link credit owed is returned once it reaches half the link window (or LINK_CONFIRM_EVERY), or earlier once it
is at least what the peer has left, but never in pieces smaller than this: slow readers holding most of the
window must not turn every consumed frame into a WINDOW_UPDATE."""
LINK_CONFIRM_EVERY: Final = 1024 * 1024
"""Link credit owed goes back, with every stream's consumption credit owed (``_announce_link``), at least once
this much was consumed, however large the link window. Until then the peer keeps what it sent for a resend: many
quiet streams (pooled conduits carrying small requests and answers) each owe far less than half their window, so
with only the link window's half as the trigger a peer kept up to 16 MiB of small payloads, 2-3x that in memory
as retained objects (a relay or agent at 200 connections: 50-65 MiB RSS instead of under 40). A sweep costs one
WINDOW_UPDATE per stream owing credit, once per MiB consumed: a few hundredths of a frame per small exchange."""


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
    resume_window: float = 30.0
    """Seconds a parked mux (its link lost, see ``Mux.park``) keeps its streams for a new link; past it, every
    stream is reset. 0: streams end with their link (a keepalive timeout closes the mux)."""
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
        if not 0 <= self.resume_window < float("inf"):
            raise ValueError(f"resume_window must be 0 or a positive number of seconds, got {self.resume_window}")

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


_S: Final = StreamState
_I: Final = _Input
# Every legal (state, input) pair and the state it leads to; anything missing is illegal: the peer's fault if
# the input came off the wire, the application's otherwise. RST is legal in every state and simply forgets the
# stream, so it has no rows. Reaching CLOSED forgets the stream too.
_TRANSITIONS: Final[dict[tuple[StreamState, _Input], StreamState]] = {
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
_REMOTE_INPUTS: Final = frozenset((_I.RECV_SYN, _I.RECV_ACK, _I.RECV_DATA, _I.RECV_FIN))
# Data never changes a stream's state, so the hot paths test these flags instead of looking up the table.
_SENDING_STATES: Final = frozenset(state for state, stream_input in _TRANSITIONS if stream_input is _I.SEND_DATA)
_RECEIVING_STATES: Final = frozenset(state for state, stream_input in _TRANSITIONS if stream_input is _I.RECV_DATA)
_UNACCEPTED_STATES: Final = frozenset(state for state, stream_input in _TRANSITIONS if stream_input is _I.SEND_ACK)
_FIN_SENT_STATES: Final = frozenset((_S.SYN_SENT_LOCAL_CLOSED, _S.LOCAL_CLOSED, _S.CLOSED))
_FIN_RECEIVED_STATES: Final = frozenset((_S.SYN_RECEIVED_REMOTE_CLOSED, _S.REMOTE_CLOSED, _S.CLOSED))
_OPENING_STATES: Final = frozenset((_S.SYN_SENT, _S.SYN_SENT_LOCAL_CLOSED))


class _Stream:
    """Per-stream state and flow-control counters.

    On the receive side ``receive_remaining + unacknowledged + unannounced + unannounced_growth ==
    receive_window`` always holds: every byte the window grants is either still usable by the peer, delivered
    but not yet consumed by the application, consumed but not yet credited back in a WINDOW_UPDATE, or added to
    the window and not yet announced (with GROW).

    For resuming on another link (proto/resume.py) it also counts the bytes received, keeps the bytes sent that
    the peer has not confirmed (``retransmit``; its ``end`` is the bytes sent) and what it knows of the peer's
    receive window: ``peer_consumed`` bytes credited back as consumed, ``peer_window`` its size.
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
        "unannounced_growth",
        "received",
        "retransmit",
        "fin_acked",
        "peer_window",
        "peer_consumed",
    )

    def __init__(self, receive_window: int, epoch_started_at: float, tally: RetransmitTally) -> None:
        self.state = StreamState.IDLE
        self.may_send = False
        self.may_receive = False
        self.send_window = INITIAL_STREAM_WINDOW
        self.receive_window = receive_window
        self.receive_remaining = INITIAL_STREAM_WINDOW
        self.unacknowledged = 0
        self.unannounced = 0
        self.unannounced_growth = receive_window - INITIAL_STREAM_WINDOW
        self.received = 0
        self.retransmit = RetransmitBuffer(tally)
        self.fin_acked = False  # the peer confirmed our FIN: it has everything we sent
        self.peer_window = INITIAL_STREAM_WINDOW
        self.peer_consumed = 0
        self.sent_any = False  # a stream we answered on did real work; resetting it is no flood
        # Window auto-growth measures how long the application takes to consume half a window ("epoch").
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
        self._smoothed_rtt: float | None = None  # what window growth compares with (see RTT_PROBE_INTERVAL)
        self._probe_token: int | None = None  # the last RTT probe's ping token; outstanding while in _pings
        self._probe_due_at = now
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
        self.link_waits = 0  # how often a stream was held up by the link window (streams by their own don't count)
        # How far the streams' receive windows are above the protocol's base, all together. Auto-growth stops
        # at half the link window: a few streams that read fast, then stalled (a paused video) must not hold
        # all of it, or every other stream of the link would wait for them.
        self._link_growth = 0
        self._window_growth_total = 0  # what auto-growth ever added, for metrics (streams gone included)
        # Resuming (see proto/resume.py). Streams closed in both directions whose last bytes or FIN the peer
        # has not confirmed yet: kept to send again if the link is lost first.
        self._retained: dict[int, _Stream] = {}
        # What the retransmit buffers hold together. The peer's windows bound it, but the peer chooses them, so
        # sending also stops at our own link window of it: a hostile peer announcing a huge window and never
        # consuming can't make us keep more than we would let it make us receive.
        self._retransmit = RetransmitTally()
        self._linked = True  # False while parked: no link to send on or receive from
        self._live = True  # linked and past any resume exchange: streams may send
        self._parked_until: float | None = None  # while parked or resuming: when the streams are given up
        self._resume_parts: list[bytes] | None = None  # the peer's RESUME payloads, while we wait for them all
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
    def smoothed_rtt(self) -> float | None:
        """Round-trip time smoothed over every answered ping (keepalive and probes alike), or None before the
        first answer; window growth compares with it."""
        return self._smoothed_rtt

    @property
    def window_growth_total(self) -> int:
        """Bytes window auto-growth has added to our streams' receive windows on this mux, ever (a counter)."""
        return self._window_growth_total

    @property
    def can_park(self) -> bool:
        """Whether losing the link now should park the streams: resuming is on, the mux is open, and neither
        side said GO_AWAY (a peer going away on purpose takes its streams with it)."""
        return (self.config.resume_window > 0 and not self._closed and not self._go_away_sent
                and not self._go_away_received)

    @property
    def is_parked(self) -> bool:
        """True from ``park`` until the resume exchange on a new link has finished (or the window expired)."""
        return self._parked_until is not None

    @property
    def retransmit_size(self) -> int:
        """Bytes kept to send again should the link be lost: sent on the live and retained streams and not yet
        confirmed by the peer. At most the peer's link window (see proto/resume.py)."""
        return self._retransmit.held

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
        if not self._linked:
            raise ValueError("the mux is parked: resume() it on a new link first")
        if data:
            self._last_received_at = now
            self._pinged_since_heard = False
        decoder = self._decoder
        decoder.feed(data)
        events: list[Event] = []
        if self._resume_parts is not None:
            try:
                still_waiting = self._receive_resume(now, events)
            except ProtocolError as error:
                self._close(go_away_code=error.code)
                raise
            if still_waiting or self._closed:
                return events
        streams = self._streams
        link_remaining = self._link_receive_remaining  # kept in a local while frames take the fast path
        try:
            while (frame := decoder.next_frame()) is not None:
                # Fast path: payload on a stream that may receive it, within its window and the link's.
                if frame.type is _DATA and not frame.flags:
                    stream_id = frame.stream_id
                    length = frame.length
                    stream = streams.get(stream_id)
                    if (
                        stream is not None
                        and stream.may_receive
                        and 0 < length <= stream.receive_remaining
                        and length <= link_remaining
                    ):
                        stream.receive_remaining -= length
                        stream.unacknowledged += length
                        stream.received += length
                        link_remaining -= length
                        events.append(DataReceived(stream_id, frame.payload))
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
        if self._link_waiting and self._sendable_link() > self._link_reserved:
            self._wake_link_waiters(events)
        return events

    def _receive_frame(self, frame: Frame, now: float, events: list[Event]) -> None:
        frame_type, flags, stream_id = frame.type, frame.flags, frame.stream_id
        length, payload = frame.length, frame.payload
        if frame_type is _PING:
            self._receive_ping(int(flags), length, now, events)
        elif frame_type is FrameType.FIN_ACK:
            self._receive_fin_ack(stream_id, now)
        elif frame_type is FrameType.RESUME:
            raise ProtocolError("RESUME outside a resume exchange")
        elif frame_type is FrameType.GO_AWAY:
            self._count_control_frame(now)
            self._go_away_received = True
            events.append(GoAwayReceived(length))
        elif frame_type is FrameType.MOVE:
            self._count_control_frame(now)
            if self.role is not Role.CLIENT:
                raise ProtocolError("MOVE from an agent: only a relay names where to go")
            try:
                address = bytes(payload).decode("ascii")
            except UnicodeDecodeError:
                raise ProtocolError("MOVE address is not ASCII") from None
            events.append(MoveRequested(address))
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
        payload: bytes | memoryview,
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
            retained = self._retained.get(stream_id)
            if retained is not None and frame_type is _WINDOW_UPDATE and not flags & ~_GROW:
                if length and not flags:  # consumption credit that crossed our FIN: lets go of more
                    self._confirm_consumed(stream_id, retained, length)
                return
            if flags & _RST and retained is not None:
                del self._retained[stream_id]
                retained.retransmit.clear()
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
            stream.received += length
            if length:
                events.append(DataReceived(stream_id, payload))
        elif length:
            window = stream.send_window + length
            if window > MAX_WINDOW_SIZE:
                raise ProtocolError(f"WINDOW_UPDATE overflows the send window of stream {stream_id}")
            stream.send_window = window
            if flags & _GROW:
                stream.peer_window += length
            else:
                self._confirm_consumed(stream_id, stream, length)
            if stream.may_send:
                events.append(WindowUpdated(stream_id))
        if flags & _FIN:
            self._transition(stream_id, stream, _I.RECV_FIN)
            self._queue_header(FrameType.FIN_ACK, 0, stream_id, 0)
            events.append(StreamEnded(stream_id))

    def _confirm_consumed(self, stream_id: int, stream: _Stream, credit: int) -> None:
        """Credit that is no GROW says the peer's application consumed that many more of our bytes: they need
        not be kept for a resume any longer."""
        consumed = stream.peer_consumed + credit
        if consumed > stream.retransmit.end:
            raise ProtocolError(
                f"WINDOW_UPDATE on stream {stream_id} returns credit for {consumed} bytes consumed, but only"
                f" {stream.retransmit.end} were sent (window growth must be flagged GROW)"
            )
        stream.peer_consumed = consumed
        stream.retransmit.trim(consumed)

    def _receive_fin_ack(self, stream_id: int, now: float) -> None:
        """The peer has all we sent on the stream, FIN included: nothing of it needs keeping any more."""
        stream = self._streams.get(stream_id)
        if stream is not None:
            if stream.state not in _FIN_SENT_STATES or stream.fin_acked:
                raise ProtocolError(f"FIN_ACK on stream {stream_id}, which sent no FIN")
            stream.fin_acked = True
            stream.retransmit.clear()
            return
        retained = self._retained.pop(stream_id, None)
        if retained is not None:
            retained.retransmit.clear()
            return
        self._check_was_opened(stream_id)
        self._count_control_frame(now)

    def _receive_syn(self, stream_id: int, now: float, events: list[Event]) -> _Stream | None:
        """Register a stream the peer opens, or refuse it with RST (no event) when we are at a limit or the peer
        said GO_AWAY. One that arrives after our own GO_AWAY crossed it (the peer opened it before reading ours,
        and opens none after): it is served like any other, since a refusal would fail a request nobody saw (a
        moving agent's old node opening a stream for a visitor just as the agent said GO_AWAY)."""
        if stream_id % 2 != self._remote_parity:
            raise ProtocolError(f"peer opened stream {stream_id}, an id from our half of the space")
        if stream_id <= self._highest_remote_id:
            raise ProtocolError(f"peer reopened stream {stream_id}; ids must increase")
        self._highest_remote_id = stream_id
        if (
            self._go_away_received
            or self._unaccepted >= self.config.accept_backlog
            or len(self._streams) + len(self._retained) >= self.config.max_streams
        ):
            self._queue_header(_WINDOW_UPDATE, _RST, stream_id, 0)
            return None
        stream = _Stream(INITIAL_STREAM_WINDOW, epoch_started_at=now, tally=self._retransmit)
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
            sample = now - sent_at
            self._last_rtt = sample
            smoothed = self._smoothed_rtt
            self._smoothed_rtt = sample if smoothed is None else smoothed + (sample - smoothed) * _RTT_GAIN
            events.append(PingAcked(sample))

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
        if not self._live:
            raise MuxClosedError("the link is lost and not resumed yet; no new streams")
        stream_id = self._next_local_id
        if stream_id > MAX_STREAM_ID:
            raise MuxClosedError("stream ids are exhausted on this link; open a new one")
        self._next_local_id = stream_id + 2
        stream = _Stream(self.config.initial_window, epoch_started_at=0.0,  # the epoch starts at the ACK
                         tally=self._retransmit)
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
        stream.unannounced_growth += extra
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
        if not self._live:  # parked: no window until the peer's RESUME says how much it has
            if end_stream and not size:
                self.end_stream(stream_id)
            return 0
        window = stream.send_window
        link_window = self._sendable_link()
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
        frame_size = self.config.max_frame_size
        view: bytes | memoryview
        if accepted == size <= frame_size and type(data) is bytes:
            # one whole frame, kept and queued as it is: a view would add ~230 bytes to each small payload kept
            # for a resend, and a relay keeps thousands of request heads (an agent, of answers) at a time
            view = data
        else:
            part = memoryview(data)[:accepted]
            if type(part.obj) is not bytes:
                # Queued frames reference the payload until data_to_send(); a mutable buffer must be frozen first.
                part = memoryview(bytes(part))
            view = part
        stream.retransmit.append(view)  # kept until the peer confirms it (the window bounds how much)
        outbound = self._outbound
        if accepted <= frame_size:  # one frame: no range object and no slice per call (most sends are small)
            outbound.append(encode_data_header(stream_id, accepted, fin != 0))
            outbound.append(view)
        else:
            for start in range(0, accepted, frame_size):
                chunk = view[start : start + frame_size]
                last = start + frame_size >= accepted
                outbound.append(encode_data_header(stream_id, len(chunk), last and fin != 0))
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
        if stream is None or not stream.may_send or not self._live:
            return 0
        link_window = self._sendable_link() - self._link_reserved + self._link_woken.get(stream_id, 0)
        return min(stream.send_window, link_window)

    def end_stream(self, stream_id: int) -> None:
        """Half-close: we send no more data, the peer may still send."""
        stream = self._local_stream(stream_id)
        self._transition(stream_id, stream, _I.SEND_FIN)
        if self._live:  # else it is a position like any byte, sent when the link resumes
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
        half a window within ``GROWTH_ROUND_TRIPS`` round trips of the previous such half (or of the peer
        being able to start sending: its SYN, or its ACK of our open): the window, not the reader, was then
        limiting throughput. The round trip is the smoothed RTT of the pings answered so far, which include the RTT
        probes sent from here while data is consumed (see ``RTT_PROBE_INTERVAL``), so it is the link's round
        trip under load, losses recovered included; until a ping has been answered, ``ASSUMED_RTT`` stands in.
        Growth stops once the windows of all the link's streams together are half the link window above the
        protocol's base.
        Acknowledging for a stream that is already gone does nothing (its bytes' link credit went back when it
        went). Link credit is batched likewise: it goes out once half the link window (or ``LINK_CONFIRM_EVERY``)
        is owed, or once what is owed is at least what the peer has left (slow streams holding the rest), in pieces
        of 64 KiB or more.
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
        if (owed >= LINK_CONFIRM_EVERY or owed * 2 >= self._link_window
                or (owed >= self._link_receive_remaining and owed >= _LINK_UPDATE_MIN)):
            self._announce_link()
        if not stream.may_receive:
            return  # the peer has finished sending, stream credit would be wasted (link credit is not)
        stream.epoch_consumed += n
        if stream.epoch_consumed * 2 >= stream.receive_window:
            rtt = ASSUMED_RTT if self._smoothed_rtt is None else max(self._smoothed_rtt, _MIN_GROWTH_RTT)
            if (now - stream.epoch_started_at < GROWTH_ROUND_TRIPS * rtt
                    and stream.receive_window < self.config.max_window):
                growth = min(stream.receive_window, self.config.max_window - stream.receive_window,
                             self._link_window // 2 - self._link_growth)
                if growth > 0:
                    stream.unannounced_growth += growth  # doubling owes >= half: announced below
                    stream.receive_window += growth
                    self._link_growth += growth
                    self._window_growth_total += growth
            stream.epoch_started_at = now
            stream.epoch_consumed = 0
        if (stream.unannounced + stream.unannounced_growth) * 2 >= stream.receive_window:
            self._announce_window(stream_id, stream, 0)
            if now >= self._probe_due_at and self._live and self._probe_token not in self._pings:
                # the probe times the credit's loop: its answer waits behind what the peer sends meanwhile
                self._probe_token = self._next_ping_token
                self._probe_due_at = now + RTT_PROBE_INTERVAL
                self.ping(now)

    # ------------------------------------------------------------------ link API

    def ping(self, now: float) -> None:
        """Ask the peer for a PING answer; it comes back as PingAcked with the round-trip time.

        Its answer, like anything else the peer sends, keeps the link alive (see ``handle_timer``).
        """
        if self._closed or not self._live:
            raise MuxClosedError("the link is closed" if self._closed else "the link is lost and not resumed yet")
        token = self._next_ping_token
        self._next_ping_token = (token + 1) & _PING_TOKEN_MASK
        self._pings[token] = now
        self._queue_header(_PING, _SYN, 0, token)

    def move(self, address: str) -> None:
        """A relay that is stopping: tell the agent where to go (another node's ``HOST:PORT``). Nothing else
        changes: streams open both ways as before, until the agent, registered there, says GO_AWAY."""
        if self.role is not Role.SERVER:
            raise ValueError("only the relay's side of a link sends MOVE")
        encoded = address.encode("ascii")
        if not 0 < len(encoded) <= MAX_MOVE_ADDRESS:
            raise ValueError(f"a MOVE address takes 1 to {MAX_MOVE_ADDRESS} bytes, not {len(encoded)}")
        if self._closed or not self._live or self._go_away_sent or self._go_away_received:
            return  # closed, parked (a lost link), or going away already: nobody is there to move
        self._outbound.append(_pack_header(PROTOCOL_VERSION, FrameType.MOVE, 0, 0, len(encoded)) + encoded)

    def go_away(self, code: int = GoAwayCode.NORMAL) -> None:
        """Tell the peer to open no new streams, and that none will be opened from here; existing streams drain
        normally, and so do those the peer opened before it read this (see _receive_syn)."""
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
        if self._parked_until is not None:
            return self._parked_until
        if self._link_waiting and self._sendable_link() > self._link_reserved:
            # link credit a woken stream gave up (it was reset before sending) is waiting to be handed on: now
            return self._last_received_at
        if self._pinged_since_heard:
            return self._last_received_at + self.config.keepalive_timeout
        return self._last_received_at + self.config.ping_after

    def handle_timer(self, now: float) -> list[Event]:
        """Run keepalive: ping a peer quiet for ``ping_after``, and declare the link dead once the peer has
        been silent for ``keepalive_timeout``, whatever we sent meanwhile: a black-holed link or a frozen peer
        is noticed within that bound of its last word, and a live peer, pinged well before, always has
        something to say in time. A parked mux gives its streams up once the resume window has passed.

        A dead link queues no GO_AWAY (nobody would read it): the mux parks its streams and reports LinkLost
        (``can_park``), or closes and reports ConnectionTerminated. Calling this early is harmless.
        """
        if self._closed:
            return []
        if self._parked_until is not None:
            if now < self._parked_until:
                return []
            return self._give_up(f"the link was not resumed within {self.config.resume_window:g}s")
        # deadlines as get_timer computes them, so a timer armed for one finds it due (floats don't round-trip)
        if now >= self._last_received_at + self.config.keepalive_timeout:
            reason = f"keepalive timeout: nothing heard from the peer for {self.config.keepalive_timeout:g}s"
            if self.can_park:
                self.park(now)
                return [LinkLost(reason)]
            self._close(go_away_code=None)
            return [ConnectionTerminated(GoAwayCode.INTERNAL_ERROR, reason)]
        if not self._pinged_since_heard and now >= self._last_received_at + self.config.ping_after:
            self.ping(now)
            self._pinged_since_heard = True
        events: list[Event] = []
        if self._link_waiting and self._sendable_link() > self._link_reserved:
            self._wake_link_waiters(events)  # credit a woken stream gave up (see get_timer)
        return events

    # ------------------------------------------------------------------ link loss and resume

    def park(self, now: float) -> None:
        """The link was lost without a GO_AWAY: keep every stream for a new link, until ``resume_window`` after
        the first loss (a new link lost during the resume exchange keeps that deadline).

        Until the exchange on a new link is done, no stream can send (its window is 0) and no stream can be
        opened; ending, resetting, accepting and acknowledging work as usual and take effect on the new link.
        ``handle_timer`` past the deadline resets every stream. What was queued for the old link is dropped.
        """
        if self._closed:
            raise MuxClosedError("the link is closed")
        if self._parked_until is None:
            self._parked_until = now + self.config.resume_window
        self._linked = False
        self._live = False
        self._resume_parts = None
        self._decoder = FrameDecoder(self.config.max_frame_size)  # a frame cut in half is lost with the link
        self._outbound = []
        self._pings.clear()
        self._link_waiting.clear()
        self._link_woken.clear()
        self._link_reserved = 0

    def resume(self, now: float) -> None:
        """Start the resume exchange on a new link: queue the RESUME frames listing every stream we hold. The
        peer's RESUME (``receive_data``) finishes it: LinkResumed, what the peer missed re-sent, windows set."""
        if self._closed:
            raise MuxClosedError("the link is closed")
        if self._linked or self._parked_until is None:
            raise ValueError("only a parked mux can resume")
        self._linked = True
        self._resume_parts = []
        self._outbound = []  # what the application queued while parked is restated by the resume list
        self._last_received_at = now
        self._pinged_since_heard = False
        entries = []
        held = 0
        for stream_id, stream in self._streams.items():
            # whatever credit is owed is re-granted in the entry's limit: the old link's updates may be lost
            stream.receive_remaining += stream.unannounced + stream.unannounced_growth
            stream.unannounced = stream.unannounced_growth = 0
            held += stream.unacknowledged
            accepted = stream_id % 2 == self._remote_parity and stream.state not in _UNACCEPTED_STATES
            received = stream.received + (stream.state in _FIN_RECEIVED_STATES)
            limit = stream.received + stream.receive_remaining
            entries.append(ResumeEntry(stream_id, accepted, received, limit, stream.receive_window))
        for stream_id, stream in self._retained.items():
            entries.append(ResumeEntry(stream_id, stream_id % 2 == self._remote_parity, stream.received + 1,
                                       stream.received, 0))
        self._link_unannounced = 0
        self._link_receive_remaining = self._link_window - held
        resume = ResumeList(self._highest_remote_id, self._link_receive_remaining, tuple(entries))
        payloads = encode_resume(resume, self.config.max_frame_size)
        for index, payload in enumerate(payloads):
            last = index == len(payloads) - 1
            self._outbound.append(_pack_header(PROTOCOL_VERSION, FrameType.RESUME, _FIN if last else 0, 0,
                                               len(payload)))
            self._outbound.append(payload)
        if self._go_away_sent:  # it may have been lost with the old link
            self._queue_header(FrameType.GO_AWAY, 0, 0, GoAwayCode.NORMAL)

    def unanswered_streams(self) -> list[int]:
        """Streams we opened that the peer has not accepted yet: on a lost link nothing says the peer ever saw
        them (a request sent into a black hole), so a caller may rather fail them at once than park them."""
        parity = self._remote_parity
        return [stream_id for stream_id, stream in self._streams.items()
                if stream_id % 2 != parity and stream.state in _OPENING_STATES]

    def abandon(self) -> list[Event]:
        """Give the parked streams up now (the peer lost its state, or no new link is coming): every stream
        is reset and the mux closes."""
        if self._closed:
            return []
        return self._give_up("the peer no longer has this link's streams")

    def _give_up(self, reason: str) -> list[Event]:
        events: list[Event] = [StreamReset(stream_id) for stream_id in self._streams]
        self._retained.clear()
        self._close(go_away_code=None)
        events.append(ConnectionTerminated(GoAwayCode.INTERNAL_ERROR, reason))
        return events

    def _receive_resume(self, now: float, events: list[Event]) -> bool:
        """While we wait for the peer's RESUME: collect it, and once whole apply it and go on with the frames
        that follow it in the same read like any others. Returns whether we still wait for it."""
        parts: list[bytes] | None = self._resume_parts
        for frame in self._decoder:
            if parts is None:
                self._receive_frame(frame, now, events)
                continue
            if frame.type is not FrameType.RESUME:
                raise ProtocolError(f"{frame.type.name} frame before the peer's RESUME on a resumed link")
            parts.append(bytes(frame.payload))  # RESUME payloads are bytes already: no copy
            # an honest list holds at most the streams a link may hold (live and retained); twice ours is
            # generous for a peer configured otherwise, and keeps what a hostile one can make us buffer bounded
            if sum(map(len, parts)) > 2 * self.config.max_streams * ENTRY.size + len(parts) * RESUME_HEADER.size:
                raise ProtocolError("RESUME lists more streams than a link may hold")
            if frame.flags & _FIN:
                self._resume_parts = None
                self._apply_resume(decode_resume(parts), now, events)
                parts = None
        return parts is not None

    def _apply_resume(self, resume: ResumeList, now: float, events: list[Event]) -> None:
        """Settle every stream with what the peer says it holds, then let them carry on."""
        listed = {entry.stream_id: entry for entry in resume.entries}
        resent = 0
        for stream_id, stream in list(self._streams.items()):
            entry = listed.get(stream_id)
            if entry is not None:
                resent += self._resume_stream(stream_id, stream, entry, now, events)
            elif stream_id % 2 != self._remote_parity and stream_id > resume.highest_peer_stream:
                resent += self._reopen_stream(stream_id, stream)  # our open never arrived: it all goes again
            else:
                self._forget(stream_id, stream)  # the peer gave it up (reset it, or lost it)
                events.append(StreamReset(stream_id))
        for stream_id, stream in list(self._retained.items()):
            entry = listed.get(stream_id)
            if entry is None:
                del self._retained[stream_id]  # the peer got all of it and forgot it (see proto/resume.py)
                stream.retransmit.clear()
            else:
                resent += self._resume_stream(stream_id, stream, entry, now, events)
        if resent > resume.link_window:
            raise ProtocolError(f"the peer's link window of {resume.link_window} can't take the {resent} bytes it"
                                " missed")
        self._link_send_window = resume.link_window - resent
        self._parked_until = None
        self._live = True
        events.append(LinkResumed(len(self._streams), resent))
        events.extend(WindowUpdated(stream_id) for stream_id, stream in self._streams.items() if stream.may_send)

    def _resume_stream(self, stream_id: int, stream: _Stream, entry: ResumeEntry, now: float,
                       events: list[Event]) -> int:
        """Send again what the peer is missing of a stream both sides hold; return how many data bytes."""
        retransmit = stream.retransmit
        fin_sent = stream.state in _FIN_SENT_STATES
        received = entry.received
        if not retransmit.start <= min(received, retransmit.end) or received > retransmit.end + fin_sent:
            raise ProtocolError(
                f"RESUME says {received} positions of stream {stream_id} arrived, but we sent"
                f" {retransmit.end + fin_sent} and it had confirmed {retransmit.start}"
            )
        if received > retransmit.end:  # the FIN arrived too: nothing to send again
            retransmit.clear()
            stream.fin_acked = True
            if stream.state is StreamState.CLOSED:
                del self._retained[stream_id]
                return 0
        missing = retransmit.since(received) if received <= retransmit.end else []
        retransmit.trim(min(received, retransmit.end))
        if stream.state is not StreamState.CLOSED:
            if entry.accepted and stream.state in _OPENING_STATES and stream_id % 2 != self._remote_parity:
                self._transition(stream_id, stream, _I.RECV_ACK)  # its ACK was lost with the old link
                stream.epoch_started_at = now
                events.append(StreamAccepted(stream_id))
            if entry.limit < retransmit.end:
                raise ProtocolError(f"RESUME shrinks the window of stream {stream_id} below what was sent")
            stream.peer_window = entry.window
            stream.peer_consumed = entry.limit - entry.window
            stream.send_window = entry.limit - retransmit.end
        return self._resend(stream_id, missing, fin_sent and not stream.fin_acked)

    def _reopen_stream(self, stream_id: int, stream: _Stream) -> int:
        """Open again a stream whose SYN was lost with the old link, and send all of it again."""
        retransmit = stream.retransmit
        if stream.state not in _OPENING_STATES or retransmit.start or stream.received:
            raise ProtocolError(f"RESUME says stream {stream_id}'s open never arrived, but the peer answered it")
        stream.receive_remaining = INITIAL_STREAM_WINDOW  # the peer starts it afresh, at the protocol's base
        stream.unannounced_growth = stream.receive_window - INITIAL_STREAM_WINDOW
        self._announce_window(stream_id, stream, _SYN)
        stream.peer_window = INITIAL_STREAM_WINDOW
        stream.peer_consumed = 0
        stream.send_window = INITIAL_STREAM_WINDOW - retransmit.end
        return self._resend(stream_id, retransmit.since(0), stream.state in _FIN_SENT_STATES)

    def _resend(self, stream_id: int, chunks: list[bytes | memoryview], fin: bool) -> int:
        frame_size = self.config.max_frame_size
        outbound = self._outbound
        frames: list[bytes | memoryview] = []
        for chunk in chunks:
            frames.extend(chunk[start : start + frame_size] for start in range(0, len(chunk), frame_size))
        for index, frame in enumerate(frames):
            flags = _FIN if fin and index == len(frames) - 1 else 0
            outbound.append(_pack_header(PROTOCOL_VERSION, _DATA, flags, stream_id, len(frame)))
            outbound.append(frame)
        if fin and not frames:
            self._queue_header(_WINDOW_UPDATE, _FIN, stream_id, 0)
        return sum(map(len, frames))

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
            self._forget(stream_id, stream, keep_retransmit=not stream.fin_acked)
            stream.state = new_state
            if not stream.fin_acked:  # our last bytes or FIN may still be lost with the link: keep them
                self._retained[stream_id] = stream
            return
        self._unaccepted += (new_state in _UNACCEPTED_STATES) - (state in _UNACCEPTED_STATES)
        stream.enter(new_state)

    def _forget(self, stream_id: int, stream: _Stream, keep_retransmit: bool = False) -> None:
        del self._streams[stream_id]
        if not keep_retransmit:
            stream.retransmit.clear()
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

    def _sendable_link(self) -> int:
        """What the link lets us send: the peer's credit, and no more than our own link window can keep."""
        keepable = self._link_window - self._retransmit.held
        return keepable if keepable < self._link_send_window else self._link_send_window

    def _credit_link(self, n: int) -> None:
        """``n`` received bytes are done with (consumed or dropped): owe the peer their link credit."""
        owed = self._link_unannounced + n
        self._link_unannounced = owed
        if (owed >= LINK_CONFIRM_EVERY or owed * 2 >= self._link_window
                or (owed >= self._link_receive_remaining and owed >= _LINK_UPDATE_MIN)):
            self._announce_link()

    def _announce_link(self) -> None:
        """Queue a stream-0 WINDOW_UPDATE returning all link credit owed, after every stream's consumption credit
        owed: whatever the peer counts as done on the link it has then also seen confirmed on its stream, which
        is what bounds its retransmit buffers by the link window."""
        for stream_id, stream in self._streams.items():
            if stream.unannounced and stream.may_receive:
                self._announce_window(stream_id, stream, 0)
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
            if stream_id not in self._link_waiting:
                self.link_waits += 1
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
        available = self._sendable_link() - self._link_reserved
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
        """Queue what the stream's window owes the peer: growth (GROW, with SYN or ACK if given) and credit for
        consumed bytes, each in its own WINDOW_UPDATE, so that the peer can tell them apart."""
        growth = stream.unannounced_growth
        consumed = stream.unannounced
        stream.unannounced_growth = 0
        stream.unannounced = 0
        stream.receive_remaining += growth + consumed
        if growth or flags:
            self._queue_header(_WINDOW_UPDATE, flags | _GROW, stream_id, growth)
        if consumed:
            self._queue_header(_WINDOW_UPDATE, 0, stream_id, consumed)

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
