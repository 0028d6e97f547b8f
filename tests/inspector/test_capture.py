"""The inspector's capture, fed bytes as the agent's bridge would (no sockets, `now` passed in): HTTP exchanges
on keep-alive streams, every body framing, WebSocket messages decoded with wsproto, the limits, and never raising."""

from __future__ import annotations

import os
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto.frame_protocol import FrameProtocol, Opcode

from portway.inspector.capture import Limits, StreamCapture
from portway.inspector.store import Store


def request(method="GET", path="/", body=b"", headers=(), chunked=False) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: demo.localhost:8000", "X-Forwarded-For: 203.0.113.9", *headers]
    if chunked:
        lines.append("Transfer-Encoding: chunked")
        payload = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in (body[:3], body[3:]) if piece) + b"0\r\n\r\n"
    else:
        if body or method in ("POST", "PUT"):
            lines.append(f"Content-Length: {len(body)}")
        payload = body
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + payload


def response(status=200, body=b"", headers=(), framing="length") -> bytes:
    lines = [f"HTTP/1.1 {status} Whatever", *headers]
    if framing == "length":
        lines.append(f"Content-Length: {len(body)}")
        payload = body
    elif framing == "chunked":
        lines.append("Transfer-Encoding: chunked")
        payload = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 5]), body[i:i + 5]) for i in range(0, len(body), 5))
        payload += b"0\r\nX-Trailer: t\r\n\r\n"
    else:  # until close
        payload = body
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + payload


UPGRADE = request("GET", "/chat", headers=("Connection: Upgrade", "Upgrade: websocket", "Sec-WebSocket-Version: 13",
                                           "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=="))
SWITCHED = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"


def visitor_frames() -> FrameProtocol:
    return FrameProtocol(client=True, extensions=[])  # sends masked frames, as a browser does


def service_frames() -> FrameProtocol:
    return FrameProtocol(client=False, extensions=[])


class World:
    def __init__(self, limits: Limits | None = None, store: Store | None = None) -> None:
        self.store = store if store is not None else Store()
        self.capture = StreamCapture(self.store, 1, limits)
        self.now = 100.0

    def visitor(self, data: bytes, pieces: int = 1) -> None:
        for piece in split(data, pieces):
            self.now += 0.001
            self.capture.to_service([piece], self.now)

    def service(self, data: bytes, pieces: int = 1) -> None:
        for piece in split(data, pieces):
            self.now += 0.001
            self.capture.to_visitor(piece, self.now)

    def close(self) -> None:
        self.capture.closed(self.now + 1)

    def exchanges(self):
        return list(reversed(list(self.store.newest_first())))


def split(data: bytes, pieces: int) -> list[bytes]:
    if pieces <= 1:
        return [data]
    if pieces >= len(data):
        return [data[i:i + 1] for i in range(len(data))]
    size = -(-len(data) // pieces)
    return [data[i:i + size] for i in range(0, len(data), size)]


def shape(world: World) -> list[tuple]:
    """What a test compares: every exchange's request and response as kept."""
    rows = []
    for exchange in world.exchanges():
        r, s = exchange.request, exchange.response
        rows.append((r.method, r.target, r.headers, bytes(r.body), r.body_size, r.complete,
                     None if s is None else (s.status, s.headers, bytes(s.body), s.body_size, s.complete, s.informational),
                     exchange.remote_addr, exchange.error,
                     None if exchange.websocket is None else [
                         (m.sender, m.kind, m.size, m.data, m.close_code) for m in exchange.websocket.messages]))
    return rows


CONVERSATION = [
    (request("GET", "/a?x=1"), response(200, b"hello")),
    (request("POST", "/upload", b"0123456789" * 50), response(201, b"{\"ok\": true}", ("Content-Type: application/json",))),
    (request("PUT", "/chunks", b"chunked body", chunked=True), response(200, b"x" * 23, framing="chunked")),
    (request("HEAD", "/big"), b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n"),
    (request("GET", "/nothing"), b"HTTP/1.1 204 No Content\r\n\r\n"),
    (request("POST", "/continue", b"abc", ("Expect: 100-continue",)),
     b"HTTP/1.1 100 Continue\r\n\r\n" + response(200, b"done")),
    (request("GET", "/not-modified"), b"HTTP/1.1 304 Not Modified\r\nContent-Length: 99\r\n\r\n"),
]


@pytest.mark.parametrize("pieces", [1, 3, 10**9], ids=["whole", "in-pieces", "byte-by-byte"])
def test_a_keep_alive_stream_gives_one_exchange_per_request(pieces):
    world = World()
    for req, resp in CONVERSATION:
        world.visitor(req, pieces)
        world.service(resp, pieces)
    world.close()
    exchanges = world.exchanges()
    assert [(e.request.method, e.request.target, e.response.status) for e in exchanges] == [
        ("GET", b"/a?x=1", 200), ("POST", b"/upload", 201), ("PUT", b"/chunks", 200), ("HEAD", b"/big", 200),
        ("GET", b"/nothing", 204), ("POST", b"/continue", 200), ("GET", b"/not-modified", 304)]
    assert all(e.response.complete and e.request.complete and e.error is None for e in exchanges)
    assert bytes(exchanges[0].response.body) == b"hello"
    assert bytes(exchanges[1].request.body) == b"0123456789" * 50
    assert bytes(exchanges[2].request.body) == b"chunked body"
    assert bytes(exchanges[2].response.body) == b"x" * 23
    assert exchanges[3].response.body_size == 0  # HEAD: no body whatever Content-Length says
    assert exchanges[5].response.informational == [100]
    assert all(e.remote_addr == "203.0.113.9" for e in exchanges)
    assert [e.id for e in exchanges] == list(range(1, 8))


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_arbitrary_splits_give_the_same_exchanges(data):
    reference = World()
    for req, resp in CONVERSATION:
        reference.visitor(req)
        reference.service(resp)
    reference.close()
    world = World()
    for req, resp in CONVERSATION:
        for payload, feed in ((req, world.visitor), (resp, world.service)):
            cuts = sorted(data.draw(st.lists(st.integers(0, len(payload)), max_size=6)))
            for start, end in zip([0] + cuts, cuts + [len(payload)]):
                if end > start:
                    feed(payload[start:end])
    world.close()
    assert shape(world) == shape(reference)


def test_a_close_delimited_body_completes_when_the_stream_closes():
    world = World()
    world.visitor(request("GET", "/stream"))
    world.service(response(200, b"until the end", framing="close"))
    assert not world.exchanges()[0].response.complete
    world.close()
    exchange = world.exchanges()[0]
    assert exchange.response.complete and bytes(exchange.response.body) == b"until the end"
    assert exchange.error is None


def test_a_response_cut_short_is_marked_incomplete():
    world = World()
    world.visitor(request("GET", "/cut"))
    world.service(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part")
    world.close()
    exchange = world.exchanges()[0]
    assert not exchange.response.complete
    assert "closed before the response was complete" in exchange.error


def test_bodies_are_kept_up_to_the_limit_and_counted_past_it():
    limits = Limits(max_body=1000)
    world = World(limits)
    big = os.urandom(5000)
    world.visitor(request("POST", "/up", big), pieces=7)
    world.service(response(200, big, framing="chunked"), pieces=5)
    exchange = world.exchanges()[0]
    for part in (exchange.request, exchange.response):
        assert bytes(part.body) == big[:1000] and part.body_size == 5000 and part.truncated and part.complete
    assert exchange.kept == 2000 == world.store.kept


@pytest.mark.parametrize("pieces", [1, 4, 10**9], ids=["whole", "in-pieces", "byte-by-byte"])
def test_a_websocket_conversation_is_logged_both_ways(pieces):
    world = World()
    world.visitor(UPGRADE)
    world.service(SWITCHED)
    client, server = visitor_frames(), service_frames()
    world.visitor(bytes(client.send_data("hello")), pieces)
    world.service(bytes(server.send_data("Echo: hello")), pieces)
    # a fragmented message with a ping between its frames, then a binary one and the closing handshake
    fragmented = (bytes(client.send_data("frag", fin=False)) + bytes(client.ping(b"are you there"))
                  + bytes(client.send_data("mented", fin=True)))
    world.visitor(fragmented, pieces)
    world.service(bytes(server.pong(b"are you there")) + bytes(server.send_data(b"\x00\x01\x02")), pieces)
    world.visitor(bytes(client.close(1000, "bye")), pieces)
    world.service(bytes(server.close(1000, "bye")), pieces)
    world.close()
    exchange = world.exchanges()[0]
    assert exchange.response.status == 101 and exchange.error is None
    log = exchange.websocket
    assert [(m.sender, m.kind, m.data, m.size) for m in log.messages] == [
        ("visitor", "text", b"hello", 5), ("service", "text", b"Echo: hello", 11),
        ("visitor", "ping", b"are you there", 13), ("visitor", "text", b"fragmented", 10),
        ("service", "pong", b"are you there", 13), ("service", "binary", b"\x00\x01\x02", 3),
        ("visitor", "close", b"bye", 5), ("service", "close", b"bye", 5)]
    assert [m.close_code for m in log.messages][-2:] == [1000, 1000]
    assert log.closed is not None and log.counts == {"visitor": 4, "service": 4}


def test_frames_in_the_same_read_as_the_101_are_not_lost():
    world = World()
    world.visitor(UPGRADE)
    world.service(SWITCHED + bytes(service_frames().send_data("welcome")))
    assert [m.data for m in world.exchanges()[0].websocket.messages] == [b"welcome"]


def test_a_big_message_is_kept_as_a_prefix_with_its_whole_size():
    limits = Limits(ws_max_message=1000)
    world = World(limits)
    world.visitor(UPGRADE)
    world.service(SWITCHED)
    client = visitor_frames()
    blob = os.urandom(300_000)
    wire = bytes(client.send_data(blob[:100_000], fin=False)) + bytes(client.send_data(blob[100_000:], fin=True))
    world.visitor(wire + bytes(client.send_data("after")), pieces=37)
    messages = world.exchanges()[0].websocket.messages
    assert [(m.kind, m.size, m.truncated) for m in messages] == [("binary", 300_000, True), ("text", 5, False)]
    assert messages[0].data == blob[:1000]  # unmasked correctly, and only the prefix
    assert messages[1].data == b"after"


def test_a_connection_keeps_its_newest_messages_within_the_limits():
    limits = Limits(ws_max_messages=10, max_body=100)
    world = World(limits)
    world.visitor(UPGRADE)
    world.service(SWITCHED)
    server = service_frames()
    world.service(b"".join(bytes(server.send_data(f"message {i:03}")) for i in range(50)))
    log = world.exchanges()[0].websocket
    # 11 bytes each: at most 9 fit in 100 bytes
    assert [m.data for m in log.messages] == [f"message {i:03}".encode() for i in range(41, 50)]
    assert log.dropped == 41 and log.counts["service"] == 50
    assert log.kept == 99 == world.store.kept


def test_permessage_deflate_messages_are_inflated():
    world = World()
    world.visitor(UPGRADE)
    world.service(SWITCHED.replace(b"\r\n\r\n", b"\r\nSec-WebSocket-Extensions: permessage-deflate\r\n\r\n"))
    text = b"compress me " * 100
    compressor = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -zlib.MAX_WBITS)
    payload = compressor.compress(text) + compressor.flush(zlib.Z_SYNC_FLUSH)
    assert payload.endswith(b"\x00\x00\xff\xff")
    body = payload[:-4]
    assert len(body) < 126
    world.service(bytes([0x80 | 0x40 | Opcode.TEXT, len(body)]) + body)
    message = world.exchanges()[0].websocket.messages[0]
    assert (message.kind, message.data, message.size, message.compressed) == ("text", text, len(text), True)


def test_a_refused_upgrade_ends_parsing_of_the_visitor_side():
    world = World()
    world.visitor(UPGRADE)
    world.service(response(426, b"no"))
    world.visitor(b"anything at all")
    world.close()
    exchange = world.exchanges()[0]
    assert exchange.response.status == 426 and exchange.websocket is None and exchange.error is None


@pytest.mark.parametrize("garbage", [
    b"this is not HTTP\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX: " + b"a" * 100_000,
])
def test_garbage_from_the_service_stops_capture_and_marks_the_exchange(garbage):
    world = World()
    world.visitor(request("GET", "/x"))
    world.service(garbage, pieces=4)
    world.service(response(200, b"later"))  # ignored: capture stopped on this stream
    world.visitor(request("GET", "/y"))
    world.close()
    exchanges = world.exchanges()
    assert len(exchanges) == 1
    assert exchanges[0].error.startswith("capture stopped")
    assert world.capture.stopped


def test_a_response_nobody_asked_for_stops_capture():
    world = World()
    world.service(response(200, b"unsolicited"))
    assert world.capture.stopped and not world.exchanges()


def test_bad_websocket_frames_stop_capture_on_the_stream():
    world = World()
    world.visitor(UPGRADE)
    world.service(SWITCHED)
    world.visitor(bytes(service_frames().send_data("unmasked from a client")))
    exchange = world.exchanges()[0]
    assert exchange.error.startswith("capture stopped: WebSocket frames from the visitor")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.binary(max_size=300), st.booleans())
def test_arbitrary_bytes_never_raise(to_service, to_visitor, upgraded):
    world = World(Limits(max_body=64, ws_max_message=16))
    if upgraded:
        world.visitor(UPGRADE)
        world.service(SWITCHED)
    world.visitor(to_service, pieces=3)
    world.service(to_visitor, pieces=3)
    world.close()


def test_an_evicted_exchange_keeps_nothing_more():
    store = Store(max_exchanges=1)
    world = World(store=store)
    world.visitor(request("POST", "/first", b"x" * 10))
    other = StreamCapture(store, 2)
    other.to_service([request("GET", "/second")], 1.0)
    first = world.capture.last
    assert first.evicted and len(store) == 1
    world.service(response(200, b"y" * 1000))
    assert first.response.body == b"" and store.kept == 0
