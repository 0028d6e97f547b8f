"""Wire format: pinned constants, an encode/decode table checked both ways, malformed input, fuzzing."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from portway.errors import FrameError
from portway.proto.frame import (
    DEFAULT_MAX_FRAME_SIZE,
    HEADER,
    HEADER_SIZE,
    INITIAL_LINK_WINDOW,
    INITIAL_STREAM_WINDOW,
    MAX_MOVE_ADDRESS,
    MAX_STREAM_ID,
    MAX_WINDOW_SIZE,
    PROTOCOL_VERSION,
    Flag,
    Frame,
    FrameDecoder,
    FrameType,
    GoAwayCode,
    encode_data_header,
)

from .helpers import FrameFactory

frames = FrameFactory()


def test_wire_constants_are_pinned() -> None:
    assert HEADER_SIZE == 12
    assert HEADER.format == ">BBHII"
    assert DEFAULT_MAX_FRAME_SIZE == 64 * 1024
    assert INITIAL_STREAM_WINDOW == 256 * 1024
    assert INITIAL_LINK_WINDOW == 1024 * 1024
    assert MAX_WINDOW_SIZE == 2**31 - 1
    assert PROTOCOL_VERSION == 1
    assert [(t.name, t.value) for t in FrameType] == [
        ("DATA", 0), ("WINDOW_UPDATE", 1), ("PING", 2), ("GO_AWAY", 3), ("RESUME", 4), ("FIN_ACK", 5),
        ("MOVE", 6),
    ]
    assert [(f.name, f.value) for f in Flag] == [("SYN", 1), ("ACK", 2), ("FIN", 4), ("RST", 8), ("GROW", 16)]
    assert [(c.name, c.value) for c in GoAwayCode] == [("NORMAL", 0), ("PROTOCOL_ERROR", 1), ("INTERNAL_ERROR", 2)]


def test_header_layout_is_big_endian_version_type_flags_stream_length() -> None:
    frame = Frame(FrameType.WINDOW_UPDATE, Flag.SYN | Flag.FIN, 0x01020304, 0x0A0B0C0D)
    assert frame.encode() == bytes.fromhex("01 01 0005 01020304 0a0b0c0d")


VALID = [
    pytest.param(
        Frame(FrameType.DATA, Flag(0), 1, 5, b"hello"),
        bytes.fromhex("01 00 0000 00000001 00000005") + b"hello",
        id="data",
    ),
    pytest.param(
        Frame(FrameType.DATA, Flag(0), 3, 0, b""), bytes.fromhex("01 00 0000 00000003 00000000"), id="empty-data"
    ),
    pytest.param(
        Frame(FrameType.DATA, Flag.SYN | Flag.ACK | Flag.FIN | Flag.RST, 0xFFFFFFFF, 1, b"x"),
        bytes.fromhex("01 00 000f ffffffff 00000001") + b"x",
        id="data-all-flags-max-id",
    ),
    pytest.param(
        Frame(FrameType.WINDOW_UPDATE, Flag.SYN, 2, 768 * 1024),
        bytes.fromhex("01 01 0001 00000002 000c0000"),
        id="window-update-syn",
    ),
    pytest.param(
        Frame(FrameType.WINDOW_UPDATE, Flag(0), 7, 0xFFFFFFFF),
        bytes.fromhex("01 01 0000 00000007 ffffffff"),
        id="window-update-max-delta",
    ),
    pytest.param(
        Frame(FrameType.WINDOW_UPDATE, Flag(0), 0, 31 * 1024 * 1024),
        bytes.fromhex("01 01 0000 00000000 01f00000"),
        id="window-update-for-the-link",
    ),
    pytest.param(Frame(FrameType.PING, Flag.SYN, 0, 42), bytes.fromhex("01 02 0001 00000000 0000002a"), id="ping"),
    pytest.param(Frame(FrameType.PING, Flag.ACK, 0, 42), bytes.fromhex("01 02 0002 00000000 0000002a"), id="ping-ack"),
    pytest.param(Frame(FrameType.GO_AWAY, Flag(0), 0, 0), bytes.fromhex("01 03 0000 00000000 00000000"), id="go-away"),
    pytest.param(
        Frame(FrameType.GO_AWAY, Flag(0), 0, GoAwayCode.INTERNAL_ERROR),
        bytes.fromhex("01 03 0000 00000000 00000002"),
        id="go-away-internal",
    ),
    pytest.param(
        Frame(FrameType.WINDOW_UPDATE, Flag.ACK | Flag.GROW, 3, 4096),
        bytes.fromhex("01 01 0012 00000003 00001000"),
        id="window-update-ack-grow",
    ),
    pytest.param(
        Frame(FrameType.RESUME, Flag.FIN, 0, 3, b"abc"), bytes.fromhex("01 04 0004 00000000 00000003") + b"abc",
        id="resume",
    ),
    pytest.param(Frame(FrameType.FIN_ACK, Flag(0), 9, 0), bytes.fromhex("01 05 0000 00000009 00000000"), id="fin-ack"),
]

NEXT_FRAME = Frame(FrameType.PING, Flag.SYN, 0, 7)


def decode_whole(data: bytes) -> list[Frame]:
    decoder = FrameDecoder()
    decoder.feed(data)
    return list(decoder)


def decode_byte_by_byte(data: bytes) -> list[Frame]:
    decoder = FrameDecoder()
    decoded = []
    for i in range(len(data)):
        decoder.feed(data[i : i + 1])
        decoded.extend(decoder)
    return decoded


@pytest.mark.parametrize(("frame", "wire"), VALID)
def test_encode(frame: Frame, wire: bytes) -> None:
    assert frame.encode() == wire


@pytest.mark.parametrize(("frame", "wire"), VALID)
@pytest.mark.parametrize("decode", [decode_whole, decode_byte_by_byte])
def test_decode(frame: Frame, wire: bytes, decode) -> None:
    assert decode(wire) == [frame]
    assert decode(wire + NEXT_FRAME.encode()) == [frame, NEXT_FRAME]


@pytest.mark.parametrize(("frame", "wire"), VALID)
def test_decoded_fields_are_enum_members(frame: Frame, wire: bytes) -> None:
    (decoded,) = decode_whole(wire)
    assert type(decoded.type) is FrameType
    assert type(decoded.flags) is Flag
    # payloads are bytes, or read-only views of the bytes fed in (zero-copy); never a view of a reused buffer
    assert type(decoded.payload) is bytes or (type(decoded.payload) is memoryview and decoded.payload.readonly)


def test_payload_views_survive_later_feeds() -> None:
    decoder = FrameDecoder()
    first = Frame(FrameType.DATA, Flag(0), 1, 5, b"hello").encode()
    second = Frame(FrameType.DATA, Flag(0), 1, 5, b"world").encode()
    decoder.feed(first + second[:3])
    (frame,) = list(decoder)
    decoder.feed(second[3:])
    (later,) = list(decoder)
    decoder.feed(first)
    list(decoder)
    assert bytes(frame.payload) == b"hello" and bytes(later.payload) == b"world"


def test_a_payload_is_a_view_only_of_a_read_at_most_four_times_its_frame() -> None:
    big = Frame(FrameType.DATA, Flag(0), 1, 60_000, b"b" * 60_000).encode()
    small = Frame(FrameType.DATA, Flag(0), 3, 10, b"s" * 10).encode()
    decoder = FrameDecoder()
    decoder.feed(big + small + big)
    first, tiny, last = decoder
    assert type(first.payload) is memoryview and type(last.payload) is memoryview  # each half the read
    assert type(tiny.payload) is bytes and tiny.payload == b"s" * 10  # copied: it would pin 12,000x its size
    decoder.feed(big * 4)
    assert all(type(frame.payload) is memoryview for frame in decoder)  # each frame is a quarter of the read
    decoder.feed(big * 5)
    assert all(type(frame.payload) is bytes for frame in decoder)  # each is under a quarter of the read


def test_a_payload_of_at_most_a_kibibyte_is_copied_even_when_it_is_the_whole_read() -> None:
    """Copying a small payload costs less than a view of the read (and writes of bytes are cheaper later)."""
    decoder = FrameDecoder()
    for size, kind in ((1, bytes), (1024, bytes), (1025, memoryview)):
        decoder.feed(Frame(FrameType.DATA, Flag(0), 1, size, b"p" * size).encode())
        (frame,) = list(decoder)
        assert type(frame.payload) is kind and bytes(frame.payload) == b"p" * size


MALFORMED = [
    pytest.param(frames.header(0, 0, 1, 0, version=0), "version", id="version-0-peer"),
    pytest.param(frames.header(0, 0, 1, 0, version=2), "version", id="bad-version"),
    pytest.param(frames.header(7, 0, 1, 0), "unknown frame type", id="unknown-type"),
    pytest.param(frames.header(0, 0x20, 1, 0), "unknown flags", id="unknown-flag"),
    pytest.param(frames.header(0, Flag.GROW, 1, 0), "GROW", id="data-with-grow"),
    pytest.param(frames.header(1, Flag.GROW, 0, 1), "stream 0 .* no flags", id="link-window-update-with-grow"),
    pytest.param(frames.header(2, Flag.SYN | Flag.GROW, 0, 0), "exactly one", id="ping-with-grow"),
    pytest.param(frames.header(4, 0, 1, 0), "RESUME frame on stream 1", id="resume-on-stream"),
    pytest.param(frames.header(4, Flag.SYN, 0, 0), "RESUME takes no flags", id="resume-with-syn"),
    pytest.param(frames.header(4, 0, 0, DEFAULT_MAX_FRAME_SIZE + 1), "exceeds", id="oversize-resume"),
    pytest.param(frames.header(5, 0, 0, 0), "FIN_ACK", id="fin-ack-on-stream-0"),
    pytest.param(frames.header(5, Flag.FIN, 1, 0), "FIN_ACK", id="fin-ack-with-flags"),
    pytest.param(frames.header(5, 0, 1, 1), "FIN_ACK", id="fin-ack-with-length"),
    pytest.param(frames.header(0, 0, 1, DEFAULT_MAX_FRAME_SIZE + 1), "exceeds", id="oversize-data"),
    pytest.param(frames.header(0, 0, 1, 0xFFFFFFFF), "exceeds", id="huge-data"),
    pytest.param(frames.header(0, 0, 0, 0), "stream 0", id="data-on-stream-0"),
    pytest.param(frames.header(1, Flag.SYN, 0, 1), "stream 0 .* no flags", id="window-update-on-stream-0-with-syn"),
    pytest.param(frames.header(1, Flag.RST, 0, 0), "stream 0 .* no flags", id="window-update-on-stream-0-with-rst"),
    pytest.param(frames.header(2, Flag.SYN, 1, 0), "stream 1", id="ping-on-stream"),
    pytest.param(frames.header(3, 0, 5, 0), "stream 5", id="go-away-on-stream"),
    pytest.param(frames.header(2, 0, 0, 0), "exactly one", id="ping-without-flags"),
    pytest.param(frames.header(2, Flag.SYN | Flag.ACK, 0, 0), "exactly one", id="ping-syn-ack"),
    pytest.param(frames.header(2, Flag.FIN, 0, 0), "exactly one", id="ping-fin"),
    pytest.param(frames.header(3, Flag.RST, 0, 0), "no flags", id="go-away-with-flags"),
    pytest.param(frames.header(3, 0, 0, 3), "GO_AWAY code", id="go-away-unknown-code"),
]


@pytest.mark.parametrize(("wire", "message"), MALFORMED)
@pytest.mark.parametrize("decode", [decode_whole, decode_byte_by_byte])
def test_malformed_header_raises_frame_error(wire: bytes, message: str, decode) -> None:
    with pytest.raises(FrameError, match=message):
        decode(wire)
    with pytest.raises(FrameError, match=message):
        decode(wire + NEXT_FRAME.encode())


def test_a_bad_header_is_never_skipped() -> None:
    decoder = FrameDecoder()
    decoder.feed(NEXT_FRAME.encode() + frames.header(9, 0, 0, 0) + NEXT_FRAME.encode())
    assert next(decoder) == NEXT_FRAME
    for _ in range(2):
        with pytest.raises(FrameError):
            next(decoder)


def test_max_frame_size_is_a_parameter() -> None:
    decoder = FrameDecoder(max_frame_size=4)
    decoder.feed(frames.data(1, b"four"))
    assert [f.payload for f in decoder] == [b"four"]
    decoder.feed(frames.data(1, b"fives"))
    with pytest.raises(FrameError, match="4-byte limit"):
        list(decoder)


def test_oversize_length_is_refused_before_the_payload_arrives() -> None:
    decoder = FrameDecoder(max_frame_size=16)
    decoder.feed(frames.header(FrameType.DATA, 0, 1, 17))
    with pytest.raises(FrameError):
        next(decoder)


@pytest.mark.parametrize("size", [0, -1, 2**32])
def test_max_frame_size_must_be_sane(size: int) -> None:
    with pytest.raises(ValueError):
        FrameDecoder(size)


def test_encode_refuses_frames_the_decoder_would_reject() -> None:
    with pytest.raises(ValueError, match="length"):
        Frame(FrameType.DATA, Flag(0), 1, 3, b"ab").encode()
    with pytest.raises(ValueError, match="no payload"):
        Frame(FrameType.WINDOW_UPDATE, Flag(0), 1, 0, b"ab").encode()


def test_large_stream_in_odd_chunks_compacts_and_stays_exact() -> None:
    payloads = [bytes([i % 251]) * (i * 997 % DEFAULT_MAX_FRAME_SIZE) for i in range(300)]
    wire = b"".join(Frame(FrameType.DATA, Flag(0), 1, len(p), p).encode() for p in payloads)
    decoder = FrameDecoder()
    decoded = []
    for start in range(0, len(wire), 50_001):
        decoder.feed(wire[start : start + 50_001])
        decoded.extend(f.payload for f in decoder)
    assert decoded == payloads


def test_feeding_without_iterating_keeps_everything() -> None:
    decoder = FrameDecoder()
    decoder.feed(NEXT_FRAME.encode())
    decoder.feed(NEXT_FRAME.encode())
    assert list(decoder) == [NEXT_FRAME, NEXT_FRAME]


# ---------------------------------------------------------------------------- hypothesis

flag_values = st.integers(0, 15).map(Flag)
stream_ids = st.integers(1, 2**32 - 1)
u32 = st.integers(0, 2**32 - 1)

valid_frames = st.one_of(
    st.builds(
        lambda flags, sid, payload: Frame(FrameType.DATA, flags, sid, len(payload), payload),
        flag_values,
        stream_ids,
        st.binary(max_size=2048),
    ),
    st.builds(
        lambda flags, sid, delta: Frame(FrameType.WINDOW_UPDATE, flags, sid, delta), flag_values, stream_ids, u32
    ),
    st.builds(lambda delta: Frame(FrameType.WINDOW_UPDATE, Flag(0), 0, delta), u32),
    st.builds(lambda flag, token: Frame(FrameType.PING, flag, 0, token), st.sampled_from([Flag.SYN, Flag.ACK]), u32),
    st.builds(lambda code: Frame(FrameType.GO_AWAY, Flag(0), 0, code), st.sampled_from(list(GoAwayCode))),
    st.builds(lambda address: Frame(FrameType.MOVE, Flag(0), 0, len(address), address),
              st.binary(min_size=1, max_size=255)),
)


@given(st.lists(valid_frames, max_size=20), st.data())
def test_round_trip_survives_any_chunking(frame_list: list[Frame], data: st.DataObject) -> None:
    wire = b"".join(f.encode() for f in frame_list)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=10)))
    decoder = FrameDecoder()
    decoded = []
    for start, end in zip([0, *cuts], [*cuts, len(wire)], strict=True):
        decoder.feed(wire[start:end])
        decoded.extend(decoder)
    assert decoded == frame_list
    assert [f.encode() for f in decoded] == [f.encode() for f in frame_list]


@given(st.binary(max_size=512), st.integers(1, 4096))
def test_arbitrary_bytes_raise_only_frame_error(garbage: bytes, max_frame_size: int) -> None:
    decoder = FrameDecoder(max_frame_size)
    decoder.feed(garbage)
    consumed = 0
    try:
        for frame in decoder:
            # whatever decodes is a frame we could have sent, and exactly the bytes it was decoded from
            wire = frame.encode()
            assert garbage[consumed : consumed + len(wire)] == wire
            consumed += len(wire)
    except FrameError:
        with pytest.raises(FrameError):
            next(decoder)  # a bad header stays at the front: the decoder never resynchronises past it
        return
    # it stopped for want of bytes: what is left is less than one whole frame
    rest = garbage[consumed:]
    assert len(rest) < HEADER_SIZE or (rest[1] == FrameType.DATA and len(rest) < HEADER_SIZE + HEADER.unpack(rest[:HEADER_SIZE])[4])


# Mostly-plausible headers reach far deeper into the decoder than uniformly random bytes, which almost
# always fail on the version byte.
near_valid_chunks = st.builds(
    lambda version, frame_type, flags, stream_id, length, tail: (
        FrameFactory.header(frame_type, flags, stream_id, length, version) + tail
    ),
    st.sampled_from([0, 0, 0, 1, 255]),
    st.integers(0, 5),
    st.integers(0, 0x1F) | st.integers(0, 0xFFFF),
    st.integers(0, 4) | u32,
    st.integers(0, 80) | u32,
    st.binary(max_size=80),
)


@given(st.lists(near_valid_chunks | st.binary(max_size=64), max_size=20))
def test_arbitrary_chunks_raise_only_frame_error(chunks: list[bytes]) -> None:
    decoder = FrameDecoder(max_frame_size=64)
    try:
        for chunk in chunks:
            decoder.feed(chunk)
            list(decoder)
    except FrameError:
        pass


# ----------------------------------------------------------------------------------------------- found by mutmut
# (scripts/mutate.sh: decoder changes that no test above noticed)


def test_decoder_accepts_the_largest_frame_size_it_can_express() -> None:
    assert FrameDecoder(MAX_STREAM_ID).max_frame_size == MAX_STREAM_ID
    with pytest.raises(ValueError, match="max_frame_size must be in 1.."):
        FrameDecoder(MAX_STREAM_ID + 1)


def test_payloads_fed_as_bytes_are_views_of_them_and_other_buffers_are_copied() -> None:
    """Bytes are immutable, so a DATA payload may be a view of what the caller fed (no copy on the way through);
    a bytearray or memoryview the caller may reuse is copied, so rewriting it later changes no payload."""
    payload = b"hello" * 400
    wire = Frame(FrameType.DATA, Flag(0), 1, len(payload), payload).encode()
    decoder = FrameDecoder()
    decoder.feed(wire)
    (frame,) = list(decoder)
    assert type(frame.payload) is memoryview and frame.payload.obj is wire
    for make in (bytearray, lambda data: memoryview(bytearray(data))):
        reused = make(wire)
        decoder = FrameDecoder()
        decoder.feed(reused)
        (frame,) = list(decoder)
        reused[HEADER_SIZE:] = b"X" * len(payload)
        assert type(frame.payload) is bytes and frame.payload == payload


def test_buffer_stays_bounded_while_a_frame_is_always_pending() -> None:
    """A link whose reads always end mid-frame never empties the buffer; consumed bytes must still be dropped
    from its front, or it grows by every byte the link ever carried."""
    frame = Frame(FrameType.DATA, Flag(0), 1, 1000, b"x" * 1000).encode()
    stream = frame * 10_000  # 10 MB
    decoder = FrameDecoder()
    largest = 0
    for start in range(0, len(stream), 1500):  # 1500-byte reads: never aligned with the 1012-byte frames
        decoder.feed(bytearray(stream[start : start + 1500]))
        assert all(bytes(f.payload) == b"x" * 1000 for f in decoder)
        largest = max(largest, len(decoder._buffer))
    assert largest < 4 * 64 * 1024


# ---------------------------------------------------------------------------- MOVE

def test_a_move_frame_carries_an_address_on_stream_0() -> None:
    frame = Frame(FrameType.MOVE, Flag(0), 0, 13, b"10.0.0.2:8000")
    wire = frame.encode()
    assert wire == HEADER.pack(PROTOCOL_VERSION, 6, 0, 0, 13) + b"10.0.0.2:8000"
    decoder = FrameDecoder()
    decoder.feed(wire[:15])  # a partial payload waits for the rest
    assert list(decoder) == []
    decoder.feed(wire[15:])
    assert list(decoder) == [frame]


@pytest.mark.parametrize(("wire", "message"), [
    (HEADER.pack(PROTOCOL_VERSION, 6, 0, 1, 4) + b"a:80", "MOVE names stream 0"),
    (HEADER.pack(PROTOCOL_VERSION, 6, Flag.FIN, 0, 4) + b"a:80", "takes no flags"),
    (HEADER.pack(PROTOCOL_VERSION, 6, 0, 0, 0), "MOVE address of 0 bytes"),
    (HEADER.pack(PROTOCOL_VERSION, 6, 0, 0, MAX_MOVE_ADDRESS + 1), "MOVE address of 256 bytes"),
])
def test_a_malformed_move_frame_is_refused_before_its_payload(wire: bytes, message: str) -> None:
    decoder = FrameDecoder()
    decoder.feed(wire)
    with pytest.raises(FrameError, match=message):
        list(decoder)


@given(stream_id=st.integers(0, 2**32 - 1), length=st.integers(0, 2**32 - 1), fin=st.booleans())
def test_the_fast_data_header_is_the_struct_packed_one(stream_id: int, length: int, fin: bool) -> None:
    flags = Flag.FIN if fin else 0
    assert encode_data_header(stream_id, length, fin) == HEADER.pack(PROTOCOL_VERSION, FrameType.DATA, flags,
                                                                    stream_id, length)


@given(header=st.binary(min_size=HEADER_SIZE, max_size=HEADER_SIZE))
def test_headers_decode_alike_from_bytes_and_from_a_bytearray(header: bytes) -> None:
    """Bytes are decoded byte by byte, a bytearray (a frame split across reads) with struct: the same result."""
    outcomes = []
    for make in (bytes, bytearray):
        decoder = FrameDecoder()
        decoder.feed(make(header))
        try:
            frame = decoder.next_frame()
            outcomes.append(None if frame is None else (frame.type, frame.flags, frame.stream_id, frame.length))
        except FrameError as error:
            outcomes.append(str(error))
    assert outcomes[0] == outcomes[1]
