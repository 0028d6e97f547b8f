"""What crosses one agent stream, as HTTP exchanges and WebSocket messages: sans-I/O, bounded, never raising.

The agent's bridge lets the inspector look at the bytes of one stream going each way, visitor → service
(`to_service`) and service → visitor (`to_visitor`), with `now` passed in. `StreamCapture` turns them into
`Exchange`s and hands them to a `Sink` (the store):

- requests and responses are parsed by llhttp (httptools); a keep-alive stream carries several exchanges,
  each response answering the oldest request still unanswered; bodies may be chunked, Content-Length or
  close-delimited (completed by `closed`);
- a `101` switches the stream to WebSocket frames, decoded by wsproto's frame layer in both directions
  (the visitor's frames masked, the service's not) into a message log;
- bounded: an exchange keeps at most `max_body` bytes of each body (marked truncated past that), a
  connection the last `ws_max_messages` messages within `max_body` bytes, each message's first
  `ws_max_message` bytes. Past the kept prefix a Content-Length body or a WebSocket frame is only counted,
  never copied or unmasked, so capture costs the data path a bounded copy plus llhttp's scan of chunked
  framing;
- never raising: whatever the bytes, a parse error stops capture on this stream and marks the exchange it
  happened in (`Exchange.error`); the data path goes on untouched.
"""

from __future__ import annotations

import zlib
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

import httptools
from wsproto.extensions import Extension
from wsproto.frame_protocol import FrameDecoder, Opcode, ParseFailed, RsvBits

VISITOR = "visitor"
SERVICE = "service"

MAX_FRAME_HEAD = 14  # a WebSocket frame header: 2 bytes, 8 of extended length, 4 of mask
_INFLATE_PIECE = 64 * 1024
_DEFLATE_TAIL = b"\x00\x00\xff\xff"  # RFC 7692 §7.2.2: stripped by the sender, put back to inflate


@dataclass(frozen=True, slots=True)
class Limits:
    """What one exchange may keep; the store bounds how many exchanges are kept."""

    max_body: int = 1024 * 1024  # bytes of each body kept; also a WebSocket connection's messages, together
    max_head: int = 64 * 1024  # a head larger than this stops capture on the stream
    ws_max_messages: int = 1000  # a connection's log keeps the most recent ones
    ws_max_message: int = 64 * 1024  # bytes of one message kept
    ws_max_inflate: int = 16 * 1024 * 1024  # a compressed message inflating past this stops capture


@dataclass(slots=True, eq=False)
class Request:
    method: str
    target: bytes
    http_version: str
    headers: list[tuple[bytes, bytes]]
    started: float  # its first byte
    body: bytearray = field(default_factory=bytearray)  # the kept prefix
    body_size: int = 0  # every body byte seen
    complete: bool = False
    ended: float | None = None

    @property
    def truncated(self) -> bool:
        return self.body_size > len(self.body)


@dataclass(slots=True, eq=False)
class Response:
    status: int
    reason: bytes
    http_version: str
    headers: list[tuple[bytes, bytes]]
    started: float  # its first byte (of the first interim response, if any)
    body: bytearray = field(default_factory=bytearray)
    body_size: int = 0
    complete: bool = False
    ended: float | None = None
    informational: list[int] = field(default_factory=list)  # 1xx statuses before this one

    @property
    def truncated(self) -> bool:
        return self.body_size > len(self.body)


@dataclass(slots=True, eq=False)
class WsMessage:
    at: float  # its first byte
    sender: str  # VISITOR or SERVICE
    kind: str  # text, binary, ping, pong, close
    size: int  # the whole payload, inflated when compressed
    data: bytes  # the kept prefix (a close frame's reason, for close)
    compressed: bool = False
    close_code: int | None = None

    @property
    def truncated(self) -> bool:
        return self.size > len(self.data) + (2 if self.close_code is not None else 0)


@dataclass(slots=True, eq=False)
class WebSocketLog:
    opened: float
    messages: deque[WsMessage] = field(default_factory=deque)
    dropped: int = 0  # older messages let go to stay within the limits
    kept: int = 0  # bytes of message data kept
    counts: dict[str, int] = field(default_factory=lambda: {VISITOR: 0, SERVICE: 0})
    closed: float | None = None
    compressed: bool = False  # permessage-deflate was negotiated


@dataclass(slots=True, eq=False)
class Exchange:
    connection: int  # which stream (service connection) it came on
    request: Request
    remote_addr: str | None  # the visitor, as the relay's X-Forwarded-For states it
    replay_of: int | None = None
    id: int = 0  # given by the store
    response: Response | None = None
    websocket: WebSocketLog | None = None
    error: str | None = None  # why capture stopped, or why the exchange is unfinished
    kept: int = 0  # bytes of bodies and messages kept (the store's budget)
    evicted: bool = False  # the store let it go: keep nothing more

    @property
    def finished(self) -> bool:
        if self.websocket is not None:
            return self.websocket.closed is not None
        return self.error is not None or (self.response is not None and self.response.complete)


class Sink(Protocol):
    """Where exchanges go (the store)."""

    def add(self, exchange: Exchange) -> None: ...  # a request head arrived

    def changed(self, exchange: Exchange) -> None: ...  # something worth showing changed

    def grew(self, exchange: Exchange, size: int) -> None: ...  # `size` more (or fewer) bytes kept


class _Stop(Exception):
    """Ends capture on a stream; never leaves this module."""

    def __init__(self, reason: str, exchange: Exchange | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.exchange = exchange


class StreamCapture:
    """One stream's capture. Every entry point takes the bytes as they cross and `now` (seconds since the epoch)."""

    def __init__(self, sink: Sink, connection: int = 0, limits: Limits | None = None,
                 replay_of: int | None = None) -> None:
        self.sink = sink
        self.connection = connection
        self.limits = limits or Limits()
        self.replay_of = replay_of
        self.stopped: str | None = None  # why capture stopped on this stream
        self.last: Exchange | None = None  # the newest exchange of this stream
        self._unanswered: deque[Exchange] = deque()
        self._requests = _RequestReader(self)
        self._responses = _ResponseReader(self)
        self._upgrade: Exchange | None = None  # asked to switch protocols; its answer decides what follows
        self._held = bytearray()  # visitor bytes after an upgrade request, until the answer
        self._visitor_frames: _WsReader | None = None
        self._service_frames: _WsReader | None = None
        self._visitor_done = False  # the visitor's side carries nothing more to parse

    # entry points (the tap's)
    def to_service(self, chunks: list[bytes], now: float) -> None:
        if self.stopped is not None:
            return
        try:
            for chunk in chunks:
                self._from_visitor(chunk, now)
        except _Stop as stop:
            self._stop(stop.reason, stop.exchange, now)
        except Exception as error:  # a bug here must never reach the data path
            self._stop(f"capture failed: {error!r}", None, now)

    def to_visitor(self, data: bytes, now: float) -> None:
        if self.stopped is not None:
            return
        try:
            self._from_service(data, now)
        except _Stop as stop:
            self._stop(stop.reason, stop.exchange, now)
        except Exception as error:
            self._stop(f"capture failed: {error!r}", None, now)

    def closed(self, now: float) -> None:
        """The stream and its service connection are gone."""
        if self.stopped is None:
            try:
                self._responses.finish(now)
            except Exception:
                pass
        for exchange in self._unanswered:
            self._end_unfinished(exchange, now)
        self._unanswered.clear()
        if self._upgrade is not None:
            self._end_unfinished(self._upgrade, now)
            self._upgrade = None
        log = self.last.websocket if self.last is not None else None
        if log is not None and log.closed is None:
            log.closed = now
            self.sink.changed(self.last)
        self.stopped = self.stopped or "closed"

    def _end_unfinished(self, exchange: Exchange, now: float) -> None:
        if exchange.finished:
            return
        if exchange.error is None:
            exchange.error = ("the connection closed before the response was complete"
                              if exchange.request.complete else "the connection closed mid-request")
        response = exchange.response
        if response is not None and response.ended is None:
            response.ended = now
        self.sink.changed(exchange)

    # visitor -> service
    def _from_visitor(self, data: bytes, now: float) -> None:
        if self._visitor_frames is not None:
            self._visitor_frames.feed(data, now)
        elif self._upgrade is not None:
            if len(self._held) + len(data) > self.limits.max_head:
                raise _Stop("too many bytes after an upgrade request before its answer", self._upgrade)
            self._held += data
        elif not self._visitor_done:
            rest = self._requests.feed(data, now)
            if rest is not None:  # the request asked to switch protocols: the rest waits for the answer
                self._upgrade = self._requests.exchange
                self._held += rest

    def _request_begun(self, exchange: Exchange) -> None:
        self.last = exchange
        self._unanswered.append(exchange)
        self.sink.add(exchange)

    # service -> visitor
    def _from_service(self, data: bytes, now: float) -> None:
        if self._service_frames is not None:
            self._service_frames.feed(data, now)
            return
        rest = self._responses.feed(data, now)
        if rest is not None:
            self._switched(rest, now)

    def _answering(self) -> Exchange:
        if not self._unanswered:
            raise _Stop("the service sent a response nobody asked for", self.last)
        return self._unanswered[0]

    def _response_complete(self, exchange: Exchange) -> None:
        if self._unanswered and self._unanswered[0] is exchange:
            self._unanswered.popleft()
        if exchange is self._upgrade and exchange.response is not None and exchange.response.status != 101:
            # refused: the relay closes such a connection, nothing follows
            self._upgrade = None
            self._held.clear()
            self._visitor_done = True
        self.sink.changed(exchange)

    def _switched(self, rest: bytes, now: float) -> None:
        exchange = self._responses.exchange
        if exchange is None or exchange is not self._upgrade or exchange.response is None:
            raise _Stop("the service switched protocols although nobody asked it to", exchange)
        self._upgrade = None
        self._requests.exchange = None
        compressed = any(b"permessage-deflate" in value.lower() for name, value in exchange.response.headers
                         if name.lower() == b"sec-websocket-extensions")
        log = WebSocketLog(opened=now, compressed=compressed)
        exchange.websocket = log
        self._visitor_frames = _WsReader(self, exchange, VISITOR, compressed)
        self._service_frames = _WsReader(self, exchange, SERVICE, compressed)
        self.sink.changed(exchange)
        held, self._held = bytes(self._held), bytearray()
        if held:
            self._visitor_frames.feed(held, now)
        if rest:
            self._service_frames.feed(rest, now)

    # bounded keeping
    def _keep_body(self, exchange: Exchange, part: Request | Response, data: bytes) -> None:
        part.body_size += len(data)
        room = self.limits.max_body - len(part.body)
        if room > 0 and not exchange.evicted:
            piece = data[:room]
            part.body += piece
            exchange.kept += len(piece)
            self.sink.grew(exchange, len(piece))

    def _log_message(self, exchange: Exchange, message: WsMessage) -> None:
        log = exchange.websocket
        assert log is not None
        log.counts[message.sender] += 1
        if exchange.evicted:
            return
        limits = self.limits
        log.messages.append(message)
        delta = len(message.data)
        while len(log.messages) > limits.ws_max_messages or (log.kept + delta > limits.max_body
                                                               and len(log.messages) > 1):
            delta -= len(log.messages.popleft().data)
            log.dropped += 1
        log.kept += delta
        exchange.kept += delta
        self.sink.grew(exchange, delta)
        self.sink.changed(exchange)

    def _stop(self, reason: str, exchange: Exchange | None, now: float) -> None:
        self.stopped = reason
        exchange = exchange or (self._unanswered[0] if self._unanswered else self.last)
        if exchange is not None and exchange.error is None:
            exchange.error = f"capture stopped: {reason}"
            self.sink.changed(exchange)


def _remote_addr(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The visitor's address: the last X-Forwarded-For entry, the one the relay wrote."""
    found = None
    for name, value in headers:
        if name.lower() == b"x-forwarded-for":
            found = value.decode("latin-1").split(",")[-1].strip() or None
    return found


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    """The body's length when it is framed by Content-Length alone (llhttp has refused anything ambiguous)."""
    length = None
    for name, value in headers:
        lowered = name.lower()
        if lowered == b"transfer-encoding":
            return None
        if lowered == b"content-length":
            length = int(value)
    return length


class _HttpReader:
    """llhttp's callbacks for one direction. A Content-Length body past llhttp's first look is counted here
    instead (no copy per chunk); the next message then gets a fresh parser."""

    def __init__(self, capture: StreamCapture) -> None:
        self.capture = capture
        self.max_head = capture.limits.max_head
        self.exchange: Exchange | None = None  # the message being received belongs to it
        self.parser = self._new_parser()
        self.now = 0.0
        self.in_head = False
        self.head_bytes = 0  # of the head being received, as llhttp hands it over
        self.head_fed = 0  # bytes fed while llhttp stayed inside one head (it buffers a value whole)
        self.headers: list[tuple[bytes, bytes]] = []
        self.length: int | None = None  # the current message's Content-Length
        self.body_left = 0  # Content-Length body bytes still to count

    def _new_parser(self):  # pragma: no cover - overridden
        raise NotImplementedError

    def _part(self) -> Request | Response | None:  # pragma: no cover - overridden
        raise NotImplementedError

    def feed(self, data: bytes, now: float) -> memoryview | None:
        """Parse `data`; returns the bytes after a head that switched protocols, if one did."""
        self.now = now
        view = memoryview(data)
        while len(view) and self.body_left:
            view = self._count_body(view)
        if not len(view):
            return None
        return self._parse(view)

    def _parse(self, view: memoryview) -> memoryview | None:
        was_in_head = self.in_head
        try:
            self.parser.feed_data(view)
        except httptools.HttpParserUpgrade as upgrade:
            return view[upgrade.args[0]:]
        except httptools.HttpParserCallbackError as error:
            if isinstance(error.__context__, _Stop):
                raise error.__context__ from None
            raise _Stop(f"unparsable HTTP: {error}", self.exchange) from None
        except httptools.HttpParserError as error:
            raise _Stop(f"unparsable HTTP: {error}", self.exchange) from None
        if was_in_head and self.in_head:
            self.head_fed += len(view)
            if self.head_fed > self.max_head:
                raise _Stop(f"a head over {self.max_head} bytes", self.exchange)
        else:
            self.head_fed = 0
        part = self._part()
        if part is not None and not part.complete and self.length is not None and not self.in_head:
            self.body_left = self.length - part.body_size
        return None

    def _count_body(self, view: memoryview) -> memoryview:
        exchange = self.exchange
        part = self._part()
        take = min(self.body_left, len(view))
        assert exchange is not None and part is not None
        self.capture._keep_body(exchange, part, view[:take])
        self.body_left -= take
        if not self.body_left:
            self.parser = self._new_parser()  # it never saw the rest of this body
            self.on_message_complete()
        return view[take:]

    def _count_head(self, size: int) -> None:
        self.head_bytes += size
        if self.head_bytes > self.max_head:
            raise _Stop(f"a head over {self.max_head} bytes", self.exchange or self.capture.last)

    # callbacks shared by both directions
    def on_message_begin(self) -> None:
        self.in_head = True
        self.head_bytes = 0
        self.headers = []

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.in_head:
            return  # a trailer field; not kept
        self.head_bytes += len(name) + len(value) + 4  # (_count_head inlined: one call per header is costly)
        if self.head_bytes > self.max_head:
            raise _Stop(f"a head over {self.max_head} bytes", self.exchange or self.capture.last)
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        part = self._part()
        if self.exchange is not None and part is not None:
            self.capture._keep_body(self.exchange, part, body)

    def on_message_complete(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError


class _RequestReader(_HttpReader):
    def _new_parser(self):
        return httptools.HttpRequestParser(self)

    def _part(self) -> Request | None:
        return self.exchange.request if self.exchange is not None else None

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.exchange = None
        self.url = b""
        self.started = self.now

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        self.url += url

    def on_headers_complete(self) -> None:
        self.in_head = False
        parser = self.parser
        headers = self.headers
        capture = self.capture
        request = Request(method=parser.get_method().decode("latin-1"), target=self.url,
                          http_version=parser.get_http_version(), headers=headers, started=self.started)
        self.length = _content_length(headers)
        self.exchange = Exchange(connection=capture.connection, request=request, remote_addr=_remote_addr(headers),
                                 replay_of=capture.replay_of)
        capture._request_begun(self.exchange)

    def on_message_complete(self) -> None:
        exchange = self.exchange
        self.length = None
        if exchange is None:
            return
        request = exchange.request
        if not request.complete:
            request.complete = True
            request.ended = self.now
            self.capture.sink.changed(exchange)


class _ResponseReader(_HttpReader):
    """The service's responses. One to a HEAD request has no body whatever its head says, which llhttp can't
    be told: such a response is fed to llhttp up to the end of its head, and the next one gets a fresh parser."""

    def __init__(self, capture: StreamCapture) -> None:
        super().__init__(capture)
        self.mid_message = False  # a final response has begun and not ended
        self.head_only = False  # the current response answers HEAD
        self.scan_tail = b""  # the last bytes of a head being scanned for its end
        self.interim: list[int] = []
        self.started = 0.0
        self.reason = b""

    def _new_parser(self):
        return httptools.HttpResponseParser(self)

    def _part(self) -> Response | None:
        return self.exchange.response if self.exchange is not None else None

    def feed(self, data: bytes, now: float) -> memoryview | None:
        self.now = now
        view = memoryview(data)
        while len(view):
            if self.body_left:
                view = self._count_body(view)
                continue
            if not self.mid_message and not self.in_head:
                unanswered = self.capture._unanswered
                self.head_only = bool(unanswered) and unanswered[0].request.method == "HEAD"
            if not self.head_only:
                return self._parse(view)
            # a response to HEAD: feed llhttp up to the end of the next head only
            scanned = self.scan_tail + bytes(view[: self.max_head + 4])
            end = scanned.find(b"\r\n\r\n")
            if end < 0:
                self.scan_tail = scanned[-3:]
                piece, view = view, view[len(view):]
            else:
                cut = end + 4 - len(self.scan_tail)
                self.scan_tail = b""
                piece, view = view[:cut], view[cut:]
            switched = self._parse(piece)
            if switched is not None:
                return switched
            if end >= 0 and self.mid_message and not self.in_head and self._part() is not None:
                self.parser = self._new_parser()  # llhttp would wait for a body that never comes
                self.head_only = False
                self.on_message_complete()
        return None

    def finish(self, now: float) -> None:
        """The stream ended: that completes a close-delimited body."""
        response = self._part()
        if response is None or response.complete or self.in_head:
            return
        if self.length is None and response.status != 101 and not _chunked(response.headers):
            self.now = now
            self.on_message_complete()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if not self.mid_message:
            self.exchange = self.capture._answering()
            self.mid_message = True
            self.interim = []
            self.started = self.now
        self.reason = b""

    def on_status(self, reason: bytes) -> None:
        self._count_head(len(reason))
        self.reason += reason

    def on_headers_complete(self) -> None:
        self.in_head = False
        parser = self.parser
        status = parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            self.interim.append(status)
            return
        exchange = self.exchange
        assert exchange is not None
        self.length = _content_length(self.headers)
        if status in (204, 304) or self.head_only:
            self.length = None
        exchange.response = Response(status=status, reason=self.reason, http_version=parser.get_http_version(),
                                     headers=self.headers, started=self.started, informational=self.interim)
        self.capture.sink.changed(exchange)

    def on_message_complete(self) -> None:
        exchange = self.exchange
        if exchange is None or exchange.response is None or exchange.response.complete:
            return  # an interim response: the final one follows
        response = exchange.response
        response.complete = True
        response.ended = self.now
        self.length = None
        self.mid_message = False
        self.capture._response_complete(exchange)


def _chunked(headers: list[tuple[bytes, bytes]]) -> bool:
    return any(name.lower() == b"transfer-encoding" for name, _ in headers)


class _Rsv1(Extension):
    """Lets wsproto's decoder accept permessage-deflate frames (RSV1 set) and notes the bit; the payload is
    inflated by `_WsReader`, bounded."""

    name = "permessage-deflate"

    def __init__(self) -> None:
        self.rsv1 = False

    def enabled(self) -> bool:
        return True

    def offer(self) -> bool:
        return False  # never negotiates: the handshake already happened

    def frame_inbound_header(self, proto, opcode: Opcode, rsv: RsvBits, payload_len: int) -> RsvBits:
        if not opcode.iscontrol() and opcode is not Opcode.CONTINUATION:
            self.rsv1 = rsv.rsv1
        return RsvBits(True, False, False)

    def frame_inbound_payload_data(self, proto, data: bytes) -> bytes:
        return data

    def frame_inbound_complete(self, proto, fin: bool) -> None:
        return None


_KINDS = {Opcode.TEXT: "text", Opcode.BINARY: "binary", Opcode.PING: "ping", Opcode.PONG: "pong",
          Opcode.CLOSE: "close"}


class _WsReader:
    """One direction of a WebSocket connection: wsproto's frame decoder, and messages made of its frames.

    The decoder is handed a frame's header and as much payload as the message may still keep; the rest of
    an uncompressed frame is skipped by count, and a fresh decoder takes the next frame."""

    def __init__(self, capture: StreamCapture, exchange: Exchange, sender: str, compressed: bool) -> None:
        self.capture = capture
        self.exchange = exchange
        self.sender = sender
        self.limits = capture.limits
        self.compressed = compressed
        self.extension = _Rsv1() if compressed else None
        self.decoder = self._new_decoder()
        self.inflater = zlib.decompressobj(-zlib.MAX_WBITS) if compressed else None
        self.kind: str | None = None  # of the message being received
        self.message_compressed = False
        self.data = bytearray()
        self.size = 0
        self.started = 0.0
        self.skip = 0  # payload bytes of the current frame passed over: counted, never copied or unmasked
        self.skip_fin = False

    def _new_decoder(self) -> FrameDecoder:
        # wsproto's `client` means "decodes what a client receives": the service's frames, unmasked
        return FrameDecoder(client=self.sender == SERVICE, extensions=[self.extension] if self.extension else None)

    def feed(self, data: bytes, now: float) -> None:
        view = memoryview(data)
        cap = self.limits.ws_max_message
        while len(view):
            if self.skip:
                take = min(self.skip, len(view))
                self.skip -= take
                self.size += take
                view = view[take:]
                if not self.skip:
                    self.decoder = self._new_decoder()
                    if self.skip_fin:
                        self._finish(now)
                continue
            room = max(cap - len(self.data), 0) + MAX_FRAME_HEAD
            self.decoder.receive_bytes(view[:room])
            view = view[room:]
            while True:
                try:
                    frame = self.decoder.process_buffer()
                except ParseFailed as error:
                    raise _Stop(f"WebSocket frames from the {self.sender}: {error}", self.exchange) from None
                if frame is None:
                    break
                self._frame(frame, now)
            header = self.decoder.header
            if (header is not None and not header.opcode.iscontrol() and not len(self.decoder.buffer)
                    and self.kind is not None and len(self.data) >= cap and not self.message_compressed):
                self.skip = header.payload_len - self.decoder.payload_consumed
                self.skip_fin = header.fin

    def _frame(self, frame, now: float) -> None:
        opcode = frame.opcode
        if opcode.iscontrol():
            payload = bytes(frame.payload)
            if opcode is Opcode.CLOSE:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
                message = WsMessage(now, self.sender, "close", len(payload), payload[2:], close_code=code)
            else:
                message = WsMessage(now, self.sender, _KINDS[opcode], len(payload), payload)
            self.capture._log_message(self.exchange, message)
            return
        if self.kind is None:
            if opcode is Opcode.CONTINUATION:
                raise _Stop(f"WebSocket frames from the {self.sender}: a continuation with no message", self.exchange)
            self.kind = _KINDS[opcode]
            self.started = now
            self.size = 0
            self.data = bytearray()
            self.message_compressed = self.extension is not None and self.extension.rsv1
        elif opcode is not Opcode.CONTINUATION:
            raise _Stop(f"WebSocket frames from the {self.sender}: a new message inside another", self.exchange)
        payload = frame.payload
        if self.message_compressed:
            self._inflate(payload)
        else:
            self.size += len(payload)
            room = self.limits.ws_max_message - len(self.data)
            if room > 0:
                self.data += payload[:room]
        if frame.frame_finished and frame.message_finished:
            if self.message_compressed:
                self._inflate(_DEFLATE_TAIL)
            self._finish(now)

    def _inflate(self, payload: bytes) -> None:
        inflater = self.inflater
        assert inflater is not None
        pending = bytes(payload)
        while True:
            out = inflater.decompress(pending, _INFLATE_PIECE)
            pending = inflater.unconsumed_tail
            self.size += len(out)
            if self.size > self.limits.ws_max_inflate:
                raise _Stop(f"a compressed WebSocket message inflates past {self.limits.ws_max_inflate} bytes",
                            self.exchange)
            room = self.limits.ws_max_message - len(self.data)
            if room > 0:
                self.data += out[:room]
            if not pending and len(out) < _INFLATE_PIECE:
                break

    def _finish(self, now: float) -> None:
        assert self.kind is not None
        message = WsMessage(self.started, self.sender, self.kind, self.size, bytes(self.data),
                            compressed=self.message_compressed)
        self.kind = None
        self.data = bytearray()
        self.size = 0
        self.capture._log_message(self.exchange, message)
