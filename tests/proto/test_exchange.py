"""The rules of one exchange (proto/exchange.py), decided on parsed heads without a relay or a socket."""

from __future__ import annotations

import pytest

from portway.proto import exchange
from portway.proto.http1 import BodyFraming, RequestParser, ResponseHead, ResponseParser


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
