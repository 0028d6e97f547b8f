"""Two established connections joined by callbacks, both ways: the relay's path for a visitor whose connection
switched protocols (a WebSocket) over an lt pool socket. It is bridge.py's shape with a socket on both ends:
bytes move inside the read callbacks, no task and no future per chunk.

Flow control is each side's own signal: while one side's write buffer is full, the other side is not read.
An end (FIN) is passed on, so each direction closes on its own; when one side is lost with an error (a reset),
the other is reset too, so the loss stays visible.
"""

from __future__ import annotations

import asyncio

from .connection import Connection, abort_with_reset


class _Side(asyncio.Protocol):
    """One connection of a pipe; what it reads goes to `peer`."""

    def __init__(self, pipe: "SocketPipe") -> None:
        self.pipe = pipe
        self.peer: _Side
        self.conn: Connection | None = None  # the protocol before the switch: told when the connection is gone
        self.transport: asyncio.Transport | None = None
        self.ended = False  # its other end finished sending
        self.lost = False
        self.tls = False

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if not peer.lost and peer.transport is not None:
            peer.transport.write(data)

    def eof_received(self) -> bool:
        self.ended = True
        peer = self.peer
        if peer.transport is not None and not peer.lost and peer.transport.can_write_eof():
            peer.transport.write_eof()
        self.pipe._maybe_done()
        return not self.tls  # keep our sending half open, the other direction may go on (TLS can't)

    def pause_writing(self) -> None:
        if self.peer.transport is not None and not self.peer.lost:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer.transport is not None and not self.peer.lost:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.ended = True
        if self.conn is not None:
            self.conn.connection_lost(exc)  # its owner's bookkeeping (an lt pool socket frees its slot)
        peer = self.peer
        if not peer.lost and peer.transport is not None:
            if exc is not None:
                abort_with_reset(peer.transport)
            else:
                peer.transport.close()  # after what is still buffered for it
        self.pipe._maybe_done()


class SocketPipe:
    """Owns the two connections from the switch on; `closed` resolves once both are gone."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.a = _Side(self)
        self.b = _Side(self)
        self.a.peer, self.b.peer = self.b, self.a
        self.closed: asyncio.Future[None] = loop.create_future()

    @classmethod
    def take_over(cls, a: Connection, b: Connection, a_unread: bytes = b"", b_unread: bytes = b"") -> "SocketPipe":
        """Go on with two established connections: `a_unread`/`b_unread` came from them before the switch,
        ahead of anything they still have buffered."""
        pipe = cls(asyncio.get_running_loop())
        states = []
        for side, conn in ((pipe.a, a), (pipe.b, b)):
            writing_paused = conn.must_drain  # the transport tells only its current protocol when it drains
            states.append((side, conn.hand_over(side), writing_paused))
            side.transport = conn.transport
            side.conn = conn
            side.tls = conn.transport is not None and conn.transport.get_extra_info("sslcontext") is not None
        for (side, (buffered, ended, lost), writing_paused), unread in zip(states, (a_unread, b_unread)):
            if lost:
                side.lost = True
                continue
            for data in (unread, buffered):
                if data:
                    side.data_received(data)
            if writing_paused:
                side.pause_writing()
            if ended:
                side.eof_received()
        for side, (_, _, lost), _ in states:
            if lost:
                side.conn = None  # it was told already
                side.connection_lost(None)
        return pipe

    def _maybe_done(self) -> None:
        a, b = self.a, self.b
        if a.lost and b.lost:
            if not self.closed.done():
                self.closed.set_result(None)
        elif a.ended and b.ended:
            for side in (a, b):  # both directions finished: nothing more can cross
                if not side.lost and side.transport is not None:
                    side.transport.close()
