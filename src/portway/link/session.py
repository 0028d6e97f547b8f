"""Runs a sans-I/O Mux over one transport at a time: the glue between asyncio and proto.mux.

One read callback feeds the mux, one coalesced flush per loop iteration writes what it produced, one
timer drives keepalive. Streams are conduits with the same interface as link.connection.Connection.

A link lost without a GO_AWAY parks the session (proto/resume.py): its MuxStreams stay, their writers wait for
window and their readers for data, until the role hands the session a new transport (``resume_on``), gives
the streams up (``abandon``), or the resume window passes and every stream is reset.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections import deque
from typing import Awaitable, Callable, Final, Protocol

from ..errors import ConduitReset, MuxClosedError, ProtocolError
from ..proto import events as ev
from ..proto.mux import Mux, MuxConfig, Role
from .connection import Buffer, Chunk, ReceiveBuffer, write_batch

log = logging.getLogger(__name__)


class StreamSink(Protocol):
    """Receives a stream's events as callbacks (see link.bridge), for a data path without tasks."""

    def stream_data(self, chunks: list[Chunk]) -> None: ...

    def stream_ended(self) -> None: ...

    def stream_reset(self) -> None: ...

    def window_opened(self) -> None: ...


class MuxStream(ReceiveBuffer):
    """One multiplexed stream, read and written like a connection (a conduit): owns the chunks the session
    delivered for it and not yet read, and the credit to return for them; its state (open, ended, reset) is the
    mux's, mirrored here for readers that await it. A sink (bridge.py) can take its data by callbacks instead."""

    __slots__ = (
        "session", "_loop", "stream_id", "_chunks", "_eof", "_reset", "_read_waiter", "_window_waiter",
        "_local_ended", "_closed", "_sink", "_undelivered", "_taken",
    )

    def __init__(self, session: "MuxSession", stream_id: int) -> None:
        self.session = session
        self._loop = session.loop
        self.stream_id = stream_id
        self._chunks: deque[Chunk] = deque()
        self._eof = False
        self._reset = False
        self._local_ended = False
        self._closed = False
        self._read_waiter: asyncio.Future[None] | None = None
        self._window_waiter: asyncio.Future[None] | None = None
        self._sink: StreamSink | None = None
        self._undelivered: list[Chunk] | None = None  # for the sink, from the link read being dispatched
        self._taken = 0  # bytes the reader took and has not come back for more since: credit not returned yet

    def attach(self, sink: "StreamSink") -> None:
        """Hand every event of this stream to `sink` from now on, instead of to `read_chunks()`; what arrived
        before is delivered at once."""
        self._return_credit()  # the sink returns credit for what it is handed; what was read before is done
        self._sink = sink
        if self._chunks:
            chunks = list(self._chunks)
            self._chunks.clear()
            sink.stream_data(chunks)
        if self._reset:
            sink.stream_reset()
        elif self._eof:
            sink.stream_ended()

    def detach(self) -> None:
        """Take the stream's events back from its sink: from now on they wait for read_chunks() again."""
        self._sink = None
        undelivered = self._undelivered
        if undelivered is not None:
            self._undelivered = None
            self._chunks.extend(undelivered)

    # fed by the session
    def _on_data(self, data: Chunk) -> None:
        if self._sink is not None:
            # held until the session has dispatched the whole link read: the frames one read brought for
            # this stream then leave in one vectored write
            undelivered = self._undelivered
            if undelivered is None:
                self._undelivered = [data]
                self.session.undelivered.append(self)
            else:
                undelivered.append(data)
            return
        self._chunks.append(data)
        self._wake_reader()

    def _deliver(self) -> None:
        chunks = self._undelivered
        if chunks is not None and self._sink is not None:
            self._undelivered = None
            self._sink.stream_data(chunks)

    # A sink may let go of the stream (detach, close) while it is handed the data delivered first: each of these
    # tells it the rest only if it is still the sink afterwards, and otherwise wakes a reader instead.
    def _on_end(self) -> None:
        self._eof = True
        sink = self._sink
        if sink is not None:
            self._deliver()
            if self._sink is sink:
                sink.stream_ended()
                return
        self._wake_reader()

    def _on_reset(self) -> None:
        self._reset = True
        self._eof = True
        self._closed = True
        sink = self._sink
        if sink is not None:
            self._deliver()
            if self._sink is sink:
                self._sink = None  # gone from the session: nothing more for it (see _forget)
                sink.stream_reset()
                return
        self._wake_reader()
        self._on_window()

    def _on_window(self) -> None:
        sink = self._sink
        if sink is not None:
            self._deliver()
            if self._sink is sink:
                sink.window_opened()
                return
        waiter = self._window_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # the conduit interface
    def _describe(self) -> str:
        return f"stream {self.stream_id}"

    # What one read_chunks() takes at most, so that credit follows what a slow reader actually drains.
    READ_BUDGET = 256 * 1024

    def poll_readable(self) -> "bool | asyncio.Future[None]":
        # A reader that comes back for more is done with what it took last (written out, its writer drained):
        # only now does that earn the peer credit, so bytes sitting in a slow visitor's write buffer still
        # count against the windows, and a link's windows bound all the relay holds for it.
        if self._taken:
            self._return_credit()
        return ReceiveBuffer.poll_readable(self)

    def _return_credit(self) -> None:
        taken, self._taken = self._taken, 0
        if taken and not self._closed:
            self.session.consumed(self.stream_id, taken)

    def reader_done(self) -> None:
        self._return_credit()  # an idle stream in a pool must not hold link credit back

    def put_back(self, chunks: list[Chunk]) -> None:
        self._taken -= sum(map(len, chunks))  # not consumed after all: their credit goes when they are
        ReceiveBuffer.put_back(self, chunks)

    def _take_chunks(self) -> list[Chunk]:
        pending = self._chunks
        chunks = [pending.popleft()]  # frames' payloads: joining them would copy every byte again
        taken = len(chunks[0])
        while pending and taken + len(pending[0]) <= self.READ_BUDGET:
            data = pending.popleft()
            chunks.append(data)
            taken += len(data)
        self._taken += taken
        return chunks

    async def send(self, data: Buffer) -> None:
        session = self.session
        view = data  # passed whole: the mux keeps a small payload as it is (a view only for what is left)
        while True:
            if self._reset or self._closed:
                raise ConduitReset(f"stream {self.stream_id} was reset")
            try:
                sent = session.mux.send_data(self.stream_id, view)
            except (KeyError, MuxClosedError, ProtocolError) as error:
                raise ConduitReset(f"stream {self.stream_id} is gone: {error}") from None
            session.schedule_flush()
            if sent == len(view):
                break
            view = memoryview(view)[sent:]
            self._window_waiter = self._loop.create_future()
            try:
                await self._window_waiter
            finally:
                self._window_waiter = None
        if session.writing_paused or session.ended:
            await session.drain()

    def send_now(self, data: Buffer) -> bool:
        """Queue `data` whole if the stream takes it without waiting (its window has room and the link's write
        buffer is not full); otherwise queue nothing and return False, for the caller to await send()."""
        session = self.session
        if self._reset or self._closed or session.writing_paused or session.ended:
            return False
        mux = session.mux
        if mux.send_window(self.stream_id) < len(data):
            return False
        mux.send_data(self.stream_id, data)
        session.schedule_flush()
        return True

    def write(self, data: Buffer) -> None:
        """Queue without waiting; only for small control writes (error pages) that fit the window."""
        if self._reset or self._closed:
            raise ConduitReset(f"stream {self.stream_id} was reset")
        sent = self.session.mux.send_data(self.stream_id, data)
        if sent != len(data):
            raise ConduitReset("write exceeded the stream window; use send()")
        self.session.schedule_flush()

    async def drain(self) -> None:
        await self.session.drain()

    def write_eof(self) -> None:
        if not self._local_ended and not self._closed:
            self._local_ended = True
            try:
                self.session.mux.end_stream(self.stream_id)
            except (KeyError, MuxClosedError, ProtocolError):
                pass
            self.session.schedule_flush()
            if self._eof:
                self._forget()

    def close(self) -> None:
        """Done with the stream: a clean close when both halves ended, else a reset."""
        if self._closed:
            return
        if self._eof and self._local_ended:
            self._forget()
        else:
            self.abort()

    def abort(self) -> None:
        if self._closed:
            return
        self._reset = True
        self._wake_reader()
        self._on_window()
        session = self.session
        try:
            session.mux.reset_stream(self.stream_id)
        except (KeyError, MuxClosedError, ProtocolError):
            pass
        session.schedule_flush()
        session.rearm_timer()  # link credit set aside for this stream may be due to another one now
        self._forget()

    def _forget(self) -> None:
        self._closed = True
        self.session.streams.pop(self.stream_id, None)
        # The sink (a bridge) refers to this stream too: unlinked now, the pair and the connection it holds are
        # freed as the stream ends, not piled up by the thousand (a connection each) for the cyclic collector.
        self._sink = None


_LONE_PASSES_BEFORE_WRITING_AT_ONCE: Final = 4
"""Deferred link writes in a row that each carried one send, before the session writes first sends at once."""


class LinkWrites:
    """This process's batched link writes that carried more than one send (of its sessions together): how busy
    the streams are, for runtime.SchedulingGovernor."""

    __slots__ = ("joined",)

    def __init__(self) -> None:
        self.joined = 0


LINK_WRITES: Final = LinkWrites()


def _flush_session(session: MuxSession) -> None:
    """A pass's batched link write (MuxSession.schedule_flush)."""
    if session._flush_scheduled:  # (a link read may have flushed it meanwhile)
        if session._batch_joined:
            session._lone_passes = 0
            LINK_WRITES.joined += 1
        else:
            session._lone_passes += 1
    session._batch_joined = False
    session._wrote_through = False
    session._flush_now()


class MuxSession(asyncio.Protocol):
    """An agent link: the asyncio protocol that owns a transport speaking the multiplexing protocol. Feeds what
    it reads to its sans-I/O Mux, dispatches the mux's events to its MuxStreams, writes what the mux has to send
    (batched per loop pass), and keeps the mux's one timer (keepalive) armed. `closed` resolves with the reason
    the link ended."""

    def __init__(
        self,
        role: Role,
        config: MuxConfig | None = None,
        on_stream: Callable[[MuxStream], Awaitable[None]] | None = None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        config = config or MuxConfig()
        # Every stream the peer opens is accepted as its event is dispatched, right after the read that brought
        # it: the mux's accept backlog (for applications that accept later) would only refuse the streams past
        # it that one read opened together (a burst of visitors), so the session's bound is max_streams.
        self.mux = Mux(role, dataclasses.replace(config, accept_backlog=config.max_streams), now=self.loop.time())
        self.streams: dict[int, MuxStream] = {}
        self.transport: asyncio.Transport | None = None
        self._on_stream = on_stream
        self._flush_scheduled = False
        # (schedule_flush) whether a send went out at once since the link was last read; deferred writes in a row
        # that carried one send each; whether another send joined the pending one
        self._wrote_through = False
        self._lone_passes = 0
        self._batch_joined = False
        # bound once: called per read, per consumption or once per loop pass (a method lookup each time otherwise)
        self._call_soon: Callable[..., object] = self.loop.call_soon
        self._clock: Callable[[], float] = self.loop.time
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._writing_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._writable_callbacks: list[Callable[[], None]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.undelivered: list[MuxStream] = []  # streams with data for their sink from the read being dispatched
        self.closed: asyncio.Future[str] = self.loop.create_future()
        self.ended = False  # the link is over for good (closed resolved): the one flag every check reads
        self._link_down: asyncio.Future[str] = self.loop.create_future()  # this link's end: parked or closed
        self.on_link_lost: Callable[[str], None] | None = None  # told why, when the link is lost and streams park
        self._exchange_done: asyncio.Future[None] | None = None  # while a resume exchange runs
        self.go_away_received = False
        self.on_go_away: Callable[[], None] | None = None  # called once the peer said it is going away
        self.moved_to: str | None = None  # the relay node is stopping and named this HOST:PORT to go to
        self.on_move: Callable[[str], None] | None = None  # called with it
        self.protocol_error = False  # the peer broke the frame protocol (the link was closed for it)

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._flush_now()  # the mux's opening words: the link window it grants, if above the protocol's base
        self._rearm_timer()

    def data_received(self, data: bytes) -> None:
        self._flush_scheduled = True  # what the streams send while this read is dispatched leaves at its end
        try:
            try:
                events = self.mux.receive_data(data, self._clock())
            except ProtocolError as error:
                log.warning("closing agent link: protocol error: %s", error)
                self._flush_now()
                self.protocol_error = True
                self._terminate(f"protocol error: {error}")
                return
            self._dispatch(events)
        finally:
            self._wrote_through = False
            self._flush_now()
        self._rearm_timer()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        reason = "link closed" if exc is None else f"link lost: {exc}"
        if self.may_park:
            self.transport = None
            self.mux.park(self.loop.time())
            self._parked(reason)
        else:
            self._shutdown(reason)

    # link loss and resume
    @property
    def may_park(self) -> bool:
        """Losing the link now parks the streams instead of ending them (see proto.mux.Mux.can_park)."""
        return not self.ended and not self.protocol_error and self.mux.can_park

    @property
    def parked(self) -> bool:
        """The link is lost and the streams wait for a new one (``resume_on``)."""
        return self.transport is None and self.mux.is_parked and not self.ended

    @property
    def resuming(self) -> bool:
        """A new link is up and the resume exchange on it has not finished: no stream can send or open yet."""
        return self._exchange_done is not None

    async def until_resumed(self) -> None:
        """Wait for the resume exchange under way (if any) to end: the streams carry on, or the link is lost."""
        if self._exchange_done is not None:
            await asyncio.shield(self._exchange_done)

    def _end_exchange(self) -> None:
        done, self._exchange_done = self._exchange_done, None
        if done is not None and not done.done():
            done.set_result(None)

    async def link_down(self) -> str:
        """Wait until the current link ends, parked or closed; returns why."""
        return await asyncio.shield(self._link_down)

    def detach(self, reason: str) -> None:
        """Let go of the current link (a new one replaces it) and park the streams: the old transport is
        hung up without a word, as if it had been lost."""
        transport = self.transport
        if transport is None or not self.may_park:
            return
        self.transport = None
        transport.set_protocol(asyncio.Protocol())  # its connection_lost must not reach this session
        transport.abort()
        self.mux.park(self.loop.time())
        self._parked(reason)

    def resume_on(self, transport: asyncio.Transport, link_bytes: bytes = b"") -> None:
        """Carry the parked streams on over a new link: the resume exchange starts at once; `link_bytes` are
        the first bytes already read from it."""
        self.transport = transport
        transport.set_protocol(self)
        self._link_down = self.loop.create_future()
        self._exchange_done = self.loop.create_future()
        self.mux.resume(self.loop.time())
        self._flush_now()
        if link_bytes:
            self.data_received(link_bytes)
        self._rearm_timer()

    def abandon(self) -> None:
        """Give the parked streams up at once (the peer no longer has them): each is reset, the session closes."""
        if not self.ended:
            self._dispatch(self.mux.abandon())
            self._shutdown("the peer no longer had the link's streams")

    def _parked(self, reason: str) -> None:
        # A stream the peer never answered was opened into the silence (a visitor's request sent after the link's
        # last word): nobody on the far side waits for it, and its visitor must hear within the keepalive bound,
        # not wait out the resume window. The streams the peer answered are parked for a resume.
        for stream_id in self.mux.unanswered_streams():
            self.mux.reset_stream(stream_id)
            stream = self.streams.pop(stream_id, None)
            if stream is not None:
                stream._on_reset()
        log.info("agent link lost (%s): %d streams wait up to %gs for a new link", reason, len(self.streams),
                 self.mux.config.resume_window)
        self.resume_writing()  # writers waiting for the old transport to drain now wait for window instead
        self._end_exchange()
        if not self._link_down.done():
            self._link_down.set_result(reason)
        if self.on_link_lost is not None:
            self.on_link_lost(reason)
        self._rearm_timer()

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
        callbacks, self._writable_callbacks = self._writable_callbacks, []
        for callback in callbacks:
            callback()

    @property
    def writing_paused(self) -> bool:
        return self._writing_paused

    def call_when_writable(self, callback: Callable[[], None]) -> None:
        """Call back once the link's write buffer has drained (or the link closed)."""
        self._writable_callbacks.append(callback)

    # for streams
    def open_stream(self) -> MuxStream:
        if self.transport is None or self.ended:
            raise MuxClosedError("the agent link is closed")
        stream_id = self.mux.open_stream()
        stream = MuxStream(self, stream_id)
        self.streams[stream_id] = stream
        self._defer_flush()  # the opener's first bytes follow at once, mostly: the open leaves with them
        return stream

    def consumed(self, stream_id: int, count: int) -> None:
        mux = self.mux
        try:
            mux.acknowledge_received(stream_id, count, self._clock())
        except (KeyError, MuxClosedError):
            return
        if mux.has_data_to_send:  # credit is returned in batches: most reads owe the peer nothing yet
            self.schedule_flush()

    async def drain(self) -> None:
        if self.ended:
            raise ConduitReset("the agent link is closed")
        if self._writing_paused:
            waiter = self.loop.create_future()
            self._drain_waiters.append(waiter)
            await waiter
            if self.ended:
                raise ConduitReset("the agent link is closed")

    def schedule_flush(self) -> None:
        """Link writes batched per loop pass, the way sshd and ssh write their channels: with many visitors the
        requests (relay) and responses (agent) of a pass share a writev instead of one each, and what a link
        read makes the streams send leaves at the end of that read. A batch waits for the rest of the pass (not
        a timer), which costs the loop a pass through its ready queue: when the last passes each batched one
        send only, the streams are taking turns (a WebSocket's messages, one request at a time), and the first
        send after each link read leaves at once instead. A second send before the next link read means
        they no longer do: it waits for the batch, and so do the sends after it until passes are lone again."""
        if self._flush_scheduled:
            self._batch_joined = True
            return
        if self._wrote_through:
            self._lone_passes = 0
        elif self._lone_passes >= _LONE_PASSES_BEFORE_WRITING_AT_ONCE:
            self._wrote_through = True
            self._flush_now()
            return
        self._defer_flush()

    def _defer_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._batch_joined = False
            self._call_soon(_flush_session, self)  # (not a bound method: no new object, no cycle through it)

    def _flush_now(self) -> None:
        self._flush_scheduled = False
        buffers = self.mux.buffers_to_send()
        if buffers and self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(buffers)

    def go_away(self) -> None:
        self.mux.go_away(0)
        self._flush_now()

    def move(self, address: str) -> None:
        """The relay's side: tell the agent to go to `address` (another node); the link carries on meanwhile."""
        self.mux.move(address)
        self._flush_now()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self._shutdown("closed locally")

    # internals
    def _dispatch(self, events: list[ev.Event]) -> None:
        streams = self.streams
        for event in events:
            if isinstance(event, ev.DataReceived):
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream._on_data(event.data)
                else:
                    # the app already forgot this stream; return the credit so the window stays honest
                    self.consumed(event.stream_id, len(event.data))
            elif isinstance(event, ev.WindowUpdated):
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream._on_window()
            elif isinstance(event, ev.StreamEnded):
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream._on_end()
                    if stream._local_ended:
                        stream._forget()
            elif isinstance(event, ev.StreamReset):
                stream = streams.pop(event.stream_id, None)
                if stream is not None:
                    stream._on_reset()
            elif isinstance(event, ev.StreamOpened):
                self._accept(event.stream_id)
            elif isinstance(event, ev.GoAwayReceived):
                self.go_away_received = True
                if self.on_go_away is not None:
                    self.on_go_away()
            elif isinstance(event, ev.MoveRequested):
                self.moved_to = event.address
                if self.on_move is not None:
                    self.on_move(event.address)
            elif isinstance(event, ev.ConnectionTerminated):
                self._terminate(event.reason)
            elif isinstance(event, ev.LinkLost):  # keepalive: the peer went silent and the mux parked the streams
                transport, self.transport = self.transport, None
                if transport is not None:
                    transport.set_protocol(asyncio.Protocol())
                    transport.abort()
                self._parked(event.reason)
            elif isinstance(event, ev.LinkResumed):
                self._end_exchange()
                log.info("agent link resumed: %d streams carry on, %d bytes sent again", event.streams,
                         event.resent)
            # StreamAccepted and PingAcked need no action here; the mux keeps the RTT.
        undelivered = self.undelivered
        if undelivered:
            self.undelivered = []
            # what the sinks write to their connections (the relay's answers to visitors) leaves after the last
            # of them, back to back (connection.WriteBatch)
            write_batch.begin()
            try:
                for stream in undelivered:
                    stream._deliver()
            finally:
                write_batch.end()

    def _accept(self, stream_id: int) -> None:
        if self._on_stream is None:
            self.mux.reset_stream(stream_id)
            return
        try:
            self.mux.accept_stream(stream_id)
        except KeyError:
            return  # opened and reset in the same read (legal): there is nothing left to serve
        stream = MuxStream(self, stream_id)
        self.streams[stream_id] = stream
        task: asyncio.Task[None] = asyncio.ensure_future(self._on_stream(stream))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def rearm_timer(self) -> None:
        """Fire the timer earlier if the mux now wants it earlier (after an API call that may change that)."""
        if not self.ended:
            self._rearm_timer()

    def _rearm_timer(self) -> None:
        when = self.mux.get_timer()
        if when is not None and self._timer_at is not None and when >= self._timer_at:
            # Every read moves the keepalive deadline later; firing early is harmless (the handler re-arms
            # for the deadline then due), while moving a uvloop timer on every read costs a libuv handle.
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = None if when is None else self.loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self._dispatch(self.mux.handle_timer(self.loop.time()))
        self._flush_now()
        if not self.ended:
            self._rearm_timer()

    def _terminate(self, reason: str) -> None:
        if self.transport is not None:
            self.transport.close()
        self._shutdown(reason)

    def _shutdown(self, reason: str) -> None:
        if self.ended:
            return
        self.ended = True
        self.closed.set_result(reason)
        if not self._link_down.done():
            self._link_down.set_result(reason)
        self._end_exchange()
        if self._timer is not None:
            self._timer.cancel()
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            stream._on_reset()
        self.resume_writing()
