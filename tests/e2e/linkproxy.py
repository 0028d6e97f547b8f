"""A TCP proxy to put between an agent and its relay, that can make the link die silently.

`black_hole()` is what a NAT that dropped its mapping, or a frozen peer, does to a connection: from then on the
bytes of every connection already open are read and dropped in both directions, and nothing is closed (not even
when one end gives up and closes: its FIN is lost too). Connections opened afterwards are forwarded normally, so
an agent that notices can reconnect through the same proxy. `outage()` is a network gone altogether: the open
connections are black-holed and new ones refused (the proxy stops listening) until `restore()`. `reset()` (or
`cut()`) is what a router that forgets a connection and answers with a reset does: every open connection is reset
at both ends, whatever was in flight in the proxy is lost; with `refusing` set, each new connection is reset at once
too (the way back is still down). One thread, one selector; `close()` ends both.
"""

from __future__ import annotations

import queue
import selectors
import socket
import struct
import threading
from typing import Callable


class _Pair:
    def __init__(self, visitor: socket.socket, upstream: socket.socket) -> None:
        self.ends = (visitor, upstream)
        self.black_holed = False

    def other(self, sock: socket.socket) -> socket.socket:
        return self.ends[1] if sock is self.ends[0] else self.ends[0]


class LinkProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._selector.register(self.listener, selectors.EVENT_READ, None)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._lock = threading.Lock()
        self._pairs: list[_Pair] = []
        self._owner: dict[socket.socket, _Pair] = {}
        self._stopping = False
        self._commands: queue.Queue[tuple[Callable[[], object], threading.Event, list]] = queue.Queue()
        self.accepted = 0  # connections accepted so far (each one is forwarded until black-holed)
        self.dropped_bytes = 0  # bytes read and thrown away by black-holed connections
        self.refusing = False  # reset new connections at once instead of forwarding them
        self._thread = threading.Thread(target=self._run, name="link proxy", daemon=True)
        self._thread.start()

    def black_hole(self) -> int:
        """Stop forwarding on every connection open now, both ways, without closing any; returns how many."""
        with self._lock:
            for pair in self._pairs:
                pair.black_holed = True
            return len(self._pairs)

    def outage(self) -> int:
        """Black-hole every open connection and refuse new ones until restore(); returns how many were open."""
        held = self.black_hole()
        self._in_thread(self._stop_listening)
        return held

    def restore(self) -> None:
        """Listen again on the same port after an outage(): new connections are forwarded."""
        self._in_thread(self._listen_again)

    def reset(self) -> int:
        """Cut every open connection with a TCP reset, both ways; returns how many."""
        return self._in_thread(self._reset_all)

    cut = reset

    def _in_thread(self, command: Callable[[], object]) -> object:
        done = threading.Event()
        result: list = []
        self._commands.put((command, done, result))
        self._wake_w.send(b"c")
        assert done.wait(10), "the link proxy thread did not run the command"
        return result[0]

    def _stop_listening(self) -> None:
        self._selector.unregister(self.listener)
        self.listener.close()

    def _listen_again(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", self.port))
        self.listener.setblocking(False)
        self._selector.register(self.listener, selectors.EVENT_READ, None)

    def _reset_all(self) -> int:
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            for sock in pair.ends:
                self._owner.pop(sock, None)
                try:
                    self._selector.unregister(sock)
                except (KeyError, ValueError):
                    pass
                _reset(sock)
        return len(pairs)

    def close(self) -> None:
        self._stopping = True
        self._wake_w.send(b"x")
        self._thread.join(10)
        assert not self._thread.is_alive(), "the link proxy thread did not stop"
        with self._lock:
            for pair in self._pairs:
                for sock in pair.ends:
                    sock.close()
            self._pairs.clear()
        self._selector.close()
        for sock in (self.listener, self._wake_r, self._wake_w):
            sock.close()

    def __enter__(self) -> "LinkProxy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # the proxy thread
    def _run(self) -> None:
        while not self._stopping:
            for key, _ in self._selector.select():
                sock = key.fileobj
                if sock is self._wake_r:
                    self._wake_r.recv(64)
                    while not self._commands.empty():
                        command, done, result = self._commands.get()
                        result.append(command())
                        done.set()
                    continue
                if sock is self.listener:
                    self._accept()
                elif sock in self._owner:  # (not one that a command earlier in this same pass reset)
                    self._pump(sock)

    def _accept(self) -> None:
        try:
            visitor, _ = self.listener.accept()
        except OSError:  # nothing to accept after all, or the listener was closed by an outage() meanwhile
            return
        if self.refusing:
            _reset(visitor)
            return
        upstream = socket.create_connection(self.target, timeout=10)
        for sock in (visitor, upstream):
            sock.setblocking(True)
            sock.settimeout(10)  # a forwarded write never waits long: the test's traffic is small
        pair = _Pair(visitor, upstream)
        with self._lock:
            self._pairs.append(pair)
            self.accepted += 1
        for sock in pair.ends:
            self._owner[sock] = pair
            self._selector.register(sock, selectors.EVENT_READ, None)

    def _pump(self, sock: socket.socket) -> None:
        pair = self._owner[sock]
        try:
            data = sock.recv(65536)
        except OSError:
            data = b""
        with self._lock:
            black_holed = pair.black_holed
        if black_holed:
            if data:
                self.dropped_bytes += len(data)
            else:  # this end gave up; the other end is never told
                self._selector.unregister(sock)
            return
        if data:
            try:
                pair.other(sock).sendall(data)
                return
            except OSError:
                pass
        for end in pair.ends:  # an honest close (or a failed write) is passed on as a close
            try:
                self._selector.unregister(end)
            except (KeyError, ValueError):
                pass
            try:
                end.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _reset(sock: socket.socket) -> None:
    """Close with a reset (RST), not a FIN: the other end reads an error, not an end of stream."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()
