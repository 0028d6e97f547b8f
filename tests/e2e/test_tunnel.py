"""Issue 2's end-to-end checks: real relay, real agent, the seed's Node `ws` echo server."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import signal
from concurrent.futures import ThreadPoolExecutor

import pytest

from .conftest import (
    assert_websocket_echo,
    PORTWAY,
    assert_cut_short_when_killed,
    free_port,
    start_agent,
    start_origin,
    start_relay,
)
from .payload import expected_sha256


def request(relay, name, method="GET", path="/", body=None, headers=None, timeout=30, encode_chunked=False):
    conn = http.client.HTTPConnection("127.0.0.1", relay.port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers={"Host": relay.host(name), **(headers or {})},
                     encode_chunked=encode_chunked)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


@pytest.fixture
def tunnel(procs, relay, origin):
    agent, name = start_agent(procs, relay, origin, name="seed")
    return relay, name, agent


def test_get_through_tunnel(tunnel):
    relay, name, _ = tunnel
    status, _, body = request(relay, name)
    assert (status, body) == (200, b"hello from origin")


def test_forwarded_headers_replace_visitor_ones(tunnel):
    relay, name, _ = tunnel
    status, _, body = request(relay, name, path="/whoami", headers={"X-Forwarded-For": "6.6.6.6"})
    seen = json.loads(body)["headers"]
    assert status == 200
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert seen["x-forwarded-proto"] == "http"
    assert seen["x-forwarded-host"] == relay.host(name)
    assert seen["host"] == relay.host(name)


def test_head_answer_says_the_size_and_the_connection_goes_on(tunnel):
    relay, name, _ = tunnel
    conn = http.client.HTTPConnection("127.0.0.1", relay.port, timeout=30)
    try:
        conn.request("HEAD", "/download?bytes=123457&seed=7", headers={"Host": relay.host(name)})
        response = conn.getresponse()
        assert (response.status, response.getheader("Content-Length"), response.read()) == (200, "123457", b"")
        conn.request("GET", "/", headers={"Host": relay.host(name)})  # the same connection: no body was awaited
        response = conn.getresponse()
        assert (response.status, response.read()) == (200, b"hello from origin")
    finally:
        conn.close()


def test_50mb_download_intact(tunnel):
    relay, name, _ = tunnel
    size = 50 * 1024 * 1024
    status, _, body = request(relay, name, path=f"/download?bytes={size}&seed=dl")
    assert status == 200 and len(body) == size
    assert hashlib.sha256(body).hexdigest() == expected_sha256(size, "dl")


def test_chunked_download_intact(tunnel):
    relay, name, _ = tunnel
    size = 5 * 1024 * 1024 + 17
    status, headers, body = request(relay, name, path=f"/download-chunked?bytes={size}&seed=ch")
    assert status == 200 and headers.get("Transfer-Encoding") == "chunked"
    assert hashlib.sha256(body).hexdigest() == expected_sha256(size, "ch")


def test_close_delimited_response_is_rechunked(tunnel):
    relay, name, _ = tunnel
    size = 300_001
    status, headers, body = request(relay, name, path=f"/close-delimited?bytes={size}&seed=cd")
    assert status == 200 and hashlib.sha256(body).hexdigest() == expected_sha256(size, "cd")


def test_50mb_upload_intact(tunnel):
    relay, name, _ = tunnel
    size = 50 * 1024 * 1024
    payload = os.urandom(1024 * 1024) * 50
    status, _, body = request(relay, name, method="POST", path="/upload", body=payload,
                              headers={"Content-Length": str(size)})
    answer = json.loads(body)
    assert status == 200 and answer["bytes"] == size
    assert answer["sha256"] == hashlib.sha256(payload).hexdigest()


def test_chunked_upload_intact(tunnel):
    relay, name, _ = tunnel
    pieces = [os.urandom(n) for n in (1, 1000, 65536, 70000, 3)]
    status, _, body = request(relay, name, method="POST", path="/upload", body=iter(pieces),
                              headers={"Transfer-Encoding": "chunked"}, encode_chunked=True)
    answer = json.loads(body)
    assert status == 200 and answer["sha256"] == hashlib.sha256(b"".join(pieces)).hexdigest()


def test_websocket_text_and_binary(tunnel):
    relay, name, _ = tunnel
    assert_websocket_echo(relay, name)


def _masked_text_frame(text: bytes) -> bytes:
    mask = os.urandom(4)
    return bytes([0x81, 0x80 | len(text)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(text))


def test_websocket_frame_glued_to_the_upgrade_request_is_echoed(tunnel):
    """A client may send its first frame in the same packet as the handshake: those bytes follow the
    request head through the relay's switch to raw bytes and must reach the origin, in order."""
    import base64
    import socket

    relay, name, _ = tunnel
    key = base64.b64encode(os.urandom(16)).decode()
    head = (f"GET / HTTP/1.1\r\nHost: {relay.host(name)}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as sock:
        sock.sendall(head + _masked_text_frame(b"early") + _masked_text_frame(b"second"))
        received = b""
        expected = [b"Echo: early", b"Echo: second"]
        want = b"".join(bytes([0x81, len(text)]) + text for text in expected)
        while not received.endswith(want):
            chunk = sock.recv(65536)
            assert chunk, f"connection closed; got {received!r}"
            received += chunk
        assert received.startswith(b"HTTP/1.1 101 ")
        assert received.split(b"\r\n\r\n", 1)[1] == want


def test_100_concurrent_visitors_share_one_agent_link(tunnel):
    relay, name, _ = tunnel

    def one(i: int) -> bool:
        size = 10_000 + i * 997
        status, _, body = request(relay, name, path=f"/download?bytes={size}&seed=c{i}")
        return status == 200 and hashlib.sha256(body).hexdigest() == expected_sha256(size, f"c{i}")

    with ThreadPoolExecutor(100) as pool:
        results = list(pool.map(one, range(100)))
    assert all(results)


def test_keep_alive_connection_routes_each_request_by_its_host(procs, relay):
    first = start_origin(procs, "first")
    second = start_origin(procs, "second")
    start_agent(procs, relay, first, name="one")
    start_agent(procs, relay, second, name="two")
    conn = http.client.HTTPConnection("127.0.0.1", relay.port, timeout=10)
    answers = []
    sockets = set()
    for name in ("one", "two", "one", "two"):
        conn.request("GET", "/name", headers={"Host": relay.host(name)})
        response = conn.getresponse()
        answers.append(response.read())
        sockets.add(conn.sock.getsockname())
    conn.close()
    assert answers == [b"first", b"second", b"first", b"second"]
    assert len(sockets) == 1  # one keep-alive connection carried all four


def test_embedded_relay_when_no_relay_is_given(procs, origin):
    env = {"PORTWAY_RELAY": ""}
    agent = procs.start(PORTWAY + ["http", str(origin), "--name", "embedded"], "embedded agent", env=env)
    match = agent.wait_for_line(r"^http://embedded\.localhost:(\d+)$")
    port = int(match.group(1))
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/", headers={"Host": f"embedded.localhost:{port}"})
    response = conn.getresponse()
    body = response.read()
    conn.close()
    assert (response.status, body) == (200, b"hello from origin")


def test_unknown_host_gets_404_naming_it(relay):
    status, _, body = request(relay, "nobody")
    assert status == 404 and b"nobody.localhost" in body


def test_bare_domain_shows_landing_page(relay):
    conn = http.client.HTTPConnection("127.0.0.1", relay.port, timeout=10)
    conn.request("GET", "/", headers={"Host": f"localhost:{relay.port}"})
    response = conn.getresponse()
    body = response.read()
    conn.close()
    assert response.status == 200 and b"Portway relay" in body


def test_name_taken_exits_nonzero(procs, tunnel):
    relay, name, _ = tunnel
    second = procs.start(PORTWAY + ["http", "9", "--relay", relay.url, "--name", name], "second agent")
    assert second.wait_exit(20) != 0
    assert f"'{name}'" in second.output() and "in use" in second.output()


def test_invalid_name_exits_nonzero(procs, relay):
    agent = procs.start(PORTWAY + ["http", "9", "--relay", relay.url, "--name", "../etc"], "bad agent")
    assert agent.wait_exit(20) != 0
    assert "DNS label" in agent.output()


def test_random_readable_name(procs, relay, origin):
    _, name = start_agent(procs, relay, origin)
    assert len(name.split("-")) >= 2
    assert request(relay, name)[0] == 200


def test_local_service_down_gives_502_saying_so(procs, relay):
    dead_port = free_port()
    _, name = start_agent(procs, relay, dead_port, name="down")
    status, _, body = request(relay, name)
    assert status == 502 and f"localhost:{dead_port} refused the connection".encode() in body


SLOW_DEADLINES = 60.0  # the relay's keepalive and response timeout in the next test: nothing fires that soon
NOTICED_WITHIN = 10.0  # bound for an answer that needs no deadline; generous for a loaded machine


def test_agent_killed_gives_502_at_once(procs, origin):
    """SIGKILL: the kernel closes the agent's end of the link and the relay hears it at once. The very next
    visitor gets a 502 saying the agent is gone, well before any of the relay's deadlines could have produced an
    answer. (A link that dies without a word is tests/e2e/test_keepalive.py's.)"""
    deadlines = ["--keepalive-timeout", "--response-timeout"]
    relay = start_relay(procs, *[arg for flag in deadlines for arg in (flag, str(SLOW_DEADLINES))])
    agent, name = start_agent(procs, relay, origin, name="seed")
    # Connection: close leaves no idle stream in the relay's pool (a request retried off a pooled stream whose
    # link just died hangs: see POOLED_STREAM_BUG in test_keepalive.py)
    assert request(relay, name, headers={"Connection": "close"})[0] == 200
    agent.kill(signal.SIGKILL)
    status, _, body = request(relay, name, timeout=NOTICED_WITHIN)  # one request: no retrying until it works
    assert status == 502, body
    assert b"not connected" in body or b"went away" in body  # the link's end, not a deadline, answered


def test_visitor_sees_cut_short_response_when_agent_dies(procs, origin):
    """To the relay a killed agent is a lost link: the download waits the resume window (1 s here) for the agent
    to come back, then is cut short visibly."""
    relay = start_relay(procs, "--resume-window", "1")
    agent, name = start_agent(procs, relay, origin, name="seed")
    assert_cut_short_when_killed(relay, name, agent)


def test_stopped_agent_frees_its_name_and_a_new_one_can_take_it(procs, tunnel):
    relay, name, agent = tunnel
    agent.kill(signal.SIGINT)
    assert agent.popen.returncode == 0
    second, second_name = start_agent(procs, relay, 9, name=name)
    assert second_name == name


def test_agent_that_lost_its_link_keeps_its_name_during_the_grace_period(procs, tunnel):
    relay, name, agent = tunnel
    agent.kill(signal.SIGKILL)
    intruder = procs.start(PORTWAY + ["http", "9", "--relay", relay.url, "--name", name], "intruder")
    # refused either way: "in use" if the relay has not seen the link end yet, else "held … free in N s"
    assert intruder.wait_exit(20) != 0 and f"tunnel name {name!r} is" in intruder.output()


def test_origin_that_never_answers_gives_504(procs, origin):
    relay = start_relay(procs, "--response-timeout", "1")
    start_agent(procs, relay, origin, name="mute")
    status, _, body = request(relay, "mute", path="/slow?ms=100&bytes=10&delay=3000", timeout=10)
    assert status == 504 and b"did not answer" in body
    assert request(relay, "mute")[0] == 200  # the tunnel itself is fine
