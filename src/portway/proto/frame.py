"""Agent-link wire format: the 12-byte yamux-style frame header, its encoder and an incremental decoder.

Every frame starts with the same big-endian header::

    version u8 (always 0) | type u8 | flags u16 | stream id u32 | length u32

DATA, RESUME and MOVE frames carry a payload (``length`` bytes of it). For the other types ``length`` is a value:
the window delta for WINDOW_UPDATE, an opaque token echoed back for PING, the error code for GO_AWAY; FIN_ACK
carries nothing. Stream id 0 names the link itself, so PING, GO_AWAY and RESUME must use it and DATA and
FIN_ACK must not; a WINDOW_UPDATE on stream 0 (no flags) grants credit for the link as a whole.

Streams outlive their link (see proto/resume.py), which takes three things on top of yamux: a WINDOW_UPDATE
that enlarges a stream's window says so (GROW), so every other delta proves the peer consumed that many
bytes; the receiver of a FIN confirms it (FIN_ACK); and a link that replaces a lost one starts with RESUME
frames, in which each side lists the streams it still holds and how much of each it received.

Flow control has two levels, as in HTTP/2: every DATA byte counts against its stream's window and against the
link's window. Both sides start with ``INITIAL_STREAM_WINDOW`` per stream and ``INITIAL_LINK_WINDOW`` for the
link without saying so; a side that grants more announces it: in a stream's SYN or ACK, and for the link in
a stream-0 WINDOW_UPDATE sent as the link starts.

The decoder is the first thing hostile bytes touch, so it checks every header before it buffers a payload
and reports any malformed input as :class:`~portway.errors.FrameError` and nothing else. It is also the hot
receive path, which is why it parses straight out of the bytes read (or one growing ``bytearray``) through an
offset, reading a header's fields byte by byte where that is native when compiled. :func:`encode_data_header` is
the matching fast encoder for DATA headers.
"""

from __future__ import annotations

import struct
from enum import IntEnum, IntFlag
from dataclasses import dataclass
from typing import Final, cast

from portway.errors import FrameError

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "HEADER",
    "HEADER_SIZE",
    "INITIAL_LINK_WINDOW",
    "INITIAL_STREAM_WINDOW",
    "MAX_MOVE_ADDRESS",
    "MAX_STREAM_ID",
    "MAX_WINDOW_SIZE",
    "PROTOCOL_VERSION",
    "Flag",
    "Frame",
    "FrameDecoder",
    "FrameType",
    "GoAwayCode",
    "encode_data_header",
]

PROTOCOL_VERSION: Final = 1
"""1: resumable streams (GROW, FIN_ACK, RESUME). Version 0 peers are refused by the decoder."""
HEADER: Final = struct.Struct(">BBHII")
"""The header layout; ``HEADER.pack(PROTOCOL_VERSION, type, flags, stream_id, length)`` encodes one."""
HEADER_SIZE: Final = HEADER.size
DEFAULT_MAX_FRAME_SIZE: Final = 64 * 1024
INITIAL_STREAM_WINDOW: Final = 256 * 1024
"""Receive window every stream starts with on both sides; anything above it is announced by WINDOW_UPDATE."""
INITIAL_LINK_WINDOW: Final = 1024 * 1024
"""Receive window of the whole link (all streams together) on both sides at link start; anything above it is
announced by a WINDOW_UPDATE on stream 0."""
MAX_WINDOW_SIZE: Final = 2**31 - 1
"""A send window may never exceed this; a WINDOW_UPDATE that would push it over is a protocol error."""
MAX_STREAM_ID: Final = 2**32 - 1
MAX_MOVE_ADDRESS: Final = 255
"""Bytes a MOVE frame's address may take."""


class FrameType(IntEnum):
    DATA = 0
    WINDOW_UPDATE = 1
    PING = 2
    GO_AWAY = 3
    RESUME = 4
    """Stream 0: one part of the list of streams a side still holds, sent first on a link that replaces a lost
    one (proto/resume.py has the payload); FIN marks the last part."""
    FIN_ACK = 5
    """The sender received the peer's FIN on the stream: everything the peer sent on it arrived."""
    MOVE = 6
    """Stream 0, from a relay node that is stopping: the payload is where the agent should go (another node's
    ``HOST:PORT``, ASCII). The link carries on until the agent, registered there, says GO_AWAY itself. Sent
    only to agents that said they understand it (proto/control.py, ``Portway-Move``)."""


class Flag(IntFlag):
    SYN = 0x1
    """Opens a stream (DATA / WINDOW_UPDATE) or asks for a ping answer (PING)."""
    ACK = 0x2
    """Accepts a stream the peer opened, or answers a ping."""
    FIN = 0x4
    """The sender will send no more data on the stream (half-close)."""
    RST = 0x8
    """The stream is abandoned at once; also refuses an open."""
    GROW = 0x10
    """On a stream's WINDOW_UPDATE: the delta enlarges the window. Without it, the delta returns credit for
    bytes the peer's application consumed, which is what lets the sender stop keeping them for a resume."""


class GoAwayCode(IntEnum):
    NORMAL = 0
    PROTOCOL_ERROR = 1
    INTERNAL_ERROR = 2


@dataclass(slots=True, init=False)
class Frame:
    """One decoded frame. ``payload`` is empty for every type but DATA, where ``length == len(payload)``."""

    type: FrameType
    flags: Flag
    stream_id: int
    length: int
    payload: bytes | memoryview

    # written out: compiled, a generated dataclass __init__ would run as Python (one per frame received)
    def __init__(self, type: FrameType, flags: Flag, stream_id: int, length: int,
                 payload: bytes | memoryview = b"") -> None:
        self.type = type
        self.flags = flags
        self.stream_id = stream_id
        self.length = length
        self.payload = payload

    def encode(self) -> bytes:
        """Serialise the frame; raise ValueError for a frame the decoder would reject as malformed."""
        if self.type in (FrameType.DATA, FrameType.RESUME, FrameType.MOVE):
            if self.length != len(self.payload):
                raise ValueError(f"a {FrameType(self.type).name} frame's length must equal its payload length")
        elif self.payload:
            raise ValueError(f"{FrameType(self.type).name} frames carry no payload")
        return HEADER.pack(PROTOCOL_VERSION, self.type, self.flags, self.stream_id, self.length) + self.payload


def encode_data_header(stream_id: int, length: int, fin: bool) -> bytes:
    """``HEADER.pack(PROTOCOL_VERSION, DATA, FIN or 0, stream_id, length)``, for the one header sent per DATA frame:
    compiled, a constant start and ``int.to_bytes`` are native, where struct's call costs several times as much.
    ``length`` is at most a frame (``max_frame_size`` < 2**32), so it never reaches the stream id's bytes."""
    start = _DATA_FIN_HEADER_START if fin else _DATA_HEADER_START
    return start + (stream_id << 32 | length).to_bytes(8, "big")


# Decoded type and flag fields are mapped to enum members by indexing, which is far cheaper per frame than
# calling the enum classes; an index past the end is exactly an unknown type or flag bit.
_TYPES_BY_VALUE: Final = tuple(FrameType)
_FLAGS_BY_VALUE: Final = tuple(Flag(value) for value in range(32))
_PING_FLAGS: Final = frozenset((Flag.SYN, Flag.ACK))
_RESUME_FLAGS: Final = frozenset((0, Flag.FIN))
_GO_AWAY_CODES: Final = frozenset(GoAwayCode)
_unpack_header: Final = HEADER.unpack_from  # bound once: compiled, ``HEADER.unpack_from(...)`` looks the method up per call
# (two names, not a pair: compiled, a fixed-size tuple constant is rebuilt as an object wherever it is indexed)
_DATA_HEADER_START: Final = HEADER.pack(PROTOCOL_VERSION, FrameType.DATA, 0, 0, 0)[:4]
_DATA_FIN_HEADER_START: Final = HEADER.pack(PROTOCOL_VERSION, FrameType.DATA, Flag.FIN, 0, 0)[:4]
_DATA_TYPE: Final = FrameType.DATA
_GROW_BIT: Final = int(Flag.GROW)  # tested per DATA frame: `int & Flag` runs the enum's Python-level operator
_COMPACT_AFTER: Final = 64 * 1024
"""Consumed bytes worth moving out of the buffer's way once they outweigh what is still unread."""
_COPY_UP_TO: Final = 1024
"""A payload this small is copied out of the bytes fed in: cheaper than a view of them (a memoryview object, then a
slice of it, and a write of a view later goes through the buffer protocol)."""
_VIEW_PIN_LIMIT: Final = 4
"""A payload is handed out as a view of the bytes fed in only if they are at most this many times its frame's
size; smaller payloads are copied. What a held payload keeps in memory is then at most 4x its frame."""


class FrameDecoder:
    """Turns a byte stream into :class:`Frame` objects: ``feed(data)``, then iterate until it stops.

    Iteration stops when the buffer holds no complete frame; feed more and iterate again. A malformed header
    raises FrameError and stays at the front of the buffer, so every later attempt raises again: a decoder
    never resynchronises on a corrupted link.
    """

    __slots__ = ("max_frame_size", "_buffer", "_offset", "_view")

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        if not 0 < max_frame_size <= MAX_STREAM_ID:
            raise ValueError(f"max_frame_size must be in 1..{MAX_STREAM_ID}, got {max_frame_size}")
        self.max_frame_size = max_frame_size
        self._buffer: bytes | bytearray = bytearray()
        self._offset = 0
        # A memoryview lets a payload be copied out once instead of twice (slice, then bytes()); it must be
        # released before the bytearray is resized, which only feed() does.
        self._view: memoryview | None = None

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append bytes from the link; nothing is parsed until the decoder is iterated."""
        view = self._view
        if view is not None:
            self._view = None
            if type(self._buffer) is not bytes:
                view.release()  # views of immutable bytes may live on in payloads handed out
        buffer = self._buffer
        offset = self._offset
        if offset == len(buffer):
            self._offset = 0
            if type(data) is bytes:
                # Nothing left over: decode straight out of the caller's immutable bytes, and hand out payloads
                # as views of it, so a DATA frame's bytes are never copied on the way through (unless small:
                # see __next__).
                self._buffer = data
            else:
                self._buffer = bytearray(data)
            return
        if isinstance(buffer, bytes):
            self._buffer = buffer = bytearray(memoryview(buffer)[offset:])
            self._offset = 0
        elif offset >= _COMPACT_AFTER and offset * 2 >= len(buffer):
            del buffer[:offset]
            self._offset = 0
        buffer += data

    def __iter__(self) -> FrameDecoder:
        return self

    def __next__(self) -> Frame:
        frame = self.next_frame()
        if frame is None:
            raise StopIteration
        return frame

    def next_frame(self) -> Frame | None:
        """The next whole frame, or None until more bytes arrive (no exception per read: see __next__)."""
        buffer = self._buffer
        offset = self._offset
        available = len(buffer) - offset
        if available < HEADER_SIZE:
            return None
        # typed: compiled, the fields are then native ints, not objects compared and masked through Python
        version: int
        type_value: int
        flags_value: int
        stream_id: int
        length: int
        if type(buffer) is bytes:
            # byte by byte: compiled, indexing bytes is native, where struct's call costs several times as much
            data = cast(bytes, buffer)
            version = data[offset]
            type_value = data[offset + 1]
            flags_value = data[offset + 2] << 8 | data[offset + 3]
            stream_id = data[offset + 4] << 24 | data[offset + 5] << 16 | data[offset + 6] << 8 | data[offset + 7]
            length = data[offset + 8] << 24 | data[offset + 9] << 16 | data[offset + 10] << 8 | data[offset + 11]
        else:
            version, type_value, flags_value, stream_id, length = _unpack_header(buffer, offset)
        if version != PROTOCOL_VERSION:
            raise FrameError(f"unsupported protocol version {version}")
        if type_value >= len(_TYPES_BY_VALUE):
            raise FrameError(f"unknown frame type {type_value}")
        if flags_value >= len(_FLAGS_BY_VALUE):
            raise FrameError(f"unknown flags 0x{flags_value:04x}")
        if type_value == 0:  # DATA
            if stream_id == 0:
                raise FrameError("DATA frame on stream 0")
            if flags_value & _GROW_BIT:
                raise FrameError("GROW is only for WINDOW_UPDATE")
            if length > self.max_frame_size:
                raise FrameError(f"DATA frame of {length} bytes exceeds the {self.max_frame_size}-byte limit")
            end = HEADER_SIZE + length
            if available < end:
                return None
            payload: bytes | memoryview
            if type(buffer) is bytes:
                if length <= _COPY_UP_TO:
                    payload = buffer[offset + HEADER_SIZE : offset + end]
                elif end * _VIEW_PIN_LIMIT >= len(buffer):
                    view = self._view
                    if view is None:
                        view = self._view = memoryview(buffer)
                    payload = view[offset + HEADER_SIZE : offset + end]
                else:
                    # Copied (slicing bytes copies): a view keeps the whole read alive as long as the payload is
                    # held (by a slow reader, a paused write buffer), so a small payload would pin many times
                    # its size, out of reach of flow control, which counts payload bytes.
                    payload = buffer[offset + HEADER_SIZE : offset + end]
            else:
                view = self._view
                if view is None:
                    view = self._view = memoryview(buffer)
                payload = bytes(view[offset + HEADER_SIZE : offset + end])  # the bytearray is reused by feed()
            self._offset = offset + end
            return Frame(_DATA_TYPE, _FLAGS_BY_VALUE[flags_value], stream_id, length, payload)
        if type_value == 1:  # WINDOW_UPDATE
            if stream_id == 0 and flags_value:
                raise FrameError(f"WINDOW_UPDATE on stream 0 (the link's window) takes no flags, got 0x{flags_value:x}")
        elif type_value == 4:  # RESUME
            if stream_id != 0:
                raise FrameError(f"RESUME frame on stream {stream_id}, expected 0")
            if flags_value not in _RESUME_FLAGS:
                raise FrameError(f"RESUME takes no flags but FIN, got 0x{flags_value:x}")
            if length > self.max_frame_size:
                raise FrameError(f"RESUME frame of {length} bytes exceeds the {self.max_frame_size}-byte limit")
            end = HEADER_SIZE + length
            if available < end:
                return None
            payload = bytes(buffer[offset + HEADER_SIZE : offset + end])  # rare: a copy is fine
            self._offset = offset + end
            return Frame(FrameType.RESUME, _FLAGS_BY_VALUE[flags_value], 0, length, payload)
        elif type_value == 6:  # MOVE
            if stream_id != 0 or flags_value:
                raise FrameError("MOVE names stream 0 and takes no flags")
            if not 0 < length <= MAX_MOVE_ADDRESS:
                raise FrameError(f"MOVE address of {length} bytes (1 to {MAX_MOVE_ADDRESS})")
            end = HEADER_SIZE + length
            if available < end:
                return None
            payload = bytes(buffer[offset + HEADER_SIZE : offset + end])
            self._offset = offset + end
            return Frame(FrameType.MOVE, Flag(0), 0, length, payload)
        elif type_value == 5:  # FIN_ACK
            if stream_id == 0 or flags_value or length:
                raise FrameError("FIN_ACK names a stream other than 0 and takes no flags and no length")
        else:
            self._check_session_frame(_TYPES_BY_VALUE[type_value], flags_value, stream_id, length)
        self._offset = offset + HEADER_SIZE
        return Frame(_TYPES_BY_VALUE[type_value], _FLAGS_BY_VALUE[flags_value], stream_id, length, b"")

    @staticmethod
    def _check_session_frame(frame_type: FrameType, flags_value: int, stream_id: int, length: int) -> None:
        """PING and GO_AWAY speak for the whole link, so they are pinned to stream 0 with strict flags."""
        if stream_id != 0:
            raise FrameError(f"{frame_type.name} frame on stream {stream_id}, expected 0")
        if frame_type is FrameType.PING:
            if flags_value not in _PING_FLAGS:
                raise FrameError(f"PING needs exactly one of SYN or ACK, got flags 0x{flags_value:x}")
        else:
            if flags_value:
                raise FrameError(f"GO_AWAY takes no flags, got 0x{flags_value:x}")
            if length not in _GO_AWAY_CODES:
                raise FrameError(f"unknown GO_AWAY code {length}")
