"""The rules of one HTTP exchange through the relay: what framing the visitor gets, whether the connection and
the conduit to the origin carry another request, when a request may be retried, when a refused request's body
is worth skipping. Pure decisions on parsed heads; relay/front.py moves the bytes.
"""

from __future__ import annotations

from typing import Final
from . import http1
from .http1 import MESSAGE_END, Body, BodyFraming, RequestHead, ResponseHead, Switched

SKIPPABLE_BODY: Final = 64 * 1024
"""Largest declared body the relay reads and drops to keep a connection after refusing its request."""


def response_framing(request: RequestHead, response: ResponseHead) -> tuple[BodyFraming, bool]:
    """The framing of the answer as the visitor receives it, and whether the visitor's connection stays open.

    A close-delimited answer to an HTTP/1.1 request is re-framed as chunked, so it no longer needs the close to
    end; an HTTP/1.0 visitor can't read chunked and gets it close-delimited. After a 101 the connection is no
    longer HTTP.
    """
    if response.status == 101:
        return response.framing, False
    if response.framing is BodyFraming.UNTIL_CLOSE and request.http_version == "1.1":
        return BodyFraming.CHUNKED, request.keep_alive
    return response.framing, response.keep_alive and request.keep_alive


class ResponseReframer:
    """Turns the parsed events of an origin's answer into the bytes the visitor receives: every head re-encoded
    with the framing response_framing() chose, the body re-chunked when that framing is chunked. Remembers what
    the exchange needs once the answer ends: its status, whether the head went out, and keep-alive."""

    __slots__ = ("request", "status", "sent_head", "chunked_out", "keep_alive")

    def __init__(self, request: RequestHead) -> None:
        self.request = request
        self.status = 0
        self.sent_head = False  # the final head went out: a failure from here on must look cut short
        self.chunked_out = False
        self.keep_alive = False

    def reframe(self, events: list[object], out: list[bytes | bytearray | memoryview]) -> object | None:
        """Append the visitor's bytes for `events` to `out`. Returns MESSAGE_END once the answer ended, the
        Switched event if the connection switched protocols (events after either are not read), else None."""
        for event in events:
            if isinstance(event, Body):
                out.append(http1.encode_chunk(event.data) if self.chunked_out else event.data)
            elif event is MESSAGE_END:
                if self.chunked_out:
                    out.append(http1.LAST_CHUNK)
                return MESSAGE_END
            elif isinstance(event, ResponseHead):
                if event.informational:
                    out.append(http1.encode_response_head(event, framing=BodyFraming.NONE, keep_alive=True))
                    continue
                framing, self.keep_alive = response_framing(self.request, event)
                self.status = event.status
                self.chunked_out = framing is BodyFraming.CHUNKED
                out.append(http1.encode_response_head(event, framing=framing, keep_alive=self.keep_alive))
                self.sent_head = True
            elif isinstance(event, Switched):
                return event
        return None


def retry_allowed(request: RequestHead) -> bool:
    """Whether the request may be sent again on a fresh conduit when a reused one turns out closed before the
    origin answered: only one with no body to replay and no protocol switch under way."""
    return request.framing is BodyFraming.NONE and request.upgrade is None


def refusal_keeps_connection(request: RequestHead) -> bool:
    """After refusing `request` (401, 404…), whether to skip its body and keep the connection: only for a
    keep-alive request with at most SKIPPABLE_BODY declared bytes and no upgrade. A visitor waiting on
    `Expect: 100-continue` may never send its body, so that connection closes after the answer."""
    if not request.keep_alive or request.upgrade is not None:
        return False
    if request.framing is BodyFraming.NONE:
        return True
    if request.framing is not BodyFraming.LENGTH or request.content_length > SKIPPABLE_BODY:
        return False
    return request.header(b"expect") is None


def conduit_reusable(response_keep_alive: bool, request_complete: bool, unread_from_origin: bool) -> bool:
    """Whether the conduit may serve the next request to this tunnel: the answer ended cleanly with keep-alive,
    the whole request reached the origin, and the origin sent nothing past its answer."""
    return response_keep_alive and request_complete and not unread_from_origin


def visitor_continues(request: RequestHead, response_keep_alive: bool, request_complete: bool) -> bool:
    """Whether the visitor's connection carries another request after this exchange."""
    return response_keep_alive and request_complete and request.keep_alive
