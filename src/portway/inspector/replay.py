"""A captured request rebuilt for sending again, as it was or with edits (pure; the sending is in app.py).

Edits are a JSON object with any of `method`, `path`, `headers` (a list of [name, value], replacing them
all), `body` (text) with `body_base64: true` when it is base64. The request is re-framed: its
Content-Length is that of the body sent, whatever the captured head said.
"""

from __future__ import annotations

import base64
import binascii
import re

from .capture import Exchange

_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_TARGET = re.compile(r"^(/[\x21-\x7e]*|\*)$")
_FRAMING = {"content-length", "transfer-encoding", "connection", "keep-alive", "upgrade", "te", "trailer",
            "proxy-connection"}
_BODY_METHODS = {"POST", "PUT", "PATCH"}


class ReplayError(Exception):
    """The replay can't be made; `status` is the HTTP answer the API gives."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def build_request(exchange: Exchange, edits: dict | None = None) -> bytes:
    edits = edits or {}
    if not isinstance(edits, dict):
        raise ReplayError(400, "the edits must be a JSON object")
    unknown = set(edits) - {"method", "path", "headers", "body", "body_base64"}
    if unknown:
        raise ReplayError(400, f"unknown edit field(s): {', '.join(sorted(unknown))}")
    request = exchange.request
    if exchange.websocket is not None or (exchange.response is not None and exchange.response.status == 101):
        raise ReplayError(400, "a WebSocket connection can't be replayed")
    method = edits.get("method", request.method)
    if not isinstance(method, str) or not _TOKEN.match(method):
        raise ReplayError(400, "method must be an HTTP token such as GET")
    method = method.upper()
    if method == "CONNECT":
        raise ReplayError(400, "CONNECT can't be replayed")
    path = edits.get("path", request.target.decode("latin-1"))
    if not isinstance(path, str) or not _TARGET.match(path):
        raise ReplayError(400, "path must start with / and hold only visible ASCII (percent-encode the rest)")
    if "headers" in edits:
        headers = _edited_headers(edits["headers"])
    else:
        headers = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in request.headers]
    if "body" in edits:
        body = _edited_body(edits["body"], edits.get("body_base64", False))
    else:
        if request.truncated:
            raise ReplayError(409, "the captured body was cut at the capture limit: send the body as an edit")
        if not request.complete:
            raise ReplayError(409, "the request was not completely received")
        body = bytes(request.body)
    lines = [f"{method} {path} HTTP/1.1"]
    has_host = False
    had_length = False
    for name, value in headers:
        lowered = name.lower()
        if lowered in _FRAMING:
            had_length = had_length or lowered in ("content-length", "transfer-encoding")
            continue
        has_host = has_host or lowered == "host"
        lines.append(f"{name}: {value}")
    if not has_host:
        raise ReplayError(400, "the request needs a Host header")
    if body or had_length or method in _BODY_METHODS:
        lines.append(f"Content-Length: {len(body)}")
    try:
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    except UnicodeEncodeError:
        raise ReplayError(400, "header values must be Latin-1") from None
    return head + body


def _edited_headers(headers: object) -> list[tuple[str, str]]:
    if not isinstance(headers, list):
        raise ReplayError(400, "headers must be a list of [name, value]")
    checked = []
    for pair in headers:
        if (not isinstance(pair, (list, tuple)) or len(pair) != 2
                or not all(isinstance(item, str) for item in pair)):
            raise ReplayError(400, "headers must be a list of [name, value] strings")
        name, value = pair
        if not _TOKEN.match(name):
            raise ReplayError(400, f"not a header name: {name!r}")
        if any(char in value for char in "\r\n\x00"):
            raise ReplayError(400, f"the value of {name} holds CR, LF or NUL")
        checked.append((name, value.strip()))
    return checked


def _edited_body(body: object, is_base64: object) -> bytes:
    if not isinstance(body, str):
        raise ReplayError(400, "body must be a string")
    if is_base64:
        try:
            return base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            raise ReplayError(400, "body is not valid base64") from None
    return body.encode("utf-8")
