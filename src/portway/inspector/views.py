"""Exchanges as the JSON API shows them, and how a body is best shown (pure functions, no I/O).

A body travels as text when it is UTF-8, else as base64 with `body_base64: true`; its `view` says how the
page renders it: pretty JSON (or where the syntax error is), a decoded form, text, an image, or a hex dump.
"""

from __future__ import annotations

import base64
import json
import zlib
from email.parser import BytesParser
from email.policy import HTTP
from urllib.parse import parse_qsl, urlsplit

from .capture import Exchange, Request, Response, WsMessage

HEX_DUMP_LIMIT = 64 * 1024  # bytes of a binary body shown as hex
DECODED_LIMIT = 4 * 1024 * 1024  # bytes a gzip or deflate body is inflated to, at most, to be shown
JSON_PRETTY_LIMIT = 4 * 1024 * 1024  # characters of pretty-printed JSON sent (the raw body is always there)


def _text(value: bytes) -> str:
    return value.decode("latin-1")


def header_value(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


def media_type(headers: list[tuple[bytes, bytes]]) -> str:
    value = header_value(headers, b"content-type")
    return _text(value).split(";")[0].strip().lower() if value else ""


def decode_text(data: bytes, truncated: bool) -> str | None:
    """UTF-8 text, or None; a prefix cut inside a character still counts as text."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        if truncated and error.reason == "unexpected end of data" and error.start >= len(data) - 3:
            try:
                return data[: error.start].decode("utf-8")
            except UnicodeDecodeError:
                return None
        return None


def encode_body(data: bytes, truncated: bool) -> tuple[str, bool]:
    """(text, False) for UTF-8, else (base64, True)."""
    text = decode_text(data, truncated)
    if text is not None:
        return text, False
    return base64.b64encode(data).decode("ascii"), True


def hex_dump(data: bytes, limit: int = HEX_DUMP_LIMIT) -> str:
    lines = []
    for offset in range(0, min(len(data), limit), 16):
        row = data[offset:offset + 16]
        hexes = " ".join(f"{byte:02x}" for byte in row)
        if len(row) > 8:
            hexes = hexes[:23] + " " + hexes[23:]
        printable = "".join(chr(byte) if 32 <= byte < 127 else "." for byte in row)
        lines.append(f"{offset:08x}  {hexes:<49} |{printable}|")
    return "\n".join(lines)


def _looks_binary(text: str) -> bool:
    return any(ord(char) < 32 and char not in "\t\r\n\f" for char in text[:4096])


def decoded_body(headers: list[tuple[bytes, bytes]], data: bytes) -> tuple[bytes, str] | None:
    """A gzip or deflate body inflated (at most DECODED_LIMIT bytes), with the coding's name; None otherwise."""
    coding = header_value(headers, b"content-encoding")
    if coding is None:
        return None
    name = coding.decode("latin-1").strip().lower()
    if name in ("gzip", "x-gzip"):
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    elif name == "deflate":
        inflater = zlib.decompressobj(zlib.MAX_WBITS if data[:1] == b"\x78" else -zlib.MAX_WBITS)
    else:
        return None
    try:
        return inflater.decompress(data, DECODED_LIMIT), name
    except zlib.error:
        return None


def body_view(headers: list[tuple[bytes, bytes]], data: bytes, truncated: bool) -> dict:
    """How to show a body: {"kind": "empty" | "json" | "form" | "text" | "image" | "binary", ...}. A gzip or
    deflate body is shown inflated: the view then says so (`decoded`) and carries the inflated body itself
    (`text`, or `data` in base64), since the API's `body` stays the bytes that crossed."""
    if not data:
        return {"kind": "empty"}
    decoded = decoded_body(headers, data)
    if decoded is not None:
        inflated, coding = decoded
        view = body_view([(name, value) for name, value in headers if name.lower() != b"content-encoding"],
                         inflated, truncated or len(inflated) >= DECODED_LIMIT)
        text = decode_text(inflated, True)
        if text is not None and view["kind"] not in ("image", "binary"):
            view["text"] = text
        else:
            view["data"] = base64.b64encode(inflated).decode("ascii")
        view["decoded"] = coding
        return view
    mime = media_type(headers)
    if mime.startswith("image/"):
        return {"kind": "image", "mime": mime}
    text = decode_text(data, truncated)
    if mime == "application/x-www-form-urlencoded" and text is not None:
        return {"kind": "form", "fields": [list(pair) for pair in parse_qsl(text, keep_blank_values=True)]}
    if mime == "multipart/form-data" and not truncated:
        fields = _multipart(header_value(headers, b"content-type") or b"", data)
        if fields is not None:
            return {"kind": "form", "fields": fields}
    if text is not None and (mime == "application/json" or mime.endswith("+json")
                             or (not mime and text.lstrip()[:1] in ("{", "["))):
        return _json_view(text, truncated)
    if text is not None and not _looks_binary(text):
        return {"kind": "text"}
    return {"kind": "binary", "hex": hex_dump(data), "hex_truncated": len(data) > HEX_DUMP_LIMIT}


def _json_view(text: str, truncated: bool) -> dict:
    try:
        parsed = json.loads(text)
    except ValueError as error:
        if truncated:
            return {"kind": "text", "note": "JSON cut at the capture limit"}
        assert isinstance(error, json.JSONDecodeError)
        return {"kind": "json", "error": {"message": error.msg, "line": error.lineno, "column": error.colno,
                                          "offset": error.pos}}
    pretty = json.dumps(parsed, indent=2, ensure_ascii=False)
    if len(pretty) > JSON_PRETTY_LIMIT:
        return {"kind": "text", "note": "JSON too large to pretty-print"}
    return {"kind": "json", "pretty": pretty}


def _multipart(content_type: bytes, data: bytes) -> list[list[str]] | None:
    try:
        message = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type + b"\r\n\r\n" + data)
        if not message.is_multipart():
            return None
        fields = []
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition") or ""
            filename = part.get_filename()
            payload = part.get_payload(decode=True) or b""
            if filename is not None:
                fields.append([str(name), f"[file {filename}, {len(payload)} bytes, {part.get_content_type()}]"])
            else:
                fields.append([str(name), payload.decode("utf-8", "replace")])
        return fields
    except Exception:
        return None


def query_params(target: bytes) -> list[list[str]]:
    query = urlsplit(_text(target)).query
    return [list(pair) for pair in parse_qsl(query, keep_blank_values=True)]


def span_ms(start: float | None, end: float | None) -> float | None:
    if start is None or end is None:
        return None
    return round(max(end - start, 0.0) * 1000, 3)


def state(exchange: Exchange) -> str:
    """receiving → waiting → responding → complete; websocket → closed; or incomplete / error."""
    if exchange.error is not None:
        return "error" if exchange.error.startswith("capture stopped") else "incomplete"
    if exchange.websocket is not None:
        return "closed" if exchange.websocket.closed is not None else "websocket"
    if not exchange.request.complete:
        return "receiving"
    response = exchange.response
    if response is None:
        return "waiting"
    return "complete" if response.complete else "responding"


def duration_ms(exchange: Exchange) -> float | None:
    response = exchange.response
    return span_ms(exchange.request.started, response.ended if response is not None else None)


def summary(exchange: Exchange) -> dict:
    request, response, websocket = exchange.request, exchange.response, exchange.websocket
    return {
        "id": exchange.id,
        "method": request.method,
        "path": _text(request.target),
        "status": response.status if response is not None else None,
        "reason": _text(response.reason) if response is not None else None,
        "duration_ms": duration_ms(exchange),
        "websocket": websocket is not None,
        "replay_of": exchange.replay_of,
        "started": request.started,
        "state": state(exchange),
        "error": exchange.error,
        "remote_addr": exchange.remote_addr,
        "connection": exchange.connection,
        "request_size": request.body_size,
        "response_size": response.body_size if response is not None else None,
        "content_type": media_type(response.headers) if response is not None else None,
        "message_count": (sum(websocket.counts.values()) if websocket is not None else None),
    }


def _headers(headers: list[tuple[bytes, bytes]]) -> list[list[str]]:
    return [[_text(name), _text(value)] for name, value in headers]


def raw_request_head(request: Request) -> str:
    lines = [f"{request.method} {_text(request.target)} HTTP/{request.http_version}"]
    lines += [f"{_text(name)}: {_text(value)}" for name, value in request.headers]
    return "\r\n".join(lines) + "\r\n\r\n"


def raw_response_head(response: Response) -> str:
    lines = [f"HTTP/{response.http_version} {response.status} {_text(response.reason)}".rstrip()]
    lines += [f"{_text(name)}: {_text(value)}" for name, value in response.headers]
    return "\r\n".join(lines) + "\r\n\r\n"


def _body_fields(headers: list[tuple[bytes, bytes]], part: Request | Response) -> dict:
    data = bytes(part.body)
    body, is_base64 = encode_body(data, part.truncated)
    return {
        "headers": _headers(headers),
        "body": body,
        "body_base64": is_base64,
        "body_size": part.body_size,
        "body_truncated": part.truncated,
        "complete": part.complete,
        "view": body_view(headers, data, part.truncated),
    }


def request_detail(request: Request) -> dict:
    return {
        "method": request.method,
        "path": _text(request.target),
        "http_version": request.http_version,
        "query": query_params(request.target),
        "raw_head": raw_request_head(request),
        **_body_fields(request.headers, request),
    }


def response_detail(response: Response) -> dict:
    return {
        "status": response.status,
        "reason": _text(response.reason),
        "http_version": response.http_version,
        "informational": list(response.informational),
        "raw_head": raw_response_head(response),
        **_body_fields(response.headers, response),
    }


def message_detail(message: WsMessage) -> dict:
    shown: dict = {"time": message.at, "from": message.sender, "kind": message.kind, "size": message.size,
                   "truncated": message.truncated, "compressed": message.compressed}
    if message.kind == "close":
        shown["close_code"] = message.close_code
        shown["close_reason"] = message.data.decode("utf-8", "replace")
        return shown
    text = decode_text(message.data, message.truncated) if message.kind != "binary" else None
    if text is not None:
        shown.update(text=text, base64=False)
    else:
        shown.update(data=base64.b64encode(message.data).decode("ascii"), base64=True)
    return shown


def timing(exchange: Exchange) -> dict:
    request, response = exchange.request, exchange.response
    return {
        "started": request.started,
        "request_ms": span_ms(request.started, request.ended),  # its head's first byte to its body's last
        "wait_ms": span_ms(request.ended, response.started if response is not None else None),
        "response_ms": span_ms(response.started if response is not None else None,
                           response.ended if response is not None else None),
        "total_ms": duration_ms(exchange),
    }


def detail(exchange: Exchange) -> dict:
    shown = summary(exchange)
    shown["request"] = request_detail(exchange.request)
    shown["response"] = response_detail(exchange.response) if exchange.response is not None else None
    shown["timing"] = timing(exchange)
    websocket = exchange.websocket
    if websocket is not None:
        shown["messages"] = [message_detail(message) for message in websocket.messages]
        shown["messages_dropped"] = websocket.dropped
        shown["message_counts"] = dict(websocket.counts)
        shown["websocket_opened"] = websocket.opened
        shown["websocket_closed"] = websocket.closed
        shown["websocket_compressed"] = websocket.compressed
    return shown
