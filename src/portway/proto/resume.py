"""Streams that outlive their link: the resume exchange's wire format and the retransmit buffer.

When an agent link drops unexpectedly (no GO_AWAY) each side *parks* its :class:`~portway.proto.mux.Mux`
(``Mux.park``): its streams stay, writers find no window, readers get nothing, for at most
``MuxConfig.resume_window`` seconds. When the agent is back, each side calls ``Mux.resume`` on its new link
and the first thing both send is a list of the streams they still hold, in RESUME frames (stream 0; the last
one flagged FIN). Each :class:`ResumeEntry` says, for one stream, how much of it this side received and how far
the peer may send on it. Each side then re-sends what the other is missing from its retransmit buffer, and
the streams carry on on the new link byte-exact: nothing lost, nothing twice.

Positions count a stream's bytes from 0, and its end (FIN) as one more position, so "received the FIN"
needs no flag of its own: a side that received ``n`` bytes and the FIN reports ``n + 1``.

What a side must keep to re-send is what it sent and does not know arrived. It learns that from credit: a
WINDOW_UPDATE that is not a GROW returns credit for bytes the peer's *application* consumed, and a FIN_ACK
confirms the whole stream. So a stream's :class:`RetransmitBuffer` never holds more than the peer's receive
window for it (``MuxConfig.max_window``, 4 MiB by default): bytes past the window were never sent. Over all the
streams of a link it never holds more than the peer's link window (``MuxConfig.link_window``, 32 MiB): the mux
returns every stream's owed credit before it returns link credit, so every byte the link window counts as
done has also been confirmed on its stream. The peer picks those windows, though, so a mux also stops sending
once its buffers hold its *own* link window: what a hostile peer can make it keep is what it can make it
receive.

The peer not listing a stream means one of three things, told apart by what each side knows for itself:
we opened it and the peer never saw our open (its id is above the highest the peer saw): we open it again
and send it all; we had already finished both directions of it: the peer got everything and forgot it, and so
do we; otherwise the peer gave up the stream (reset it, or lost its state), and so must we, visibly.

A payload is a fixed header (the highest stream id this side saw the peer open, and the link window it grants
the peer on the new link), then entries; this module encodes and decodes it and never touches a Mux.
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass
from typing import Final

from portway.errors import ProtocolError

__all__ = [
    "ENTRY",
    "RESUME_HEADER",
    "RetransmitBuffer",
    "RetransmitTally",
    "ResumeEntry",
    "ResumeList",
    "decode_resume",
    "encode_resume",
]

RESUME_HEADER: Final = struct.Struct(">II")
"""highest stream id seen from the peer u32 | link window granted to the peer on the new link u32"""
ENTRY: Final = struct.Struct(">IBQQI")
"""stream id u32 | flags u8 | received position u64 | receive limit u64 | receive window u32"""
ENTRY_ACCEPTED: Final = 0x1
"""This side accepted the stream the peer opened (its ACK may have been lost with the link)."""
_KNOWN_ENTRY_FLAGS: Final = ENTRY_ACCEPTED


@dataclass(frozen=True, slots=True)
class ResumeEntry:
    """One stream as this side holds it when the new link starts."""

    stream_id: int
    accepted: bool
    """For a stream the peer opened: this side accepted it. Always False for a stream this side opened."""
    received: int
    """Bytes of the peer's data received, plus 1 once its FIN has arrived: the peer re-sends from here."""
    limit: int
    """Data position up to which the peer may send (received bytes plus the window still open to it)."""
    window: int
    """This side's receive window for the stream: credit beyond ``limit - window`` was consumed by the
    application, so the peer may forget those bytes."""


@dataclass(frozen=True, slots=True)
class ResumeList:
    """Everything one side's RESUME frames say."""

    highest_peer_stream: int
    """The highest id of a stream the peer opened that this side saw; opens above it never arrived."""
    link_window: int
    """Link credit granted to the peer on the new link: the link window less what this side still holds."""
    entries: tuple[ResumeEntry, ...]


def encode_resume(resume: ResumeList, max_frame_size: int) -> list[bytes]:
    """The payloads of the RESUME frames that carry ``resume`` (at least one; the last is to be flagged FIN)."""
    per_frame = max(1, (max_frame_size - RESUME_HEADER.size) // ENTRY.size)
    if RESUME_HEADER.size + ENTRY.size > max_frame_size:
        raise ValueError(f"max_frame_size {max_frame_size} can't carry one resume entry")
    header = RESUME_HEADER.pack(resume.highest_peer_stream, resume.link_window)
    entries = resume.entries
    payloads = []
    for start in range(0, max(len(entries), 1), per_frame):
        parts = [header]
        for entry in entries[start : start + per_frame]:
            flags = ENTRY_ACCEPTED if entry.accepted else 0
            parts.append(ENTRY.pack(entry.stream_id, flags, entry.received, entry.limit, entry.window))
        payloads.append(b"".join(parts))
    return payloads


def decode_resume(payloads: list[bytes]) -> ResumeList:
    """Read the payloads of one side's RESUME frames; ProtocolError for anything malformed."""
    entries: list[ResumeEntry] = []
    header: tuple[int, int] | None = None
    seen: set[int] = set()
    for payload in payloads:
        if len(payload) < RESUME_HEADER.size or (len(payload) - RESUME_HEADER.size) % ENTRY.size:
            raise ProtocolError(f"RESUME payload of {len(payload)} bytes is not a header and whole entries")
        this_header = RESUME_HEADER.unpack_from(payload)
        if header is not None and this_header != header:
            raise ProtocolError("RESUME frames of one exchange disagree on the header")
        header = this_header
        for offset in range(RESUME_HEADER.size, len(payload), ENTRY.size):
            stream_id, flags, received, limit, window = ENTRY.unpack_from(payload, offset)
            if stream_id == 0 or stream_id in seen:
                raise ProtocolError(f"RESUME lists stream {stream_id} {'twice' if stream_id else '(the link)'}")
            if flags & ~_KNOWN_ENTRY_FLAGS:
                raise ProtocolError(f"RESUME entry for stream {stream_id} has unknown flags 0x{flags:x}")
            if limit + 1 < received or window > limit:
                raise ProtocolError(f"RESUME entry for stream {stream_id} is inconsistent")
            seen.add(stream_id)
            entries.append(ResumeEntry(stream_id, bool(flags & ENTRY_ACCEPTED), received, limit, window))
    if header is None:
        raise ProtocolError("empty RESUME exchange")
    return ResumeList(header[0], header[1], tuple(entries))


class RetransmitTally:
    """What all the retransmit buffers of one link hold together, kept up to date by each of them."""

    __slots__ = ("held",)

    def __init__(self) -> None:
        self.held = 0


class RetransmitBuffer:
    """The bytes of one stream sent but not yet known to have arrived: positions ``start`` to ``end``.

    Holds the payloads the mux queued (no copy: a small one whole, as it is, the rest as views); ``trim`` drops
    what the peer confirmed, ``since`` returns what to send again from a position the peer reported, ``clear``
    drops it all (the stream is done with). The link's tally follows every change.
    """

    __slots__ = ("start", "end", "_chunks", "_tally")

    def __init__(self, tally: RetransmitTally) -> None:
        self.start = 0
        self.end = 0
        self._chunks: deque[bytes | memoryview] = deque()
        self._tally = tally

    def __len__(self) -> int:
        return self.end - self.start

    def append(self, chunk: bytes | memoryview) -> None:
        self._chunks.append(chunk)
        self.end += len(chunk)
        self._tally.held += len(chunk)

    def trim(self, position: int) -> None:
        """Forget everything before ``position`` (the peer has it); positions at or before ``start`` are no-ops."""
        if position <= self.start:
            return
        if position > self.end:
            raise ValueError(f"can't confirm position {position}: only {self.end} bytes were sent")
        drop = position - self.start
        self._tally.held -= drop
        chunks = self._chunks
        while drop:
            first = chunks[0]
            if len(first) <= drop:
                chunks.popleft()
                drop -= len(first)
            else:
                chunks[0] = memoryview(first)[drop:]
                drop = 0
        self.start = position

    def since(self, position: int) -> list[bytes | memoryview]:
        """The bytes from ``position`` to the end; ``position`` must be in ``start..end``."""
        if not self.start <= position <= self.end:
            raise ValueError(f"position {position} is outside the buffer's {self.start}..{self.end}")
        skip = position - self.start
        chunks: list[bytes | memoryview] = []
        for chunk in self._chunks:
            if skip >= len(chunk):
                skip -= len(chunk)
                continue
            chunks.append(memoryview(chunk)[skip:] if skip else chunk)
            skip = 0
        return chunks

    def clear(self) -> None:
        self._tally.held -= self.end - self.start
        self._chunks.clear()
        self.start = self.end
