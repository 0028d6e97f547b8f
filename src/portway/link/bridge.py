"""One multiplexed stream joined to one TCP connection, driven by callbacks alone: the agent's data path
(stream <-> local service) and the relay's once a visitor's connection switched protocols
(visitor <-> stream).

Every request and every WebSocket message crosses the agent twice; a task per direction would cost a
future, a wake-up and a task step each time. Here bytes move inside the read callbacks, and flow
control is the two sides' own signals ("service" below is whatever the TCP connection leads to):
- service -> stream: what the stream window can't take yet waits here, and the service connection
  stops being read until the window opens (and while the agent link's write buffer is full);
- stream -> service: credit goes back to the peer as bytes are handed to the service connection,
  and is held back while that connection's write buffer is full, so the peer stops sending.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from ..errors import MuxClosedError, ProtocolError
from .connection import Chunk, Connection, abort_with_reset, set_nodelay
from .session import MuxStream


class BridgeTap(Protocol):
    """Sees a copy of what crosses a bridge (the inspector's); never raises."""

    def to_service(self, chunks: list[Chunk]) -> None: ...

    def to_visitor(self, data: bytes) -> None: ...

    def closed(self) -> None: ...


class StreamBridge(asyncio.Protocol):
    """One stream joined to one TCP connection (the agent's local service, or a visitor after a 101). Owns the
    connection's transport from then on; tracks which side has ended, the service bytes the stream window can't
    take yet, and the credit held back while the connection's write buffer is full. `closed` resolves when the
    connection is gone."""

    def __init__(self, stream: MuxStream) -> None:
        self.stream = stream
        self.session = stream.session
        self.tap: BridgeTap | None = None  # the inspector's, when it is on
        self.closed: asyncio.Future[None] = stream.session.loop.create_future()  # the connection is gone
        self.transport: asyncio.Transport | None = None
        self._unsent: memoryview | None = None  # service bytes the stream window could not take yet
        self._service_ended = False  # the service finished sending (FIN to forward after _unsent)
        self._stream_ended = False  # the relay finished sending
        self._service_writing_paused = False
        self._credit_held = 0  # stream bytes handed over while the service's write buffer was full
        self._reading_paused = False
        self._waiting_for_link = False
        self._closed = False

    # the service connection (asyncio.Protocol)
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        set_nodelay(transport)
        self.stream.attach(self)

    @property
    def _tls(self) -> bool:
        return self.transport is not None and self.transport.get_extra_info("sslcontext") is not None

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        if self.tap is not None:
            self.tap.to_visitor(data)
        self._send(data)

    def eof_received(self) -> bool:
        self._service_ended = True
        if self._unsent is None:
            self._end_stream()
        return not self._tls  # keep our sending half open, the other side may still send (TLS can't half-close)

    @classmethod
    def take_over(cls, conn: Connection, stream: MuxStream, unread: bytes = b"") -> "StreamBridge":
        """Go on with an established connection as a bridge: `unread` came from it before the switch,
        ahead of anything it still has buffered."""
        bridge = cls(stream)
        writing_paused = conn.must_drain  # the transport tells only its current protocol when it drains
        buffered, ended, lost = conn.hand_over(bridge)
        bridge.transport = conn.transport
        bridge._service_writing_paused = writing_paused and not lost
        stream.attach(bridge)
        # one piece: what the stream window can't take yet waits as the bridge's only unsent remainder
        early = unread + buffered if unread and buffered else unread or buffered
        if early:
            bridge.data_received(early)
        if lost:
            bridge.connection_lost(None)
        elif ended:
            bridge.eof_received()
        return bridge

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        if self.tap is not None:
            self.tap.closed()
        if self._closed:
            return
        self._closed = True
        stream = self.stream
        if exc is None and self._service_ended and self._unsent is None and self._stream_ended:
            stream.close()  # both directions finished: a clean close
        else:
            stream.abort()  # the service went away with something unfinished: the visitor must see a reset

    def pause_writing(self) -> None:
        self._service_writing_paused = True

    def resume_writing(self) -> None:
        self._service_writing_paused = False
        held, self._credit_held = self._credit_held, 0
        if held and not self._closed:
            self.session.consumed(self.stream.stream_id, held)

    # service -> stream
    def _send(self, view: bytes | memoryview) -> bool:
        """Hand service bytes to the stream; returns whether the stream window took them all."""
        session = self.session
        try:
            sent = session.mux.send_data(self.stream.stream_id, view)
        except (KeyError, ValueError, MuxClosedError, ProtocolError):
            self._abort()
            return True  # nothing is left to send: the bridge is gone
        session.schedule_flush()
        if sent < len(view):
            self._unsent = memoryview(view)[sent:]
            self._pause_reading()
            return False
        if session.writing_paused and not self._waiting_for_link:
            self._waiting_for_link = True
            self._pause_reading()
            session.call_when_writable(self._link_writable)
        return True

    def window_opened(self) -> None:
        view = self._unsent
        if view is None or self._closed:
            return
        self._unsent = None
        # what _send says, not a second look at self._unsent: compiled, that read would still be typed None
        if self._send(view):
            if self._service_ended:
                self._end_stream()
            elif not self._waiting_for_link:
                self._resume_reading()

    def _link_writable(self) -> None:
        self._waiting_for_link = False
        if self._unsent is None and not self._closed:
            self._resume_reading()

    def _end_stream(self) -> None:
        self.stream.write_eof()
        self._maybe_finished()

    # stream -> service
    def stream_data(self, chunks: list[Chunk]) -> None:
        transport = self.transport
        if self._closed or transport is None or transport.is_closing():
            return
        if self.tap is not None:
            self.tap.to_service(chunks)
        if len(chunks) == 1:
            size = len(chunks[0])
            transport.write(chunks[0])
        else:
            size = sum(map(len, chunks))
            transport.writelines(chunks)
        if self._service_writing_paused:
            self._credit_held += size
        else:
            self.session.consumed(self.stream.stream_id, size)

    def stream_ended(self) -> None:
        self._stream_ended = True
        transport = self.transport
        if transport is not None and not self._closed and transport.can_write_eof():
            try:
                transport.write_eof()
            except OSError:
                pass
        self._maybe_finished()

    def stream_reset(self) -> None:
        self._abort()

    # helpers
    def _maybe_finished(self) -> None:
        if self._stream_ended and self._service_ended and self._unsent is None and not self._closed:
            self._closed = True
            self.stream.close()
            if self.transport is not None:
                self.transport.close()

    def _abort(self) -> None:
        """Reset both sides: the service connection with a TCP reset, the stream with RST."""
        if self._closed:
            return
        self._closed = True
        self.stream.abort()
        if self.transport is not None:
            abort_with_reset(self.transport)

    def _pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._reading_paused and self.transport is not None and not self._closed:
            self._reading_paused = False
            self.transport.resume_reading()
