"""The relay's public edge: one visitor connection, request by request, each routed by its own Host.

Every decision (parsing, framing, routing) comes from proto/; this module moves bytes between the
visitor and a conduit and keeps the two sides' framing honest: a response cut short reaches the
visitor cut short (connection reset), never as a complete-looking answer.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING

from ..errors import HttpError
from ..proto import http1
from ..proto.http1 import MESSAGE_END, Body, BodyFraming, RequestHead, ResponseHead, Switched
from ..proto.pages import error_response
from ..proto.routing import NotServed, ToRelay
from .bridge import StreamBridge
from .connection import ConduitReset, Connection, splice
from .deadlines import Deadline
from .session import MuxStream

if TYPE_CHECKING:
    from .relay import Relay

log = logging.getLogger(__name__)


class VisitorGone(Exception):
    """The visitor closed or reset its connection; nothing more can be sent to it."""


class CloseAfterResponse(Exception):
    """The exchange finished in a way that leaves the visitor connection unusable."""


class VisitorConnection:
    """Drives one visitor connection; `pending` holds parsed events not yet acted on."""

    def __init__(self, relay: "Relay", conn: Connection, scheme: str) -> None:
        self.relay = relay
        self.conn = conn
        self.scheme = scheme
        self.parser = http1.RequestParser()
        self.pending: deque[object] = deque()
        self.loop = asyncio.get_running_loop()
        self.deadline = Deadline(self.loop)  # watched by the relay's sweeper while the connection lives

    async def _read_and_parse(self) -> None:
        conn = self.conn
        try:
            while (readable := conn.poll_readable()) is not True:
                if readable is False:
                    raise VisitorGone
                await readable
        except ConduitReset:
            raise VisitorGone from None
        self.pending.extend(self.parser.feed(conn.take_buffered()))

    async def next_event(self) -> object:
        while not self.pending:
            await self._read_and_parse()
        return self.pending.popleft()

    async def next_head(self) -> RequestHead:
        """The next request head: an idle connection may wait idle_timeout for its first byte, then the
        whole head must arrive within head_timeout (a slowloris can't hold a connection open)."""
        if self.pending:
            head = self.pending.popleft()
            assert isinstance(head, RequestHead)
            return head
        config = self.relay.config
        deadline = self.deadline
        deadline.arm(config.idle_timeout, self.conn.close)
        started = False
        try:
            while not self.pending:
                await self._read_and_parse()
                if not started and not self.pending:
                    started = True
                    deadline.arm(config.head_timeout, self._head_timed_out)
        finally:
            deadline.disarm()
        head = self.pending.popleft()
        assert isinstance(head, RequestHead)
        return head

    def _head_timed_out(self) -> None:
        self.send_error(408, "The request head did not arrive in time.", close=True)
        self.conn.close()

    async def serve(self) -> None:
        conn = self.conn
        try:
            while True:
                head = await self.next_head()
                if not await self.handle(head):
                    break
        except VisitorGone:
            pass
        except HttpError as error:
            self.send_error(error.status, error.message, close=True)
        except CloseAfterResponse:
            pass
        finally:
            conn.close()

    def send_error(self, status: int, message: str, *, close: bool,
                   extra_headers: list[tuple[str, str]] | None = None, head_only: bool = False) -> None:
        self.send(error_response(status, message, close=close, extra_headers=extra_headers), head_only=head_only)

    def send(self, response: bytes, *, head_only: bool = False) -> None:
        """Write a response the relay made itself; `head_only` for HEAD, whose answer has no body
        (RFC 9110 §9.3.2): a body there would desync the visitor's next response."""
        if head_only:
            response = response[: response.index(b"\r\n\r\n") + 4]
        try:
            self.conn.write(response)
        except ConduitReset:
            pass

    async def handle(self, head: RequestHead) -> bool:
        """Serve one request; returns whether the connection may carry another."""
        relay = self.relay
        route = relay.router.route(head.host)
        if isinstance(route, ToRelay):
            return await relay.serve_own(self, head)
        if isinstance(route, NotServed):
            return await self.refuse(head, 404, f"No tunnel is served at {route.hostname} by this relay.")
        tunnel = relay.registry.get(route.name)
        if tunnel is None:
            hostname = f"{route.name}.{relay.router.domain}"
            return await self.refuse(head, 404, f"There is no tunnel at {hostname}.")
        try:
            relay.admit(tunnel, self.conn.peer_ip, head)
        except HttpError as error:
            extra = [("WWW-Authenticate", f'Basic realm="{tunnel.name}"')] if error.status == 401 else error.headers
            return await self.refuse(head, error.status, error.message, extra_headers=extra)
        if not tunnel.online:
            return await self.refuse(head, 502, f"The agent for tunnel {tunnel.name!r} is not connected.")
        tunnel.requests += 1
        return await self.exchange(head, tunnel)

    async def skip_body(self, head: RequestHead) -> bool:
        """Read and drop a request body we answer ourselves; False if it can't be skipped cheaply."""
        if head.upgrade is not None:
            return False
        while True:
            event = await self.next_event()
            if event is MESSAGE_END:
                return True
            if isinstance(event, Switched):
                return False

    async def refuse(self, head: RequestHead, status: int, message: str,
                     extra_headers: list[tuple[str, str]] | None = None) -> bool:
        small_body = head.framing is BodyFraming.NONE or (
            head.framing is BodyFraming.LENGTH and head.content_length <= 64 * 1024
        )
        keep = head.keep_alive and small_body and head.upgrade is None
        if keep:
            keep = await self.skip_body(head)
        self.send_error(status, message, close=not keep, extra_headers=extra_headers, head_only=head.method == "HEAD")
        return keep

    async def exchange(self, head: RequestHead, tunnel) -> bool:
        relay = self.relay
        request_bytes = http1.encode_request_head(
            head, peer_ip=self.conn.peer_ip, scheme=self.scheme,
            drop_authorization=tunnel.access.basic_auth is not None,
        )
        retry_allowed = head.framing is BodyFraming.NONE and head.upgrade is None
        request_complete: bool | None = None
        while True:
            try:
                idle = tunnel.take_idle()
                if idle is not None:
                    conduit, reused = idle, True
                else:
                    conduit, reused = await asyncio.wait_for(tunnel.acquire(), relay.config.pool_wait_timeout)
            except asyncio.TimeoutError:
                return await self.refuse(
                    head, 503, f"Tunnel {tunnel.name!r} is busy: no connection to its origin became free in time."
                )
            except HttpError as error:
                return await self.refuse(head, error.status, error.message)
            try:
                await conduit.send(request_bytes)
            except ConduitReset:
                conduit.close()
                if reused:
                    continue
                return await self.refuse(head, 502, f"The agent for tunnel {tunnel.name!r} went away.")
            may_retry = reused and retry_allowed
            if retry_allowed and self.pending and self.pending[0] is MESSAGE_END:
                # no body to upload: the common GET needs no second task
                self.pending.popleft()
                request_complete = True
            if request_complete is not None:
                try:
                    outcome = await self.forward_response(head, conduit, may_retry)
                except _RetryOnFreshConduit:
                    conduit.close()
                    continue
                except BaseException:
                    conduit.abort()
                    raise
            else:
                response = asyncio.ensure_future(self.forward_response(head, conduit, may_retry))
                try:
                    request_complete = await self.forward_request_body(head, conduit)
                    outcome = await response
                except _RetryOnFreshConduit:
                    conduit.close()
                    continue
                except BaseException:
                    response.cancel()
                    conduit.abort()
                    raise
            if isinstance(outcome, Switched):
                await self.switch_protocols(conduit, outcome)
                return False
            reusable = outcome and request_complete and not conduit.has_unread
            tunnel.release(conduit, reusable)
            return outcome and request_complete and head.keep_alive

    async def forward_request_body(self, head: RequestHead, conduit) -> bool:
        """Send the rest of the request; returns whether it ended as an HTTP message."""
        chunked = head.framing is BodyFraming.CHUNKED
        while True:
            event = await self.next_event()
            if event is MESSAGE_END:
                if chunked:
                    await conduit.send(http1.LAST_CHUNK)
                if head.upgrade is None:
                    return True
                continue
            if isinstance(event, Body):
                try:
                    await conduit.send(http1.encode_chunk(event.data) if chunked else event.data)
                except ConduitReset:
                    # the origin gave up on the upload; its answer (or the reset) reaches the visitor
                    await self._drain_until_end()
                    return False
            elif isinstance(event, Switched):
                self.pending.appendleft(event)
                return False

    async def _drain_until_end(self) -> None:
        while True:
            event = await self.next_event()
            if event is MESSAGE_END or isinstance(event, Switched):
                return

    async def forward_response(self, request: RequestHead, conduit, may_retry: bool):
        """Copy the response to the visitor; returns keep-alive (bool) or the Switched event."""
        conn = self.conn
        parser = http1.ResponseParser(request.method)
        sent_head = False
        chunked_out = False
        keep_alive = False
        received_any = False
        timeout = self.relay.config.response_timeout
        timed_out = False

        def give_up() -> None:
            nonlocal timed_out
            timed_out = True
            conduit.abort()

        deadline = self.deadline
        deadline.arm(timeout, give_up)
        try:
            while True:
                try:
                    chunks = await conduit.read_chunks()
                    if chunks:
                        received_any = True
                        events = parser.feed(chunks[0])
                        for index in range(1, len(chunks)):
                            if parser.complete:
                                rest = chunks[index:]
                                if parser.switched:
                                    # the origin's first raw bytes after its 101 reach the visitor first
                                    events[-1] = Switched(events[-1].trailing + b"".join(rest))
                                else:
                                    # stray bytes after the response: left unread, the conduit is not reused
                                    conduit.put_back(rest)
                                break
                            events += parser.feed(chunks[index])
                    else:
                        events = parser.feed_eof()
                except (ConduitReset, HttpError) as error:
                    if not sent_head:
                        if timed_out:
                            self.send_error(504, f"The origin did not answer within {timeout:g} s.", close=True)
                            raise CloseAfterResponse from None
                        if may_retry and not received_any:
                            raise _RetryOnFreshConduit from None
                        status = error.status if isinstance(error, HttpError) else 502
                        message = (error.message if isinstance(error, HttpError)
                                   else "The tunnel's agent went away before the origin answered.")
                        self.send_error(status, message, close=True)
                        raise CloseAfterResponse from None
                    conn.abort()  # mid-body: the visitor must see the answer as cut short
                    raise CloseAfterResponse from None
                out: list[bytes] = []  # one write per read from the conduit: head and body leave together
                try:
                    for event in events:
                        if isinstance(event, Body):
                            out.append(http1.encode_chunk(event.data) if chunked_out else event.data)
                        elif event is MESSAGE_END:
                            if chunked_out:
                                out.append(http1.LAST_CHUNK)
                            return keep_alive
                        elif isinstance(event, ResponseHead):
                            if event.informational:
                                out.append(http1.encode_response_head(event, framing=BodyFraming.NONE,
                                                                      keep_alive=True))
                                continue
                            framing = event.framing
                            if event.status == 101:
                                keep_alive = False
                            elif framing is BodyFraming.UNTIL_CLOSE and request.http_version == "1.1":
                                framing = BodyFraming.CHUNKED
                                keep_alive = request.keep_alive
                            else:
                                keep_alive = event.keep_alive and request.keep_alive
                            chunked_out = framing is BodyFraming.CHUNKED
                            out.append(http1.encode_response_head(event, framing=framing, keep_alive=keep_alive))
                            sent_head = True
                            deadline.disarm()
                        elif isinstance(event, Switched):
                            return event
                finally:
                    if out:
                        try:
                            conn.writelines(out)
                        except ConduitReset:
                            raise VisitorGone from None
                if conn.must_drain:
                    try:
                        await conn.drain()
                    except ConduitReset:
                        raise VisitorGone from None
        finally:
            deadline.disarm()  # also when cancelled: a stale deadline must not abort a pooled conduit

    async def switch_protocols(self, conduit, response_switch: Switched) -> None:
        """After a 101: raw bytes both ways, including any that arrived with either head."""
        conn = self.conn
        if response_switch.trailing:
            conn.write(response_switch.trailing)
        leftover = [event for event in self.pending if isinstance(event, Switched)]
        unread = leftover[0].trailing if leftover else b""
        self.pending.clear()
        if isinstance(conduit, MuxStream):
            await StreamBridge.take_over(conn, conduit, unread).closed
            return
        if unread:
            await conduit.send(unread)
        await splice(conn, conduit)


class _RetryOnFreshConduit(Exception):
    """A reused keep-alive conduit was closed by the origin before it saw our request."""
