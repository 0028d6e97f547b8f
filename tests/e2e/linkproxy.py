"""A TCP proxy to put between an agent and its relay, that can make the link die silently or loudly.

`black_hole()` is what a NAT that dropped its mapping, or a frozen peer, does to a connection: from then on the
bytes of every connection already open are read and dropped in both directions, and nothing is closed (not even
when one end gives up and closes: its FIN is lost too). `cut()` is what a router that forgets a connection
and answers with a reset does: every connection open now is reset at both ends, whatever was in flight in the
proxy is lost. Connections opened afterwards are forwarded normally, so an agent that notices can reconnect
through the same proxy, unless `refusing` is set: then each new connection is reset at once (the way back is
still down). One thread, one selector; `close()` ends both.
"""

from __future__ import annotations

import selectors
import socket
import struct
import threading


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
        self.accepted = 0  # connections accepted so far (each one is forwarded until black-holed or cut)
        self.dropped_bytes = 0  # bytes read and thrown away by black-holed connections
        self.refusing = False  # reset new connections at once instead of forwarding them
        self._cut_requested = threading.Event()
        self._cut_done = threading.Event()
        self._cut_count = 0
        self._thread = threading.Thread(target=self._run, name="link proxy", daemon=True)
        self._thread.start()

    def black_hole(self) -> int:
        """Stop forwarding on every connection open now, both ways, without closing any; returns how many."""
        with self._lock:
            for pair in self._pairs:
                pair.black_holed = True
            return len(self._pairs)

    def cut(self) -> int:
        """Reset every connection open now at both ends; returns how many were cut."""
        self._cut_done.clear()
        self._cut_requested.set()
        self._wake_w.send(b"x")
        assert self._cut_done.wait(10), "the link proxy thread did not cut"
        return self._cut_count

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
                    continue
                if sock is self.listener:
                    self._accept()
                elif sock in self._owner:  # (not one a cut in this same pass closed)
                    self._pump(sock)
            if self._cut_requested.is_set():
                self._cut_requested.clear()
                self._cut_all()
                self._cut_done.set()

    def _cut_all(self) -> None:
        with self._lock:
            pairs, self._pairs = self._pairs, []
        self._cut_count = len(pairs)
        for pair in pairs:
            for sock in pair.ends:
                self._owner.pop(sock, None)
                try:
                    self._selector.unregister(sock)
                except (KeyError, ValueError):
                    pass
                _reset(sock)

    def _accept(self) -> None:
        try:
            visitor, _ = self.listener.accept()
        except BlockingIOError:
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
