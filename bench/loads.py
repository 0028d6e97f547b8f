"""The benchmark's load generators. Each takes a `Target` (where to connect, which Host to send)
and returns a dict of numbers, or raises; every one is bounded in time."""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import json
import os
import re
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WRK_LUA = Path(__file__).resolve().parent / "wrk_report.lua"


def _load_payload_module():
    spec = importlib.util.spec_from_file_location("portway_bench_payload", ROOT / "tests" / "e2e" / "payload.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


payload = _load_payload_module()


class LoadError(RuntimeError):
    pass


@dataclass(frozen=True)
class Target:
    """Where a visitor connects (ip, port) and the Host header it sends."""

    ip: str
    port: int
    host: str

    @property
    def url(self) -> str:
        return f"http://{self.ip}:{self.port}/"


# ---------------------------------------------------------------------------------------------
# plain HTTP helpers


def http_get(target: Target, path: str = "/", timeout: float = 5.0) -> tuple[int, bytes]:
    with socket.create_connection((target.ip, target.port), timeout=timeout) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {target.host}\r\nConnection: close\r\n\r\n".encode())
        head, rest, length = _read_head(sock)
        body = _read_body(sock, rest, length)
        status = int(head.split(b" ", 2)[1])
        return status, bytes(body)


def _read_head(sock: socket.socket, limit: int = 65536) -> tuple[bytes, bytes, int | None]:
    """Read a response head. Returns (head, bytes read past it, Content-Length or None)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise LoadError(f"connection closed before the response head (got {buf[:200]!r})")
        buf += chunk
        if len(buf) > limit:
            raise LoadError("response head too large")
    head, rest = buf.split(b"\r\n\r\n", 1)
    match = re.search(rb"\r\ncontent-length:\s*(\d+)", head, re.I)
    return head, rest, int(match.group(1)) if match else None


def _read_body(sock: socket.socket, rest: bytes, length: int | None) -> bytearray:
    """The body after the head: `length` bytes, or up to the close when the answer gave none."""
    body = bytearray(rest)
    while length is None or len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return body


def wait_ready(target: Target, timeout: float = 20.0, expect: bytes = b"hello from origin") -> None:
    """Poll GET / until the origin's greeting comes back through the path."""
    deadline = time.monotonic() + timeout
    last = "no attempt"
    while time.monotonic() < deadline:
        try:
            status, body = http_get(target, "/", timeout=2.0)
            if status == 200 and expect in body:
                return
            last = f"status {status}: {body[:120]!r}"
        except (OSError, LoadError, ValueError, IndexError) as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.2)
    raise LoadError(f"path not ready after {timeout:.0f} s (last: {last})")


# ---------------------------------------------------------------------------------------------
# wrk


def run_wrk(target: Target, connections: int, duration: float, registry, timeout_s: float = 5.0,
            new_connections: bool = False) -> dict:
    """wrk's GET load; with `new_connections`, every request on a connection of its own (Connection: close):
    a rate of new connections through the path, each one set up and torn down by the tunnel."""
    close = ["-H", "Connection: close"] if new_connections else []
    args = ["wrk", "-t1", f"-c{connections}", f"-d{duration:g}s", f"--timeout={timeout_s:g}s", "--latency",
            "-s", str(WRK_LUA), "-H", f"Host: {target.host}", *close, target.url]
    proc = registry.start(args, f"wrk-c{connections}")
    try:
        rc = proc.popen.wait(duration + 30)
    except subprocess.TimeoutExpired:
        raise LoadError("wrk did not finish in time") from None
    finally:
        registry.kill([proc])
    out = proc.output()
    match = re.search(r"^BENCHJSON (\{.*\})$", out, re.M)
    if rc != 0 or not match:
        raise LoadError(f"wrk failed (status {rc}): {out[-400:]}")
    raw = json.loads(match.group(1))
    secs = raw["duration_us"] / 1e6
    errors = raw["err_connect"] + raw["err_read"] + raw["err_write"] + raw["err_status"] + raw["err_timeout"]
    return {
        "connections": connections,
        "requests": raw["requests"],
        "duration_s": round(secs, 3),
        "rps": round(raw["requests"] / secs, 1) if secs else 0.0,
        "p50_ms": round(raw["lat_p50_us"] / 1000, 3),
        "p90_ms": round(raw["lat_p90_us"] / 1000, 3),
        "p99_ms": round(raw["lat_p99_us"] / 1000, 3),
        "max_ms": round(raw["lat_max_us"] / 1000, 3),
        "mean_ms": round(raw["lat_mean_us"] / 1000, 3),
        "errors": errors,
        "errors_detail": {k[4:]: v for k, v in raw.items() if k.startswith("err_")},
    }


# ---------------------------------------------------------------------------------------------
# bulk transfers

BULK_READ = 1 << 20


def bulk_download(target: Target, nbytes: int, seed: str, expected_sha: str, deadline_s: float) -> dict:
    buf = bytearray(BULK_READ)
    view = memoryview(buf)
    h = hashlib.sha256()
    t0 = time.perf_counter()
    with socket.create_connection((target.ip, target.port), timeout=30) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(f"GET /download?bytes={nbytes}&seed={seed} HTTP/1.1\r\nHost: {target.host}\r\n"
                     f"Connection: close\r\n\r\n".encode())
        head, rest, length = _read_head(sock)
        status = int(head.split(b" ", 2)[1])
        if status != 200:
            raise LoadError(f"download: status {status}")
        if length != nbytes:
            raise LoadError(f"download: Content-Length {length}, expected {nbytes}")
        h.update(rest)
        got = len(rest)
        t_first = time.perf_counter()
        limit = t0 + deadline_s
        while got < nbytes:
            n = sock.recv_into(view, min(BULK_READ, nbytes - got))
            if n == 0:
                raise LoadError(f"download: connection closed after {got} of {nbytes} bytes")
            h.update(view[:n])
            got += n
            if time.perf_counter() > limit:
                raise LoadError(f"download: over the {deadline_s:.0f} s limit after {got} bytes")
    elapsed = time.perf_counter() - t0
    ok = h.hexdigest() == expected_sha
    if not ok:
        raise LoadError("download: sha256 mismatch")
    return {"bytes": nbytes, "seconds": round(elapsed, 3), "mb_s": round(nbytes / elapsed / 1e6, 1),
            "ttfb_ms": round((t_first - t0) * 1000, 2), "sha256_ok": ok}


def upload_chunks(nbytes: int, seed: str, chunk: int = BULK_READ):
    """payload(nbytes, seed) in pieces of `chunk` bytes (64 KiB multiples)."""
    pieces = []
    size = 0
    for block in payload.iter_download(nbytes, seed):
        pieces.append(block)
        size += len(block)
        if size >= chunk:
            yield b"".join(pieces)
            pieces, size = [], 0
    if pieces:
        yield b"".join(pieces)


def bulk_upload(target: Target, nbytes: int, seed: str, expected_sha: str, deadline_s: float) -> dict:
    t0 = time.perf_counter()
    limit = t0 + deadline_s
    with socket.create_connection((target.ip, target.port), timeout=30) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(f"POST /upload HTTP/1.1\r\nHost: {target.host}\r\nContent-Type: application/octet-stream\r\n"
                     f"Content-Length: {nbytes}\r\nConnection: close\r\n\r\n".encode())
        for piece in upload_chunks(nbytes, seed):
            sock.sendall(piece)
            if time.perf_counter() > limit:
                raise LoadError(f"upload: over the {deadline_s:.0f} s limit")
        head, rest, length = _read_head(sock)
        body = _read_body(sock, rest, length)
    elapsed = time.perf_counter() - t0
    status = int(head.split(b" ", 2)[1])
    if status != 200:
        raise LoadError(f"upload: status {status}: {bytes(body[:200])!r}")
    answer = json.loads(body)
    if answer.get("bytes") != nbytes or answer.get("sha256") != expected_sha:
        raise LoadError(f"upload: origin received {answer.get('bytes')} bytes, sha256 "
                        f"{'matches' if answer.get('sha256') == expected_sha else 'differs'}")
    return {"bytes": nbytes, "seconds": round(elapsed, 3), "mb_s": round(nbytes / elapsed / 1e6, 1),
            "sha256_ok": True}


# ---------------------------------------------------------------------------------------------
# WebSocket


def _ws_connect(target: Target):
    from websockets.sync.client import connect

    sock = socket.create_connection((target.ip, target.port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return connect(f"ws://{target.host}/", sock=sock, compression=None, max_size=None,
                   open_timeout=10, close_timeout=2, ping_interval=None)


def ws_round_trips(target: Target, duration: float, max_messages: int = 1_000_000) -> dict:
    lat = []
    with _ws_connect(target) as ws:
        # a few warm-up round trips
        for i in range(20):
            ws.send(f"w{i}")
            if ws.recv(timeout=10) != f"Echo: w{i}":
                raise LoadError("ws: wrong echo in warm-up")
        t0 = time.perf_counter()
        end = t0 + duration
        i = 0
        now = t0
        while now < end and i < max_messages:
            msg = f"m{i}"
            ws.send(msg)
            reply = ws.recv(timeout=10)
            if reply != "Echo: " + msg:
                raise LoadError(f"ws: wrong echo {reply[:60]!r} for {msg!r}")
            t = time.perf_counter()
            lat.append(t - now)
            now = t
            i += 1
        elapsed = now - t0
    lat.sort()
    return {"messages": i, "seconds": round(elapsed, 3), "rtt_per_s": round(i / elapsed, 1),
            "p50_ms": round(lat[len(lat) // 2] * 1000, 3), "p99_ms": round(lat[int(len(lat) * 0.99)] * 1000, 3)}


def ws_bulk(target: Target, count: int, size: int = 1 << 20, window: int = 4, deadline_s: float = 120.0) -> dict:
    """Echo `count` binary messages of `size` bytes, up to `window` in flight; all verified."""
    base = bytearray(os.urandom(size))

    def message(i: int) -> bytes:
        base[:8] = i.to_bytes(8, "big")
        return bytes(base)

    expected_tail = bytes(base[8:])
    credits = threading.Semaphore(window)
    failure: list[BaseException] = []
    stop = threading.Event()

    with _ws_connect(target) as ws:
        ws.send(message(0))  # warm-up
        if ws.recv(timeout=30)[:8] != (0).to_bytes(8, "big"):
            raise LoadError("ws bulk: wrong warm-up echo")

        def sender() -> None:
            try:
                for i in range(count):
                    while not credits.acquire(timeout=0.5):
                        if stop.is_set():
                            return
                    ws.send(message(i))
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                failure.append(exc)

        t0 = time.perf_counter()
        thread = threading.Thread(target=sender, daemon=True)
        thread.start()
        try:
            for i in range(count):
                left = t0 + deadline_s - time.perf_counter()
                if left <= 0:
                    raise LoadError(f"ws bulk: over the {deadline_s:.0f} s limit after {i} messages")
                reply = ws.recv(timeout=left)
                if (len(reply) != size or reply[:8] != i.to_bytes(8, "big")
                        or reply[8:] != expected_tail):
                    raise LoadError(f"ws bulk: message {i} came back altered")
                credits.release()
            elapsed = time.perf_counter() - t0
        finally:
            stop.set()
            thread.join(5)
        if failure:
            raise LoadError(f"ws bulk: send failed: {failure[0]!r}")
    return {"messages": count, "message_bytes": size, "window": window, "seconds": round(elapsed, 3),
            "mb_s": round(count * size / elapsed / 1e6, 1), "msgs_per_s": round(count / elapsed, 1)}


# ---------------------------------------------------------------------------------------------
# many concurrent slow streams


def stream_seed(i: int) -> str:
    return f"s{i}"


def expected_stream_hashes(count: int, nbytes: int) -> list[str]:
    return [payload.expected_sha256(nbytes, stream_seed(i)) for i in range(count)]


async def _one_stream(i, target, path_fmt, nbytes, expected, state, connect_gate, timeout):
    t0 = time.perf_counter()
    async with connect_gate:
        reader, writer = await asyncio.open_connection(target.ip, target.port)
    state["open"] += 1
    state["peak_open"] = max(state["peak_open"], state["open"])
    try:
        path = path_fmt.format(seed=stream_seed(i))
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {target.host}\r\nConnection: close\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        status = int(head.split(b" ", 2)[1])
        if status != 200:
            raise LoadError(f"status {status}")
        match = re.search(rb"\r\ncontent-length:\s*(\d+)", head, re.I)
        if not match or int(match.group(1)) != nbytes:
            raise LoadError("bad Content-Length")
        body = await asyncio.wait_for(reader.readexactly(nbytes), timeout)
        if hashlib.sha256(body).hexdigest() != expected[i]:
            raise LoadError("sha256 mismatch")
        return time.perf_counter() - t0
    finally:
        state["open"] -= 1
        writer.close()


async def _many_streams(target, count, ms, nbytes, expected, timeout):
    path_fmt = f"/slow?ms={ms}&bytes={nbytes}&seed={{seed}}"
    state = {"open": 0, "peak_open": 0}
    gate = asyncio.Semaphore(64)
    t0 = time.perf_counter()
    results = await asyncio.gather(
        *(_one_stream(i, target, path_fmt, nbytes, expected, state, gate, timeout) for i in range(count)),
        return_exceptions=True)
    elapsed = time.perf_counter() - t0
    ok = [r for r in results if isinstance(r, float)]
    errors: dict[str, int] = {}
    for r in results:
        if isinstance(r, BaseException):
            key = f"{type(r).__name__}: {r}"[:80]
            errors[key] = errors.get(key, 0) + 1
    ok.sort()
    return {
        "streams": count, "ok": len(ok), "failed": count - len(ok), "bytes_each": nbytes, "origin_ms": ms,
        "peak_concurrent": state["peak_open"], "seconds": round(elapsed, 3),
        "p50_s": round(ok[len(ok) // 2], 3) if ok else None, "max_s": round(ok[-1], 3) if ok else None,
        "errors": errors,
    }


def many_streams(target: Target, count: int, ms: int, nbytes: int, expected: list[str], timeout: float = 60.0) -> dict:
    coro = asyncio.wait_for(_many_streams(target, count, ms, nbytes, expected, timeout), timeout + 30)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)
