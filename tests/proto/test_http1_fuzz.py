"""Fuzzing the relay's HTTP front (proto/http1.py, proto/routing.py) beyond test_http1.py's arbitrary bytes.

The property that matters for a reverse proxy is that it and the origin behind it agree on where every message
starts and ends. The relay re-frames each request, so the check is: whatever the parser accepts, the head and
body the relay would forward parse back (with the same strict parser, standing in for the origin) into exactly
the messages the relay understood, with canonical framing and nothing a downstream parser could read differently.
Whatever it does not accept is refused with a 4xx, however the bytes are split, in work bounded by the head limit.
"""

from __future__ import annotations

import string

import httptools
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from portway.errors import HttpError
from portway.proto import http1
from portway.proto.http1 import (
    MAX_HEAD_BYTES,
    MESSAGE_END,
    Body,
    BodyFraming,
    RequestHead,
    RequestParser,
    ResponseHead,
    ResponseParser,
    Switched,
)
from portway.proto.names import SYSTEM_NAMES
from portway.proto.routing import NotServed, Router, ToRelay, ToTunnel

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PEER = "203.0.113.9"

# ----------------------------------------------------------------------------------------------- the oracle

# What the relay promises about the head an origin receives, spelled out here and never imported from the code
# under test (docs/SECURITY.md, "The relay's HTTP front"): a check that reads its expectations from the
# implementation can't notice the implementation forgetting one.
NEVER_FROM_A_VISITOR = {
    # hop-by-hop: the relay writes its own framing and Connection
    b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"te", b"trailer", b"upgrade",
    # who the client is: only the relay may say
    b"forwarded", b"x-real-ip", b"true-client-ip", b"cf-connecting-ip", b"cf-connecting-ipv6", b"fastly-client-ip",
    b"akamai-client-ip", b"x-client-ip", b"x-cluster-client-ip", b"x-original-forwarded-for", b"x-originating-ip",
    b"x-remote-ip", b"x-remote-addr", b"x-proxyuser-ip", b"x-envoy-external-address", b"client-ip", b"via",
}
RELAY_WRITES = [b"x-forwarded-for", b"x-forwarded-host", b"x-forwarded-proto"]


def never_from_a_visitor(name: bytes) -> bool:
    folded = name.lower().replace(b"_", b"-")
    return folded in NEVER_FROM_A_VISITOR or folded.startswith(b"x-forwarded-")


# ----------------------------------------------------------------------------------------------- strategies

TOKEN_CHARS = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"
RESERVED = {"host", "content-length", "transfer-encoding", "connection", "upgrade", "expect", "te", "trailer",
            "keep-alive", "proxy-connection"}
methods = st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"])
paths = st.text(alphabet=string.ascii_letters + string.digits + "/-._~%!$&'()*+,;=:@?", max_size=40).map(
    lambda p: "/" + p)
names = st.text(alphabet=TOKEN_CHARS, min_size=1, max_size=20).filter(lambda n: n.lower() not in RESERVED)
values = st.binary(max_size=40).map(
    lambda raw: bytes(b for b in raw if b == 0x09 or 0x20 <= b < 0x7F or b >= 0x80).strip(b" \t"))
bodies = st.binary(max_size=300)
hosts = st.sampled_from(["a.pw.test", "A.PW.TEST:8000", "b.pw.test.", "pw.test", "127.0.0.1:80", "[::1]:8000"])
identity_spoofs = st.sampled_from([b"X-Forwarded-Prefix", b"X-Forwarded-Server", b"X-Forwarded-Ssl",
                                   b"X-Forwarded-Scheme", b"X-Forwarded-Port", b"X_Forwarded_For", b"Forwarded",
                                   b"X-Real-IP", b"True-Client-IP", b"CF-Connecting-IP", b"X-Client-IP"])
TRAILERS = [b"", b"X-Trailer: t\r\n", b"Host: evil.pw.test\r\n", b"Authorization: Basic dTpw\r\n",
            b"Host: evil.pw.test\r\nX-Forwarded-For: 6.6.6.6\r\nConnection: close\r\n"]


@st.composite
def requests(draw) -> tuple[bytes, dict]:
    """A well-formed request with random headers, body and framing; returns its bytes and what it means."""
    method = draw(methods)
    path = draw(paths)
    host = draw(hosts)
    body = draw(bodies)
    framing = draw(st.sampled_from(["none", "length", "chunked"])) if body or draw(st.booleans()) else "none"
    if framing == "none":
        body = b""
    headers = [(n.encode(), v) for n, v in draw(st.lists(st.tuples(names, values), max_size=6))]
    headers += [(spoof, b"6.6.6.6") for spoof in draw(st.lists(identity_spoofs, max_size=2))]
    headers.insert(draw(st.integers(0, len(headers))), (b"Host", host.encode()))
    if framing == "length":
        headers.append((b"Content-Length", str(len(body)).encode()))
        wire_body = body
    elif framing == "chunked":
        headers.append((b"Transfer-Encoding", b"chunked"))
        cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=4)))
        pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)]) if b > a]
        wire_body = b"".join(
            b"%x%s\r\n%s\r\n" % (len(piece), draw(st.sampled_from([b"", b";ext=1", b";a"])), piece) for piece in pieces)
        wire_body += b"0\r\n" + draw(st.sampled_from(TRAILERS)) + b"\r\n"
    else:
        wire_body = b""
    if draw(st.booleans()):
        headers.append((b"Connection", draw(st.sampled_from(
            [b"close", b"keep-alive", b"close, X-Foo", b"close, Host", b"Host", b"keep-alive, host, X-Real-IP"]))))
    head = f"{method} {path} HTTP/1.1\r\n".encode() + b"".join(k + b": " + v + b"\r\n" for k, v in headers) + b"\r\n"
    return head + wire_body, {"method": method, "path": path, "host": host, "body": body, "framing": framing}


HOSTILE_INSERTS = [b"\r", b"\n", b"\x00", b"\r\n", b"\r\n ", b"\r\n\t", b" ", b"\t", b"\x0b", b"\x7f", b":", b",",
                   b"\r\nContent-Length: 0", b"\r\nTransfer-Encoding: chunked", b"\r\nContent-Length: 5",
                   b"\r\nHost: evil.pw.test", b"\r\nTransfer-Encoding: gzip", b"\r\nTransfer_Encoding: chunked",
                   b"0\r\n\r\nGET /SMUGGLED HTTP/1.1\r\nHost: a.pw.test\r\n\r\n", b"\xff", b"\xa0", b"_", b"-"]


@st.composite
def mutated_requests(draw) -> bytes:
    """A well-formed request with one to three hostile edits: bytes inserted, removed or a line duplicated."""
    raw, _ = draw(requests())
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.integers(0, len(raw)))
        action = draw(st.sampled_from(["insert", "delete", "duplicate-line"]))
        if action == "insert":
            raw = raw[:where] + draw(st.sampled_from(HOSTILE_INSERTS)) + raw[where:]
        elif action == "delete" and raw:
            raw = raw[:where] + raw[where + 1:]
        else:
            start = raw.rfind(b"\r\n", 0, where) + 2
            end = raw.find(b"\r\n", where)
            if start >= 2 and end > start:
                raw = raw[:end + 2] + raw[start:end + 2] + raw[end + 2:]
    return raw


def split_points(data: bytes):
    return st.lists(st.integers(0, len(data)), max_size=6).map(sorted)


# ----------------------------------------------------------------------------------------------- helpers

def parse(pieces: list[bytes]) -> tuple[list[object], int | None]:
    """Feed pieces to one parser; the events it produced and the status of the HttpError it raised (if any)."""
    parser = RequestParser()
    events: list[object] = []
    for piece in pieces:
        if not piece:
            continue  # the proxy never feeds an empty read: b"" from a connection is its end
        try:
            events.extend(parser.feed(piece))
        except HttpError as error:
            assert 400 <= error.status < 500, error
            return events, error.status
        if any(isinstance(event, Switched) for event in events):
            break
    return events, None


def messages(events: list[object]) -> list[tuple[RequestHead, bytes, bool]]:
    """(head, body, complete) per request, merging body events; checks no empty Body event ever appears
    (an empty chunk on the way out would read as the last chunk)."""
    out = []
    for event in events:
        if isinstance(event, RequestHead):
            out.append([event, b"", False])
        elif isinstance(event, Body):
            assert event.data, "an empty Body event would be re-encoded as the terminating chunk"
            out[-1][1] += event.data
        elif event is MESSAGE_END:
            out[-1][2] = True
    return [tuple(item) for item in out]


def forwarded(head: RequestHead, body: bytes) -> bytes:
    """What the relay sends the origin for this request (proxy.forward_request_body's framing)."""
    wire = http1.encode_request_head(head, forwarded=http1.forwarded_fields(PEER, "https"))
    if head.framing is BodyFraming.CHUNKED:
        return wire + (http1.encode_chunk(body) if body else b"") + http1.LAST_CHUNK
    return wire + body


def assert_clean_head(wire: bytes, routed_host: str) -> None:
    head, _, _ = wire.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    for line in lines:
        assert b"\r" not in line and b"\n" not in line and b"\x00" not in line, line
    fields = [line.split(b":", 1) for line in lines[1:]]
    names = [name.lower() for name, _ in fields]
    assert [value.strip() for name, value in fields if name.lower() == b"host"] == [routed_host.encode("latin-1")], \
        "the origin must get exactly one Host, the one the request was routed by"
    framing = [n for n in names if n.replace(b"_", b"-") in (b"content-length", b"transfer-encoding")]
    assert len(framing) <= 1, f"more than one framing header forwarded: {framing}"
    identity = [n for n in names if never_from_a_visitor(n) and n not in (b"connection", b"transfer-encoding",
                                                                          b"upgrade")]
    assert sorted(identity) == RELAY_WRITES, f"client identity headers the relay did not write: {identity}"
    assert names.count(b"connection") == 1


def assert_origin_agrees(events: list[object]) -> None:
    """Re-parse what the relay would forward: the origin must see the very same messages."""
    for head, body, complete in messages(events):
        if not complete or head.upgrade is not None:
            continue
        wire = forwarded(head, body)
        assert_clean_head(wire, head.host)
        again, error = parse([wire])
        assert error is None, f"the relay forwarded something its own parser refuses: {wire[:300]!r}"
        (head2, body2, complete2), = messages(again)
        assert complete2 and body2 == body
        assert (head2.method, head2.target, head2.host) == (head.method, head.target, head.host)
        assert head2.framing is head.framing
        assert [v for k, v in head2.headers if k.lower() == b"x-forwarded-for"] == [PEER.encode()]


# ----------------------------------------------------------------------------------------------- properties

@FUZZ
@given(requests())
def test_well_formed_requests_are_understood_as_sent(request):
    raw, meant = request
    events, error = parse([raw])
    assert error is None, raw
    ((head, body, complete),) = messages(events)
    assert complete and body == meant["body"] and head.method == meant["method"]
    assert head.target == meant["path"].encode() and head.host == meant["host"]
    assert head.framing.value == {"none": "none", "length": "length", "chunked": "chunked"}[meant["framing"]]
    assert_origin_agrees(events)


@FUZZ
@given(st.data())
def test_any_split_of_a_request_gives_the_same_outcome(data):
    raw = data.draw(st.one_of(requests().map(lambda r: r[0]), mutated_requests()))
    cuts = data.draw(split_points(raw))
    pieces = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)])]
    whole_events, whole_error = parse([raw])
    split_events, split_error = parse(pieces)
    assert split_error == whole_error
    if whole_error is None:
        assert [(h.method, h.target, h.host, b, c) for h, b, c in messages(split_events)] == \
               [(h.method, h.target, h.host, b, c) for h, b, c in messages(whole_events)]


@FUZZ
@given(mutated_requests())
def test_hostile_edits_are_refused_or_forwarded_canonically(raw):
    events, error = parse([raw])
    if error is not None:
        assert error in (400, 405, 431)
    assert_origin_agrees(events)
    for head, _, _ in messages(events):
        hosts = [v for k, v in head.headers if k.lower() == b"host"]
        assert len(hosts) == 1 and b"\x00" not in hosts[0]
        lengths = [v for k, v in head.headers if k.lower() == b"content-length"]
        encodings = [v for k, v in head.headers if k.lower() == b"transfer-encoding"]
        assert not (lengths and encodings), "CL and TE together were accepted"
        if head.framing is BodyFraming.LENGTH:
            assert len(lengths) == 1 and lengths[0].strip().isdigit()
        if head.framing is BodyFraming.CHUNKED:
            assert len(encodings) == 1 and encodings[0].strip().lower().endswith(b"chunked")


@FUZZ
@given(st.lists(requests(), min_size=2, max_size=4), st.data())
def test_pipelines_split_where_the_origin_splits_them(batch, data):
    raw = b"".join(item[0] for item in batch)
    cuts = data.draw(split_points(raw))
    events, error = parse([raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)])])
    seen = messages(events)
    closing = [i for i, (head, _, complete) in enumerate(seen) if not head.keep_alive and complete]
    # strict llhttp refuses bytes after a `Connection: close` request (the proxy stops reading there anyway);
    # up to that point every message is exactly the one sent
    sent_close = any(b"Connection: close" in item[0] for item in batch[:-1])
    assert error is None or (error == 400 and (closing or sent_close)), (error, seen)
    expected = [(m["method"], m["path"], m["body"]) for _, m in batch]
    got = [(h.method, h.target.decode(), b if complete else None) for h, b, complete in seen]
    assert got == [(m, p, b if complete else None) for (m, p, b), (_, _, complete) in zip(expected, seen)]
    assert all(expected[i][2].startswith(b) for i, (_, b, _) in enumerate(seen))
    assert len(seen) == len(batch) or closing or sent_close
    assert_origin_agrees(events)


@FUZZ
@given(st.lists(st.tuples(paths, st.sampled_from(["1.0", "1.1"]), st.sampled_from([b"", b"\r\n", b"\r\n\r\n"])),
                min_size=1, max_size=5), st.data())
def test_each_pipelined_head_has_the_version_of_its_own_request_line(batch, data):
    """The parser reads a request's version from its request line when that line starts a read (sparing
    llhttp's formatted string): a pipeline mixing 1.0 and 1.1 (and the empty lines llhttp skips before a
    request, and a header line that looks like the end of a request line), split anywhere, still gives each
    head its own request's version."""
    raw = b"".join(blank + f"GET {path} HTTP/{version}\r\nX-Note: as HTTP/1.1\r\nHost: a.pw.test\r\n"
                           f"Connection: keep-alive\r\n\r\n".encode() for path, version, blank in batch)
    cuts = data.draw(split_points(raw))
    events, error = parse([raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)])])
    assert error is None
    heads = [event for event in events if isinstance(event, RequestHead)]
    assert [(head.target.decode(), head.http_version) for head in heads] == [(p, v) for p, v, _ in batch]


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4096), st.sampled_from([b"X-Long: ", b"Host: ", b"GET /"]))
def test_an_endless_head_is_cut_at_the_limit_in_bounded_work(piece_size, where):
    """However the bytes trickle in, the parser gives up once the head passes MAX_HEAD_BYTES: it never buffers
    or scans an unbounded head (count bytes, not seconds)."""
    start = b"GET / HTTP/1.1\r\nHost: a.pw.test\r\n" + where if where != b"GET /" else where
    parser = RequestParser()
    fed = 0
    with pytest.raises(HttpError) as refused:
        parser.feed(start)
        fed += len(start)
        while fed < 4 * MAX_HEAD_BYTES:
            parser.feed(b"a" * piece_size)
            fed += piece_size
    assert refused.value.status == 431
    assert fed <= MAX_HEAD_BYTES + piece_size + 64


@pytest.mark.parametrize("size, status", [(MAX_HEAD_BYTES - 200, None), (MAX_HEAD_BYTES + 64, 431)])
def test_head_limit_edge(size, status):
    prefix = b"GET / HTTP/1.1\r\nHost: a.pw.test\r\nX: "
    raw = prefix + b"v" * (size - len(prefix) - 4) + b"\r\n\r\n"
    _, error = parse([raw])
    assert error == status


@FUZZ
@given(st.binary(max_size=600), st.data())
def test_chunked_body_round_trips_through_the_relays_encoder(body, data):
    cuts = sorted(data.draw(st.lists(st.integers(0, len(body)), max_size=5)))
    pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)]) if b > a]
    wire = b"".join(http1.encode_chunk(piece) for piece in pieces) + http1.LAST_CHUNK
    events, error = parse([b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + wire])
    assert error is None and messages(events)[0][1:] == (body, True)


CHUNK_SIZE_LINES = [b"0x5", b"0_5", b"+5", b"-5", b" 5", b"5 ", b"", b"g", b"1" * 21, b"f" * 17, b"5\x00",
                    b"5;\r", b"5\rX"]


@pytest.mark.parametrize("size_line", CHUNK_SIZE_LINES)
def test_malformed_chunk_sizes_are_refused(size_line):
    raw = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + size_line + b"\r\nhello\r\n0\r\n\r\n"
    for pieces in ([raw], [raw[i:i + 1] for i in range(len(raw))]):
        _, error = parse(pieces)
        assert error == 400, (size_line, pieces[:1])


UNDERSCORE_SPOOFS = [b"X_Forwarded_For", b"X-Forwarded_For", b"x_forwarded_host", b"X_Forwarded_Proto",
                     b"Transfer_Encoding", b"Content_Length", b"Proxy_Connection", b"Keep_Alive"]


@pytest.mark.parametrize("name", UNDERSCORE_SPOOFS)
def test_underscore_spellings_of_forwarding_and_framing_headers_are_dropped(name):
    """CGI/WSGI servers turn `_` and `-` into the same variable: `X_Forwarded_For` would spoof the relay's own."""
    events, error = parse([b"GET / HTTP/1.1\r\nHost: a.pw.test\r\n" + name + b": 6.6.6.6\r\n\r\n"])
    assert error is None
    wire = forwarded(messages(events)[0][0], b"")
    assert b"6.6.6.6" not in wire


# ----------------------------------------------------------------------------------------------- responses

@FUZZ
@given(st.binary(max_size=512), st.sampled_from(["GET", "HEAD"]))
def test_any_origin_bytes_raise_only_502(data, method):
    parser = ResponseParser(method)
    try:
        events = parser.feed(data) if data else []
        events += parser.feed_eof()
    except HttpError as error:
        assert error.status == 502
        return
    for event in events:
        if isinstance(event, Body):
            assert event.data, "an empty Body event would be re-chunked as the last chunk"


@st.composite
def switching_responses(draw) -> bytes:
    """Responses built to look like a switch: any 1xx/101 status line, Connection/Upgrade spellings, glued bytes."""
    status = draw(st.sampled_from([b"101", b"101", b"100", b"199", b"200"]))
    headers = draw(st.lists(st.sampled_from([b"Connection: Upgrade", b"Connection: upgrade, close",
                                             b"Upgrade: websocket", b"Upgrade: h2c", b"Upgrade: WEBSOCKET/13",
                                             b"Upgrade: websocket, h2c", b"Content-Length: 0",
                                             b"Transfer-Encoding: chunked", b"X: y"]), max_size=4))
    glued = draw(st.sampled_from([b"", b"raw", b"GET / HTTP/1.1\r\nHost: b.pw.test\r\n\r\n"]))
    head = b"HTTP/1.1 " + status + b" X\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n"
    return draw(st.sampled_from([b"", b"HTTP/1.1 100 Continue\r\n\r\n"])) + head + glued


def switch_outcome(raw: bytes, cuts: list[int], upgrade: bytes | None) -> bool:
    """Whether feeding `raw`, split at `cuts`, makes the parser hand the connection over."""
    parser = ResponseParser("GET", upgrade)
    try:
        for a, b in zip([0, *cuts], [*cuts, len(raw)]):
            if b > a and not parser.complete:
                if any(isinstance(event, Switched) for event in parser.feed(raw[a:b])):
                    return True
        parser.feed_eof()
    except HttpError as error:
        assert error.status == 502
    assert not parser.switched
    return False


@FUZZ
@given(st.one_of(st.binary(max_size=300), switching_responses()), st.data())
def test_no_origin_bytes_switch_a_connection_the_visitor_did_not_ask_to_switch(raw, data):
    cuts = data.draw(split_points(raw))
    assert not switch_outcome(raw, cuts, None)
    if switch_outcome(raw, cuts, b"h2c"):
        # asked for h2c only: a switch happens only to h2c
        upgrades = [line for line in raw.split(b"\r\n") if line.lower().startswith(b"upgrade:")]
        assert upgrades and all(line.split(b":", 1)[1].strip().lower() == b"h2c" for line in upgrades)


HOSTILE_RESPONSES = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\nhello!",
    b"HTTP/1.1 200 OK\r\nX: a\rb\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\nContent-Length: 0\n\n",
    b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA",
]


@pytest.mark.parametrize("raw", HOSTILE_RESPONSES)
def test_hostile_origin_responses_are_502_and_never_complete(raw):
    """Ambiguous framing or bytes past the end from an origin: a 502 (or a cut) for the visitor, never a clean end
    followed by surplus bytes."""
    for pieces in ([raw], [raw[:len(raw) // 2], raw[len(raw) // 2:]], [raw[i:i + 1] for i in range(len(raw))]):
        parser = ResponseParser("GET")
        with pytest.raises(HttpError) as refused:
            for piece in pieces:
                parser.feed(piece)
            parser.feed_eof()
        assert refused.value.status == 502


def test_a_second_response_glued_to_the_first_never_reaches_the_visitor():
    """An origin answering twice: the proxy stops at the first MessageEnd, so only the first answer's bytes can reach
    the visitor. Surplus in the same read as the first answer's end is a 502 (llhttp would otherwise parse it as a
    next answer, unseen, and the conduit would look clean); in a later read it stays unread on the conduit, which is
    then not reused (tests/relay/test_front.py)."""
    first = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    raw = first + b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil"
    for cut in range(1, len(raw) + 1):
        if cut > len(first):  # the end of the first answer and surplus in one read
            with pytest.raises(HttpError) as refused:
                ResponseParser("GET").feed(raw[:cut])
            assert refused.value.status == 502
    for cut in range(1, len(raw) + 1):
        parser = ResponseParser("GET")
        delivered = []
        try:
            for piece in (raw[:cut], raw[cut:]):
                if piece:
                    events = parser.feed(piece)
                    delivered += events[: events.index(MESSAGE_END) + 1] if MESSAGE_END in events else events
                    if MESSAGE_END in events:
                        break
        except HttpError as error:
            assert error.status == 502
        bodies = b"".join(event.data for event in delivered if isinstance(event, Body))
        assert bodies in (b"", b"o", b"ok") and b"evil" not in bodies


def test_an_empty_read_never_ends_a_chunked_body():
    """llhttp reports an empty body piece when fed b"" mid-body; re-chunked, it must not become the last chunk
    (the rest of the visitor's body would reach the origin as a new request)."""
    parser = RequestParser()
    parser.feed(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nab")
    events = parser.feed(b"")
    assert b"".join(http1.encode_chunk(e.data) for e in events if isinstance(e, Body)) == b""
    assert http1.encode_chunk(b"") == b"" and http1.encode_chunk(b"x") == b"1\r\nx\r\n"


@FUZZ
@given(st.lists(st.tuples(names, values), max_size=6), st.sampled_from(list(BodyFraming)), st.booleans())
def test_response_heads_are_reframed_canonically(headers, framing, keep_alive):
    raw_headers = [(k.encode(), v) for k, v in headers] + [(b"Content-Length", b"3"), (b"Transfer-Encoding", b"x")]
    head = ResponseHead(200, b"OK", raw_headers, framing, 3, keep_alive)
    wire = http1.encode_response_head(head, framing=framing, keep_alive=keep_alive)
    lines = wire[:-4].split(b"\r\n")
    names_out = [line.split(b":", 1)[0].lower() for line in lines[1:]]
    assert names_out.count(b"content-length") == (framing is BodyFraming.LENGTH)
    assert names_out.count(b"transfer-encoding") == (framing is BodyFraming.CHUNKED)
    assert names_out.count(b"connection") == 1
    assert all(b"\r" not in line and b"\n" not in line for line in lines)


@FUZZ
@given(st.lists(st.tuples(names | st.sampled_from(["Connection", "keep-alive", "UPGRADE", "Te", "Proxy-Connection"]),
                          values), max_size=6),
       st.sampled_from([200, 101, 103, 204]), st.booleans())
def test_the_lines_a_parser_keeps_are_the_lines_derived_from_its_headers(headers, status, chunked):
    """The parser encodes the forwarded header lines as it meets them; encoding from the headers alone (a head
    made elsewhere) must give the same head on the wire."""
    framing_header = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: 0"
    raw = b"HTTP/1.1 %d X\r\n" % status + b"".join(b"%s: %s\r\n" % (k.encode(), v) for k, v in headers)
    upgrade = b"websocket" if status == 101 else None
    if status == 101:
        raw += b"Upgrade: websocket\r\nConnection: upgrade\r\n"
    parser = http1.ResponseParser("GET", upgrade)
    try:
        events = parser.feed(raw + framing_header + b"\r\n\r\n" + (b"0\r\n\r\n" if chunked else b""))
    except HttpError:
        return  # a head llhttp or the 101 checks refuse: nothing is encoded
    (head,) = [event for event in events if isinstance(event, ResponseHead)]
    derived = ResponseHead(head.status, head.reason, head.headers, head.framing, head.content_length, head.keep_alive)
    for framing in (head.framing, BodyFraming.LENGTH, BodyFraming.CHUNKED):
        assert (http1.encode_response_head(head, framing=framing, keep_alive=head.keep_alive)
                == http1.encode_response_head(derived, framing=framing, keep_alive=head.keep_alive))


class FieldByField:
    """The oracle for the response parser, which reads each head from its bytes once llhttp has accepted it:
    llhttp itself, calling back for the status and for every field, as the relay's parser once did."""

    def __init__(self) -> None:
        self.heads: list[tuple[int, bytes, list[tuple[bytes, bytes]]]] = []
        self.body = b""
        self.complete = False
        self.parser = httptools.HttpResponseParser(self)
        self._reason = b""
        self._fields: list[tuple[bytes, bytes]] = []
        self._in_head = True

    def on_message_begin(self) -> None:
        self._reason, self._fields, self._in_head = b"", [], True

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._in_head:  # (trailer fields are not the head's)
            self._fields.append((name, value))

    def on_headers_complete(self) -> None:
        self._in_head = False
        self.heads.append((self.parser.get_status_code(), self._reason, self._fields))

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.complete = 200 <= self.heads[-1][0]


response_names = names | st.sampled_from(["Connection", "Keep-Alive", "content-length", "TE", "Upgrade", "Trailer"])
response_values = st.sampled_from([b"", b"v", b"  spaced  ", b"\tx", b"a, b", b"close", b"\xa0\xff", b"t\x01"]) | values
reasons = st.sampled_from([b"OK", b"", b" ", b"Not Found", b"O\x01K", b"  two  spaces", b"\xe9t\xe9"])


@st.composite
def origin_responses(draw) -> bytes:
    """One final answer (a body by length, chunked with trailers, or until close), perhaps after 1xx heads and the
    empty lines llhttp skips, with fields of every spelling of whitespace, or the same bytes edited at random."""
    def head(status: int) -> bytes:
        fields = draw(st.lists(st.tuples(response_names, st.sampled_from([b": ", b":", b":  ", b":\t"]),
                                         response_values), max_size=6))
        return (draw(st.sampled_from([b"", b"\r\n", b"\r\n\r\n"])) + b"HTTP/1.%d %d " % (draw(st.integers(0, 1)), status)
                + draw(reasons) + b"\r\n" + b"".join(n.encode() + sep + v + b"\r\n" for n, sep, v in fields))
    raw = b"".join(head(draw(st.sampled_from([100, 102, 103]))) + b"\r\n"
                   for _ in range(draw(st.integers(0, 2))))
    status = draw(st.sampled_from([200, 201, 204, 206, 301, 304, 404, 500]))
    body = draw(st.binary(max_size=40))
    framing = draw(st.sampled_from(["length", "chunked", "close"]))
    if framing == "length":
        raw += head(status) + b"Content-Length: %d\r\n\r\n" % len(body) + body
    elif framing == "chunked":
        trailer = draw(st.sampled_from([b"", b"X-T: t\r\n", b"Content-Length: 9\r\nSet-Cookie: s=1\r\n"]))
        raw += head(status) + b"Transfer-Encoding: chunked\r\n\r\n" + (
            b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n" + trailer + b"\r\n"
    else:
        raw += head(status) + b"\r\n" + body
    for _ in range(draw(st.integers(0, 2))):
        where = draw(st.integers(0, len(raw)))
        raw = raw[:where] + draw(st.sampled_from([b"\r", b"\n", b"\r\n", b" ", b":", b"\x00", b"\r\n\r\n", b"X"])) \
            + raw[where:]
    return raw


@FUZZ
@given(origin_responses(), st.data())
def test_heads_read_from_their_bytes_are_the_heads_llhttp_reads_field_by_field(raw, data):
    """Whatever the bytes and however they are split: where llhttp accepts the answer, the parser gives the same
    heads (status, reason, every field with its value, in order), forwards exactly the fields that are not
    hop-by-hop, as they arrived, and the same body; where llhttp refuses it, the parser refuses it with a 502."""
    cuts = data.draw(split_points(raw))
    pieces = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)]) if b > a]
    oracle = FieldByField()
    oracle_ended_in = len(pieces)  # the read in which llhttp saw the answer end
    try:
        for index, piece in enumerate(pieces):
            oracle.parser.feed_data(piece)
            if oracle.complete:
                oracle_ended_in = index
                break  # (as the relay stops reading a conduit at the answer's end)
        refused_by_llhttp = False
    except httptools.HttpParserError:
        refused_by_llhttp = True
    parser = ResponseParser("GET")
    events: list[object] = []
    index = len(pieces)
    try:
        for index, piece in enumerate(pieces):
            if parser.complete:
                break
            events += parser.feed(piece)
        index = len(pieces)
        if not parser.complete:
            events += parser.feed_eof()
    except HttpError as error:
        assert error.status == 502
        # a refusal of bytes llhttp accepts: an answer cut short, or bytes past its end in the read that ends it
        assert refused_by_llhttp or not oracle.complete or index == oracle_ended_in, raw
        return
    assert not refused_by_llhttp, raw
    heads = [event for event in events if isinstance(event, ResponseHead)]
    assert [(head.status, head.reason, head.headers) for head in heads] == oracle.heads[: len(heads)]
    for head in heads:
        if head.lines is not None:
            kept = [line for line in head.lines if not line.startswith(b"Content-Length: ")]  # (304's, added back)
            assert [line.partition(b":")[0] for line in kept] == \
                [name for name, _ in head.headers if name.lower() not in http1.HOP_BY_HOP]
            assert all(line in raw for line in head.lines if not line.startswith(b"Content-Length: "))
    assert b"".join(event.data for event in events if isinstance(event, Body)) == oracle.body


# ----------------------------------------------------------------------------------------------- routing

ROUTER = Router("pw.test", SYSTEM_NAMES)


@FUZZ
@given(st.text(max_size=80))
def test_any_host_routes_or_is_refused_with_400(host):
    try:
        route = ROUTER.route(host)
    except HttpError as error:
        assert error.status == 400
        return
    if isinstance(route, ToTunnel):
        hostname = http1_hostname(host)
        assert hostname == f"{route.name}.pw.test" and "." not in route.name and route.name not in SYSTEM_NAMES
    else:
        assert isinstance(route, (ToRelay, NotServed))


def http1_hostname(host: str) -> str:
    from portway.proto.routing import hostname_of

    return hostname_of(host)


@FUZZ
@given(st.sampled_from(["alpha", "a-1", "x" * 63]), st.data())
def test_spellings_of_a_tunnel_host_all_reach_it_and_lookalikes_never_do(name, data):
    cased = "".join(data.draw(st.sampled_from([c.lower(), c.upper()])) for c in f"{name}.pw.test")
    host = cased + data.draw(st.sampled_from(["", "."])) + data.draw(st.sampled_from(["", ":", ":80", ":65535"]))
    assert ROUTER.route(host) == ToTunnel(name)
    evil = data.draw(st.sampled_from([f"{name}.pw.test.evil", f"x{name}.pw.test", f"x.{name}.pw.test",
                                      f"{name}pw.test", f"{name}.pw.tes", f"{name}..pw.test"]))
    route = ROUTER.route(evil)
    assert route != ToTunnel(name)


def test_route_cache_cannot_be_grown_without_bound():
    router = Router("pw.test", SYSTEM_NAMES)
    for i in range(3 * router.CACHE_SIZE):
        router.route(f"n{i}.pw.test")
    assert len(router._cache) <= router.CACHE_SIZE
