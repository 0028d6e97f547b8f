"""The relay's public edge: one visitor connection, request by request, each routed by its own Host.

Every decision (parsing, framing, routing) comes from proto/; this module moves bytes between the
visitor and a conduit and keeps the two sides' framing honest: a response cut short reaches the
visitor cut short (connection reset), never as a complete-looking answer.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Final

from ..auth import BasicAuthGuard
from ..errors import ConduitReset, HttpError, VisitorGone
from ..policy.admission import Admission
from ..proto import exchange, http1
from ..proto.http1 import MESSAGE_END, Body, BodyFraming, RequestHead, Switched
from ..proto.pages import error_response
from ..proto.routing import NotServed, OneTunnel, Router, ToRelay, ToTunnel
from ..link.connection import Buffer, Chunk, Connection
from ..link.deadlines import Deadline
from ..link.session import MuxStream
from .access_log import AccessLog
from .metrics import RelayCounters, TunnelCounters
from .tunnels import AgentTunnel

log = logging.getLogger(__name__)


class CloseAfterResponse(Exception):
    """The exchange finished in a way that leaves the visitor connection unusable."""


# What a connection served from callbacks needs its task for (the result of the future the task sleeps on):
TASK_SERVES: Final = 0  # the request first in `pending` (a body, an upgrade, a refusal, a retry, no idle conduit...)
TASK_ENDS: Final = 1  # nothing more: the answer said so, the relay is draining, or an error answer went out
TASK_GONE: Final = 2  # the visitor's connection is gone
TASK_REFUSES: Final = 3  # the visitor sent a malformed request
TASK_DRAINS: Final = 4  # the answer is out but waits in a full write buffer: drain it, then release the conduit

# which deadline waits for the next request head while callbacks serve: none yet, the idle one, the head one
_NOT_WAITING: Final = 0
_WAITING_IDLE: Final = 1
_WAITING_HEAD: Final = 2


class Drain:
    """Set once when the relay starts stopping gracefully; each visitor connection checks it after every
    exchange (a plain flag: an asyncio.Event's is_set() was a Python call per request)."""

    __slots__ = ("started",)

    def __init__(self) -> None:
        self.started = False

    def start(self) -> None:
        self.started = True


@dataclass(frozen=True, slots=True)
class FrontServices:
    """What a relay hands each visitor connection: its settings, how hosts route, the registry, its own
    endpoints (for requests to the relay's host), and where counts and log lines go."""

    config: Any
    router: Router | OneTunnel
    registry: Any
    serve_own: Callable[["VisitorConnection", RequestHead], Awaitable[bool]]
    counters: RelayCounters
    guard: BasicAuthGuard
    access_log: AccessLog | None = None
    draining: Drain = field(default_factory=Drain)
    admission: Admission | None = None  # per-address caps: an upgrade moves a connection to its own count
    nodes: Any = None  # the cluster's other nodes, for tunnels held there (None: not in a cluster)


class VisitorConnection:
    """One visitor connection, request by request: parses each head, routes it by its own Host, refuses or
    forwards it over a conduit to the tunnel's origin, and copies the answer back with the relay's framing.
    Owns the connection's parser, its queue of parsed events not yet acted on (`pending`) and its deadline,
    which the relay's sweep watches while the connection lives."""

    def __init__(self, conn: Connection, scheme: str, services: FrontServices) -> None:
        self.conn = conn
        self.scheme = scheme
        self.forwarded = http1.forwarded_fields(conn.peer_ip, scheme)  # the same in each request it forwards
        self.config = services.config
        self.router = services.router
        self.registry = services.registry
        self.serve_own = services.serve_own
        self.counters = services.counters
        self.guard = services.guard
        self.access_log = services.access_log
        self.draining = services.draining
        self.admission = services.admission
        self.nodes = services.nodes
        self.idle = False  # waiting for the first byte of a request: a draining relay closes it at once
        self.served = 0  # requests handled: an idle connection that served one is a keep-alive one
        self.upgraded = False  # switched protocols (a WebSocket, an agent link): counted as upgraded
        self.carries_agent_link = False  # became an agent's link (agents.py): not an exchange a drain waits for
        # what the request being served came to: its answer's status and the bytes each way (for metrics)
        self.status = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.switched = False
        self.parser = http1.RequestParser()
        self.answer_parser: http1.ResponseParser | None = None  # the last answer's, reused for the next one
        self.pending: deque[object] = deque()
        self.loop = asyncio.get_running_loop()
        self.clock: Callable[[], float] = self.loop.time  # bound once: a method lookup on the loop per call otherwise
        # read per request: native floats here, where the config (a Python class) costs an attribute lookup each
        self.idle_timeout: float = self.config.idle_timeout
        self.head_timeout: float = self.config.head_timeout
        self.response_timeout: float = self.config.response_timeout
        self.deadline = Deadline(self.loop)
        # Served from callbacks (the common request, see InlineExchange), the task sleeps on `task_needed`
        self.task_needed: asyncio.Future[int] | None = None
        self.inline: InlineExchange | None = None  # the exchange in flight, served from callbacks
        self.draining_inline: InlineExchange | None = None  # one whose answer waits for the task to drain it
        self.refusal: HttpError | None = None  # a malformed request met between exchanges, for the task
        self.waiting = _NOT_WAITING

    def _parse_or_waiter(self) -> "asyncio.Future[None] | None":
        """Parse what the visitor sent into `pending`, or return the future to await for more first. Readers
        loop on this inline: a coroutine per read would cost one per request."""
        try:
            readable = self.conn.poll_readable()
        except ConduitReset:
            raise VisitorGone from None
        if readable is True:
            self.pending.extend(self.parser.feed(self.conn.take_buffered()))
            return None
        if readable is False:
            raise VisitorGone
        return readable

    async def next_event(self) -> object:
        pending = self.pending
        while not pending:
            if (waiter := self._parse_or_waiter()) is not None:
                await waiter
        return pending.popleft()

    async def next_head(self) -> RequestHead:
        """The next request head: an idle connection may wait idle_timeout for its first byte, then the
        whole head must arrive within head_timeout (a slowloris can't hold a connection open)."""
        if self.pending:
            head = self.pending.popleft()
            assert isinstance(head, RequestHead)
            return head
        deadline = self.deadline
        deadline.arm(self.idle_timeout, self.conn.close)
        started = False
        self.idle = True
        pending = self.pending
        try:
            while not pending:
                if (waiter := self._parse_or_waiter()) is not None:
                    await waiter
                    continue
                self.idle = False
                if not started and not pending:
                    started = True
                    deadline.arm(self.head_timeout, self._head_timed_out)
        finally:
            self.idle = False
            deadline.disarm()
        head = self.pending.popleft()
        assert isinstance(head, RequestHead)
        return head

    def response_parser(self, request: RequestHead) -> http1.ResponseParser:
        """A parser for the answer to `request`: the previous answer's when it can go on (a connection's
        exchanges come one at a time, and a new llhttp parser costs about as much as parsing a small answer)."""
        parser = self.answer_parser
        if parser is not None:
            if parser.restart(request.method, request.upgrade):
                return parser
            parser.close()
        parser = self.answer_parser = http1.ResponseParser(request.method, request.upgrade, reusable=True)
        return parser

    def upgrade_refusal(self) -> str | None:
        """Why this connection may not become an upgraded one (the address holds too many), or None."""
        if self.admission is None:
            return None
        refusal = self.admission.may_upgrade(self.conn.peer_ip)
        return None if refusal is None else refusal.value

    def mark_upgraded(self) -> None:
        """The connection switched protocols: from now on it counts against the address's upgraded cap."""
        if not self.upgraded and self.admission is not None:
            self.admission.upgraded(self.conn.peer_ip)
        self.upgraded = True

    def _head_timed_out(self) -> None:
        self.send_error(408, "The request head did not arrive in time.", close=True)
        self.conn.close()

    async def serve(self) -> None:
        conn = self.conn
        try:
            try:
                while True:
                    # common requests are served from callbacks, with no step of this task; it wakes for the rest
                    step = await self.serve_from_callbacks()
                    if step == TASK_ENDS:
                        break
                    if step == TASK_GONE:
                        raise VisitorGone
                    if step == TASK_REFUSES:
                        refusal, self.refusal = self.refusal, None
                        assert refusal is not None
                        raise refusal
                    if step == TASK_DRAINS:
                        if not await self.drain_inline() or self.draining.started:
                            break
                        continue
                    head = await self.next_head()
                    self.served += 1
                    # a draining relay finishes the exchange under way, then closes: no new one starts
                    if not await self.handle(head) or self.draining.started:
                        break
            except HttpError as error:
                self.counters.protocol_errors["visitor"] += 1
                self.send_error(error.status, error.message, close=True)
            except CloseAfterResponse:
                pass
            if self.parser.mid_message:
                await self.linger()
        except VisitorGone:
            pass
        finally:
            conn.on_change = None  # the connection no longer calls back into this object (no cycle left behind)
            if self.inline is not None:  # cancelled with an exchange in flight
                self.inline.abandon(TASK_GONE)
            conn.close()
            self.parser.close()
            if self.answer_parser is not None:
                self.answer_parser.close()

    # Serving from callbacks. A connection's requests are mostly plain ones to a tunnel of this relay's own agents:
    # those are parsed, routed and forwarded inside the visitor's read callback, and their answers copied inside
    # the conduit's (InlineExchange), so a request costs no task step and no future. Everything else, and
    # whatever has to wait, goes to the connection's task: the exact same code serves it there.
    def serve_from_callbacks(self) -> "asyncio.Future[int]":
        """Serve requests from callbacks until one needs the task; returns the future that says what for."""
        needed = self.task_needed = self.loop.create_future()
        self.conn.on_change = self._visitor_changed
        self.serve_buffered()
        return needed

    def _visitor_changed(self) -> None:
        inline = self.inline
        if inline is not None:
            inline.visitor_changed()
        elif self.task_needed is not None:
            self.serve_buffered()

    def serve_buffered(self) -> None:
        """Between exchanges: parse what the visitor sent, and serve its next request inline or hand it to the
        task. The deadlines are next_head()'s: idle_timeout for a first byte, then head_timeout for the head."""
        pending = self.pending
        conn = self.conn
        if not pending:
            try:
                buffered = conn.poll_buffered()
            except ConduitReset:
                buffered = False
            if buffered is None:
                if self.waiting == _NOT_WAITING:
                    self.waiting = _WAITING_IDLE
                    self.idle = True
                    self.deadline.arm(self.idle_timeout, conn.close)
                return
            if buffered is False:
                self.hand_to_task(TASK_GONE)
                return
            self.idle = False
            try:
                pending.extend(self.parser.feed(conn.take_buffered()))
            except HttpError as error:
                self.refusal = error
                self.hand_to_task(TASK_REFUSES)
                return
            if not pending:
                if self.waiting != _WAITING_HEAD:
                    self.waiting = _WAITING_HEAD
                    self.deadline.arm(self.head_timeout, self._head_timed_out)
                return
        self.waiting = _NOT_WAITING
        self.deadline.disarm()
        head = pending[0]
        try:
            started = isinstance(head, RequestHead) and self._start_inline(head)
        except HttpError:  # a Host the router refuses: the task meets the same refusal and answers it
            started = False
        if not started:
            self.hand_to_task(TASK_SERVES)

    def _start_inline(self, head: RequestHead) -> bool:
        """Start serving `head` from callbacks if it is a plain request: no body, no upgrade, to an online
        tunnel of an agent of this relay with no access rules, over an idle conduit whose window takes the
        request now. Refusals, uploads, waits for a conduit and the cluster's tunnels are the task's."""
        pending = self.pending
        if head.upgrade is not None or len(pending) < 2 or pending[1] is not MESSAGE_END:
            return False
        route = self.router.route(head.host)
        if not isinstance(route, ToTunnel):
            return False
        found = self.registry.get(route.name)
        if type(found) is not AgentTunnel:
            return False
        tunnel: AgentTunnel = found  # typed: its attributes are then read natively (the registry's are Any)
        if not tunnel.online or (self.nodes is not None and tunnel.agent_leaving):
            return False  # (a cluster node forwards the visitors of an agent that moved away: nodes.py)
        access = tunnel.access
        if access.requires_login or access.allow_networks:
            return False
        conduit = tunnel.take_idle()
        if conduit is None:
            return False
        request = http1.encode_request_head(head, forwarded=self.forwarded)
        if not (isinstance(conduit, MuxStream) and conduit.send_now(request)):
            tunnel.release(conduit, True)  # not used: back to the pool
            return False
        pending.popleft()
        pending.popleft()
        self.served += 1
        self.status = self.bytes_in = self.bytes_out = 0
        self.switched = False
        inline = self.inline = InlineExchange(self, head, tunnel, conduit)
        self.deadline.arm(self.response_timeout, inline.give_up)
        conduit.attach(inline)
        return True

    def hand_to_task(self, step: int) -> None:
        """Stop serving from callbacks and wake the task with `step`."""
        self.conn.on_change = None
        self.deadline.disarm()
        self.waiting = _NOT_WAITING
        self.idle = False
        needed, self.task_needed = self.task_needed, None
        if needed is not None and not needed.done():
            needed.set_result(step)

    def retry_in_task(self, head: RequestHead) -> None:
        """An idle conduit turned out closed before its origin saw `head`: the task sends it again (as its own
        exchange() does), on another idle conduit or a fresh one."""
        self.pending.appendleft(MESSAGE_END)
        self.pending.appendleft(head)
        self.served -= 1  # counted again when the task takes it
        self.hand_to_task(TASK_SERVES)

    async def drain_inline(self) -> bool:
        """The inline exchange's answer is complete but waits in the visitor's write buffer: once it has left,
        the conduit goes back (its credit with it, as after forward_response()). Whether the visitor continues."""
        inline, self.draining_inline = self.draining_inline, None
        assert inline is not None
        try:
            await self.conn.drain()
        except ConduitReset:
            inline.conduit.close()
            self.account(inline.head, inline.tunnel, inline.started)
            raise VisitorGone from None
        except BaseException:
            inline.conduit.abort()
            raise
        return inline.release()

    def account(self, head: RequestHead, tunnel: Any, started: float) -> None:
        """Count a finished exchange: the tunnel's metrics, the request duration, the access log."""
        duration = self.clock() - started
        if tunnel is not None:
            counters: TunnelCounters = tunnel.counters  # typed: counted natively (`tunnel` is any kind of tunnel)
            if self.status:
                counters.answers[RelayCounters.status_index(self.status)] += 1
            counters.bytes_from_visitors += self.bytes_in
            counters.bytes_to_visitors += self.bytes_out
            self.counters.request_duration.observe(duration)
        if self.access_log is not None:
            self.access_log.record(client=self.conn.peer_ip, method=head.method, host=head.host,
                                   target=head.target, status=self.status, duration=duration,
                                   sent=self.bytes_out, websocket=self.switched)

    async def linger(self) -> None:
        """The relay answered before the visitor finished sending its request: end our side after the answer
        and drop what still arrives for at most linger_timeout, so the visitor reads the answer instead of a
        reset (closing with unread bytes sends RST, which may destroy the answer in flight). Then close."""
        conn = self.conn
        conn.write_eof()
        self.deadline.arm(self.config.linger_timeout, conn.abort)
        try:
            while await conn.read():
                pass
        except ConduitReset:
            pass
        finally:
            self.deadline.disarm()

    def send_error(self, status: int, message: str, *, close: bool,
                   extra_headers: list[tuple[str, str]] | None = None, head_only: bool = False) -> None:
        self.status = status
        self.send(error_response(status, message, close=close, extra_headers=extra_headers), head_only=head_only)

    def answer_origin_failure(self, error: HttpError | None) -> None:
        """The conduit failed before the answer's head reached the visitor (`error`: the origin's answer was
        malformed; None: the stream was reset or ended early): say why, and close."""
        if error is None:
            self.send_error(502, "The tunnel's agent went away before the origin answered.", close=True)
        else:
            self.counters.protocol_errors["origin"] += 1
            self.send_error(error.status, error.message, close=True)

    def answer_timed_out(self) -> None:
        self.send_error(504, f"The origin did not answer within {self.response_timeout:g} s.", close=True)

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
        route = self.router.route(head.host)
        if isinstance(route, ToRelay):
            self.counters.unrouted_requests += 1
            return await self.serve_own(self, head)
        tunnel = self.registry.get(route.name) if isinstance(route, ToTunnel) else None
        started = self.loop.time()
        self.status = self.bytes_in = self.bytes_out = 0
        self.switched = False
        try:
            if self.nodes is not None and isinstance(route, ToTunnel) and (
                    tunnel is None or not tunnel.online or tunnel.agent_leaving):
                # held by another node of the cluster? then it is served from here over a node link (nodes.py);
                # so is a name whose agent, away from this node, came back on another one, or moved to another
                # (it said GO_AWAY here, and this node has not yet seen its name go)
                try:
                    tunnel = await self.nodes.find(route.name) or tunnel
                except HttpError as error:
                    if tunnel is None:
                        self.counters.unrouted_requests += 1
                        return await self.refuse(head, error.status, error.message)
            if tunnel is None:
                self.counters.unrouted_requests += 1
                if isinstance(route, NotServed):
                    return await self.refuse(head, 404, f"No tunnel is served at {route.hostname} by this relay.")
                return await self.refuse(head, 404, f"There is no tunnel at {route.name}.{self.router.domain}.")
            access = tunnel.access
            try:
                if access.requires_login or access.allow_networks:  # most tunnels have no rules
                    access.check(self.conn.peer_ip, head, self.guard, tunnel.name, self.loop.time())
            except HttpError as error:
                extra = error.headers
                if error.status == 401:
                    extra = [("WWW-Authenticate", f'Basic realm="{tunnel.name}"')]
                    if head.header(b"authorization") is not None:
                        self.counters.auth_failures["basic"] += 1
                return await self.refuse(head, error.status, error.message, extra_headers=extra)
            if head.upgrade is not None and (refused := self.upgrade_refusal()) is not None:
                self.counters.refused_connections["upgraded"] += 1
                return await self.refuse(head, 429, refused)
            if not tunnel.online:
                # the name is held for an agent whose link dropped (its grace period): it is on its way back
                return await self.refuse(head, 502, f"The agent for tunnel {tunnel.name!r} is not connected (agent "
                                         "reconnecting); try again in a moment.", [("Retry-After", "2")])
            return await self.exchange(head, tunnel)
        finally:
            self.account(head, tunnel, started)

    async def skip_body(self, head: RequestHead) -> bool:
        """Read and drop a request body we answer ourselves; False if it can't be skipped cheaply. The rest of
        the request must arrive within head_timeout: a body declared and never sent can't hold the connection."""
        if head.upgrade is not None:
            return False
        if self.pending and self.pending[0] is MESSAGE_END:
            self.pending.popleft()
            return True
        self.deadline.arm(self.head_timeout, self.conn.close)
        try:
            while True:
                event = await self.next_event()
                if event is MESSAGE_END:
                    return True
                if isinstance(event, Switched):
                    return False
        finally:
            self.deadline.disarm()

    async def refuse(self, head: RequestHead, status: int, message: str,
                     extra_headers: list[tuple[str, str]] | None = None, *, fully_read: bool = False) -> bool:
        """Answer a request the relay won't forward. The answer goes out at once; a small body is then skipped
        to keep the connection (a visitor waiting on `Expect: 100-continue` gets the answer and a close).
        `fully_read`: the request's end was consumed already (a retry after its first conduit failed)."""
        keep = exchange.refusal_keeps_connection(head)
        self.send_error(status, message, close=not keep, extra_headers=extra_headers, head_only=head.method == "HEAD")
        return keep and (fully_read or await self.skip_body(head))

    async def exchange(self, head: RequestHead, tunnel) -> bool:
        request_bytes = http1.encode_request_head(
            head, forwarded=self.forwarded, drop_authorization=tunnel.access.requires_login,
        )
        retry_allowed = exchange.retry_allowed(head)
        request_complete: bool | None = None
        while True:
            try:
                idle = tunnel.take_idle()
                if idle is not None:
                    conduit, reused = idle, True
                else:
                    conduit, reused = await asyncio.wait_for(tunnel.acquire(), self.config.pool_wait_timeout)
            except asyncio.TimeoutError:
                return await self.refuse(
                    head, 503, f"Tunnel {tunnel.name!r} is busy: no connection to its origin became free in time.",
                    fully_read=request_complete is True)
            except HttpError as error:
                return await self.refuse(head, error.status, error.message, fully_read=request_complete is True)
            try:
                await conduit.send(request_bytes)
            except ConduitReset:
                conduit.close()
                if reused:
                    continue
                return await self.refuse(head, 502, f"The agent for tunnel {tunnel.name!r} went away.",
                                         fully_read=request_complete is True)
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
                upload = asyncio.ensure_future(self.forward_request_body(head, conduit))
                try:
                    await asyncio.wait((response, upload), return_when=asyncio.FIRST_COMPLETED)
                    if upload.done():
                        request_complete = upload.result()
                    else:
                        # answered (or gave up: 504, 502) before the whole request came: the rest of it is not
                        # read any more, and the connection closes after the answer
                        upload.cancel()
                        request_complete = False
                    outcome = await response
                except _RetryOnFreshConduit:
                    conduit.close()
                    continue
                except BaseException:
                    response.cancel()
                    upload.cancel()
                    conduit.abort()
                    raise
            if isinstance(outcome, Switched):
                await self.switch_protocols(tunnel, conduit, outcome)
                return False
            if self.conn.must_drain:
                # the answer's last batch still waits for a slow visitor: the stream's credit for it goes back
                # only once it has left (release), so what a link holds for slow visitors stays counted
                try:
                    await self.conn.drain()
                except ConduitReset:
                    conduit.close()
                    raise VisitorGone from None
            tunnel.release(conduit, exchange.conduit_reusable(outcome, request_complete, conduit.has_unread))
            return exchange.visitor_continues(head, outcome, request_complete)

    async def forward_request_body(self, head: RequestHead, conduit) -> bool:
        """Send the rest of the request; returns whether it ended as an HTTP message."""
        chunked = head.framing is BodyFraming.CHUNKED
        try:
            while True:
                event = await self.next_event()
                if event is MESSAGE_END:
                    if chunked:
                        await conduit.send(http1.LAST_CHUNK)
                    if head.upgrade is None:
                        return True
                    continue
                if isinstance(event, Body):
                    self.bytes_in += len(event.data)
                    await conduit.send(http1.encode_chunk(event.data) if chunked else event.data)
                elif isinstance(event, Switched):
                    self.pending.appendleft(event)
                    return False
        except ConduitReset:
            # the origin gave up on the upload; its answer (or the reset) reaches the visitor, and the rest of
            # the body is not read (the connection closes after the answer)
            return False

    async def forward_response(self, request: RequestHead, conduit, may_retry: bool):
        """Copy the response to the visitor; returns keep-alive (bool) or the Switched event."""
        conn = self.conn
        parser = self.response_parser(request)
        reframer = exchange.ResponseReframer(request)
        received_any = False
        timeout = self.response_timeout
        timed_out = False

        def give_up() -> None:
            nonlocal timed_out
            timed_out = True
            conduit.abort()
            if reframer.sent_head:
                conn.abort()  # also wakes a write to a visitor that stopped reading

        # The origin must start answering within response_timeout, and once it has, it may not fall silent
        # (nor the visitor stop reading) for that long either: every state of the exchange has a deadline.
        deadline = self.deadline
        deadline.arm(timeout, give_up)
        try:
            while True:
                try:
                    while type(chunks := conduit.chunks_or_waiter()) is not list:  # inline: no coroutine per read
                        await chunks
                    if chunks:
                        received_any = True
                        events = parser.feed(chunks[0])
                        for index in range(1, len(chunks)):
                            if parser.complete:
                                rest = chunks[index:]
                                if parser.switched:
                                    # the origin's first raw bytes after its 101 reach the visitor first
                                    switched = events[-1]
                                    assert isinstance(switched, Switched)
                                    events[-1] = Switched(switched.trailing + b"".join(rest))
                                else:
                                    # stray bytes after the response: left unread, the conduit is not reused
                                    conduit.put_back(rest)
                                break
                            events += parser.feed(chunks[index])
                    else:
                        events = parser.feed_eof()
                except (ConduitReset, HttpError) as error:
                    if not reframer.sent_head:
                        if timed_out:
                            self.answer_timed_out()
                            raise CloseAfterResponse from None
                        if may_retry and not received_any:
                            raise _RetryOnFreshConduit from None
                        self.answer_origin_failure(error if isinstance(error, HttpError) else None)
                        raise CloseAfterResponse from None
                    conn.abort()  # mid-body: the visitor must see the answer as cut short
                    raise CloseAfterResponse from None
                out: list[Buffer] = []  # one write per read from the conduit: head and body leave together
                ended = reframer.reframe(events, out)
                if reframer.sent_head:
                    self.status = reframer.status
                if out:
                    self.write_answer(out)
                if ended is MESSAGE_END:
                    return reframer.keep_alive
                if ended is not None:
                    return ended  # Switched
                if reframer.sent_head:
                    deadline.arm(timeout, give_up)
                if conn.must_drain:
                    try:
                        await conn.drain()
                    except ConduitReset:
                        raise VisitorGone from None
        finally:
            deadline.disarm()  # also when cancelled: a stale deadline must not abort a pooled conduit

    def write_answer(self, out: list[Buffer]) -> None:
        """Write one batch of the answer to the visitor (counted); VisitorGone if the connection is gone."""
        for piece in out:
            self.bytes_out += len(piece)
        try:
            self.conn.writelines(out)
        except ConduitReset:
            raise VisitorGone from None

    async def switch_protocols(self, tunnel, conduit, response_switch: Switched) -> None:
        """After a 101: raw bytes both ways, including any that arrived with either head."""
        conn = self.conn
        if response_switch.trailing:
            try:
                conn.write(response_switch.trailing)
            except ConduitReset:
                conduit.abort()  # nobody else will end the stream: its agent side is bridged to the origin
                raise VisitorGone from None
        leftover = [event for event in self.pending if isinstance(event, Switched)]
        unread = leftover[0].trailing if leftover else b""
        self.pending.clear()
        self.switched = True
        self.mark_upgraded()
        counters = tunnel.counters
        counters.websockets_open += 1
        counters.websockets_total += 1
        try:
            await tunnel.join(conn, conduit, unread)
        finally:
            counters.websockets_open -= 1


class _RetryOnFreshConduit(Exception):
    """A reused keep-alive conduit was closed by the origin before it saw our request."""


class InlineExchange:
    """One plain exchange served from callbacks: the request went out whole on an idle conduit, and this is the
    conduit's sink (link/session.py's StreamSink) while the answer comes back, parsed and re-framed for the
    visitor as forward_response() does it, with the same deadlines and the same answers to every failure.
    What has to wait (an answer still in a full write buffer, a retry on a fresh conduit) goes to the
    visitor's task."""

    def __init__(self, visitor: VisitorConnection, head: RequestHead, tunnel: AgentTunnel, conduit: MuxStream) -> None:
        self.visitor = visitor
        self.head = head
        self.tunnel = tunnel
        self.conduit = conduit
        self.parser = visitor.response_parser(head)
        self.reframer = exchange.ResponseReframer(head)
        self.started = visitor.clock()
        self.received_any = False
        self.stray = False  # the origin sent bytes past its answer: the conduit is not reused
        self.credit_held = 0  # answer bytes written while the visitor's write buffer was full
        self.over = False

    # the conduit's events
    def stream_data(self, chunks: list[Chunk]) -> None:
        if self.over:
            return
        self.received_any = True
        parser = self.parser
        size = 0
        events: list[object] = []
        try:
            for chunk in chunks:
                if parser.complete:
                    self.stray = True
                    break
                size += len(chunk)
                events += parser.feed(chunk)
        except HttpError as error:
            self._failed(error)
            return
        self._forward(events, size)

    def stream_ended(self) -> None:
        if self.over:
            return
        try:
            events = self.parser.feed_eof()
        except HttpError as error:
            self._failed(error)
            return
        self._forward(events, 0)

    def stream_reset(self) -> None:
        if not self.over:
            self._failed(None)

    def window_opened(self) -> None:
        pass  # the request went out whole: nothing waits for window

    # the visitor's connection
    def visitor_changed(self) -> None:
        conn = self.visitor.conn
        if conn.lost:
            self.abandon(TASK_GONE)
        elif self.credit_held and not conn.must_drain:
            held, self.credit_held = self.credit_held, 0
            self.conduit.session.consumed(self.conduit.stream_id, held)

    def give_up(self) -> None:
        """The origin did not answer, or fell silent, or the visitor stopped reading, for response_timeout."""
        if self.over:
            return
        visitor = self.visitor
        if self.reframer.sent_head:
            visitor.conn.abort()  # mid-body: the visitor must see the answer as cut short
        else:
            visitor.answer_timed_out()
        self.abandon(TASK_ENDS)

    def _forward(self, events: list[object], size: int) -> None:
        visitor = self.visitor
        conn = visitor.conn
        out: list[Buffer] = []  # one write per delivery from the conduit: head and body leave together
        reframer = self.reframer
        complete = reframer.reframe(events, out) is MESSAGE_END  # (no Switched: a plain request asks none)
        if reframer.sent_head:
            visitor.status = reframer.status
        if out:
            try:
                visitor.write_answer(out)
            except VisitorGone:
                self.abandon(TASK_GONE)
                return
        if size:
            if conn.must_drain:
                self.credit_held += size  # given back once the visitor reads: the peer stops sending meanwhile
            else:
                self.conduit.session.consumed(self.conduit.stream_id, size)
        if complete:
            self._complete()
        elif reframer.sent_head:
            visitor.deadline.arm(visitor.response_timeout, self.give_up)

    def _failed(self, error: HttpError | None) -> None:
        """The conduit was reset or ended early, or the origin's answer was malformed (`error`)."""
        visitor = self.visitor
        if not self.reframer.sent_head:
            if not self.received_any:
                # an idle conduit whose origin connection had closed: the request goes again on another one
                self._end()
                self.conduit.close()
                visitor.retry_in_task(self.head)
                return
            visitor.answer_origin_failure(error)
        else:
            visitor.conn.abort()  # mid-body: the visitor must see the answer as cut short
        self.abandon(TASK_ENDS)

    def _complete(self) -> None:
        visitor = self.visitor
        self._end()
        if visitor.conn.must_drain:
            visitor.draining_inline = self
            visitor.hand_to_task(TASK_DRAINS)
            return
        if not self.release() or visitor.draining.started:
            visitor.hand_to_task(TASK_ENDS)
        else:
            visitor.serve_buffered()  # the next request, if it came already

    def release(self) -> bool:
        """The answer has left: the conduit goes back to the pool if it can serve again, with the credit still
        held for it, and the exchange is counted. Returns whether the visitor's connection goes on."""
        conduit = self.conduit
        held, self.credit_held = self.credit_held, 0
        if held:
            conduit.session.consumed(conduit.stream_id, held)
        self.tunnel.release(conduit, exchange.conduit_reusable(self.reframer.keep_alive, True,
                                                                conduit.has_unread or self.stray))
        self.visitor.account(self.head, self.tunnel, self.started)
        return exchange.visitor_continues(self.head, self.reframer.keep_alive, True)

    def abandon(self, step: int) -> None:
        """End the exchange as failed: reset the conduit, count the exchange, wake the task with `step`."""
        if self.over:
            return
        self._end()
        self.conduit.abort()
        visitor = self.visitor
        visitor.account(self.head, self.tunnel, self.started)
        visitor.hand_to_task(step)

    def _end(self) -> None:
        """No longer the conduit's sink, nor the visitor's exchange in flight; the response deadline is off."""
        self.over = True
        self.conduit.detach()
        visitor = self.visitor
        visitor.inline = None
        visitor.deadline.disarm()
