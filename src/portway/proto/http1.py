"""HTTP/1.1 as the relay's public edge speaks it: visitor requests in, origin responses back.

Both directions are parsed with llhttp (via httptools) in strict mode and re-framed on the way
through, so the origin and the visitor each see a message whose framing the relay chose. That is
what makes request smuggling through the relay impossible and what lets a response cut short by a
dying agent look cut short to the visitor. Nothing here does I/O: feed bytes, get events.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Final, final

import httptools

from ..errors import HttpError

MAX_HEAD_BYTES: Final = 32 * 1024

# Headers that describe one hop only; the relay drops them and writes its own framing.
HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"te",
        b"trailer",
        b"upgrade",
        b"content-length",
    }
)
# Headers that tell an origin who the client is. Origins behind proxies trust them (ProxyFix, `set_real_ip_from`),
# so only the relay may state them: every one a visitor sends is dropped, whatever its spelling, and the relay
# writes X-Forwarded-For/-Proto/-Host itself. Every `X-Forwarded-*` name is dropped too (FORWARDED_PREFIX).
CLIENT_IDENTITY_HEADERS: Final = frozenset(
    {
        b"forwarded",
        b"x-real-ip",
        b"true-client-ip",
        b"cf-connecting-ip",
        b"cf-connecting-ipv6",
        b"fastly-client-ip",
        b"akamai-client-ip",
        b"x-client-ip",
        b"x-cluster-client-ip",
        b"x-original-forwarded-for",
        b"x-originating-ip",
        b"x-remote-ip",
        b"x-remote-addr",
        b"x-proxyuser-ip",
        b"x-envoy-external-address",
        b"client-ip",
        b"via",
    }
)
FORWARDED_PREFIX: Final = b"x-forwarded-"

_NOTHING: Final[frozenset[bytes]] = frozenset()
# What the relay never passes through to the origin. It writes its own framing and X-Forwarded-*, and Host
# itself (the value it routed by, first), so a visitor naming `Host` in `Connection` can't remove it.
_NOT_FORWARDED: Final = HOP_BY_HOP | CLIENT_IDENTITY_HEADERS | {b"host"}


@final
class FieldName:
    """What the relay needs to know of one header name, worked out once per distinct spelling (see field_name)."""

    def __init__(self, name: bytes) -> None:
        self.lowered = name.lower()
        # CGI/WSGI servers fold `_` into `-`: `X_Forwarded_For` or `Transfer_Encoding` must not get through either
        self.folded = self.lowered.replace(b"_", b"-")
        self.hop_by_hop = self.lowered in HOP_BY_HOP
        self.never_forwarded = self.folded in _NOT_FORWARDED or self.folded.startswith(FORWARDED_PREFIX)


_FIELD_NAMES: Final[dict[bytes, FieldName]] = {}
_NAMES_KEPT: Final = 512
"""Header names remembered with what they mean: a few dozen recur on every request and answer, and one lookup
replaces ``lower()`` (a method call and a new bytes object each time) and the set lookups after it. Bounded in
count and size: names are the peers' to choose."""
_NAME_KEPT_UP_TO: Final = 64


def field_name(name: bytes) -> FieldName:
    known = _FIELD_NAMES.get(name)
    if known is None:
        known = FieldName(name)
        if len(_FIELD_NAMES) < _NAMES_KEPT and len(name) <= _NAME_KEPT_UP_TO:
            _FIELD_NAMES[name] = known
    return known


def lowered_name(name: bytes) -> bytes:
    """``name.lower()``, remembered for the names that recur."""
    return field_name(name).lowered


class BodyFraming(Enum):
    NONE = "none"
    LENGTH = "length"
    CHUNKED = "chunked"
    UNTIL_CLOSE = "until-close"


# The heads and events below are slotted dataclasses (equality, repr) with a hand-written __init__: the one
# @dataclass writes is interpreted Python even in a compiled build, and every request and answer builds them.
@dataclass(slots=True, init=False)
class RequestHead:
    method: str
    target: bytes  # origin-form, even when the visitor sent absolute-form
    http_version: str
    headers: list[tuple[bytes, bytes]]  # as sent, hop-by-hop ones included
    host: str  # the Host header's value, as sent
    framing: BodyFraming
    content_length: int
    keep_alive: bool
    upgrade: bytes | None  # the Upgrade header's value when the visitor asks to switch protocols
    # headers the visitor declared hop-by-hop by listing them in `Connection` (RFC 9110 §7.6.1)
    connection_named: frozenset[bytes]

    def __init__(self, method: str, target: bytes, http_version: str, headers: list[tuple[bytes, bytes]], host: str,
                 framing: BodyFraming, content_length: int, keep_alive: bool, upgrade: bytes | None,
                 connection_named: frozenset[bytes] = frozenset()) -> None:
        self.method = method
        self.target = target
        self.http_version = http_version
        self.headers = headers
        self.host = host
        self.framing = framing
        self.content_length = content_length
        self.keep_alive = keep_alive
        self.upgrade = upgrade
        self.connection_named = connection_named

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if lowered_name(key) == name:
                return value
        return None


@dataclass(slots=True, init=False)
class ResponseHead:
    status: int
    reason: bytes
    framing: BodyFraming
    content_length: int
    keep_alive: bool
    # The header lines as they arrived, `Name: value` (hop-by-hop ones included; the parser keeps them as llhttp
    # accepted them instead of taking them apart), or made from the (name, value) pairs the head was built with.
    fields: list[bytes]
    # The forwarded header lines: every field but the hop-by-hop ones, picked by the parser as it reads the head.
    # None: encode_response_head derives them from `fields`.
    lines: list[bytes] | None = field(compare=False, repr=False)

    def __init__(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]], framing: BodyFraming,
                 content_length: int, keep_alive: bool, lines: list[bytes] | None = None,
                 fields: list[bytes] | None = None) -> None:
        self.status = status
        self.reason = reason
        self.fields = [name + b": " + value for name, value in headers] if fields is None else fields
        self.framing = framing
        self.content_length = content_length
        self.keep_alive = keep_alive
        self.lines = lines

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        """The fields as (name, value) pairs, the value without the whitespace before it (as llhttp gives it)."""
        pairs = []
        for line in self.fields:
            name, _, value = line.partition(b":")
            pairs.append((name, value.lstrip(b" \t")))
        return pairs

    @property
    def informational(self) -> bool:
        return 100 <= self.status < 200 and self.status != 101


@dataclass(slots=True, init=False)
class Body:
    data: bytes | memoryview

    def __init__(self, data: bytes | memoryview) -> None:
        self.data = data


@dataclass(slots=True)
class MessageEnd:
    pass


@dataclass(slots=True, init=False)
class Switched:
    """The connection left HTTP; `trailing` is the first raw bytes after the head."""

    trailing: bytes

    def __init__(self, trailing: bytes) -> None:
        self.trailing = trailing


MESSAGE_END: Final = MessageEnd()


_METHOD_NAMES: Final[dict[bytes, str]] = {}


def _method_name(method: bytes) -> str:
    """The method as text, made once per method (llhttp accepts only the few dozen it knows)."""
    name = _METHOD_NAMES.get(method)
    if name is None:
        name = _METHOD_NAMES[method] = method.decode("ascii")
    return name


def _version_in_line(started_in: bytes | None, method: str, target: bytes) -> str | None:
    """"1.1" or "1.0", read from the request line at the start of `started_in` that llhttp accepted as
    `METHOD SP target SP HTTP/x.y`; None when the line is not there whole (it began in an earlier read, or after
    the empty lines llhttp skips) or says another version."""
    if started_in is None or not started_in or started_in[0] == 13 or started_in[0] == 10:
        return None
    minor_at = len(method) + len(target) + 9  # after `METHOD SP target SP HTTP/1.`
    if minor_at >= len(started_in) or started_in[minor_at - 2] != 49:  # (`1`)
        return None
    minor = started_in[minor_at]
    return "1.1" if minor == 49 else "1.0" if minor == 48 else None


class RequestParser:
    """Incremental parser of a visitor's requests; a keep-alive connection yields many heads."""

    def __init__(self, max_head_bytes: int = MAX_HEAD_BYTES) -> None:
        self._parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        self._max_head_bytes = max_head_bytes
        self._events: list[object] = []
        self._in_head = False
        self._head_bytes = 0
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._trailer_bytes = 0
        self._in_message = False
        self._switched = False
        # the data fed when a request began with it, where its request line is read (see on_headers_complete)
        self._started_in: bytes | None = None

    @property
    def mid_message(self) -> bool:
        """Whether a request has begun and not ended: its remaining bytes (body) are still to come."""
        return self._in_message and not self._switched

    def close(self) -> None:
        """The connection is done: let go of llhttp, which holds our bound callbacks (as ResponseParser does when
        its response ends), so both are freed by reference counting instead of left as a cycle per connection."""
        self._parser = None

    def feed(self, data: bytes | memoryview) -> list[object]:
        """Parse `data`; returns RequestHead, Body, MessageEnd and Switched events in order."""
        if self._switched:
            raise RuntimeError("the connection has switched protocols; feed raw bytes elsewhere")
        if self._in_head or not self._events:
            self._head_bytes += len(data) if self._in_head else 0
        parser = self._parser
        if parser is None:
            raise RuntimeError("the parser was closed with its connection")
        if not self._in_message:
            self._started_in = data if type(data) is bytes else None  # a request starts with these bytes
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._switched = True
            self._events.append(Switched(bytes(data[upgrade.args[0] :])))
        except httptools.HttpParserCallbackError as error:
            cause = error.__context__
            if isinstance(cause, HttpError):
                raise cause from None
            raise HttpError(400, f"malformed request: {error}") from None
        except httptools.HttpParserError as error:
            if self._in_head and self._head_bytes > self._max_head_bytes:
                raise HttpError(431, "request head too large") from None
            raise HttpError(400, f"malformed request: {error}") from None
        if self._in_head and self._head_bytes > self._max_head_bytes:
            raise HttpError(431, "request head too large")
        events, self._events = self._events, []
        return events

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._in_head = True
        self._in_message = True
        self._head_bytes = 0
        self._trailer_bytes = 0
        self._url = b""
        self._headers = []

    def on_url(self, url: bytes) -> None:
        self._url = self._url + url if self._url else url  # mostly one piece: kept as it is, not copied
        self._head_bytes += len(url)
        if self._head_bytes > self._max_head_bytes:
            raise HttpError(431, "request head too large")

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:
            # A trailer field (after a chunked body). It is never merged into the head the relay routed,
            # authorised and forwarded (RFC 9110 §6.5.1): the relay drops trailers, within the head's size limit.
            self._trailer_bytes += len(name) + len(value) + 4
            if self._trailer_bytes > self._max_head_bytes:
                raise HttpError(431, "request trailer section too large")
            return
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > self._max_head_bytes:
            raise HttpError(431, "request head too large")
        if 0 in value:
            # llhttp refuses CR/LF inside values but tolerates other controls; a proxy must not pass NUL on.
            # (The byte's value: `b"\x00" in value` first tries its needle as an int and builds a TypeError.)
            raise HttpError(400, "a header value contains a NUL byte")
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._in_head = False
        parser = self._parser
        assert parser is not None  # called back by it
        method = _method_name(parser.get_method())
        if method == "CONNECT":
            raise HttpError(405, "CONNECT is not supported by this relay")
        version = _version_in_line(self._started_in, method, self._url)
        self._started_in = None  # (a pipelined request after this one began in the same bytes, not at their start)
        if version is None:
            version = parser.get_http_version()  # (a string formatted anew on each call: a few hundred instructions)
        if version != "1.1" and version != "1.0":
            raise HttpError(400, "only HTTP/1.0 and HTTP/1.1 requests are served")
        host: bytes | None = None
        transfer_encodings = 0
        length = -1
        upgrade_value: bytes | None = None
        connection_named: set[bytes] | None = None
        for key, value in self._headers:
            lowered = lowered_name(key)
            if lowered == b"host":
                if host is not None:
                    raise HttpError(400, "the request has more than one Host header")
                host = value
            elif lowered == b"content-length":
                length = int(value)
            elif lowered == b"transfer-encoding":
                transfer_encodings += 1
            elif lowered == b"connection":
                if connection_named is None:
                    connection_named = set()
                connection_named.update(token.strip().lower().replace(b"_", b"-") for token in value.split(b","))
            elif lowered == b"upgrade":
                upgrade_value = value
        if host is None:
            raise HttpError(400, "the request has no Host header")
        if transfer_encodings > 1:
            raise HttpError(400, "the request has more than one Transfer-Encoding header")
        host_text = host.decode("latin-1").strip()
        target = self._url
        if not target.startswith(b"/") and target != b"*":
            target = self._origin_form(target, host_text)
        if transfer_encodings:
            framing = BodyFraming.CHUNKED
        elif length >= 0:
            framing = BodyFraming.LENGTH
        else:
            framing, length = BodyFraming.NONE, 0  # a request without length has no body (RFC 9112 §6.3)
        if connection_named is not None:
            connection_named.discard(b"")
        self._events.append(
            RequestHead(
                method=method,
                target=target,
                http_version=version,
                headers=self._headers,
                host=host_text,
                framing=framing,
                content_length=length,
                keep_alive=parser.should_keep_alive(),
                upgrade=upgrade_value if upgrade_value is not None and parser.should_upgrade() else None,
                connection_named=frozenset(connection_named) if connection_named else _NOTHING,
            )
        )

    @staticmethod
    def _origin_form(target: bytes, host: str) -> bytes:
        try:
            # Any: httptools' URL fields are None when absent, whatever its stubs say (a compiled build checks them)
            url: Any = httptools.parse_url(target)
        except httptools.HttpParserInvalidURLError:
            raise HttpError(400, "the request target is not a valid URL") from None
        url_host: bytes | None = url.host
        if url_host is None:
            raise HttpError(400, "the request target is not a valid URL")
        authority = url_host.decode("latin-1")
        port: int | None = url.port
        if port is not None:
            authority += f":{port}"
        if authority.lower() != host.lower():
            raise HttpError(400, "the absolute request target names a different host than the Host header")
        path: bytes | None = url.path
        query: bytes | None = url.query
        return (path or b"/") + (b"?" + query if query else b"")

    def on_body(self, body: bytes) -> None:
        self._events.append(Body(body))

    def on_message_complete(self) -> None:
        self._in_message = False
        self._events.append(MESSAGE_END)


class ResponseParser:
    """Parser of one origin response (plus any 1xx before it) arriving on a conduit.

    llhttp (strict) checks every byte and frames the body; a head is read from its own bytes once llhttp has
    accepted it whole (on_headers_complete), not field by field: llhttp calling back into Python for every field
    cost as much as the rest of the answer. The bytes of the heads being awaited are kept for that, within
    `max_head_bytes` (the heads, every 1xx and the final one, status lines included, are bounded by the bytes fed,
    since llhttp consumes an unfinished field without saying so). A trailer section is consumed by llhttp and
    dropped without being kept, like the chunk framing around the body.

    `upgrade` is the Upgrade value of the request (None if it asked for none): a 101 is accepted only for a
    protocol the client asked for (RFC 9110 §7.8), so an origin can never turn a visitor's connection into a
    raw pipe on its own.
    """

    def __init__(self, request_method: str, upgrade: bytes | None = None,
                 max_head_bytes: int = MAX_HEAD_BYTES, *, reusable: bool = False) -> None:
        self._parser: httptools.HttpResponseParser | None = httptools.HttpResponseParser(self)
        self._max_head_bytes = max_head_bytes
        # Kept for the next response (restart()) when its owner says so and closes it when done; otherwise let
        # go of as the response ends: llhttp holds our bound callbacks and we hold llhttp, and letting go frees
        # the whole response by reference counting instead of leaving a cycle for the collector.
        self._keep_parser = reusable
        self._llhttp_clean = False  # llhttp saw this response end and may start the next one (see restart)
        self._begin(request_method, upgrade)

    def _begin(self, request_method: str, upgrade: bytes | None) -> None:
        self._head_request = request_method == "HEAD"
        self._upgrade_asked = upgrade
        self._events: list[object] = []
        # the bytes fed while the final head was awaited (up to the bound, which a head must fit in), and where in
        # them the head being parsed begins (after the 1xx heads before it)
        self._head_bytes = b""
        self._head_at = 0
        self._heads_fed = 0  # bytes fed while the final head was incomplete (1xx heads included)
        self.head: ResponseHead | None = None
        self._body_seen = 0
        self._body_left = 0
        self.complete = False
        self.switched = False

    def restart(self, request_method: str, upgrade: bytes | None = None) -> bool:
        """Make ready for the answer to another request, on any conduit, with the same llhttp parser (creating
        one costs as much as parsing a small answer). Only a parser made `reusable` whose last answer llhttp
        parsed to its end, keep-alive, can: llhttp is then back at the start of a message. False otherwise
        (mid-message, stopped after a HEAD answer, switched, failed, or closed): make a new one."""
        if not self._llhttp_clean or self._parser is None:
            return False
        self._llhttp_clean = False
        self._begin(request_method, upgrade)
        return True

    def close(self) -> None:
        """Let go of llhttp (the cycle through our bound callbacks) once no answer will be parsed any more."""
        self._parser = None
        self._llhttp_clean = False

    def feed(self, data: bytes | memoryview) -> list[object]:
        if self.complete:
            raise HttpError(502, "the origin sent bytes after its response ended")
        events = self._feed_length_body(data) if self._body_left > 0 else self._feed_parser(data)
        if self.complete and not self._llhttp_clean:
            self._parser = None
        return events

    def _feed_parser(self, data: bytes | memoryview) -> list[object]:
        head = self.head
        awaiting_head = head is None or head.informational
        parser = self._parser
        assert parser is not None, "fed after the response ended"
        if awaiting_head:
            kept = self._head_bytes
            # the heads must end within the bound: bytes past it are never read as a head (see on_headers_complete)
            room = self._max_head_bytes - len(kept)
            if room > 0:
                piece = data if type(data) is bytes and len(data) <= room else bytes(data[:room])
                self._head_bytes = kept + piece if kept else piece
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._llhttp_clean = False
            self.switched = True
            self.complete = True
            self._events.append(Switched(bytes(data[upgrade.args[0] :])))
        except httptools.HttpParserCallbackError as error:
            self._llhttp_clean = False  # llhttp stopped where a callback raised: it can't go on
            if isinstance(error.__context__, HttpError):
                raise error.__context__ from None
            if not isinstance(error.__context__, _HeadResponseDone):
                raise HttpError(502, f"the origin sent a malformed response: {error}") from None
            # (no local names the stopping exception: its traceback holds this frame, which would make a cycle)
        except httptools.HttpParserError as error:
            self._llhttp_clean = False
            if self.complete:
                raise HttpError(502, "the origin sent bytes after its response ended") from None
            raise HttpError(502, f"the origin sent a malformed response: {error}") from None
        if awaiting_head:
            self._heads_fed += len(data)
            head = self.head
            if (head is None or head.informational) and self._heads_fed > self._max_head_bytes:
                raise HttpError(502, "the origin's response head is too large")
        return self._take_events()

    def _take_events(self) -> list[object]:
        events, self._events = self._events, []
        head = self.head
        if head is not None and not self.complete and head.framing is BodyFraming.LENGTH and not head.informational:
            # llhttp has seen the head; counting the rest of a Content-Length body ourselves saves a copy per chunk
            self._body_left = head.content_length - self._body_seen
        return events

    def _feed_length_body(self, data: bytes | memoryview) -> list[object]:
        left = self._body_left
        if len(data) < left:
            self._body_left = left - len(data)
            return [Body(data)]
        if len(data) > left:
            raise HttpError(502, "the origin sent more bytes than its Content-Length")
        self._body_left = 0
        self.complete = True
        return [Body(data), MESSAGE_END]

    def feed_eof(self) -> list[object]:
        """The conduit ended cleanly: that completes a close-delimited body, nothing else."""
        if self.complete:
            return []
        if self.head is not None and self.head.framing is BodyFraming.UNTIL_CLOSE:
            self.complete = True
            self._parser = None
            return [MESSAGE_END]
        raise HttpError(502, "the origin closed the connection before its response was complete")

    def on_message_begin(self) -> None:
        if self.complete:
            # bytes past the answer's end in the same read: llhttp would parse them as a next response, dropped
            # unseen, and the conduit would look clean for the next request
            raise HttpError(502, "the origin sent bytes after its response ended")

    def on_headers_complete(self) -> None:
        # Read with indexing, comparisons and loops over bytes, which compile to plain C: a method call on bytes
        # (find, lower, int()) costs hundreds of instructions, more than the work itself.
        parser = self._parser
        assert parser is not None
        kept = self._head_bytes
        start = self._head_at
        if start:
            kept = kept[start:]  # (after a 1xx head)
        if kept and (kept[0] == 13 or kept[0] == 10):
            stripped = kept.lstrip(b"\r\n")  # the empty lines llhttp skips before a message
            start += len(kept) - len(stripped)
            kept = stripped
        # llhttp accepted the head whole: its lines end in CRLF and hold no CR or LF, so the first empty line ends it
        block, end, _ = kept.partition(b"\r\n\r\n")
        if not end:  # it does not end within the bytes kept: the heads are longer than the bound
            raise HttpError(502, "the origin's response head is too large")
        self._head_at = start + len(block) + 4
        fields = block.split(b"\r\n")
        status_line = fields.pop(0)
        # `HTTP/1.1 200 OK`: llhttp allows one digit on each side of the dot, three for the status, one space each
        status = (status_line[9] - 48) * 100 + (status_line[10] - 48) * 10 + status_line[11] - 48
        reason = status_line[13:]
        lines: list[bytes] = []
        chunked = False
        length = -1
        for line in fields:
            hop_by_hop = _hop_by_hop_name(line)
            if hop_by_hop is None:
                lines.append(line)
            elif hop_by_hop == b"transfer-encoding":
                chunked = True
            elif hop_by_hop == b"content-length":
                length = _digits_after(line, 15)
        if chunked:
            framing = BodyFraming.CHUNKED
        elif length >= 0:
            framing = BodyFraming.LENGTH
        else:
            framing = BodyFraming.UNTIL_CLOSE
        body_length = length
        if status in (204, 304) or 100 <= status < 200 or self._head_request:
            if length >= 0 and not chunked and (status == 304 or (self._head_request and status >= 200
                                                                  and status != 204)):
                # No body follows, but the Content-Length is the size a GET would receive (RFC 9110 §8.6):
                # download managers and `curl -I` read it there.
                lines.append(b"Content-Length: %d" % length)
            framing, body_length = BodyFraming.NONE, 0
        head = ResponseHead(status, reason, _NO_PAIRS, framing, body_length,
                            parser.should_keep_alive() and framing is not BodyFraming.UNTIL_CLOSE,
                            None if status == 101 else lines,  # a 101 keeps Connection and Upgrade: derived then
                            fields)
        if status == 101:
            self._check_switch(head)
        if not head.informational:
            self._head_bytes = b""  # the final head: nothing more is read from the bytes kept
        self.head = head
        self._events.append(head)
        if self._head_request and 200 <= status:
            # llhttp can't be told the request was HEAD, so it would wait for a body that never comes.
            self.complete = True
            self._events.append(MESSAGE_END)
            raise _HeadResponseDone

    def _check_switch(self, head: ResponseHead) -> None:
        asked = self._upgrade_asked
        if asked is None:
            raise HttpError(502, "the origin switched protocols although the request asked for no upgrade")
        offered = {token.strip().split(b"/")[0].lower() for token in asked.split(b",")}
        switched_to = [value for key, value in head.headers if key.lower() == b"upgrade"]
        if len(switched_to) != 1 or not switched_to[0].strip():
            raise HttpError(502, "the origin's 101 response does not name one protocol in Upgrade")
        chosen = {token.strip().split(b"/")[0].lower() for token in switched_to[0].split(b",")}
        if not chosen <= offered:
            raise HttpError(502, "the origin switched to a protocol the request did not ask for")

    def on_body(self, body: bytes) -> None:
        self._body_seen += len(body)
        self._events.append(Body(body))

    def on_message_complete(self) -> None:
        head = self.head
        if head is not None and (head.informational or head.status == 101):
            return  # a final response follows, or Switched does
        if not self.complete:
            self.complete = True
            self._events.append(MESSAGE_END)
            # a keep-alive answer leaves llhttp at the start of the next message; after any other it refuses more
            self._llhttp_clean = self._keep_parser and head is not None and head.keep_alive


_NO_PAIRS: Final[list[tuple[bytes, bytes]]] = []  # a parsed head has its fields as lines

# The hop-by-hop names by their first letter, each with its usual spelling (`Content-Length`): a field line is told
# from its first bytes, with no search for its colon
_HOP_BY_HOP_BY_INITIAL: Final[list[list[tuple[bytes, bytes]]]] = [[] for _ in range(128)]
for _name in sorted(HOP_BY_HOP):
    _HOP_BY_HOP_BY_INITIAL[_name[0]].append((_name, _name.title()))


def _hop_by_hop_name(line: bytes) -> bytes | None:
    """The hop-by-hop name (lower case) a `Name: value` field line starts with, or None."""
    initial = line[0] | 0x20  # (a name is never empty; `| 0x20` makes an ASCII capital small)
    if initial >= 128:
        return None
    for name, usual in _HOP_BY_HOP_BY_INITIAL[initial]:
        size = len(name)
        # a name is a token, without colon: the line's name is `name` if its colon follows the same letters
        if len(line) > size and line[size] == 58:
            spelled = line[:size]
            if spelled == usual or spelled == name or spelled.lower() == name:
                return name
    return None


def _digits_after(line: bytes, start: int) -> int:
    """The number written in decimal digits from `start`, around whitespace (a value llhttp has checked)."""
    value = 0
    for index in range(start, len(line)):
        digit = line[index] - 48
        if 0 <= digit <= 9:
            value = value * 10 + digit
    return value


class _HeadResponseDone(Exception):
    """Stops llhttp after the head of a response to HEAD; never escapes this module."""


def forwarded_fields(peer_ip: str, scheme: str) -> bytes:
    """The X-Forwarded-For and X-Forwarded-Proto lines the relay writes into each request of one visitor
    connection (made once per connection)."""
    return b"X-Forwarded-For: " + peer_ip.encode("ascii") + b"\r\nX-Forwarded-Proto: " + scheme.encode("ascii") + b"\r\n"


_REQUEST_LINE_STARTS: Final[dict[str, bytes]] = {}


def _request_line_start(method: str) -> bytes:
    """``b"GET "`` for GET, made once per method (llhttp knows some forty)."""
    start = _REQUEST_LINE_STARTS.get(method)
    if start is None:
        start = method.encode("ascii") + b" "
        if len(_REQUEST_LINE_STARTS) < 64:
            _REQUEST_LINE_STARTS[method] = start
    return start


def encode_request_head(
    head: RequestHead, *, forwarded: bytes, connection: bytes = b"keep-alive", drop_authorization: bool = False,
) -> bytes:
    """The request head as the origin receives it: the one Host the request was routed by, hop-by-hop and
    client-identity headers replaced by the relay's own framing and X-Forwarded-* (`forwarded`, from
    forwarded_fields(), then X-Forwarded-Host).

    `drop_authorization` keeps the relay's own visitor credentials (tunnel basic auth) from the origin.
    """
    host = head.host.encode("latin-1")
    lines = [_request_line_start(head.method) + head.target + b" HTTP/1.1", b"Host: " + host]
    also_drop = head.connection_named
    if drop_authorization:
        also_drop = also_drop | {b"authorization"}
    for key, value in head.headers:
        known = field_name(key)
        if known.never_forwarded or (also_drop and known.folded in also_drop):
            continue
        lines.append(key + b": " + value)
    if head.framing is BodyFraming.LENGTH:
        lines.append(b"Content-Length: %d" % head.content_length)
    elif head.framing is BodyFraming.CHUNKED:
        lines.append(b"Transfer-Encoding: chunked")
    if head.upgrade is not None:
        lines.append(b"Connection: Upgrade")
        lines.append(b"Upgrade: " + head.upgrade)
    else:
        lines.append(b"Connection: " + connection)
    lines.append(forwarded + b"X-Forwarded-Host: " + host + b"\r\n\r\n")
    return b"\r\n".join(lines)


_STATUS_LINE_STARTS: Final[dict[int, bytes]] = {}


def _status_line_start(status: int) -> bytes:
    """``b"HTTP/1.1 200 "`` for 200, made once per three-digit status code (at most 900 of them)."""
    start = _STATUS_LINE_STARTS.get(status)
    if start is None:
        start = b"HTTP/1.1 %d " % status
        if 100 <= status <= 999:
            _STATUS_LINE_STARTS[status] = start
    return start


def encode_response_head(head: ResponseHead, *, framing: BodyFraming, keep_alive: bool) -> bytes:
    """The response head as the visitor receives it, with the framing the relay chose."""
    lines = [_status_line_start(head.status) + head.reason]
    switching = head.status == 101
    if head.lines is not None:
        lines += head.lines
    else:
        for line in head.fields:
            lowered = lowered_name(line[: line.find(b":")])
            if lowered in HOP_BY_HOP and not (switching and lowered in (b"connection", b"upgrade")):
                continue
            lines.append(line)
    if framing is BodyFraming.LENGTH:
        lines.append(b"Content-Length: %d" % head.content_length)
    elif framing is BodyFraming.CHUNKED:
        lines.append(b"Transfer-Encoding: chunked")
    if not switching and not head.informational:
        lines.append(b"Connection: keep-alive" if keep_alive else b"Connection: close")
    lines.append(b"\r\n")
    return b"\r\n".join(lines)


def encode_chunk(data: bytes | memoryview) -> bytes:
    if not data:  # a zero-size chunk is the last chunk: an empty Body must not end the message early
        return b""
    return b"".join((b"%x\r\n" % len(data), data, b"\r\n"))


LAST_CHUNK: Final = b"0\r\n\r\n"


def simple_response(
    status: int, reason: str, body: bytes, *, content_type: str = "text/html; charset=utf-8",
    close: bool = False, extra_headers: list[tuple[str, str]] | None = None,
) -> bytes:
    """A complete response the relay writes itself (error pages, API answers)."""
    lines = [
        f"HTTP/1.1 {status} {reason}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Cache-Control: no-store",
        "Connection: close" if close else "Connection: keep-alive",
    ]
    for key, value in extra_headers or ():
        lines.append(f"{key}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
