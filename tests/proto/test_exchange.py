"""The rules of one exchange (proto/exchange.py), decided on parsed heads without a relay or a socket."""

from __future__ import annotations

import pytest

from portway.proto import exchange
from portway.proto.http1 import MESSAGE_END, BodyFraming, RequestParser, ResponseHead, ResponseParser, Switched


def request(raw: str):
    return RequestParser().feed(raw.encode())[0]


def response(status: int, framing: BodyFraming, keep_alive: bool = True) -> ResponseHead:
    return ResponseHead(status, b"X", [], framing, 0, keep_alive)


GET_11 = "GET / HTTP/1.1\r\nHost: a\r\n\r\n"
GET_10 = "GET / HTTP/1.0\r\nHost: a\r\n\r\n"
GET_CLOSE = "GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"


@pytest.mark.parametrize("raw, answer, expected", [
    (GET_11, response(200, BodyFraming.UNTIL_CLOSE, False), (BodyFraming.CHUNKED, True)),
    (GET_CLOSE, response(200, BodyFraming.UNTIL_CLOSE, False), (BodyFraming.CHUNKED, False)),
    (GET_10, response(200, BodyFraming.UNTIL_CLOSE, False), (BodyFraming.UNTIL_CLOSE, False)),
    (GET_11, response(200, BodyFraming.LENGTH), (BodyFraming.LENGTH, True)),
    (GET_11, response(200, BodyFraming.LENGTH, keep_alive=False), (BodyFraming.LENGTH, False)),
    (GET_CLOSE, response(200, BodyFraming.CHUNKED), (BodyFraming.CHUNKED, False)),
    (GET_11, response(101, BodyFraming.NONE), (BodyFraming.NONE, False)),
])
def test_response_framing(raw, answer, expected):
    assert exchange.response_framing(request(raw), answer) == expected


def test_an_origin_closing_its_connection_does_not_close_the_visitors():
    """The re-chunked answer ends without the close: the visitor's keep-alive connection carries on."""
    parser = ResponseParser("GET")
    (head,) = [e for e in parser.feed(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n") if isinstance(e, ResponseHead)]
    assert exchange.response_framing(request(GET_11), head) == (BodyFraming.CHUNKED, True)


@pytest.mark.parametrize("raw, allowed", [
    (GET_11, True),
    ("DELETE /x HTTP/1.1\r\nHost: a\r\n\r\n", True),
    ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n\r\nx", False),
    ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", False),
    ("GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n", False),
])
def test_retry_only_without_a_body_or_a_switch(raw, allowed):
    assert exchange.retry_allowed(request(raw)) is allowed


@pytest.mark.parametrize("raw, keep", [
    (GET_11, True),
    (GET_CLOSE, False),
    (GET_10, False),
    ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 65536\r\n\r\n", True),
    ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 65537\r\n\r\n", False),
    ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n", False),
    ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n", False),
    ("GET / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n\r\n", True),
    ("GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n", False),
])
def test_which_refused_requests_keep_their_connection(raw, keep):
    assert exchange.refusal_keeps_connection(request(raw)) is keep


@pytest.mark.parametrize("keep_alive, complete, unread, reusable", [
    (True, True, False, True), (False, True, False, False), (True, False, False, False), (True, True, True, False),
])
def test_conduit_reuse(keep_alive, complete, unread, reusable):
    assert exchange.conduit_reusable(keep_alive, complete, unread) is reusable


@pytest.mark.parametrize("raw, keep_alive, complete, continues", [
    (GET_11, True, True, True), (GET_CLOSE, True, True, False), (GET_11, False, True, False),
    (GET_11, True, False, False),
])
def test_visitor_connection_continues(raw, keep_alive, complete, continues):
    assert exchange.visitor_continues(request(raw), keep_alive, complete) is continues


def reframed(raw_request: str, raw_answer: bytes, pieces: int = 1):
    """The bytes the visitor gets for `raw_answer`, fed in `pieces`, and what reframe() returned last."""
    reframer = exchange.ResponseReframer(request(raw_request))
    parser = ResponseParser(reframer.request.method, reframer.request.upgrade)
    out: list = []
    ended = None
    size = -(-len(raw_answer) // pieces)
    for start in range(0, len(raw_answer), size):
        ended = reframer.reframe(parser.feed(raw_answer[start:start + size]), out)
    return reframer, b"".join(bytes(piece) for piece in out), ended


@pytest.mark.parametrize("pieces", [1, 3, 50])
def test_a_close_delimited_answer_is_rechunked_for_an_http_11_visitor(pieces):
    reframer, wire, ended = reframed(GET_11, b"HTTP/1.1 200 OK\r\nKeep-Alive: x\r\n\r\nhello", pieces)
    assert ended is None  # ends only at the origin's close
    end = []
    assert reframer.reframe([MESSAGE_END], end) is MESSAGE_END
    wire += b"".join(end)
    head, _, body = wire.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in head and b"Keep-Alive" not in head and b"Connection: keep-alive" in head
    assert body.endswith(b"0\r\n\r\n") and reframer.keep_alive and reframer.status == 200 and reframer.sent_head
    assert b"".join(body.split(b"\r\n")[1::2]) == b"hello"


def test_interim_heads_pass_and_only_the_final_one_counts():
    reframer, wire, ended = reframed(GET_11, b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
                                             b"HTTP/1.1 204 No Content\r\n\r\n")
    assert ended is MESSAGE_END and reframer.status == 204
    assert wire.startswith(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 204 No Content\r\n")


def test_a_switch_is_returned_with_its_trailing_bytes():
    reframer, wire, ended = reframed("GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
                                     b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                     b"Connection: Upgrade\r\n\r\nraw")
    assert isinstance(ended, Switched) and ended.trailing == b"raw" and reframer.status == 101
    assert b"Upgrade: websocket" in wire and b"Connection: Upgrade" in wire


def test_nothing_is_sent_before_a_head():
    reframer = exchange.ResponseReframer(request(GET_11))
    out: list = []
    assert reframer.reframe([], out) is None and out == [] and not reframer.sent_head and reframer.status == 0
