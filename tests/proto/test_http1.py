"""The relay's HTTP/1.1 edge: parsing, strictness, re-framing. No sockets."""

import gc
import sys
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from portway.errors import HttpError
from portway.proto import http1
from portway.proto.http1 import MESSAGE_END, Body, BodyFraming, RequestHead, RequestParser, ResponseHead, Switched


def feed_all_ways(data: bytes):
    """Whole, byte by byte, and in two halves: all must give the same events."""
    results = []
    for pieces in ([data], [data[i : i + 1] for i in range(len(data))], [data[: len(data) // 2], data[len(data) // 2 :]]):
        parser = RequestParser()
        events = []
        for piece in pieces:
            events.extend(parser.feed(piece))
        results.append(_normalise(events))
    assert results[0] == results[1] == results[2]
    return results[0]


def _normalise(events):
    out = []
    for event in events:
        if isinstance(event, Body):
            if out and isinstance(out[-1], Body):
                out[-1] = Body(out[-1].data + event.data)
                continue
        out.append(event)
    return out


def test_simple_get():
    (head, end) = feed_all_ways(b"GET /a?b=1 HTTP/1.1\r\nHost: Quiet-River.localhost:8000\r\n\r\n")
    assert isinstance(head, RequestHead)
    assert head.method == "GET" and head.target == b"/a?b=1" and head.host == "Quiet-River.localhost:8000"
    assert head.framing is BodyFraming.NONE and head.keep_alive and head.upgrade is None
    assert end is MESSAGE_END


def test_pipelined_requests_for_different_hosts():
    events = feed_all_ways(b"GET / HTTP/1.1\r\nHost: a.x\r\n\r\nGET /2 HTTP/1.1\r\nHost: b.x\r\n\r\n")
    heads = [e for e in events if isinstance(e, RequestHead)]
    assert [h.host for h in heads] == ["a.x", "b.x"]


def test_content_length_body_streams():
    events = feed_all_ways(b"POST /u HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello")
    assert events[0].framing is BodyFraming.LENGTH and events[0].content_length == 5
    assert events[1] == Body(b"hello") and events[2] is MESSAGE_END


def test_chunked_body_is_decoded():
    events = feed_all_ways(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
    assert events[0].framing is BodyFraming.CHUNKED
    assert events[1] == Body(b"abcde") and events[2] is MESSAGE_END


def test_upgrade_hands_over_trailing_bytes():
    parser = RequestParser()
    events = parser.feed(b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nRAW")
    assert events[0].upgrade == b"websocket"
    assert events[1] is MESSAGE_END and events[2] == Switched(b"RAW")


@pytest.mark.parametrize(
    "raw, status",
    [
        (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: x\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: y\r\n  folded\r\n\r\n", 400),
        (b"GET / HTTP/1.1\nHost: a\n\n", 400),
        (b"GET http://b.x/ HTTP/1.1\r\nHost: a.x\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: \x00\r\n\r\n", 400),
        (b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", 405),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"y" * 40000 + b"\r\n\r\n", 431),
        (b"GET /" + b"y" * 40000 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 431),
    ],
)
def test_hostile_requests_are_refused(raw, status):
    with pytest.raises(HttpError) as caught:
        RequestParser().feed(raw)
    assert caught.value.status == status


def test_absolute_form_matching_host_becomes_origin_form():
    (head, _) = feed_all_ways(b"GET http://a.x:8000/p?q HTTP/1.1\r\nHost: a.x:8000\r\n\r\n")
    assert head.target == b"/p?q"


@settings(max_examples=300)
@given(st.binary(max_size=512))
def test_arbitrary_bytes_raise_only_http_errors(data):
    parser = RequestParser()
    try:
        parser.feed(data)
    except HttpError as error:
        assert 400 <= error.status < 500


def test_request_head_encoding_replaces_forwarding_headers():
    (head, _) = feed_all_ways(
        b"GET / HTTP/1.1\r\nHost: a.x\r\nX-Forwarded-For: 6.6.6.6\r\nConnection: keep-alive\r\nAccept: */*\r\n\r\n"
    )
    wire = http1.encode_request_head(head, forwarded=http1.forwarded_fields("10.0.0.1", "https"))
    assert b"6.6.6.6" not in wire
    assert b"X-Forwarded-For: 10.0.0.1\r\n" in wire and b"X-Forwarded-Proto: https\r\n" in wire
    assert b"X-Forwarded-Host: a.x\r\n" in wire and b"Accept: */*\r\n" in wire
    assert wire.endswith(b"\r\n\r\n") and wire.count(b"Connection:") == 1


def response_events(raw: bytes, method: str = "GET", eof: bool = False, upgrade: bytes | None = None):
    parser = http1.ResponseParser(method, upgrade)
    events = parser.feed(raw)
    if eof:
        events += parser.feed_eof()
    return parser, events


def test_response_with_length():
    parser, events = response_events(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert isinstance(events[0], ResponseHead) and events[0].framing is BodyFraming.LENGTH
    assert events[1] == Body(b"ok") and events[2] is MESSAGE_END and parser.complete


def test_close_delimited_response_ends_at_eof_only():
    parser, events = response_events(b"HTTP/1.1 200 OK\r\n\r\nabc", eof=True)
    assert events[0].framing is BodyFraming.UNTIL_CLOSE and not events[0].keep_alive
    assert events[-1] is MESSAGE_END


def test_truncated_response_is_an_error_at_eof():
    parser, _ = response_events(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    with pytest.raises(HttpError) as caught:
        parser.feed_eof()
    assert caught.value.status == 502


def test_head_response_has_no_body():
    parser, events = response_events(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", method="HEAD")
    assert events[-1] is MESSAGE_END and parser.complete


@pytest.mark.parametrize("method, raw, kept", [
    ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 1048576\r\n\r\n", True),
    ("HEAD", b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\n", True),
    ("GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 1048576\r\n\r\n", True),
    ("HEAD", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", False),
    ("HEAD", b"HTTP/1.1 200 OK\r\n\r\n", False),
    ("GET", b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n", False),  # never on a 204 (RFC 9110 §8.6)
])
def test_a_bodiless_answer_keeps_the_size_a_get_would_receive(method, raw, kept):
    events = http1.ResponseParser(method).feed(raw)
    head = events[0]
    assert head.framing is BodyFraming.NONE and events[-1] is MESSAGE_END
    wire = http1.encode_response_head(head, framing=BodyFraming.NONE, keep_alive=True)
    lengths = [line for line in wire.split(b"\r\n") if line.lower().startswith(b"content-length:")]
    expected = [b"Content-Length: " + raw.split(b"Content-Length: ")[1].split(b"\r\n")[0]] if kept else []
    assert lengths == expected, wire


def test_informational_then_final():
    parser, events = response_events(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n")
    assert [e.status for e in events if isinstance(e, ResponseHead)] == [100, 204]
    assert events[-1] is MESSAGE_END


def test_switching_protocols():
    parser, events = response_events(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nXY",
                                     upgrade=b"websocket")
    assert events[0].status == 101 and events[-1] == Switched(b"XY")
    wire = http1.encode_response_head(events[0], framing=BodyFraming.NONE, keep_alive=False)
    assert b"Upgrade: websocket" in wire and b"Connection: Upgrade" in wire


def test_response_reframing_to_chunked():
    parser, events = response_events(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
    wire = http1.encode_response_head(events[0], framing=BodyFraming.CHUNKED, keep_alive=True)
    assert b"Transfer-Encoding: chunked" in wire and b"Connection: keep-alive" in wire
    assert http1.encode_chunk(b"abc") == b"3\r\nabc\r\n"


def test_length_body_split_across_feeds_is_counted_exactly():
    parser = http1.ResponseParser("GET")
    events = parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    events += parser.feed(b"defg")
    assert not parser.complete
    events += parser.feed(b"hij")
    assert parser.complete and events[-1] is MESSAGE_END
    assert b"".join(e.data for e in events if isinstance(e, Body)) == b"abcdefghij"


def test_length_body_overrun_is_a_bad_gateway():
    parser = http1.ResponseParser("GET")
    parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
    with pytest.raises(HttpError) as caught:
        parser.feed(b"cdEXTRA")
    assert caught.value.status == 502


def test_headers_named_in_connection_are_not_forwarded():
    (head, _) = feed_all_ways(
        b"GET / HTTP/1.1\r\nHost: a.x\r\nConnection: close, X-Secret\r\nX-Secret: 1\r\nX-Kept: 2\r\n\r\n"
    )
    wire = http1.encode_request_head(head, forwarded=http1.forwarded_fields("10.0.0.1", "http"))
    assert b"X-Secret" not in wire and b"X-Kept: 2" in wire


def test_tunnel_credentials_are_not_forwarded_when_the_relay_consumed_them():
    (head, _) = feed_all_ways(b"GET / HTTP/1.1\r\nHost: a.x\r\nAuthorization: Basic dTpw\r\n\r\n")
    assert b"Authorization" in http1.encode_request_head(head, forwarded=http1.forwarded_fields("1.2.3.4", "http"))
    assert b"Authorization" not in http1.encode_request_head(
        head, forwarded=http1.forwarded_fields("1.2.3.4", "http"), drop_authorization=True
    )


@pytest.mark.parametrize("response, method", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", "GET"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", "HEAD"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", "GET"),
    (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nraw", "GET"),
])
def test_finished_response_parser_is_freed_without_the_cycle_collector(response, method):
    # one parser per proxied response: a reference cycle here is garbage the collector must chase per request
    gc.disable()
    try:
        parser = http1.ResponseParser(method, b"websocket")
        parser.feed(response)
        assert parser.complete
        assert sys.getrefcount(parser) == 2  # this name and getrefcount's argument: nothing inside holds it
    finally:
        gc.enable()


def test_close_delimited_response_parser_is_freed_at_eof():
    gc.disable()
    try:
        parser = http1.ResponseParser("GET")
        parser.feed(b"HTTP/1.1 200 OK\r\n\r\nbody")
        parser.feed_eof()
        assert sys.getrefcount(parser) == 2  # this name and getrefcount's argument: nothing inside holds it
    finally:
        gc.enable()


def test_a_closed_request_parser_is_freed_without_the_cycle_collector():
    # one parser per visitor connection: left as a cycle, a burst of new connections piles them up between runs
    gc.disable()
    try:
        parser = http1.RequestParser()
        parser.feed(b"GET / HTTP/1.1\r\nHost: a.x\r\n\r\n")
        parser.close()
        assert sys.getrefcount(parser) == 2  # this name and getrefcount's argument: nothing inside holds it
    finally:
        gc.enable()


# ----------------------------------------------------------------------------------------------- hardening

CHUNKED_WITH_TRAILER = (b"POST / HTTP/1.1\r\nHost: a.x\r\nTransfer-Encoding: chunked\r\n\r\n"
                        b"3\r\nabc\r\n0\r\nHost: evil.x\r\nAuthorization: Basic dTpw\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n")


@pytest.mark.parametrize("cut", [None, 10, 60, 70, 80, 100])
def test_trailer_fields_never_join_the_head(cut):
    """However TCP splits head, body and trailer, the head the relay routes and forwards is the head alone."""
    pieces = [CHUNKED_WITH_TRAILER] if cut is None else [CHUNKED_WITH_TRAILER[:cut], CHUNKED_WITH_TRAILER[cut:]]
    parser = RequestParser()
    events = [event for piece in pieces for event in parser.feed(piece)]
    (head,) = [event for event in events if isinstance(event, RequestHead)]
    assert [key for key, _ in head.headers] == [b"Host", b"Transfer-Encoding"]
    assert head.header(b"authorization") is None and events[-1] is MESSAGE_END
    wire = http1.encode_request_head(head, forwarded=http1.forwarded_fields("10.0.0.1", "http"))
    assert wire.count(b"\r\nHost:") == 1 and b"evil" not in wire and b"6.6.6.6" not in wire


def test_an_endless_trailer_section_is_refused():
    parser = RequestParser()
    parser.feed(b"POST / HTTP/1.1\r\nHost: a.x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n")
    with pytest.raises(HttpError) as refused:
        for _ in range(100):
            parser.feed(b"X-T: " + b"t" * 1000 + b"\r\n")
    assert refused.value.status == 431


@pytest.mark.parametrize("connection", [b"close, Host", b"Host", b"keep-alive, HOST", b"host, x-forwarded-for"])
def test_connection_options_cannot_remove_host(connection):
    (head, _) = feed_all_ways(b"GET / HTTP/1.1\r\nHost: a.x\r\nConnection: " + connection + b"\r\n\r\n")
    wire = http1.encode_request_head(head, forwarded=http1.forwarded_fields("10.0.0.1", "http"))
    assert wire.split(b"\r\n")[1] == b"Host: a.x" and wire.count(b"\r\nHost:") == 1


def test_the_forwarded_host_is_the_one_the_request_was_routed_by():
    (head, _) = feed_all_ways(b"GET http://A.x:80/p HTTP/1.1\r\nHost:   A.x:80  \r\n\r\n")
    wire = http1.encode_request_head(head, forwarded=http1.forwarded_fields("10.0.0.1", "http"))
    assert wire.startswith(b"GET /p HTTP/1.1\r\nHost: A.x:80\r\n") and wire.count(b"\r\nHost:") == 1


@pytest.mark.parametrize("name", [b"X-Forwarded-Prefix", b"X-Forwarded-Server", b"X-Forwarded-Ssl",
                                  b"X-Forwarded-Scheme", b"X-Forwarded-Port", b"X-Real-IP", b"True-Client-IP",
                                  b"CF-Connecting-IP", b"X-Client-IP", b"X-Cluster-Client-IP", b"Fastly-Client-IP",
                                  b"Forwarded", b"x_real_ip", b"X-Forwarded-Anything-New"])
def test_every_client_identity_header_from_a_visitor_is_dropped(name):
    (head, _) = feed_all_ways(b"GET / HTTP/1.1\r\nHost: a.x\r\n" + name + b": 6.6.6.6\r\n\r\n")
    wire = http1.encode_request_head(head, forwarded=http1.forwarded_fields("10.0.0.1", "http"))
    assert b"6.6.6.6" not in wire and b"X-Forwarded-For: 10.0.0.1\r\n" in wire


SWITCH = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nraw"


@pytest.mark.parametrize("asked", [None, b"h2c", b"websocketx", b""])
def test_a_switch_the_request_did_not_ask_for_is_a_bad_gateway(asked):
    """RFC 9110 §7.8: an origin may only switch to a protocol the client asked for; otherwise the visitor's
    connection would become a raw pipe to that origin."""
    for pieces in ([SWITCH], [SWITCH[:20], SWITCH[20:]], [SWITCH[i:i + 1] for i in range(len(SWITCH))]):
        parser = http1.ResponseParser("GET", asked)
        with pytest.raises(HttpError) as refused:
            for piece in pieces:
                assert not any(isinstance(event, Switched) for event in parser.feed(piece))
        assert refused.value.status == 502 and not parser.switched


@pytest.mark.parametrize("asked, answered", [(b"websocket", b"websocket"), (b"WebSocket", b"websocket"),
                                             (b"h2c, websocket", b"websocket"), (b"foo/2", b"foo")])
def test_a_switch_to_an_asked_protocol_is_followed(asked, answered):
    raw = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: " + answered + b"\r\n\r\nXY"
    parser, events = response_events(raw, upgrade=asked)
    assert events[-1] == Switched(b"XY") and parser.switched


@pytest.mark.parametrize("upgrade_headers", [b"", b"Upgrade: websocket\r\nUpgrade: websocket\r\n", b"Upgrade: \r\n"])
def test_a_switch_that_names_no_single_protocol_is_a_bad_gateway(upgrade_headers):
    raw = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n" + upgrade_headers + b"\r\n"
    with pytest.raises(HttpError) as refused:
        http1.ResponseParser("GET", b"websocket").feed(raw)
    assert refused.value.status == 502


def test_response_trailers_never_join_the_head_sent_to_the_visitor():
    raw = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n"
           b"Set-Cookie: session=stolen\r\nX-Auth: yes\r\n\r\n")
    parser, events = response_events(raw)
    assert [key for key, _ in events[0].headers] == [b"Transfer-Encoding"]
    wire = http1.encode_response_head(events[0], framing=BodyFraming.CHUNKED, keep_alive=True)
    assert b"stolen" not in wire and events[-1] is MESSAGE_END


@pytest.mark.parametrize("start", [b"HTTP/1.1 200 OK\r\nX-Long: ", b"HTTP/1.1 200 ", b"HTTP/1.1 100 Continue\r\nX: "])
@pytest.mark.parametrize("piece_size", [1, 1000, 65536])
def test_an_endless_response_head_is_cut_as_bytes_arrive(start, piece_size):
    """A response head (status line, a header value, an interim 1xx) is bounded by the bytes fed, not by what
    llhttp has finished parsing: it buffers a header value whole before calling back."""
    parser = http1.ResponseParser("GET")
    fed = 0
    with pytest.raises(HttpError) as refused:
        parser.feed(start)
        fed += len(start)
        while fed < 8 * http1.MAX_HEAD_BYTES:
            parser.feed(b"a" * piece_size)
            fed += piece_size
    assert refused.value.status == 502
    assert fed <= http1.MAX_HEAD_BYTES + piece_size + len(start)


def test_a_flood_of_interim_responses_is_bounded_like_one_head():
    parser = http1.ResponseParser("GET")
    with pytest.raises(HttpError) as refused:
        for _ in range(http1.MAX_HEAD_BYTES):
            parser.feed(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert refused.value.status == 502


def test_a_response_head_just_under_the_limit_passes_in_pieces():
    head = b"HTTP/1.1 200 OK\r\nX: " + b"v" * (http1.MAX_HEAD_BYTES - 200) + b"\r\nContent-Length: 2\r\n\r\nok"
    parser = http1.ResponseParser("GET")
    events = [event for i in range(0, len(head), 4096) for event in parser.feed(head[i:i + 4096])]
    assert events[0].status == 200 and events[-1] is MESSAGE_END


KEEP_ALIVE_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def answered(parser: http1.ResponseParser, raw: bytes) -> list[object]:
    events = [event for i in range(0, len(raw), 7) for event in parser.feed(raw[i:i + 7])]
    assert parser.complete
    return events


def test_a_reusable_parser_parses_the_next_answer_after_a_keep_alive_one():
    parser = http1.ResponseParser("GET", reusable=True)
    parser.feed(KEEP_ALIVE_ANSWER)
    for method, raw, body in [("GET", b"HTTP/1.1 404 Nope\r\nContent-Length: 1\r\n\r\nx", b"x"),
                              ("POST", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
                               b"abc")]:
        assert parser.restart(method)
        events = parser.feed(raw)
        assert isinstance(events[0], ResponseHead) and events[-1] is MESSAGE_END
        assert b"".join(bytes(event.data) for event in events if isinstance(event, Body)) == body
        assert parser.head is events[0] and parser.complete


@pytest.mark.parametrize("method, raw, why", [
    ("GET", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok", "not keep-alive"),
    ("GET", b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", "HTTP/1.0 without keep-alive"),
    ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", "llhttp stopped after a HEAD answer's head"),
])
def test_a_parser_is_not_restarted_after_an_answer_llhttp_cannot_go_on_from(method, raw, why):
    parser = http1.ResponseParser(method, reusable=True)
    parser.feed(raw)
    assert parser.complete
    assert not parser.restart("GET"), why


def test_a_parser_is_not_restarted_mid_answer_after_a_failure_or_without_being_asked():
    split_body = http1.ResponseParser("GET", reusable=True)
    split_body.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
    split_body.feed(b"cd")  # the rest of a Content-Length body is counted past llhttp, which never sees it
    assert split_body.complete and not split_body.restart("GET")
    unfinished = http1.ResponseParser("GET", reusable=True)
    unfinished.feed(b"HTTP/1.1 200 OK\r\nContent-Len")
    assert not unfinished.restart("GET")
    glued = http1.ResponseParser("GET", reusable=True)
    with pytest.raises(HttpError):
        glued.feed(KEEP_ALIVE_ANSWER + b"HTTP/1.1 200 OK\r\n")  # surplus after the answer, in the same read
    assert not glued.restart("GET")
    single_use = http1.ResponseParser("GET")
    single_use.feed(KEEP_ALIVE_ANSWER)
    assert not single_use.restart("GET")
    closed = http1.ResponseParser("GET", reusable=True)
    closed.feed(KEEP_ALIVE_ANSWER)
    closed.close()
    assert not closed.restart("GET")


def test_a_restarted_parser_refuses_surplus_and_bounds_heads_as_a_new_one():
    parser = http1.ResponseParser("GET", reusable=True)
    parser.feed(KEEP_ALIVE_ANSWER)
    assert parser.restart("GET")
    with pytest.raises(HttpError) as surplus:
        parser.feed(KEEP_ALIVE_ANSWER + b"X")
    assert surplus.value.status == 502
    parser = http1.ResponseParser("GET", reusable=True)
    parser.feed(KEEP_ALIVE_ANSWER)
    assert parser.restart("GET")
    with pytest.raises(HttpError) as too_large:
        parser.feed(b"HTTP/1.1 200 OK\r\nX: " + b"v" * (http1.MAX_HEAD_BYTES + 1))
    assert too_large.value.status == 502


def test_a_restarted_parser_checks_a_switch_against_the_new_request():
    parser = http1.ResponseParser("GET", reusable=True)
    parser.feed(KEEP_ALIVE_ANSWER)
    assert parser.restart("GET", None)
    with pytest.raises(HttpError) as refused:
        parser.feed(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
    assert refused.value.status == 502


def test_refused_request_body_state_is_known():
    parser = RequestParser()
    parser.feed(b"POST / HTTP/1.1\r\nHost: a.x\r\nContent-Length: 5\r\n\r\nab")
    assert parser.mid_message
    parser.feed(b"cde")
    assert not parser.mid_message


# ------------------------------------------------------------------------ mutation-testing survivors (issue 18)

def origin_head(raw: bytes, **options) -> bytes:
    (head, *_) = feed_all_ways(raw)
    return http1.encode_request_head(head, forwarded=http1.forwarded_fields("10.0.0.1", "http"), **options)


def test_the_origin_gets_the_relays_framing_and_connection():
    wire = origin_head(b"POST /u HTTP/1.1\r\nHost: a.x\r\nContent-Length: 5\r\nConnection: keep-alive\r\n\r\nhello")
    assert wire.split(b"\r\n")[:2] == [b"POST /u HTTP/1.1", b"Host: a.x"]
    assert b"\r\nContent-Length: 5\r\n" in wire and b"Transfer-Encoding" not in wire
    assert b"\r\nConnection: keep-alive\r\n" in wire and wire.count(b"Content-Length") == 1
    wire = origin_head(b"POST / HTTP/1.1\r\nHost: a.x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                       connection=b"close")
    assert b"\r\nTransfer-Encoding: chunked\r\n" in wire and b"Content-Length" not in wire
    assert b"\r\nConnection: close\r\n" in wire and wire.count(b"Connection:") == 1
    wire = origin_head(b"GET / HTTP/1.1\r\nHost: a.x\r\n\r\n")
    assert b"Content-Length" not in wire and b"Transfer-Encoding" not in wire


def test_an_upgrade_request_reaches_the_origin_as_one():
    wire = origin_head(b"GET /ws HTTP/1.1\r\nHost: a.x\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n"
                       b"Sec-WebSocket-Key: k\r\n\r\n", connection=b"close")
    assert b"\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n" in wire
    assert wire.count(b"Connection:") == 1 and wire.count(b"Upgrade:") == 1 and b"Sec-WebSocket-Key: k\r\n" in wire


def test_an_upgrade_header_without_connection_upgrade_asks_for_nothing():
    (head, *_) = feed_all_ways(b"GET / HTTP/1.1\r\nHost: a.x\r\nUpgrade: websocket\r\n\r\n")
    assert head.upgrade is None
    wire = http1.encode_request_head(head, forwarded=http1.forwarded_fields("10.0.0.1", "http"))
    assert b"Upgrade" not in wire and b"\r\nConnection: keep-alive\r\n" in wire


@pytest.mark.parametrize("name", [b"Keep-Alive", b"Proxy-Connection", b"TE", b"Trailer", b"Upgrade",
                                  b"Content-Length", b"Transfer-Encoding", b"Connection", b"Via", b"Client-IP",
                                  b"X-Original-Forwarded-For", b"X-Envoy-External-Address"])
def test_hop_by_hop_and_identity_headers_never_reach_the_origin_as_sent(name):
    wire = http1.encode_request_head(
        RequestHead("GET", b"/", "1.1", [(b"Host", b"a.x"), (name, b"6.6.6.6"), (b"X-Kept", b"1")], "a.x",
                    BodyFraming.NONE, 0, True, None),
        forwarded=http1.forwarded_fields("10.0.0.1", "http"))
    assert b"6.6.6.6" not in wire and b"X-Kept: 1\r\n" in wire


@pytest.mark.parametrize("connection", [b"X_Secret", b" x-secret ", b"X-SECRET,,", b"close,X-Secret"])
def test_connection_options_are_matched_however_they_are_spelled(connection):
    (head, *_) = feed_all_ways(b"GET / HTTP/1.1\r\nHost: a.x\r\nConnection: " + connection + b"\r\nX-Secret: 1\r\n\r\n")
    assert head.connection_named >= {b"x-secret"} and b"" not in head.connection_named
    assert b"X-Secret" not in http1.encode_request_head(head, forwarded=http1.forwarded_fields("10.0.0.1", "http"))


def test_two_connection_headers_both_count():
    (head, *_) = feed_all_ways(b"GET / HTTP/1.1\r\nHost: a.x\r\nConnection: X-A\r\nConnection: X-B\r\n\r\n")
    assert head.connection_named == {b"x-a", b"x-b"}


def test_a_request_without_connection_names_nothing():
    (head, *_) = feed_all_ways(b"GET / HTTP/1.1\r\nHost: a.x\r\n\r\n")
    assert head.connection_named == frozenset()


def test_http_1_0_is_served_and_other_versions_are_not():
    (head, *_) = feed_all_ways(b"GET / HTTP/1.0\r\nHost: a.x\r\n\r\n")
    assert head.http_version == "1.0" and not head.keep_alive
    for version in (b"0.9", b"2.0", b"1.2"):
        with pytest.raises(HttpError) as refused:
            RequestParser().feed(b"GET / HTTP/" + version + b"\r\nHost: a.x\r\n\r\n")
        assert refused.value.status == 400


@pytest.mark.parametrize("target, host, origin_form", [
    (b"http://a.x/p?q=1", b"a.x", b"/p?q=1"), (b"http://A.X", b"a.x", b"/"), (b"http://a.x:80", b"a.x:80", b"/"),
    (b"http://a.x/", b"A.x", b"/"), (b"http://a.x?q=1", b"a.x", b"/?q=1"), (b"HTTP://A.X/p", b"a.x", b"/p"),
])
def test_absolute_form_targets_become_origin_form(target, host, origin_form):
    (head, *_) = feed_all_ways(b"GET " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
    assert head.target == origin_form


@pytest.mark.parametrize("target, host", [(b"http://a.x:81/", b"a.x:80"), (b"http://a.x:80/", b"a.x"),
                                          (b"http://a.x/", b"a.x:80"), (b"http://a.xy/", b"a.x"),
                                          (b"http:///p", b"a.x")])
def test_absolute_form_naming_another_authority_is_refused(target, host):
    with pytest.raises(HttpError) as refused:
        RequestParser().feed(b"GET " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
    assert refused.value.status == 400


def test_an_asterisk_target_is_kept():
    (head, *_) = feed_all_ways(b"OPTIONS * HTTP/1.1\r\nHost: a.x\r\n\r\n")
    assert head.target == b"*"


def test_two_transfer_encoding_headers_are_refused():
    with pytest.raises(HttpError) as refused:
        RequestParser().feed(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    assert refused.value.status == 400


def test_a_zero_length_body_is_a_length_body():
    (head, end) = feed_all_ways(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n")
    assert head.framing is BodyFraming.LENGTH and head.content_length == 0 and end is MESSAGE_END
    (head, end) = feed_all_ways(b"POST / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert head.framing is BodyFraming.NONE and head.content_length == 0


def test_a_parser_that_switched_takes_no_more_bytes():
    parser = RequestParser()
    parser.feed(b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
    assert not parser.mid_message
    with pytest.raises(RuntimeError):
        parser.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")


def test_the_request_head_limit_is_exact_and_resets_per_request():
    parser = RequestParser(max_head_bytes=100)
    for _ in range(5):  # many small requests on one connection are not one big head
        assert parser.feed(b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"v" * 40 + b"\r\n\r\n")[-1] is MESSAGE_END
    fits = b"GET /" + b"p" * 40 + b" HTTP/1.1\r\nHost: a\r\nX: " + b"v" * 40 + b"\r\n\r\n"
    assert RequestParser(max_head_bytes=95).feed(fits)[-1] is MESSAGE_END
    with pytest.raises(HttpError) as refused:
        RequestParser(max_head_bytes=90).feed(fits)
    assert refused.value.status == 431


def test_a_request_trailer_section_is_bounded_like_a_head_and_counted_per_request():
    chunked = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX-T: " + b"t" * 60 + b"\r\n\r\n"
    parser = RequestParser(max_head_bytes=100)
    for _ in range(3):
        assert parser.feed(chunked)[-1] is MESSAGE_END
    with pytest.raises(HttpError) as refused:
        RequestParser(max_head_bytes=100).feed(chunked.replace(b"t" * 60, b"t" * 100))
    assert refused.value.status == 431


def test_a_response_trailer_section_is_dropped_without_being_kept():
    """llhttp consumes an origin's trailer fields and the relay keeps none of them (nor calls back per field):
    megabytes of trailer cost no memory, like the chunk framing around a body, and never reach the visitor."""
    parser = http1.ResponseParser("GET", max_head_bytes=200)
    (head,) = parser.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n")
    assert head.framing is BodyFraming.CHUNKED
    field = b"X-T: " + b"t" * 1000 + b"\r\n"
    tracemalloc.start()
    try:
        parser.feed(field)
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(2000):
            assert parser.feed(field) == []
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 16 * 1024, f"{grown} bytes kept for 2 MB of trailer fields"
    assert parser.feed(b"\r\n") == [MESSAGE_END]


def test_the_response_head_limit_is_exact():
    raw = b"HTTP/1.1 200 OK\r\nX: " + b"v" * 50 + b"\r\nContent-Length: 0\r\n\r\n"
    assert http1.ResponseParser("GET", max_head_bytes=len(raw)).feed(raw)[-1] is MESSAGE_END
    with pytest.raises(HttpError) as refused:
        http1.ResponseParser("GET", max_head_bytes=60).feed(raw)
    assert refused.value.status == 502
    with pytest.raises(HttpError) as refused:
        http1.ResponseParser("GET", max_head_bytes=40).feed(b"HTTP/1.1 200 " + b"r" * 50 + b"\r\n\r\n")
    assert refused.value.status == 502


@pytest.mark.parametrize("status", [204, 304, 100, 103])
def test_statuses_that_never_have_a_body(status):
    raw = b"HTTP/1.1 %d X\r\nContent-Length: 5\r\n\r\n" % status
    parser = http1.ResponseParser("GET")
    head = parser.feed(raw)[0]
    assert head.framing is BodyFraming.NONE and head.content_length == 0


def test_a_head_response_ends_at_its_head_but_an_interim_one_before_it_does_not():
    parser = http1.ResponseParser("HEAD")
    events = parser.feed(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert not parser.complete and MESSAGE_END not in events
    events = parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n")
    assert events[0].framing is BodyFraming.NONE and events[-1] is MESSAGE_END and parser.complete
    with pytest.raises(HttpError) as refused:
        parser.feed(b"more")
    assert refused.value.status == 502


@pytest.mark.parametrize("raw, framing, length, keep_alive", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", BodyFraming.LENGTH, 3, True),
    (b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n", BodyFraming.LENGTH, 0, True),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", BodyFraming.CHUNKED, -1, True),
    (b"HTTP/1.1 200 OK\r\n\r\n", BodyFraming.UNTIL_CLOSE, -1, False),
    (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 3\r\n\r\n", BodyFraming.LENGTH, 3, False),
])
def test_response_framing(raw, framing, length, keep_alive):
    head = http1.ResponseParser("GET").feed(raw)[0]
    assert (head.framing, head.content_length, head.keep_alive) == (framing, length, keep_alive)


def test_a_length_body_ending_exactly_completes_and_nothing_may_follow():
    parser = http1.ResponseParser("GET")
    parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n")
    assert parser.feed(b"a") == [Body(b"a")] and not parser.complete
    assert parser.feed(b"bcd") == [Body(b"bcd"), MESSAGE_END] and parser.complete
    assert parser.feed_eof() == []
    with pytest.raises(HttpError):
        parser.feed(b"x")


def test_eof_before_any_response_is_an_error():
    with pytest.raises(HttpError) as refused:
        http1.ResponseParser("GET").feed_eof()
    assert refused.value.status == 502


@pytest.mark.parametrize("asked, answered", [(b"websocket", b"WebSocket"), (b"foo", b"foo/2"),
                                             (b"a, b", b"b, a"), (b"websocket", b"websocket ")])
def test_a_switch_to_an_asked_protocol_in_another_spelling_is_followed(asked, answered):
    raw = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUPGRADE: " + answered + b"\r\n\r\nXY"
    parser, events = response_events(raw, upgrade=asked)
    assert events[-1] == Switched(b"XY") and parser.switched and parser.complete


@pytest.mark.parametrize("asked, answered", [(b"websocket", b"websocket, h2c"), (b"a", b"ab"),
                                             (b"websocket", b"upgrade: websocket")])
def test_a_switch_to_more_than_was_asked_is_a_bad_gateway(asked, answered):
    raw = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: " + answered + b"\r\n\r\n"
    with pytest.raises(HttpError) as refused:
        http1.ResponseParser("GET", asked).feed(raw)
    assert refused.value.status == 502


def test_the_informational_property():
    def head(status):
        return ResponseHead(status, b"", [], BodyFraming.NONE, 0, True)

    assert [s for s in (99, 100, 101, 103, 199, 200) if head(s).informational] == [100, 103, 199]


def test_response_heads_to_the_visitor_drop_hop_by_hop_except_on_a_switch():
    headers = [(b"Connection", b"x"), (b"Upgrade", b"y"), (b"Keep-Alive", b"5"), (b"Transfer-Encoding", b"gzip"),
               (b"Content-Length", b"9"), (b"X-App", b"1")]
    wire = http1.encode_response_head(ResponseHead(200, b"OK", headers, BodyFraming.LENGTH, 3, True),
                                      framing=BodyFraming.LENGTH, keep_alive=False)
    assert wire == b"HTTP/1.1 200 OK\r\nX-App: 1\r\nContent-Length: 3\r\nConnection: close\r\n\r\n"
    wire = http1.encode_response_head(ResponseHead(101, b"Switching", headers, BodyFraming.NONE, 0, True),
                                      framing=BodyFraming.NONE, keep_alive=True)
    assert wire == b"HTTP/1.1 101 Switching\r\nConnection: x\r\nUpgrade: y\r\nX-App: 1\r\n\r\n"
    wire = http1.encode_response_head(ResponseHead(103, b"Early", [(b"Link", b"<a>")], BodyFraming.NONE, 0,
                                                   True), framing=BodyFraming.NONE, keep_alive=True)
    assert wire == b"HTTP/1.1 103 Early\r\nLink: <a>\r\n\r\n"


def test_an_empty_chunk_is_nothing_and_chunks_are_hex_sized():
    assert http1.encode_chunk(b"") == b""
    assert http1.encode_chunk(b"x" * 26) == b"1a\r\n" + b"x" * 26 + b"\r\n"
    assert http1.LAST_CHUNK == b"0\r\n\r\n"


def test_simple_response():
    raw = http1.simple_response(404, "Not Found", b"nope", extra_headers=[("X-A", "1")])
    assert raw == (b"HTTP/1.1 404 Not Found\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: 4\r\n"
                   b"Cache-Control: no-store\r\nConnection: keep-alive\r\nX-A: 1\r\n\r\nnope")
    assert b"\r\nConnection: close\r\n" in http1.simple_response(500, "E", b"", close=True, content_type="text/plain")


def test_an_unfinished_response_head_may_reach_the_limit_but_not_pass_it():
    start = b"HTTP/1.1 200 OK\r\nX: "
    parser = http1.ResponseParser("GET", max_head_bytes=40)
    assert parser.feed(start + b"v" * (40 - len(start))) == []
    with pytest.raises(HttpError) as refused:
        parser.feed(b"v")
    assert refused.value.status == 502


def test_a_response_head_is_measured_by_its_bytes():
    raw = b"HTTP/1.1 200 OK\r\nX: " + b"v" * 50 + b"\r\nContent-Length: 0\r\n\r\n"  # status line to empty line
    assert http1.ResponseParser("GET", max_head_bytes=len(raw)).feed(raw)[-1] is MESSAGE_END
    with pytest.raises(HttpError):
        http1.ResponseParser("GET", max_head_bytes=len(raw) - 1).feed(raw)
    with pytest.raises(HttpError):  # byte by byte too
        parser = http1.ResponseParser("GET", max_head_bytes=len(raw) - 1)
        for index in range(len(raw)):
            parser.feed(raw[index : index + 1])
    interim = b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"  # and every 1xx head before it counts
    assert http1.ResponseParser("GET", max_head_bytes=len(interim + raw)).feed(interim + raw)[-1] is MESSAGE_END
    with pytest.raises(HttpError):
        http1.ResponseParser("GET", max_head_bytes=len(interim + raw) - 1).feed(interim + raw)


# docs/SECURITY.md promises 32 KiB of head, for requests (431) and responses (502); spelled out, not imported
KIB_32 = 32768


def test_the_default_request_head_limit_is_32_kib():
    def request(value_size):  # counted: the target, then name + value + 4 for each field
        return b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"v" * value_size + b"\r\n\r\n"

    fits = KIB_32 - 1 - (4 + 1 + 4) - (1 + 4)
    assert RequestParser().feed(request(fits))[-1] is MESSAGE_END
    with pytest.raises(HttpError) as refused:
        RequestParser().feed(request(fits + 1))
    assert refused.value.status == 431


def test_the_default_response_head_limit_is_32_kib():
    def response(value_size):  # counted: every byte from the status line to the empty line
        return b"HTTP/1.1 200 OK\r\nX: " + b"v" * value_size + b"\r\nContent-Length: 0\r\n\r\n"

    fits = KIB_32 - len(response(0))
    assert http1.ResponseParser("GET").feed(response(fits))[-1] is MESSAGE_END
    with pytest.raises(HttpError) as refused:
        http1.ResponseParser("GET").feed(response(fits + 1))
    assert refused.value.status == 502


@pytest.mark.parametrize("name", [
    b"Forwarded", b"X-Real-IP", b"True-Client-IP", b"CF-Connecting-IP", b"CF-Connecting-IPv6", b"Fastly-Client-IP",
    b"Akamai-Client-IP", b"X-Client-IP", b"X-Cluster-Client-IP", b"X-Original-Forwarded-For", b"X-Originating-IP",
    b"X-Remote-IP", b"X-Remote-Addr", b"X-ProxyUser-IP", b"X-Envoy-External-Address", b"Client-IP", b"Via",
    b"Connection", b"Keep-Alive", b"Proxy-Connection", b"Transfer-Encoding", b"TE", b"Trailer", b"Upgrade",
    b"Content-Length", b"X-Forwarded-For", b"x-forwarded-whatever", b"Host",
])
def test_each_header_only_the_relay_may_write_is_dropped_from_the_visitors_head(name):
    """The list is docs/SECURITY.md's, spelled out here so a name dropped from the code's set is noticed."""
    head = RequestHead("GET", b"/", "1.1", [(b"Host", b"a.x"), (name, b"6.6.6.6"), (b"X-Kept", b"1")], "a.x",
                       BodyFraming.NONE, 0, True, None)
    wire = http1.encode_request_head(head, forwarded=http1.forwarded_fields("10.0.0.1", "http"))
    assert b"6.6.6.6" not in wire and b"X-Kept: 1\r\n" in wire and wire.count(b"\r\nHost:") == 1


def test_a_reason_phrase_split_across_reads_is_kept_whole():
    raw = b"HTTP/1.1 404 Not Found Here\r\nContent-Length: 0\r\n\r\n"
    parser = http1.ResponseParser("GET")
    events = [event for i in range(len(raw)) for event in parser.feed(raw[i:i + 1])]
    assert events[0].reason == b"Not Found Here" and events[-1] is MESSAGE_END


def test_a_close_delimited_response_is_complete_after_eof():
    parser, events = response_events(b"HTTP/1.1 200 OK\r\n\r\nabc", eof=True)
    assert parser.complete and events[-1] is MESSAGE_END and parser.feed_eof() == []


def test_a_new_request_parser_is_not_mid_message():
    assert not RequestParser().mid_message


def test_a_request_trailer_section_may_reach_the_limit_but_not_pass_it():
    def feed(value_size, limit):  # counted: name + value + 4
        trailer = b"0\r\nX-T: " + b"t" * value_size + b"\r\n\r\n"
        return RequestParser(max_head_bytes=limit).feed(
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + trailer)

    assert feed(93, 100)[-1] is MESSAGE_END
    with pytest.raises(HttpError):
        feed(94, 100)


def test_header_names_are_known_from_a_bounded_memory() -> None:
    """Names are the peers' to choose: remembering what they mean must not grow without bound."""
    assert http1.lowered_name(b"Content-Type") == b"content-type"
    folded = http1.field_name(b"X_Forwarded_For")
    assert folded.folded == b"x-forwarded-for" and folded.never_forwarded and not folded.hop_by_hop
    assert folded.lowered == b"x_forwarded_for"  # folding is only for the forward check
    assert http1.field_name(b"Transfer-Encoding").hop_by_hop and http1.field_name(b"Transfer_Encoding").never_forwarded
    assert not http1.field_name(b"Transfer_Encoding").hop_by_hop  # to the visitor, a plain header
    assert not http1.field_name(b"Accept").never_forwarded and not http1.field_name(b"Accept").hop_by_hop
    long_name = b"X-" + b"A" * 100
    assert http1.lowered_name(long_name) == long_name.lower() and long_name not in http1._FIELD_NAMES
    for n in range(2 * http1._NAMES_KEPT):
        name = b"X-Name-%d" % n
        assert http1.lowered_name(name) == name.lower() and http1.field_name(name).folded == name.lower()
    assert len(http1._FIELD_NAMES) <= http1._NAMES_KEPT
    assert http1.lowered_name(b"X-Name-%d" % (2 * http1._NAMES_KEPT)) == b"x-name-%d" % (2 * http1._NAMES_KEPT)
