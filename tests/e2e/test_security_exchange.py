"""The hostile catalogue, round two: what a request and its answer may do on their way through the relay.

One relay with short deadlines, honest tunnels whose origins record every request (from test_security.py), and a
hostile tunnel whose origin is a raw socket scripted per path: it answers a plain GET with a 101, sends endless
heads, falls silent. Each test proves what reached which origin, and that the visitor's connection ends within
the configured deadlines when the relay has answered.
"""

from __future__ import annotations

import secrets
import socket
import threading
import time

import pytest

from .conftest import Processes, wait_until
from .test_security import (
    ANSWER_TIMEOUT,
    BASIC,
    TOKEN,
    RecordingOrigin,
    Relay,
    assert_clean_log,
    basic,
    connect,
    get,
    launch_agent,
    launch_relay,
    read_outcome,
    talk,
)

HEAD_TIMEOUT = 1.0
RESPONSE_TIMEOUT = 2.0
LINGER = 2.0  # RelayConfig.linger_timeout
SLACK = 3.0  # the deadline sweep fires up to a quarter of the shortest timeout late; a loaded CI box adds more


class HostileOrigin:
    """A raw TCP origin: reads one request head per connection, records it, and answers as its path says.

    /switch    `101 Switching Protocols` to a request that asked for no upgrade, then echoes raw bytes
    /big-head  a header line that never ends (64 MiB) ; /big-reason: a 1 MiB reason phrase
    /silent    reads the head (and whatever follows) and never answers
    /stall     a response head and half its body, then silence
    """

    def __init__(self) -> None:
        self.received: list[bytes] = []  # every byte any connection sent, per connection
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def everything_received(self) -> bytes:
        with self._lock:
            return b"".join(self.received)

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket, index: int) -> bytes:
        data = conn.recv(65536)
        with self._lock:
            self.received[index] += data
        return data

    def _serve(self, conn: socket.socket) -> None:
        with self._lock:
            self.received.append(b"")
            index = len(self.received) - 1
        conn.settimeout(30)
        try:
            while b"\r\n\r\n" not in self.received[index]:
                if not self._read(conn, index):
                    return
            path = self.received[index].split(b" ", 2)[1]
            if path.startswith(b"/switch"):
                conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
                while self._read(conn, index):  # a raw pipe: whatever the visitor sends next lands here
                    pass
            elif path.startswith(b"/big-head"):
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Endless: ")
                chunk = b"a" * 65536
                for _ in range(1024):  # 64 MiB, or until the relay gives up on us
                    conn.sendall(chunk)
            elif path.startswith(b"/big-reason"):
                conn.sendall(b"HTTP/1.1 200 " + b"R" * (1 << 20) + b"\r\nContent-Length: 2\r\n\r\nok")
            elif path.startswith(b"/stall"):
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10000\r\n\r\n" + b"s" * 5000)
                while self._read(conn, index):
                    pass
            else:  # /silent
                while self._read(conn, index):
                    pass
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self._closing.set()
        self.sock.close()


class Exchange:
    def __init__(self, relay: Relay, origins: dict[str, RecordingOrigin], hostile: HostileOrigin) -> None:
        self.relay = relay
        self.origins = origins
        self.hostile = hostile

    @property
    def port(self) -> int:
        return self.relay.port

    def host(self, name: str) -> str:
        return self.relay.host(name)


@pytest.fixture(scope="module")
def ex():
    procs = Processes()
    origins = {name: RecordingOrigin(name) for name in ("alpha", "beta", "guarded")}
    hostile = HostileOrigin()
    try:
        relay = launch_relay(procs, "--token", TOKEN, "--head-timeout", str(HEAD_TIMEOUT),
                             "--response-timeout", str(RESPONSE_TIMEOUT))
        launch_agent(procs, relay, origins["alpha"].port, "--token", TOKEN, name="alpha")
        launch_agent(procs, relay, origins["beta"].port, "--token", TOKEN, name="beta")
        launch_agent(procs, relay, origins["guarded"].port, "--token", TOKEN,
                     "--basic-auth", f"{BASIC[0]}:{BASIC[1]}", name="guarded")
        launch_agent(procs, relay, hostile.port, "--token", TOKEN, name="hostile")
        yield Exchange(relay, origins, hostile)
        assert_clean_log(relay.proc)
    finally:
        procs.stop_all()
        hostile.close()
        for origin in origins.values():
            origin.close()


def peak_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc")


def read_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, str, float]:
    """Read until the relay ends the connection; returns the bytes, how it ended, and when (monotonic)."""
    deadline = time.monotonic() + timeout
    received = b""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return received, "open", time.monotonic()
        sock.settimeout(remaining)
        try:
            data = sock.recv(65536)
        except socket.timeout:
            return received, "open", time.monotonic()
        except ConnectionResetError:
            return received, "reset", time.monotonic()
        if not data:
            return received, "eof", time.monotonic()
        received += data


# =============================================================================================== 1. capture

def test_an_origin_cannot_capture_a_visitors_connection_with_an_unasked_101(ex):
    """A 101 to a plain GET is a 502; the next request on that keep-alive connection, for another tunnel and
    with its cookie, reaches that tunnel's origin and never the hostile one."""
    secret = secrets.token_hex(8)
    with connect(ex.port) as sock:
        sock.sendall(f"GET /switch HTTP/1.1\r\nHost: {ex.host('hostile')}\r\n\r\n".encode())
        first = read_outcome(sock, responses=1)
        assert first.statuses == [502], first
        assert b"switched protocols" in first.responses[0].body
        try:
            sock.sendall(f"GET /after-{secret} HTTP/1.1\r\nHost: {ex.host('alpha')}\r\n"
                         f"Cookie: session={secret}\r\n\r\n".encode())
            second = read_outcome(sock, responses=1)
        except (BrokenPipeError, ConnectionResetError):
            second = None
    if second is not None and second.responses:
        assert second.statuses == [200] and f"/after-{secret}".encode() in second.responses[0].body
    assert secret.encode() not in ex.hostile.everything_received()


def test_a_websocket_upgrade_still_switches(ex):
    """The rule does not break real upgrades: an origin may switch when the visitor asked (Node `ws` is covered by
    test_tunnel.py; here the raw origin's 101 to an asked-for `websocket` is followed)."""
    with connect(ex.port) as sock:
        sock.sendall(f"GET /switch HTTP/1.1\r\nHost: {ex.host('hostile')}\r\nConnection: Upgrade\r\n"
                     f"Upgrade: websocket\r\n\r\n".encode())
        outcome = read_outcome(sock, responses=1)
        assert outcome.statuses == [101]
        sock.sendall(b"raw-after-switch")
        wait_until(lambda: b"raw-after-switch" in ex.hostile.everything_received(), timeout=ANSWER_TIMEOUT,
                   what="raw bytes through the switched connection")


# =============================================================================================== 2. trailers

def chunked_post(host: str, path: str, trailer: bytes, extra: bytes = b"") -> bytes:
    """Head, body and trailer in one write: the relay reads them in one go."""
    return (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n".encode() + extra
            + b"\r\n5\r\nhello\r\n0\r\n" + trailer + b"\r\n")


def test_trailer_fields_never_become_headers_at_the_origin(ex):
    path = f"/trailer-{secrets.token_hex(4)}"
    trailer = (f"Host: {ex.host('beta')}\r\nX-Forwarded-For: 6.6.6.6\r\nX-Trailer-Only: t\r\n").encode()
    outcome = talk(ex.port, chunked_post(ex.host("alpha"), path, trailer))
    assert outcome.statuses == [200]
    (seen,) = [seen for seen in ex.origins["alpha"].requests() if seen.path == path]
    assert seen.header("Host") == [ex.host("alpha")] and seen.body == b"hello"
    assert seen.header("X-Trailer-Only") == [] and seen.header("X-Forwarded-For") == ["127.0.0.1"]
    assert not any(path in p for p in ex.origins["beta"].paths())


def test_credentials_only_in_a_trailer_do_not_pass_basic_auth(ex):
    path = f"/trailer-auth-{secrets.token_hex(4)}"
    trailer = f"Authorization: {basic(*BASIC)}\r\n".encode()
    outcome = talk(ex.port, chunked_post(ex.host("guarded"), path, trailer))
    assert outcome.statuses == [401]
    assert not any(path in p for p in ex.origins["guarded"].paths())
    # and with the credentials in the head, the same request passes
    outcome = talk(ex.port, chunked_post(ex.host("guarded"), path, b"", f"Authorization: {basic(*BASIC)}\r\n".encode()))
    assert outcome.statuses == [200]


# =============================================================================================== 3. bounded heads

def test_an_endless_response_head_costs_bounded_memory_and_others_keep_being_served(ex):
    pid = ex.relay.proc.popen.pid
    before = peak_rss_kib(pid)
    answers: list[int] = []

    def honest_meanwhile() -> None:
        for _ in range(20):
            answers.append(get(ex.port, ex.host("alpha"), "/meanwhile").status)

    meanwhile = threading.Thread(target=honest_meanwhile)
    meanwhile.start()
    outcome = talk(ex.port, f"GET /big-head HTTP/1.1\r\nHost: {ex.host('hostile')}\r\n\r\n".encode())
    meanwhile.join(ANSWER_TIMEOUT * 3)
    assert outcome.statuses == [502] and b"too large" in outcome.responses[0].body
    assert answers == [200] * 20
    grown_mib = (peak_rss_kib(pid) - before) / 1024
    # the head limit is 32 KiB; what the relay may hold besides is a stream window (256 KiB) and one read
    assert grown_mib < 16, f"the relay's peak RSS grew by {grown_mib:.1f} MiB for a 64 MiB header line"


def test_a_huge_reason_phrase_is_a_502_and_never_reaches_the_visitor(ex):
    outcome = talk(ex.port, f"GET /big-reason HTTP/1.1\r\nHost: {ex.host('hostile')}\r\n\r\n".encode())
    assert outcome.statuses == [502]
    assert b"RRRR" not in outcome.rest and all(b"RRRR" not in r.body for r in outcome.responses)


# =============================================================================================== 4. one Host

@pytest.mark.parametrize("connection", ["close, Host", "Host", "keep-alive, host, x-forwarded-for"])
def test_connection_options_cannot_remove_or_replace_host(ex, connection):
    path = f"/conn-host-{secrets.token_hex(4)}"
    response = get(ex.port, ex.host("alpha"), path, headers={"Connection": connection})
    assert response.status == 200
    (seen,) = [seen for seen in ex.origins["alpha"].requests() if seen.path == path]
    assert seen.header("Host") == [ex.host("alpha")]
    assert seen.header("X-Forwarded-For") == ["127.0.0.1"]


# =============================================================================================== 5. deadlines

def test_after_a_504_the_relay_stops_reading_a_trickled_body(ex):
    """The origin never answers while the visitor trickles a 1 GB body: a 504 at the response deadline, then the
    connection ends within the linger time even though the visitor keeps sending."""
    with connect(ex.port) as sock:
        started = time.monotonic()
        sock.sendall(f"POST /silent HTTP/1.1\r\nHost: {ex.host('hostile')}\r\nContent-Length: 1000000000\r\n\r\n"
                     .encode())
        received = b""
        ended = "open"
        give_up = started + RESPONSE_TIMEOUT + LINGER + 4 * SLACK
        while time.monotonic() < give_up and ended == "open":
            try:
                sock.sendall(b"x" * 1024)
            except (BrokenPipeError, ConnectionResetError):
                ended = "reset"
                break
            sock.settimeout(0.2)
            try:
                data = sock.recv(65536)
                if not data:
                    ended = "eof"
                received += data
            except socket.timeout:
                pass
            except ConnectionResetError:
                ended = "reset"
        elapsed = time.monotonic() - started
    assert received.startswith(b"HTTP/1.1 504 "), received[:200]
    assert ended != "open", "the relay kept reading a body after answering 504"
    assert elapsed < RESPONSE_TIMEOUT + LINGER + 2 * SLACK, elapsed


def test_after_a_504_an_expect_100_continue_body_never_sent_ends_the_connection(ex):
    with connect(ex.port) as sock:
        sock.sendall(f"POST /silent HTTP/1.1\r\nHost: {ex.host('hostile')}\r\nContent-Length: 1000000000\r\n"
                     f"Expect: 100-continue\r\n\r\n".encode())
        received, ended, _ = read_until_closed(sock, RESPONSE_TIMEOUT + LINGER + 2 * SLACK)
    assert b"HTTP/1.1 504 " in received and ended != "open"


@pytest.mark.parametrize("target", ["unknown", "guarded"])
def test_a_refused_request_whose_body_never_arrives_is_answered_and_closed(ex, target):
    """404 (no such tunnel) and 401 (no credentials) are answered at once; the declared body that never comes
    can hold the connection only until the head deadline, not the idle timeout."""
    with connect(ex.port) as sock:
        started = time.monotonic()
        sock.sendall(f"POST /refused HTTP/1.1\r\nHost: {ex.host(target)}\r\nContent-Length: 10\r\n\r\nabc".encode())
        received, ended, at = read_until_closed(sock, HEAD_TIMEOUT + 3 * SLACK)
    assert received.split(b" ", 2)[1] in (b"404", b"401"), received[:100]
    assert ended != "open" and at - started < HEAD_TIMEOUT + 2 * SLACK


def test_a_response_that_falls_silent_mid_body_is_cut(ex):
    with connect(ex.port) as sock:
        started = time.monotonic()
        sock.sendall(f"GET /stall HTTP/1.1\r\nHost: {ex.host('hostile')}\r\n\r\n".encode())
        received, ended, at = read_until_closed(sock, RESPONSE_TIMEOUT + 3 * SLACK)
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and len(body) < 10000, "a cut response must look cut"
    assert ended == "reset" and at - started < RESPONSE_TIMEOUT + 2 * SLACK


# =============================================================================================== 6. identity

def test_no_client_identity_header_from_a_visitor_reaches_the_origin(ex):
    path = f"/identity-{secrets.token_hex(4)}"
    spoofs = {"X-Forwarded-Prefix": "/evil", "X-Forwarded-Server": "evil", "X-Forwarded-Ssl": "on",
              "X-Forwarded-Scheme": "https", "X-Forwarded-Port": "443", "X-Real-IP": "6.6.6.6",
              "True-Client-IP": "6.6.6.6", "CF-Connecting-IP": "6.6.6.6", "X-Client-IP": "6.6.6.6",
              "Forwarded": "for=6.6.6.6", "X_Real_IP": "6.6.6.6"}
    assert get(ex.port, ex.host("alpha"), path, headers=spoofs).status == 200
    (seen,) = [seen for seen in ex.origins["alpha"].requests() if seen.path == path]
    leaked = [(key, value) for key, value in seen.headers if "6.6.6.6" in value or "evil" in value
              or key.lower() in ("x-forwarded-ssl", "x-forwarded-scheme", "x-forwarded-port", "forwarded")]
    assert leaked == []
    forwarded = sorted(key.lower() for key, _ in seen.headers if key.lower().startswith("x-forwarded-"))
    assert forwarded == ["x-forwarded-for", "x-forwarded-host", "x-forwarded-proto"]


# =============================================================================================== 7. Host

@pytest.mark.parametrize("host", ["[alpha.{d}]beta.{d}:{p}", "alpha.{d}:\u00b9\u00b2", "alpha.{d}:" + "8" * 20,
                                  "alpha.{d}..", "alpha.{d}...:{p}", "alpha.{d}:65536"])
def test_loose_host_spellings_are_400_and_reach_no_tunnel(ex, host):
    path = f"/loose-{secrets.token_hex(4)}"
    value = host.format(d=ex.relay.domain, p=ex.port)
    outcome = talk(ex.port, f"GET {path} HTTP/1.1\r\nHost: {value}\r\n\r\n".encode("latin-1"))
    assert outcome.statuses == [400] and outcome.closed
    assert not any(path in p for origin in ex.origins.values() for p in origin.paths())
