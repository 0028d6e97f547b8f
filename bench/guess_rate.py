"""How fast can one keep-alive connection guess a tunnel's basic-auth password? Prints attempts per second.

Starts a relay and an agent with `--basic-auth` (the Portway under test is whatever `python3 -m portway`
imports: set PYTHONPATH to compare checkouts), then sends wrong passwords pipelined on one connection from
127.0.0.1 for a few seconds and counts the answers by status. Nothing reaches an origin (no request is
authorised), so none is started. Every process is killed at the end.

    PYTHONPATH=src python3 bench/guess_rate.py [--seconds 5] [--depth 64]
"""

from __future__ import annotations

import argparse
import base64
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter

PORTWAY = [sys.executable, "-m", "portway"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(args: list[str], ready: bytes) -> subprocess.Popen:
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 20
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{args[3]} exited before it was ready")
        if ready in line:
            return proc
    raise RuntimeError(f"{args[3]} did not become ready")


def read_responses(sock: socket.socket, buffer: bytearray, count: int, statuses: Counter) -> None:
    """Read `count` complete responses (every answer here has a Content-Length) and count their statuses."""
    while count:
        end = buffer.find(b"\r\n\r\n")
        if end >= 0:
            head = bytes(buffer[:end]).decode("latin-1")
            length = 0
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            if len(buffer) >= end + 4 + length:
                statuses[int(head.split(" ", 2)[1])] += 1
                del buffer[: end + 4 + length]
                count -= 1
                continue
        data = sock.recv(1 << 20)
        if not data:
            raise ConnectionError(f"the relay closed the connection; answers so far: {dict(statuses)}")
        buffer += data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--depth", type=int, default=64, help="requests in flight (pipelined)")
    args = parser.parse_args()
    port = free_port()
    procs = []
    try:
        procs.append(start(PORTWAY + ["server", "--port", str(port)], b"listening on"))
        procs.append(start(PORTWAY + ["http", str(free_port()), "--relay", f"http://127.0.0.1:{port}",
                                      "--name", "guess", "--basic-auth", "user:right-password"], b"http://"))
        host = f"guess.localhost:{port}"
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        statuses: Counter = Counter()
        buffer = bytearray()
        attempt = 0
        started = time.monotonic()
        while time.monotonic() - started < args.seconds:
            batch = []
            for _ in range(args.depth):
                attempt += 1
                credentials = base64.b64encode(f"user:guess-{attempt}".encode()).decode()
                batch.append(f"GET / HTTP/1.1\r\nHost: {host}\r\nAuthorization: Basic {credentials}\r\n\r\n")
            sock.sendall("".join(batch).encode())
            read_responses(sock, buffer, args.depth, statuses)
        elapsed = time.monotonic() - started
        sock.close()
        total = sum(statuses.values())
        print(f"{total} answers in {elapsed:.2f} s on one connection: {total / elapsed:,.0f}/s; by status: "
              f"{dict(sorted(statuses.items()))}; passwords actually tried (401): {statuses[401]} "
              f"= {statuses[401] / elapsed:,.1f}/s")
    finally:
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            proc.wait(10)


if __name__ == "__main__":
    main()
