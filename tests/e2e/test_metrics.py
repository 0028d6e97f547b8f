"""The relay's Prometheus metrics against real processes: a relay with `--metrics`, agents in front of the Node
origin, traffic of every kind, then the exposition read three ways: parsed, checked by `promtool check metrics`,
and scraped by a real Prometheus server whose query API must see the same numbers."""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import Processes, free_port, prometheus_sees, start_origin, wait_until
from .test_security import get, launch_agent, launch_relay, talk

BASIC = "user:secret"


@pytest.fixture(scope="module")
def observed():
    procs = Processes()
    try:
        metrics_port = free_port()
        relay = launch_relay(procs, "--metrics", f"127.0.0.1:{metrics_port}", domain="localhost")
        relay.proc.wait_for_line(rf"metrics: http://127\.0\.0\.1:{metrics_port}/metrics")
        origin = start_origin(procs)
        launch_agent(procs, relay, origin, name="alpha")
        launch_agent(procs, relay, origin, "--basic-auth", BASIC, name="guarded")
        yield relay, metrics_port, procs
    finally:
        procs.stop_all()


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        assert answer.status == 200 and answer.headers["Content-Type"].startswith("text/plain")
        return answer.read().decode()


def samples(text: str) -> dict[tuple[str, tuple], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def websocket_hello(port: int, host: str) -> bytes:
    """One WebSocket conversation by hand: upgrade, send `hello` (masked), read the echo, close."""
    key = base64.b64encode(os.urandom(16)).decode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET /ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
        received = b""
        while b"\r\n\r\n" not in received:
            received += sock.recv(4096)
        assert received.startswith(b"HTTP/1.1 101 ")
        received = received.split(b"\r\n\r\n", 1)[1]
        mask = os.urandom(4)
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(b"hello"))
        sock.sendall(bytes([0x81, 0x80 | 5]) + mask + payload)
        while len(received) < 2 or len(received) < 2 + received[1]:
            received += sock.recv(4096)
        sock.sendall(bytes([0x88, 0x80]) + os.urandom(4))
        return received[2:2 + received[1]]


def test_traffic_shows_in_the_relays_metrics(observed):
    relay, metrics_port, _ = observed
    for _ in range(5):
        assert get(relay.port, relay.host("alpha"), "/").status == 200
    assert get(relay.port, relay.host("alpha"), "/status/503").status == 503
    assert get(relay.port, relay.host("guarded"), "/", headers={"Authorization": "Basic d3Jvbmc6d3Jvbmc="}).status \
        == 401
    assert get(relay.port, relay.host("nobody"), "/").status == 404
    assert talk(relay.port, b"GET / HTTP/1.1\r\nHost: alpha.localhost\r\nContent-Length: x\r\n\r\n").statuses == [400]
    assert websocket_hello(relay.port, relay.host("alpha")) == b"Echo: hello"

    def settled():
        values = samples(scrape(metrics_port))
        return values if values[("portway_websocket_connections_open", (("tunnel", "alpha"),))] == 0 else None

    values = wait_until(settled, what="the WebSocket connection to be counted closed")
    assert values[("portway_requests_total", (("status_class", "2xx"), ("tunnel", "alpha")))] == 5
    assert values[("portway_requests_total", (("status_class", "5xx"), ("tunnel", "alpha")))] == 1
    assert values[("portway_requests_total", (("status_class", "4xx"), ("tunnel", "guarded")))] == 1
    assert values[("portway_requests_total", (("status_class", "1xx"), ("tunnel", "alpha")))] == 1  # the 101
    assert values[("portway_websocket_connections_total", (("tunnel", "alpha"),))] == 1
    assert values[("portway_tunnels", (("kind", "portway"),))] == 2
    assert values[("portway_agent_links", ())] == 2
    assert values[("portway_auth_failures_total", (("kind", "basic"),))] == 1
    assert values[("portway_protocol_errors_total", (("peer", "visitor"),))] >= 1
    assert values[("portway_unrouted_requests_total", ())] >= 2
    assert values[("portway_request_duration_seconds_count", ())] >= 8
    assert values[("portway_sent_bytes_total", (("tunnel", "alpha"),))] > 5 * len("hello from origin")
    assert not any(name.startswith("portway_") and dict(labels).get("tunnel") == "nobody"
                   for name, labels in values), "labels must only name registered tunnels"


def test_promtool_accepts_the_exposition(observed):
    promtool = shutil.which("promtool")
    assert promtool, "promtool (Debian's prometheus package) is needed: run `bash scripts/test.sh`"
    _, metrics_port, _ = observed
    checked = subprocess.run([promtool, "check", "metrics"], input=scrape(metrics_port), capture_output=True,
                             text=True, timeout=30)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_a_real_prometheus_scrapes_the_relay(observed):
    _, metrics_port, procs = observed
    prometheus_sees(procs, metrics_port, "portway_agent_links", "2")


def test_the_relay_logs_a_line_per_request(observed):
    relay, _, _ = observed
    tag = os.urandom(4).hex()
    assert get(relay.port, relay.host("alpha"), f"/whoami?{tag}").status == 200
    line = relay.proc.wait_for_line(rf"127\.0\.0\.1 GET alpha\.localhost:{relay.port} /whoami\?{tag} 200 [0-9.]+ms \d+B$")
    assert line


def test_json_access_log_lines(procs):
    relay = launch_relay(procs, "--log-format", "json", domain="localhost")
    origin = start_origin(procs)
    launch_agent(procs, relay, origin, name="beta")
    assert get(relay.port, relay.host("beta"), "/whoami?json").status == 200
    assert get(relay.port, relay.host("nobody"), "/x").status == 404
    lines = [json.loads(line) for line in (relay.proc.wait_for_line(r'"path": "/x"') and relay.proc.stderr)
             if line.startswith("{")]
    assert {(e["host"].split(":")[0], e["path"], e["status"]) for e in lines} >= {
        ("beta.localhost", "/whoami?json", 200), ("nobody.localhost", "/x", 404)}
    assert all(isinstance(e["duration_ms"], float) and e["client"] == "127.0.0.1" for e in lines)
