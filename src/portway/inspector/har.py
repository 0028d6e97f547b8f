"""Exchanges as a HAR 1.2 log (http://www.softwareishard.com/blog/har-12-spec/), which browsers' devtools import.

WebSocket connections carry their messages the way Chromium's devtools export them (`_resourceType:
"websocket"`, `_webSocketMessages`); fields of Portway's own start with `_portway`.
"""

from __future__ import annotations

import base64
from datetime import datetime, timezone
from urllib.parse import parse_qsl

from .. import __version__
from .capture import Exchange
from .views import decode_text, header_value, media_type, query_params, span_ms

_OPCODES = {"text": 1, "binary": 2, "close": 8, "ping": 9, "pong": 10}


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _headers(headers: list[tuple[bytes, bytes]]) -> list[dict]:
    return [{"name": name.decode("latin-1"), "value": value.decode("latin-1")} for name, value in headers]


def _cookies(headers: list[tuple[bytes, bytes]], name: bytes) -> list[dict]:
    cookies = []
    for key, value in headers:
        if key.lower() != name:
            continue
        text = value.decode("latin-1")
        pieces = [text] if name == b"set-cookie" else text.split(";")
        for piece in pieces:
            first = piece.split(";")[0]
            if "=" in first:
                cookie_name, cookie_value = first.split("=", 1)
                cookies.append({"name": cookie_name.strip(), "value": cookie_value.strip()})
    return cookies


def _url(exchange: Exchange) -> str:
    headers = exchange.request.headers
    host = header_value(headers, b"x-forwarded-host") or header_value(headers, b"host") or b"localhost"
    scheme = header_value(headers, b"x-forwarded-proto") or b"http"
    return f"{scheme.decode('latin-1')}://{host.decode('latin-1')}{exchange.request.target.decode('latin-1')}"


def _version(version: str) -> str:
    return f"HTTP/{version}"


def entry(exchange: Exchange) -> dict:
    request, response = exchange.request, exchange.response
    post_data = None
    if request.body_size:
        data = bytes(request.body)
        text = decode_text(data, request.truncated)
        post_data = {"mimeType": media_type(request.headers),
                     "text": text if text is not None else base64.b64encode(data).decode("ascii")}
        if text is None:
            post_data["encoding"] = "base64"  # not in HAR 1.2's postData, but what tools that read bytes look for
        if post_data["mimeType"] == "application/x-www-form-urlencoded" and text is not None:
            post_data["params"] = [{"name": k, "value": v} for k, v in parse_qsl(text, keep_blank_values=True)]
    har_request = {
        "method": request.method,
        "url": _url(exchange),
        "httpVersion": _version(request.http_version),
        "cookies": _cookies(request.headers, b"cookie"),
        "headers": _headers(request.headers),
        "queryString": [{"name": k, "value": v} for k, v in query_params(request.target)],
        "headersSize": -1,
        "bodySize": request.body_size,
    }
    if post_data is not None:
        har_request["postData"] = post_data
    if response is not None:
        data = bytes(response.body)
        text = decode_text(data, response.truncated)
        content = {"size": response.body_size, "mimeType": media_type(response.headers) or "x-unknown"}
        if text is not None:
            content["text"] = text
        else:
            content.update(text=base64.b64encode(data).decode("ascii"), encoding="base64")
        if response.truncated:
            content["comment"] = f"the first {len(data)} of {response.body_size} bytes"
        location = header_value(response.headers, b"location")
        har_response = {
            "status": response.status,
            "statusText": response.reason.decode("latin-1"),
            "httpVersion": _version(response.http_version),
            "cookies": _cookies(response.headers, b"set-cookie"),
            "headers": _headers(response.headers),
            "content": content,
            "redirectURL": location.decode("latin-1") if location else "",
            "headersSize": -1,
            "bodySize": response.body_size,
        }
    else:  # HAR has no "no response": status 0, as browsers export a request that got none
        har_response = {"status": 0, "statusText": "", "httpVersion": "", "cookies": [], "headers": [],
                        "content": {"size": 0, "mimeType": "x-unknown"}, "redirectURL": "",
                        "headersSize": -1, "bodySize": -1}
    send = span_ms(request.started, request.ended) or 0.0
    wait = span_ms(request.ended, response.started if response is not None else None) or 0.0
    receive = span_ms(response.started if response is not None else None,
                  response.ended if response is not None else None) or 0.0
    shown = {
        "startedDateTime": _iso(request.started),
        "time": round(send + wait + receive, 3),
        "request": har_request,
        "response": har_response,
        "cache": {},
        "timings": {"blocked": -1, "dns": -1, "connect": -1, "ssl": -1, "send": send, "wait": wait,
                    "receive": receive},
        "_portway": {"id": exchange.id, "replay_of": exchange.replay_of, "remote_addr": exchange.remote_addr,
                     "error": exchange.error},
    }
    if exchange.websocket is not None:
        shown["_resourceType"] = "websocket"
        messages = []
        for message in exchange.websocket.messages:
            if message.kind == "binary":
                data = base64.b64encode(message.data).decode("ascii")
            elif message.kind == "close":
                data = message.data.decode("utf-8", "replace")
            else:
                data = message.data.decode("utf-8", "replace")
            messages.append({"type": "send" if message.sender == "visitor" else "receive", "time": message.at,
                             "opcode": _OPCODES[message.kind], "data": data})
        shown["_webSocketMessages"] = messages
    return shown


def har(exchanges: list[Exchange]) -> dict:
    """A HAR log of `exchanges`, oldest first."""
    entries = [entry(exchange) for exchange in sorted(exchanges, key=lambda exchange: exchange.id)]
    return {"log": {"version": "1.2", "creator": {"name": "portway inspector", "version": __version__},
                    "pages": [], "entries": entries}}
