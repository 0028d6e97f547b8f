"""A TCP (or TLS) connection as an awaitable byte pipe, with backpressure both ways.

Used for visitors, origin connections, localtunnel pool sockets and the agent's dial-out before it
switches to the multiplexer. Reads return whatever has arrived (no per-chunk task or copy beyond
one join); reading pauses once HIGH_WATER bytes sit unread, writing callers await `drain()`.
"""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from typing import Callable, Final

from mypy_extensions import mypyc_attr

from ..errors import ConduitReset

Chunk = bytes | memoryview
"""What a read hands out: a connection's reads are bytes, a stream's payloads may be views of its link's read."""
Buffer = bytes | bytearray | memoryview
"""What a write takes (the types are checked at run time where this module is compiled: see setup.py)."""


def set_nodelay(transport: asyncio.BaseTransport) -> None:
    """Small writes (a request, a WebSocket message) must leave at once, not wait for Nagle."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


def abort_with_reset(transport: asyncio.WriteTransport) -> None:
    """Close with a TCP reset, so the other side sees an error rather than a clean end."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        except (OSError, ValueError):  # ValueError: uvloop's stand-in for a socket that is already closed
            pass
    transport.abort()


BATCH_HOLDS_UP_TO: Final = 64 * 1024
"""Bytes a WriteBatch holds in all: small answers are batched, bulk bodies go straight through."""


class WriteBatch:
    """Connection writes held while one read of a multiplexed link is dispatched, then made back to back.

    One link read brings the answers for many visitors. Written as each is parsed, every write wakes the load's
    reader (on loopback, onto the writer's own CPU, which it then takes over), and each pass of the relay moves a
    few answers; written together after the read, as sshd writes its channels after a poll, the reader wakes once
    for many, and so do the agent and the origin behind it. `begin()`/`end()` nest. What is held leaves at the
    outermost `end()`, before any other use of a connection's transport (close, EOF, abort, hand-over) and before
    a write that would take the batch past BATCH_HOLDS_UP_TO, so each connection's bytes keep their order; the
    bound also caps how stale `Connection.must_drain` can be for a writer inside the batch."""

    def __init__(self) -> None:
        self.depth = 0
        self.held_bytes = 0
        self._writes: list[tuple[asyncio.Transport, list[Buffer]]] = []

    def begin(self) -> None:
        self.depth += 1

    def end(self) -> None:
        self.depth -= 1
        if self.depth == 0 and self._writes:
            self.flush()

    def hold(self, transport: asyncio.Transport, buffers: list[Buffer], size: int) -> bool:
        """Keep `buffers` for `transport` until the batch ends; False (and everything held already written) if
        no batch is open or they would take it past BATCH_HOLDS_UP_TO: then the caller writes them itself."""
        if self.depth == 0:
            return False
        if self.held_bytes + size > BATCH_HOLDS_UP_TO:
            self.flush()
            return False
        self.held_bytes += size
        self._writes.append((transport, buffers))
        return True

    def flush(self) -> None:
        writes = self._writes
        if not writes:
            return
        self._writes = []
        self.held_bytes = 0
        for transport, buffers in writes:
            if not transport.is_closing():  # (a transport lost meanwhile: its connection raised for later writes)
                transport.writelines(buffers)


write_batch: Final = WriteBatch()
"""The batch of the process's event loop (Portway runs one): link sessions open it around their deliveries."""


@mypyc_attr(allow_interpreted_subclasses=True)  # conduits in tests; compiled, the class would refuse them
class ReceiveBuffer:
    """Bytes that arrived and were not read yet, and a way to wait for more: shared by every conduit."""

    __slots__ = ()
    _loop: asyncio.AbstractEventLoop
    _chunks: deque[Chunk]
    _eof: bool
    _reset: bool
    _read_waiter: asyncio.Future[None] | None

    def _wake_reader(self) -> None:
        waiter = self._read_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    @property
    def at_eof(self) -> bool:
        return self._eof and not self._chunks

    @property
    def has_unread(self) -> bool:
        return bool(self._chunks) or self._eof

    def poll_buffered(self) -> bool | None:
        """True once a chunk is buffered, False at a clean end, None while neither; raises ConduitReset after
        an abort. For a reader driven by callbacks, which has no future to wait on."""
        if self._chunks:
            return True
        if self._reset:
            raise ConduitReset(f"{self._describe()} was reset")
        if self._eof:
            return False
        return None

    def poll_readable(self) -> "bool | asyncio.Future[None]":
        """What poll_buffered() says, or instead of None a future to await for the next change. Readers loop on
        it inline: a helper coroutine per read would cost a coroutine object on every request."""
        state = self.poll_buffered()
        if state is not None:
            return state
        waiter = self._read_waiter = self._loop.create_future()  # type: ignore[misc]  # slots: in the classes
        return waiter

    async def read_chunks(self) -> list[Chunk]:
        """The chunks that have arrived (at least one; a stream hands out at most its READ_BUDGET bytes at a
        time), or [] at a clean end; raises ConduitReset after an abort. The chunks stay apart, so they can
        leave in one vectored write without being joined."""
        while not isinstance(chunks := self.chunks_or_waiter(), list):
            await chunks
        return chunks

    def chunks_or_waiter(self) -> "list[Chunk] | asyncio.Future[None]":
        """What read_chunks() returns if it can return now, else the future to await before asking again: a
        reader on the hot path loops on this inline instead of creating a coroutine per read."""
        readable = self.poll_readable()
        if readable is True:
            return self._take_chunks()
        return [] if readable is False else readable

    def _take_chunks(self) -> list[Chunk]:
        raise NotImplementedError

    def put_back(self, chunks: list[Chunk]) -> None:
        """Return chunks `read_chunks()` gave but the reader will not use, so that the conduit shows unread
        bytes and is not reused."""
        self._chunks.extendleft(reversed(chunks))

    def reader_done(self) -> None:
        """The reader has finished with everything it took (a stream returns the credit it held back for it);
        called when a conduit goes back to its pool."""

    def _describe(self) -> str:
        return "the connection"


@mypyc_attr(allow_interpreted_subclasses=True)  # lt pool sockets, TCP visitors (not the hot visitors: see on_made)
class Connection(ReceiveBuffer, asyncio.Protocol):
    """A TCP (or TLS) connection as a conduit: owns its transport and the bytes read from it not yet taken
    (reading pauses past HIGH_WATER), and tracks the peer's end, a reset, and whether writes must wait (`drain`).
    Visitors' connections, lt pool sockets and the agent's dial-out before its link starts are Connections."""

    HIGH_WATER = 128 * 1024
    """Reading pauses past this much unread, so at most one socket read (uvloop's are up to 256 KiB) waits beyond
    it, and what a reader takes is usually one chunk, not a join of several. At 512 KiB a visitor's 200 MB upload
    kept ~2 MiB more in the relay (the chunks read ahead, their join, the parser's copy of it) for no throughput."""

    def __init__(self, on_made: Callable[[Connection], object] | None = None) -> None:
        self.transport: asyncio.Transport | None = None
        # called once the connection is made (for TLS, once its handshake is done): how the relay starts serving a
        # visitor without an interpreted subclass, whose every method call compiled code would make through Python
        self._on_made = on_made
        self._chunks: deque[Chunk] = deque()
        self._buffered = 0
        self._eof = False
        self._lost = False
        self._reset = False
        self._reading_paused = False
        self._read_waiter: asyncio.Future[None] | None = None
        self._write_waiter: asyncio.Future[None] | None = None
        self._writing_paused = False
        self._tls = False
        self.peer_ip = ""
        # a reader driven by callbacks instead of awaiting reads (the relay's front, relay/front.py): called on
        # every change a reader or writer waits for (bytes, the end, the loss, the write buffer draining)
        self.on_change: Callable[[], None] | None = None
        self._loop = asyncio.get_running_loop()  # looked up once: get_running_loop costs a getpid() per call
        self.closed = self._loop.create_future()

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._tls = transport.get_extra_info("sslcontext") is not None
        set_nodelay(transport)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.peer_ip = peer[0]
        if self._on_made is not None:
            self._on_made(self)

    def data_received(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > self.HIGH_WATER and not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake_reader()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake_reader()
        # keep our sending half open, the peer may still be reading; TLS can't half-close (asyncio would warn)
        return not self._tls

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self._lost = True
        if exc is not None and isinstance(exc, (ConnectionResetError, BrokenPipeError)):
            self._reset = True
        self._wake_reader()
        if self._write_waiter is not None and not self._write_waiter.done():
            self._write_waiter.set_result(None)
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._write_waiter is not None and not self._write_waiter.done():
            self._write_waiter.set_result(None)
        if self.on_change is not None:
            self.on_change()

    def _wake_reader(self) -> None:
        if self.on_change is not None:
            self.on_change()
        else:
            ReceiveBuffer._wake_reader(self)

    # the conduit interface
    async def read(self) -> bytes:
        """Everything that has arrived, or b"" at end of stream; raises ConduitReset on abort."""
        while (readable := self.poll_readable()) is not True:
            if readable is False:
                return b""
            await readable
        return self.take_buffered()

    @property
    def lost(self) -> bool:
        """The connection is gone (closed by either side, or reset)."""
        return self._lost

    @property
    def must_drain(self) -> bool:
        """Whether a writer has to await drain(): the write buffer is full, or the connection is gone."""
        return self._writing_paused or self._lost

    def take_buffered(self) -> bytes:
        chunks = self._chunks
        if len(chunks) == 1:  # a request in one read, mostly: taken as it is, without a list or a copy
            chunk = chunks.popleft()
            data = chunk if isinstance(chunk, bytes) else bytes(chunk)
        else:
            data = b"".join(chunks)
            chunks.clear()
        self._all_taken()
        return data

    def _take_chunks(self) -> list[Chunk]:
        chunks = list(self._chunks)
        self._chunks.clear()
        self._all_taken()
        return chunks

    def _all_taken(self) -> None:
        self._buffered = 0
        if self._reading_paused and self.transport is not None and not self._lost:
            self._reading_paused = False
            self.transport.resume_reading()

    def hand_over(self, protocol: asyncio.Protocol) -> tuple[bytes, bool, bool]:
        """Give the transport to another protocol; returns what arrived unread, whether the peer ended
        its side, and whether the connection is already gone."""
        data = self.take_buffered() if self._chunks else b""
        write_batch.flush()  # the new protocol may write to the transport itself: what this one wrote goes first
        if self.transport is not None and not self._lost:
            self.transport.set_protocol(protocol)
        return data, self._eof, self._lost

    def write(self, data: Buffer) -> None:
        if self._lost or self.transport is None:
            raise ConduitReset("connection already closed")
        if not write_batch.hold(self.transport, [data], len(data)):
            self.transport.write(data)

    def writelines(self, buffers: list[Buffer]) -> None:
        if self._lost or self.transport is None:
            raise ConduitReset("connection already closed")
        if write_batch.depth:  # (sized only inside a batch: most writes are made outside one)
            size = 0
            for buffer in buffers:
                size += len(buffer)
            if write_batch.hold(self.transport, buffers, size):
                return
        self.transport.writelines(buffers)

    async def drain(self) -> None:
        if self._lost:
            raise ConduitReset("connection already closed")
        if self._writing_paused:
            self._write_waiter = self._loop.create_future()
            try:
                await self._write_waiter
            finally:
                self._write_waiter = None
            if self._lost:
                raise ConduitReset("connection closed while writing")

    async def send(self, data: Buffer) -> None:
        self.write(data)
        if self.must_drain:
            await self.drain()

    def write_eof(self) -> None:
        write_batch.flush()
        if self.transport is not None and not self._lost and self.transport.can_write_eof():
            try:
                self.transport.write_eof()
            except OSError:
                pass

    def close(self) -> None:
        write_batch.flush()  # a closing transport still sends what it was given, not what the batch holds
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Close with a TCP reset, so the other side sees an error rather than a clean end."""
        write_batch.flush()  # the writes held for other connections must not wait for (nor be lost with) this one
        if self.transport is not None:
            abort_with_reset(self.transport)
