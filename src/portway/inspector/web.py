"""The inspector's HTTP server: the page, its JSON API and the live push (Server-Sent Events), in the agent's
process and event loop.

    GET  /                          the page (static/: index.html, app.js, style.css)
    GET  /api/requests              {"requests": [summary, ...]} newest first; ?method= &status= &path= &limit=
    GET  /api/requests/ID           one exchange: request, response, timing, WebSocket messages
    POST /api/requests/ID/replay    send it again to the local service (optional JSON edits) -> {"id": NEW_ID}
    GET  /api/diff?a=ID&b=ID        two responses compared
    GET  /api/requests.har          HAR 1.2 (same filters as the list)
    DELETE /api/requests            forget every exchange
    GET  /api/events                text/event-stream: `exchange` (a summary), `evicted` ({"ids"}), `cleared`
    GET  /api/status                the agent's local service, the limits, what is kept

It shows secrets (cookies, Authorization), so besides listening on loopback by default it refuses (403)
every request whose Host is not one of its own addresses (DNS rebinding: a page the user visits whose
name was re-pointed at 127.0.0.1) and every request with an Origin other than its own, so another site's
page can neither read it nor replay through it; its pages can't be framed and run no inline script.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
from importlib import resources
from typing import TYPE_CHECKING, Awaitable, Callable
from urllib.parse import parse_qsl, urlsplit

import httptools

from . import views
from .diff import diff
from .har import har
from .replay import ReplayError

if TYPE_CHECKING:
    from .app import Inspector
    from .capture import Exchange

log = logging.getLogger(__name__)

MAX_REQUEST_HEAD = 32 * 1024
MAX_REQUEST_BODY = 4 * 1024 * 1024  # an edited replay's body, base64 included
IDLE_TIMEOUT = 120.0  # an idle keep-alive connection to the inspector is closed after this
PUSH_DELAY = 0.1  # changes are pushed at most this often, coalesced
PUSH_MAX_BUFFERED = 1024 * 1024  # a page that stops reading its event stream is dropped past this
KEEPALIVE_INTERVAL = 20.0  # a comment line on every event stream, so idle ones stay open

METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
}
SECURITY_HEADERS = (
    b"X-Content-Type-Options: nosniff\r\n"
    b"X-Frame-Options: DENY\r\n"
    b"Referrer-Policy: no-referrer\r\n"
    b"Cache-Control: no-store\r\n"
    b"Content-Security-Policy: default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    b"connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'\r\n"
)
REASONS = {200: "OK", 204: "No Content", 400: "Bad Request", 403: "Forbidden", 404: "Not Found",
           405: "Method Not Allowed", 409: "Conflict", 413: "Content Too Large", 431: "Request Header Fields Too Large",
           502: "Bad Gateway", 504: "Gateway Timeout"}


class _Request:
    __slots__ = ("method", "target", "headers", "body")

    def __init__(self) -> None:
        self.method = ""
        self.target = b""
        self.headers: dict[str, str] = {}
        self.body = bytearray()

    def header(self, name: str) -> str | None:
        return self.headers.get(name)


class _TooLarge(Exception):
    def __init__(self, status: int) -> None:
        self.status = status


class _RequestParser:
    """httptools callbacks collecting complete requests."""

    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.done: list[_Request] = []
        self.current = _Request()
        self.head_bytes = 0

    def feed(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as error:
            if isinstance(error.__context__, _TooLarge):
                raise error.__context__ from None
            raise
        if self.head_bytes > MAX_REQUEST_HEAD:
            raise _TooLarge(431)

    def on_message_begin(self) -> None:
        self.current = _Request()
        self.head_bytes = 0

    def on_url(self, url: bytes) -> None:
        self.current.target += url
        self.head_bytes += len(url)
        if self.head_bytes > MAX_REQUEST_HEAD:
            raise _TooLarge(431)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_bytes += len(name) + len(value) + 4
        if self.head_bytes > MAX_REQUEST_HEAD:
            raise _TooLarge(431)
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        # a repeated Host or Origin is suspicious, never merged: keep the first, refuse on mismatch later
        if key in self.current.headers and key in ("host", "origin"):
            self.current.headers[key] = "\x00conflict"
        else:
            self.current.headers[key] = text

    def on_headers_complete(self) -> None:
        self.current.method = self.parser.get_method().decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self.current.body += body
        if len(self.current.body) > MAX_REQUEST_BODY:
            raise _TooLarge(413)

    def on_message_complete(self) -> None:
        self.done.append(self.current)


def _host_literal(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class WebServer:
    """Serves one inspector's page and API."""

    def __init__(self, inspector: "Inspector") -> None:
        self.inspector = inspector
        self.store = inspector.store
        self.port = 0
        self.bind_host = inspector.config.host
        self._server: asyncio.AbstractServer | None = None
        self._static: dict[str, bytes] = {}
        self._writers: set[asyncio.StreamWriter] = set()
        self._streams: set[asyncio.StreamWriter] = set()  # event streams
        self._dirty: dict[int, "Exchange"] = {}
        self._evicted: list[int] = []
        self._cleared = False
        self._push_handle: asyncio.TimerHandle | None = None
        self._keepalive_handle: asyncio.TimerHandle | None = None
        self._unlisten: Callable[[], None] | None = None
        self._handlers: set[asyncio.Task] = set()

    # lifecycle
    async def listen(self, host: str, port: int) -> int:
        files = resources.files("portway.inspector") / "static"
        self._static = {path: (files / name).read_bytes() for path, (name, _) in STATIC.items()}
        self._server = await asyncio.start_server(self._connection, host, port, limit=MAX_REQUEST_HEAD)
        self.port = self._server.sockets[0].getsockname()[1]
        self.bind_host = host
        self._unlisten = self.store.listen(self._store_event)
        return self.port

    async def close(self) -> None:
        if self._unlisten is not None:
            self._unlisten()
        for handle in (self._push_handle, self._keepalive_handle):
            if handle is not None:
                handle.cancel()
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        if self._server is not None:
            try:
                await asyncio.wait_for(self._server.wait_closed(), 2)
            except asyncio.TimeoutError:
                pass

    # who may ask
    def host_allowed(self, host: str | None) -> bool:
        """Only the inspector's own addresses: a name other than localhost could be re-pointed at us."""
        if not host or "\x00" in host:
            return False
        host = host.strip().lower()
        suffix = f":{self.port}"
        if not host.endswith(suffix):
            return False
        name = host[: -len(suffix)]
        if name in ("localhost", "127.0.0.1", "[::1]", _host_literal(self.bind_host).lower()):
            return True
        if self.bind_host in ("0.0.0.0", "::", ""):
            # bound to every address: any IP literal (a browser never re-resolves an address)
            try:
                ipaddress.ip_address(name[1:-1] if name.startswith("[") else name)
            except ValueError:
                return False
            return True
        return False

    def origin_allowed(self, origin: str, host: str) -> bool:
        return origin.strip().lower() == f"http://{host.strip().lower()}"

    # connections
    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        parser = _RequestParser()
        try:
            while True:
                try:
                    data = await asyncio.wait_for(reader.read(65536), IDLE_TIMEOUT)
                except asyncio.TimeoutError:
                    return
                if not data:
                    return
                try:
                    parser.feed(data)
                except _TooLarge as error:
                    await self._send_json(writer, error.status, {"error": REASONS[error.status]}, close=True)
                    return
                except httptools.HttpParserError:
                    await self._send_json(writer, 400, {"error": "malformed request"}, close=True)
                    return
                while parser.done:
                    request = parser.done.pop(0)
                    if not await self._handle(request, reader, writer):
                        return
        except (ConnectionError, asyncio.CancelledError):
            pass
        except Exception:  # the inspector must never take the agent down
            log.exception("inspector: request failed")
        finally:
            self._writers.discard(writer)
            self._streams.discard(writer)
            writer.close()

    async def _handle(self, request: _Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        host = request.header("host")
        if not self.host_allowed(host):
            await self._send_json(writer, 403, {"error": "this inspector answers only to its own address "
                                                         f"(Host: 127.0.0.1:{self.port} or localhost:{self.port})"},
                                  close=True)
            return False
        assert host is not None
        origin = request.header("origin")
        if origin is not None and not self.origin_allowed(origin, host):
            await self._send_json(writer, 403, {"error": "requests from other sites' pages are refused"}, close=True)
            return False
        if request.method not in ("GET", "HEAD") and request.header("sec-fetch-site") in ("cross-site", "same-site"):
            await self._send_json(writer, 403, {"error": "requests from other sites' pages are refused"}, close=True)
            return False
        parts = urlsplit(request.target.decode("latin-1"))
        path = parts.path
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        method = request.method
        if path in STATIC:
            if method not in ("GET", "HEAD"):
                return await self._send_json(writer, 405, {"error": "method not allowed"})
            return await self._send(writer, 200, self._static[path], STATIC[path][1], head_only=method == "HEAD")
        if path == "/api/events" and method == "GET":
            return await self._event_stream(reader, writer)
        if path == "/metrics" and self.inspector.metrics is not None:
            if method not in ("GET", "HEAD"):
                return await self._send_json(writer, 405, {"error": "method not allowed"})
            return await self._send(writer, 200, self.inspector.metrics(), METRICS_TYPE,
                                    head_only=method == "HEAD")
        route = self._route(method, path)
        if route is None:
            return await self._send_json(writer, 404 if not path.startswith("/api/") or method == "GET" else 405,
                                         {"error": f"no such endpoint: {method} {path}"})
        try:
            status, payload = await route(request, path, query)
        except ReplayError as error:
            status, payload = error.status, {"error": error.message}
        if isinstance(payload, bytes):
            return await self._send(writer, status, payload, "application/json",
                                    extra=b'Content-Disposition: attachment; filename="portway-inspector.har"\r\n')
        return await self._send_json(writer, status, payload)

    def _route(self, method: str, path: str) -> Callable[..., Awaitable[tuple[int, object]]] | None:
        if path == "/api/requests":
            return {"GET": self._list, "DELETE": self._clear}.get(method)
        if path == "/api/requests.har":
            return self._har if method == "GET" else None
        if path == "/api/diff":
            return self._diff if method == "GET" else None
        if path == "/api/status":
            return self._status if method == "GET" else None
        if path.startswith("/api/requests/"):
            rest = path[len("/api/requests/"):]
            if rest.isdigit() and method == "GET":
                return self._detail
            if rest.endswith("/replay") and rest[: -len("/replay")].isdigit() and method == "POST":
                return self._replay
        return None

    # endpoints
    async def _list(self, request: _Request, path: str, query: dict) -> tuple[int, object]:
        limit = query.get("limit")
        selected = self.store.select(query.get("method"), query.get("status"), query.get("path"),
                                     int(limit) if limit and limit.isdigit() else None)
        return 200, {"requests": [views.summary(exchange) for exchange in selected]}

    async def _clear(self, request: _Request, path: str, query: dict) -> tuple[int, object]:
        self.store.clear()
        self._cleared = True
        self._schedule_push()
        return 200, {"cleared": True}

    async def _har(self, request: _Request, path: str, query: dict) -> tuple[int, object]:
        selected = self.store.select(query.get("method"), query.get("status"), query.get("path"))
        return 200, json.dumps(har(selected), ensure_ascii=False).encode("utf-8")

    async def _detail(self, request: _Request, path: str, query: dict) -> tuple[int, object]:
        exchange = self.store.get(int(path.rsplit("/", 1)[1]))
        if exchange is None:
            return 404, {"error": "no such exchange (the inspector keeps only the newest ones)"}
        return 200, views.detail(exchange)

    async def _diff(self, request: _Request, path: str, query: dict) -> tuple[int, object]:
        ids = [query.get("a", ""), query.get("b", "")]
        if not all(value.isdigit() for value in ids):
            return 400, {"error": "give two exchanges: ?a=ID&b=ID"}
        a, b = (self.store.get(int(value)) for value in ids)
        if a is None or b is None:
            return 404, {"error": "no such exchange"}
        return 200, diff(a, b)

    async def _status(self, request: _Request, path: str, query: dict) -> tuple[int, object]:
        inspector = self.inspector
        config = inspector.config
        return 200, {"local": inspector.local_target, "exchanges": len(self.store), "kept_bytes": self.store.kept,
                     "limits": {"max_exchanges": config.max_exchanges, "max_body": config.max_body,
                                "max_bytes": config.max_bytes}}

    async def _replay(self, request: _Request, path: str, query: dict) -> tuple[int, object]:
        exchange_id = int(path.split("/")[3])
        edits = None
        if request.body.strip():
            try:
                edits = json.loads(request.body)
            except ValueError:
                return 400, {"error": "the edits must be JSON"}
        new_id = await self.inspector.replay(exchange_id, edits)
        return 200, {"id": new_id}

    # the live push
    async def _event_stream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n" + SECURITY_HEADERS
                     + b"Connection: close\r\n\r\nretry: 1000\n\n")
        self._streams.add(writer)
        self._arm_keepalive()
        try:
            while await reader.read(4096):
                pass  # nothing is expected from the page; wait until it goes
        finally:
            self._streams.discard(writer)
        return False

    def _store_event(self, event: str, exchange: "Exchange") -> None:
        if not self._streams:
            return  # nobody watches: nothing to remember
        if event == "evicted":
            self._dirty.pop(exchange.id, None)
            self._evicted.append(exchange.id)
        else:
            self._dirty[exchange.id] = exchange
        self._schedule_push()

    def _schedule_push(self) -> None:
        if self._push_handle is None:
            self._push_handle = asyncio.get_running_loop().call_later(PUSH_DELAY, self._push)

    def _push(self) -> None:
        self._push_handle = None
        parts = []
        if self._cleared:
            self._cleared = False
            parts.append(b"event: cleared\ndata: {}\n\n")
        if self._evicted:
            parts.append(b"event: evicted\ndata: " + json.dumps({"ids": self._evicted}).encode() + b"\n\n")
            self._evicted = []
        for exchange in self._dirty.values():
            parts.append(b"event: exchange\ndata: " + json.dumps(views.summary(exchange)).encode() + b"\n\n")
        self._dirty = {}
        self._write_streams(b"".join(parts))

    def _arm_keepalive(self) -> None:
        if self._keepalive_handle is None:
            self._keepalive_handle = asyncio.get_running_loop().call_later(KEEPALIVE_INTERVAL, self._keepalive)

    def _keepalive(self) -> None:
        self._keepalive_handle = None
        if self._streams:
            self._write_streams(b": keepalive\n\n")
            self._arm_keepalive()

    def _write_streams(self, data: bytes) -> None:
        if not data:
            return
        for writer in list(self._streams):
            if writer.transport.get_write_buffer_size() > PUSH_MAX_BUFFERED:
                self._streams.discard(writer)
                writer.close()
            else:
                writer.write(data)

    # answers
    async def _send_json(self, writer: asyncio.StreamWriter, status: int, payload: object, close: bool = False) -> bool:
        body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        return await self._send(writer, status, body, "application/json", close=close)

    async def _send(self, writer: asyncio.StreamWriter, status: int, body: bytes, content_type: str,
                    close: bool = False, head_only: bool = False, extra: bytes = b"") -> bool:
        head = (f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\n").encode("latin-1") + SECURITY_HEADERS + extra
        head += b"Connection: close\r\n\r\n" if close else b"\r\n"
        writer.write(head if head_only else head + body)
        await writer.drain()
        return not close
