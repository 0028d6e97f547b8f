"""Events the multiplexer reports to the application, in the order the peer's frames caused them.

They are slotted dataclasses (equality, repr) with a hand-written ``__init__``: the one ``@dataclass`` writes is
interpreted Python even in a compiled build, about 0.3 µs per event on the hot path, where mypyc compiles this
one. Treat them as read-only. Don't subclass them; code downstream dispatches on the exact type.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ConnectionTerminated",
    "DataReceived",
    "Event",
    "GoAwayReceived",
    "MoveRequested",
    "LinkLost",
    "LinkResumed",
    "PingAcked",
    "StreamAccepted",
    "StreamEnded",
    "StreamOpened",
    "StreamReset",
    "WindowUpdated",
]


@dataclass(slots=True, init=False)
class StreamOpened:
    """The peer opened a stream. Answer with ``accept_stream`` or ``reset_stream``; data may already follow."""

    stream_id: int

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id


@dataclass(slots=True, init=False)
class StreamAccepted:
    """The peer accepted a stream we opened."""

    stream_id: int

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id


@dataclass(slots=True, repr=False, init=False)
class DataReceived:
    """Payload for a stream. Call ``acknowledge_received`` once it is consumed, or the peer's window runs dry."""

    stream_id: int
    data: bytes | memoryview

    def __init__(self, stream_id: int, data: bytes | memoryview) -> None:
        self.stream_id = stream_id
        self.data = data

    def __repr__(self) -> str:  # payloads can be 64 KiB; keep logs and test failures readable
        return f"DataReceived(stream_id={self.stream_id}, data=<{len(self.data)} bytes>)"


@dataclass(slots=True, init=False)
class StreamEnded:
    """The peer half-closed the stream (FIN): no more data will arrive, but we may still send."""

    stream_id: int

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id


@dataclass(slots=True, init=False)
class StreamReset:
    """The peer abandoned the stream (RST), or refused one we opened. The stream is gone."""

    stream_id: int

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id


@dataclass(slots=True, init=False)
class WindowUpdated:
    """The stream may send more: its send window grew, or link credit came back for it after the link's window
    held it up. A sender waiting for credit can try again."""

    stream_id: int

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id


@dataclass(slots=True, init=False)
class PingAcked:
    """The peer answered one of our pings after ``rtt`` seconds."""

    rtt: float

    def __init__(self, rtt: float) -> None:
        self.rtt = rtt


@dataclass(slots=True, init=False)
class GoAwayReceived:
    """The peer will accept no new streams (a ``GoAwayCode``); existing streams carry on and drain."""

    code: int

    def __init__(self, code: int) -> None:
        self.code = code


@dataclass(slots=True, init=False)
class MoveRequested:
    """The relay node is stopping and names where to go (``HOST:PORT`` of another node); the link carries on."""

    address: str

    def __init__(self, address: str) -> None:
        self.address = address


@dataclass(slots=True, init=False)
class LinkLost:
    """The peer stopped answering pings: the mux parked its streams (``Mux.park``) for a new link. Hang up the
    old one; ``resume`` on a new one within the resume window, or the streams are reset."""

    reason: str

    def __init__(self, reason: str) -> None:
        self.reason = reason


@dataclass(slots=True, init=False)
class LinkResumed:
    """The resume exchange on a new link finished: the parked streams carry on (those the peer no longer had
    were reported with StreamReset just before), and what the peer missed is on its way again."""

    streams: int
    """Streams that carried on."""
    resent: int
    """Bytes sent again because they were lost with the old link."""

    def __init__(self, streams: int, resent: int) -> None:
        self.streams = streams
        self.resent = resent


@dataclass(slots=True, init=False)
class ConnectionTerminated:
    """The link is dead (e.g. keepalive timeout) and the multiplexer closed; ``code`` is a ``GoAwayCode``."""

    code: int
    reason: str

    def __init__(self, code: int, reason: str) -> None:
        self.code = code
        self.reason = reason


Event = (
    StreamOpened
    | StreamAccepted
    | DataReceived
    | StreamEnded
    | StreamReset
    | WindowUpdated
    | PingAcked
    | GoAwayReceived
    | MoveRequested
    | LinkLost
    | LinkResumed
    | ConnectionTerminated
)
