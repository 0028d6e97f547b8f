"""The benchmark's origin (bench/origin.js) serves what bench/run.py checks: a regression there only
shows in a benchmark run, so its routes are checked here against tests/e2e/payload.py."""

from __future__ import annotations

import hashlib
import http.client
import json

from .conftest import ROOT, Processes, require_node_tools
from .payload import expected_download


def start_bench_origin(procs: Processes) -> int:
    require_node_tools()
    proc = procs.start(["node", str(ROOT / "bench" / "origin.js"), "0"], "bench origin")
    return int(proc.wait_for_line(r"^listening (\d+)").group(1))


def get(port: int, target: str, method: str = "GET", body: bytes | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, target, body=body)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_bench_origin_routes(procs):
    port = start_bench_origin(procs)
    assert get(port, "/") == (200, b"hello from origin")
    assert get(port, "/warm?prefix=s&count=20&bytes=20000") == (200, b"warmed 20")
    for target, size, seed in (("/download?bytes=300000&seed=7", 300_000, "7"),
                               ("/slow?ms=100&bytes=20000&seed=s3", 20_000, "s3")):
        status, body = get(port, target)
        assert status == 200
        assert hashlib.sha256(body).digest() == hashlib.sha256(expected_download(size, seed)).digest()
    upload = expected_download(100_000, "up")
    status, body = get(port, "/upload", "POST", upload)
    assert status == 200
    assert json.loads(body) == {"bytes": len(upload), "sha256": hashlib.sha256(upload).hexdigest()}
