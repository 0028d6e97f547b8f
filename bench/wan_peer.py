#!/usr/bin/env python3
"""The WAN case's traffic ends, run inside the test-bed's namespaces by bench/wan.py (standard library only).

    wan_peer.py serve HOST PORT                                   plain-TCP peer (public side), prints `listening`
    wan_peer.py plain HOST PORT DIRECTION BYTES STREAMS           plain TCP through the impaired link (home side)
    wan_peer.py visit HOST PORT HOSTNAME DIRECTION BYTES STREAMS  HTTP through the tunnel (visitor side)

DIRECTION is `download` (bytes flow from the home network to the public side, as when a visitor downloads from
the agent's origin) or `upload` (the other way). BYTES are split evenly over STREAMS connections that all run at
once. The client prints one line: `result {json}` with the seconds from the first connect to the last byte
verified, the bytes moved, and an `error` when something was short or corrupt.

A plain-TCP connection starts with one line `download N` (the client sends N bytes, the server answers `ok N
SHA256` when it has them all) or `upload N` (the server sends N bytes, the client checks the count). Through the
tunnel, a download is `GET /download?bytes=N&seed=S` from bench/origin.js (sha256 checked against
tests/e2e/payload.py) and an upload is `POST /upload` (the origin answers the bytes and sha256 it received).
"""

from __future__ import annotations

import hashlib
import http.client
import importlib.util
import json
import socket
import sys
import threading
import time
from pathlib import Path

CHUNK = 256 * 1024
ROOT = Path(__file__).resolve().parents[1]


def _payload_module():
    spec = importlib.util.spec_from_file_location("portway_bench_payload", ROOT / "tests" / "e2e" / "payload.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pattern(n: int):
    """n bytes in CHUNK pieces, the same for every stream (the content only has to be checkable)."""
    block = hashlib.sha256(b"portway-wan").digest() * (CHUNK // 32)
    view = memoryview(block)
    sent = 0
    while sent < n:
        take = min(CHUNK, n - sent)
        yield view[:take]
        sent += take


def _pattern_sha256(n: int) -> str:
    digest = hashlib.sha256()
    for piece in _pattern(n):
        digest.update(piece)
    return digest.hexdigest()


def _read_line(sock: socket.socket) -> str:
    line = b""
    while not line.endswith(b"\n"):
        got = sock.recv(1)
        if not got:
            raise ConnectionError("connection closed before a full line")
        line += got
    return line.decode().strip()


def _receive(sock: socket.socket, n: int) -> str:
    """Read exactly n bytes and return their sha256 (ConnectionError if the peer stops short)."""
    digest = hashlib.sha256()
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    left = n
    while left:
        got = sock.recv_into(view, min(CHUNK, left))
        if not got:
            raise ConnectionError(f"connection closed {left} bytes short")
        digest.update(view[:got])
        left -= got
    return digest.hexdigest()


def serve(host: str, port: int) -> None:
    listener = socket.create_server((host, port), backlog=64)
    print("listening", flush=True)

    def handle(conn: socket.socket) -> None:
        with conn:
            try:
                direction, size = _read_line(conn).split()
                n = int(size)
                if direction == "download":
                    conn.sendall(f"ok {n} {_receive(conn, n)}\n".encode())
                else:
                    for piece in _pattern(n):
                        conn.sendall(piece)
                    conn.shutdown(socket.SHUT_WR)
                    conn.recv(1)  # the client closes once it has everything
            except (OSError, ValueError):
                pass

    while True:
        conn, _ = listener.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


def _plain_one(host: str, port: int, direction: str, n: int) -> None:
    with socket.create_connection((host, port), timeout=120) as sock:
        sock.sendall(f"{direction} {n}\n".encode())
        if direction == "download":
            for piece in _pattern(n):
                sock.sendall(piece)
            answer = _read_line(sock)
            if answer != f"ok {n} {_pattern_sha256(n)}":
                raise ValueError(f"the server answered {answer!r}")
        else:
            if _receive(sock, n) != _pattern_sha256(n):
                raise ValueError("corrupt bytes")


def _visit_one(host: str, port: int, hostname: str, direction: str, n: int, seed: str) -> None:
    conn = http.client.HTTPConnection(host, port, timeout=120)
    try:
        headers = {"Host": f"{hostname}:{port}"}
        if direction == "download":
            conn.request("GET", f"/download?bytes={n}&seed={seed}", headers=headers)
            response = conn.getresponse()
            if response.status != 200:
                raise ValueError(f"status {response.status}")
            digest = hashlib.sha256()
            got = 0
            while piece := response.read(CHUNK):
                digest.update(piece)
                got += len(piece)
            if got != n or digest.hexdigest() != _payload_module().expected_sha256(n, seed):
                raise ValueError(f"{got} of {n} bytes, or corrupt")
        else:
            conn.request("POST", "/upload", body=_pattern(n), headers={**headers, "Content-Length": str(n)})
            response = conn.getresponse()
            body = response.read()
            if response.status != 200:
                raise ValueError(f"status {response.status}: {body[:200]!r}")
            answer = json.loads(body)
            if answer != {"bytes": n, "sha256": _pattern_sha256(n)}:
                raise ValueError(f"the origin saw {answer}")
    finally:
        conn.close()


def _run_streams(streams: int, total: int, one) -> None:
    sizes = [total // streams + (1 if i < total % streams else 0) for i in range(streams)]
    errors: list[str] = []

    def run(index: int) -> None:
        try:
            one(index, sizes[index])
        except Exception as error:  # noqa: BLE001 - reported in the result line
            errors.append(f"stream {index}: {type(error).__name__}: {error}")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(streams)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result = {"seconds": round(time.monotonic() - started, 3), "bytes": total}
    if errors:
        result["error"] = errors[0]
    print("result " + json.dumps(result), flush=True)


def main(argv: list[str]) -> int:
    mode = argv[0]
    if mode == "serve":
        serve(argv[1], int(argv[2]))
    elif mode == "plain":
        host, port, direction, total, streams = argv[1], int(argv[2]), argv[3], int(argv[4]), int(argv[5])
        _run_streams(streams, total, lambda i, n: _plain_one(host, port, direction, n))
    elif mode == "visit":
        host, port, hostname, direction = argv[1], int(argv[2]), argv[3], argv[4]
        total, streams = int(argv[5]), int(argv[6])
        _run_streams(streams, total, lambda i, n: _visit_one(host, port, hostname, direction, n, f"wan{i}"))
    else:
        print(f"unknown mode {mode!r}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
