"""Issue 4's hostile catalogue against real processes: one relay, honest tunnels, and everything an internet
visitor or a hostile agent may throw at them.

Each honest tunnel is served by its own in-test origin that records every request it sees, so the tests can
assert the strongest property there is: no hostile request ever reached an origin, and no request ever reached
another tunnel's origin. When the tests that share the relay are done (whichever ran), the `world` fixture checks
that the relay still serves every honest tunnel and nothing crossed (`assert_catalogue_left_no_trace`).

Rows are `(id, raw bytes, expected)`: an HTTP status the relay must answer (then close the connection when the
status is an error that leaves the framing in doubt), or CLOSED (no answer, the connection just ends).
Every request that must never reach an origin carries `SMUGGLED` in its target.

The other catalogue files (`test_security_setup.py`) start their own relays: tokens, throttling, tokens files,
the secure default, TLS, the per-address limit and name rules at the agent's command line.
"""

from __future__ import annotations

import base64
import json
import random
import re
import secrets
import select
import signal
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from .conftest import PORTWAY, Processes, Relay, free_port

TOKEN = "catalogue-" + secrets.token_hex(8)
DOMAIN = "pw.test"
HEAD_TIMEOUT = 1.0
IDLE_TIMEOUT = 3.0
BASIC = ("user", "pa55:word")
ANSWER_TIMEOUT = 8.0  # bound for any single answer; a healthy relay answers in milliseconds
CLOSED = "closed"
MARK = "SMUGGLED"


# ----------------------------------------------------------------------------------------------- origins

@dataclass
class Seen:
    method: str
    path: str
    host: str | None
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key.lower() == name.lower()]


class RecordingOrigin:
    """A tiny HTTP/1.1 origin on 127.0.0.1 that records every request (method, path, Host, headers, body).

    `/gate/NAME…` paths block until the test opens that gate (the origin signals `arrived(NAME)` first);
    `/partial-cl…` and `/partial-chunked…` send part of a response and then wait for their gate, so the test
    can kill the agent in the middle of a body.
    """

    def __init__(self, label: str) -> None:
        self.label = label
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        self._arrived: dict[str, threading.Event] = {}
        self._gates: dict[str, threading.Event] = {}
        self._closing = threading.Event()
        origin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def __getattr__(self, name: str):
                if name.startswith("do_"):
                    return self._serve
                raise AttributeError(name)

            def _read_body(self) -> bytes:
                if (self.headers.get("Transfer-Encoding") or "").lower() == "chunked":
                    body = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return body
                        body += self.rfile.read(size)
                        self.rfile.readline()
                length = self.headers.get("Content-Length")
                return self.rfile.read(int(length)) if length else b""

            def _serve(self) -> None:
                body = self._read_body()
                with origin._lock:
                    origin.seen.append(Seen(self.command, self.path, self.headers.get("Host"),
                                            list(self.headers.items()), body))
                path = self.path
                if path.startswith("/partial-cl"):
                    self.send_response(200)
                    self.send_header("Content-Length", "100000")
                    self.end_headers()
                    self.wfile.write(b"x" * 1000)
                    self.wfile.flush()
                    origin._signal_and_wait("partial-cl")
                    self.close_connection = True
                    return
                if path.startswith("/partial-chunked"):
                    self.send_response(200)
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    self.wfile.write(b"3e8\r\n" + b"y" * 1000 + b"\r\n")
                    self.wfile.flush()
                    origin._signal_and_wait("partial-chunked")
                    self.close_connection = True
                    return
                if path.startswith("/gate/"):
                    origin._signal_and_wait(path.split("/")[2])
                answer = f"{origin.label} {self.command} {path}".encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(answer)

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address) -> None:
                pass  # agents and relays dying mid-request are part of the catalogue

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, name=f"origin {label}", daemon=True)
        self.thread.start()

    def _event(self, table: dict[str, threading.Event], name: str) -> threading.Event:
        with self._lock:
            return table.setdefault(name, threading.Event())

    def _signal_and_wait(self, name: str) -> None:
        self._event(self._arrived, name).set()
        gate = self._event(self._gates, name)
        while not gate.is_set() and not self._closing.is_set():
            gate.wait(0.1)

    def wait_arrived(self, name: str, timeout: float = ANSWER_TIMEOUT) -> None:
        assert self._event(self._arrived, name).wait(timeout), f"origin {self.label} never got /{name}"

    def open_gate(self, name: str) -> None:
        self._event(self._gates, name).set()

    def requests(self) -> list[Seen]:
        with self._lock:
            return list(self.seen)

    def paths(self) -> list[str]:
        return [seen.path for seen in self.requests()]

    def close(self) -> None:
        self._closing.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


# ----------------------------------------------------------------------------------------------- raw HTTP

@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    @property
    def closes(self) -> bool:
        return (self.header("connection") or "").lower() == "close"


@dataclass
class Outcome:
    responses: list[Response]
    ending: str  # "eof", "reset" or "open" (still open when we stopped reading)
    rest: bytes = b""  # bytes after the last complete response

    @property
    def closed(self) -> bool:
        return self.ending in ("eof", "reset")

    @property
    def statuses(self) -> list[int]:
        return [response.status for response in self.responses]


def parse_response(buffer: bytes, method: str = "GET") -> tuple[Response, int] | None:
    """One complete response from the front of `buffer` and its size, or None if more bytes are needed."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = buffer[:end].decode("latin-1").split("\r\n")
    match = re.match(r"HTTP/1\.[01] (\d{3})", lines[0])
    assert match, f"not an HTTP response: {buffer[:200]!r}"
    status = int(match.group(1))
    headers = []
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers.append((key.strip(), value.strip()))
    response = Response(status, headers, b"")
    at = end + 4
    if 100 <= status < 200 and status != 101:
        rest = parse_response(buffer[at:], method)
        return None if rest is None else (rest[0], at + rest[1])
    if method == "HEAD" or status in (101, 204, 304):
        return response, at
    if (response.header("transfer-encoding") or "").lower() == "chunked":
        body = b""
        while True:
            line_end = buffer.find(b"\r\n", at)
            if line_end < 0:
                return None
            size = int(buffer[at:line_end].split(b";")[0], 16)
            if size == 0:
                trailer_end = buffer.find(b"\r\n\r\n", line_end)
                if trailer_end < 0:
                    return None
                response.body = body
                return response, trailer_end + 4
            if len(buffer) < line_end + 2 + size + 2:
                return None
            body += buffer[line_end + 2 : line_end + 2 + size]
            at = line_end + 2 + size + 2
    length = response.header("content-length")
    if length is None:
        return None  # close-delimited: complete only at EOF, which the caller handles
    if len(buffer) < at + int(length):
        return None
    response.body = buffer[at : at + int(length)]
    return response, at + int(length)


def connect(port: int, source: str = "127.0.0.1", timeout: float = ANSWER_TIMEOUT) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0))


def read_outcome(sock: socket.socket, responses: int | None = None, methods: list[str] | None = None,
                 timeout: float = ANSWER_TIMEOUT, initial: bytes = b"") -> Outcome:
    """Read answers until the connection ends, or until `responses` answers arrived on a connection the relay
    keeps open. Bounded by `timeout` overall."""
    deadline = time.monotonic() + timeout
    buffer = initial
    parsed: list[Response] = []
    ending = "open"
    while True:
        while True:
            method = (methods or [])[len(parsed)] if methods and len(parsed) < len(methods) else "GET"
            result = parse_response(buffer, method)
            if result is None:
                break
            parsed.append(result[0])
            buffer = buffer[result[1]:]
        if responses is not None and len(parsed) >= responses and not parsed[-1].closes:
            break
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        sock.settimeout(remaining)
        try:
            data = sock.recv(65536)
        except socket.timeout:
            break
        except ConnectionResetError:
            ending = "reset"
            break
        if not data:
            ending = "eof"
            break
        buffer += data
    if ending != "open" and buffer.startswith(b"HTTP/1.") and parse_response(buffer) is None:
        head_end = buffer.find(b"\r\n\r\n")
        if head_end >= 0:  # a close-delimited response ends here
            response, _ = parse_response(buffer[: head_end + 4] + b"", "HEAD")
            response.body = buffer[head_end + 4 :]
            parsed.append(response)
            buffer = b""
    return Outcome(parsed, ending, buffer)


def talk(port: int, raw: bytes, *, responses: int | None = 1, source: str = "127.0.0.1",
         methods: list[str] | None = None, timeout: float = ANSWER_TIMEOUT, shutdown_write: bool = False) -> Outcome:
    """Send `raw` on a fresh connection and read what comes back (see read_outcome)."""
    with connect(port, source) as sock:
        try:
            sock.sendall(raw)
            if shutdown_write:
                sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the relay refused early (431): what it answered is still readable
        return read_outcome(sock, responses, methods, timeout)


def get(port: int, host: str, path: str = "/", headers: dict[str, str] | None = None, method: str = "GET",
        source: str = "127.0.0.1") -> Response:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    lines += [f"{key}: {value}" for key, value in (headers or {}).items()]
    outcome = talk(port, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"), source=source, methods=[method])
    assert outcome.responses, f"no answer to {method} {host}{path}: {outcome}"
    return outcome.responses[0]


def basic(user: str, password: str, scheme: str = "Basic") -> str:
    return f"{scheme} " + base64.b64encode(f"{user}:{password}".encode()).decode()


# ----------------------------------------------------------------------------------------------- processes

def launch_relay(procs: Processes, *extra: str, domain: str = DOMAIN, port: int | None = None) -> Relay:
    """`portway -v server …` on 127.0.0.1 (verbose: the log names each tunnel and why it went offline)."""
    port = port or free_port()
    proc = procs.start(PORTWAY + ["-v", "server", "--port", str(port), "--domain", domain, *extra], "relay")
    proc.wait_for_line(r"listening on")
    return Relay(proc, port, domain)


def launch_agent(procs: Processes, relay: Relay, local_port: int, *extra: str, name: str, scheme: str = "http",
                 relay_url: str | None = None, env: dict | None = None):
    args = PORTWAY + ["http", str(local_port), "--relay", relay_url or relay.url, "--name", name, *extra]
    proc = procs.start(args, f"agent {name}", env=env)
    proc.wait_for_line(r"^%s://%s\.%s:%d$" % (scheme, re.escape(name), re.escape(relay.domain), relay.port))
    return proc


def assert_clean_log(proc) -> None:
    """No unhandled exception in a process's output: everything hostile is answered on purpose."""
    text = proc.output()
    for marker in ("Traceback", "Task exception was never retrieved", "Exception in callback",
                   "Unhandled exception", "Fatal error"):
        assert marker not in text, f"{proc.name} logged {marker!r}:\n{text[-4000:]}"


# ----------------------------------------------------------------------------------------------- agent link

HEADER = struct.Struct(">BBHII")
VERSION = 1  # the frame protocol these hostile peers speak (portway.proto.frame.PROTOCOL_VERSION)
DATA, WINDOW_UPDATE, PING, GO_AWAY = 0, 1, 2, 3
SYN, ACK, FIN, RST = 0x1, 0x2, 0x4, 0x8
PROTOCOL_ERROR = 1


def frame(kind: int, flags: int, stream_id: int, length: int, payload: bytes = b"", version: int = VERSION) -> bytes:
    return HEADER.pack(version, kind, flags, stream_id, length) + payload


def data_frame(stream_id: int, payload: bytes, flags: int = 0) -> bytes:
    return frame(DATA, flags, stream_id, len(payload), payload)


def refusal_message(response: Response) -> str:
    """A refused registration is JSON `{"message": "..."}`, which the agent prints; nothing else will do."""
    assert response.header("content-type") == "application/json", (
        f"refusal {response.status} is not JSON: {response.header('content-type')!r} {response.body[:200]!r}")
    answer = json.loads(response.body)
    assert isinstance(answer, dict) and list(answer) == ["message"], answer
    assert isinstance(answer["message"], str) and answer["message"], answer
    return answer["message"]


class RawAgentLink:
    """A hand-driven agent link: registers through the HTTP upgrade, then sends whatever frames a test wants."""

    def __init__(self, port: int, name: str | None, token: str | None = TOKEN, source: str = "127.0.0.1",
                 extra_headers: dict[str, str] | None = None, trailing: bytes = b"") -> None:
        target = "/_portway/agent" + (f"?name={name}" if name is not None else "")
        headers = {"Host": f"127.0.0.1:{port}", "Upgrade": "portway-mux", "Connection": "Upgrade"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        headers.update(extra_headers or {})
        lines = [f"GET {target} HTTP/1.1"] + [f"{key}: {value}" for key, value in headers.items() if value]
        self.sock = connect(port, source)
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + trailing)
        buffer = b""
        while b"\r\n\r\n" not in buffer:
            data = self.sock.recv(65536)
            if not data:
                break
            buffer += data
        head, _, self.buffer = buffer.partition(b"\r\n\r\n")
        self.status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else 0
        self.headers = {}
        for line in head.decode("latin-1").split("\r\n")[1:]:
            key, _, value = line.partition(":")
            self.headers[key.strip().lower()] = value.strip()
        self.message = ""
        self.content_type: str | None = None
        self.body = b""
        if self.status != 101:
            outcome = read_outcome(self.sock, initial=buffer)
            assert outcome.responses, f"no complete answer to the registration: {outcome}"
            refusal = outcome.responses[0]
            self.content_type, self.body, self.ending = refusal.header("content-type"), refusal.body, outcome.ending
            self.message = refusal_message(refusal)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_frames_until(self, predicate, timeout: float = ANSWER_TIMEOUT) -> list[tuple]:
        """Read frames until one satisfies `predicate(frame_tuple)`; returns all frames read."""
        deadline = time.monotonic() + timeout
        frames = []
        while True:
            while len(self.buffer) >= HEADER.size:
                version, kind, flags, stream_id, length = HEADER.unpack_from(self.buffer)
                size = HEADER.size + (length if kind == DATA else 0)
                if len(self.buffer) < size:
                    break
                item = (kind, flags, stream_id, length, self.buffer[HEADER.size:size])
                self.buffer = self.buffer[size:]
                frames.append(item)
                if predicate(item):
                    return frames
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"timed out waiting for a frame; got {frames[-5:]}"
            self.sock.settimeout(remaining)
            data = self.sock.recv(65536)
            assert data, f"link closed while waiting for a frame; got {frames[-5:]}"
            self.buffer += data

    def wait_closed(self, timeout: float = ANSWER_TIMEOUT) -> tuple[bytes, str]:
        """Read until the relay ends the link; returns the bytes it sent and how it ended."""
        deadline = time.monotonic() + timeout
        received = self.buffer
        self.buffer = b""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return received, "open"
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                return received, "open"
            except ConnectionResetError:
                return received, "reset"
            if not data:
                return received, "eof"
            received += data

    def close(self) -> None:
        self.sock.close()


def go_away_codes(data: bytes) -> list[int]:
    codes = []
    while len(data) >= HEADER.size:
        _, kind, _, _, length = HEADER.unpack_from(data)
        if kind == GO_AWAY:
            codes.append(length)
        data = data[HEADER.size + (length if kind == DATA else 0):]
    return codes


# ----------------------------------------------------------------------------------------------- the world

@dataclass
class World:
    relay: Relay
    origins: dict[str, RecordingOrigin]
    agents: dict[str, object]
    procs: Processes
    offline: set[str] = field(default_factory=set)  # tunnel names deliberately killed or closed by tests

    @property
    def port(self) -> int:
        return self.relay.port

    def host(self, name: str) -> str:
        return self.relay.host(name)


HONEST = {
    "alpha": (),
    "beta": (),
    "guarded": ("--basic-auth", f"{BASIC[0]}:{BASIC[1]}"),
    "walled": ("--allow-ip", "10.0.0.0/8"),
    "local2": ("--allow-ip", "127.0.0.2/32"),
}


def assert_catalogue_left_no_trace(world: World) -> None:
    """Run by the `world` fixture after the last test that used it, whichever tests ran and in whatever order:
    every honest tunnel still works as configured, no origin saw a request for another tunnel or a smuggled one,
    no honest agent died, and the relay logged no unhandled exception."""
    tag = secrets.token_hex(4)
    for name in ("alpha", "beta"):
        assert get(world.port, world.host(name), f"/final-{tag}").body == f"{name} GET /final-{tag}".encode()
    auth = {"Authorization": basic(*BASIC)}
    assert get(world.port, world.host("guarded"), f"/final-{tag}", headers=auth).status == 200
    assert get(world.port, world.host("walled"), "/SMUGGLED-final").status == 403
    assert get(world.port, world.host("local2"), f"/final-{tag}", source="127.0.0.2").status == 200
    for name, origin in world.origins.items():
        hosts = {(seen.host or "").lower().rstrip(".").split(":")[0].rstrip(".") for seen in origin.requests()}
        if name == "doomed":
            assert all(host.startswith("doomed-") for host in hosts), hosts
        else:
            assert hosts <= {f"{name}.{DOMAIN}"}, f"origin {name} saw requests for {hosts}"
    never_reached(world)
    assert world.relay.proc.popen.poll() is None
    for name, agent in world.agents.items():
        assert agent.popen.poll() is None, f"honest agent {name} died: {agent.output()}"
    assert_clean_log(world.relay.proc)


@pytest.fixture(scope="module")
def world():
    procs = Processes()
    origins = {name: RecordingOrigin(name) for name in [*HONEST, "doomed"]}
    try:
        # an agent killed mid-answer (the doomed ones) is a lost link to the relay: its streams wait the resume
        # window for it before the visitor sees them fail
        relay = launch_relay(procs, "--token", TOKEN, "--head-timeout", str(HEAD_TIMEOUT),
                             "--idle-timeout", str(IDLE_TIMEOUT), "--resume-window", "1")
        agents = {}
        for name, flags in HONEST.items():
            agents[name] = launch_agent(procs, relay, origins[name].port, "--token", TOKEN, *flags, name=name)
        world = World(relay, origins, agents, procs)
        yield world
        assert_catalogue_left_no_trace(world)  # a failure here is an error at the teardown of the last test
    finally:
        procs.stop_all()
        for origin in origins.values():
            origin.close()


def never_reached(world: World, marker: str = MARK) -> None:
    for origin in world.origins.values():
        leaked = [seen for seen in origin.requests() if marker in seen.path]
        assert not leaked, f"{marker} reached origin {origin.label}: {leaked}"


def assert_refused(outcome: Outcome, expected, what: str = "") -> None:
    if expected == CLOSED:
        assert outcome.responses == [] and outcome.closed, f"{what}: expected a silent close, got {outcome}"
        return
    assert outcome.statuses[:1] == [expected], f"{what}: expected {expected}, got {outcome}"
    if expected in (400, 405, 408, 431):
        # the framing of anything that follows is in doubt: one answer, then the connection ends
        assert len(outcome.responses) == 1 and outcome.responses[0].closes and outcome.closed, outcome
        assert outcome.rest == b"", f"bytes after the refusal: {outcome.rest[:200]!r}"


# =============================================================================================== host tricks

BAD_HOSTS = [
    ("no-host", b"GET /SMUGGLED HTTP/1.1\r\nAccept: */*\r\n\r\n", 400),
    ("no-host-http10", b"GET /SMUGGLED HTTP/1.0\r\n\r\n", 400),
    ("two-equal-hosts", b"GET /SMUGGLED HTTP/1.1\r\nHost: {alpha}\r\nHost: {alpha}\r\n\r\n", 400),
    ("two-hosts-port-and-none", b"GET /SMUGGLED HTTP/1.1\r\nHost: {alpha}\r\nHost: alpha.pw.test\r\n\r\n", 400),
    ("two-hosts-different", b"GET /SMUGGLED HTTP/1.1\r\nHost: {alpha}\r\nHost: {beta}\r\n\r\n", 400),
    ("absolute-form-disagrees", b"GET http://{beta}/SMUGGLED HTTP/1.1\r\nHost: {alpha}\r\n\r\n", 400),
    ("absolute-form-port-differs", b"GET http://alpha.pw.test/SMUGGLED HTTP/1.1\r\nHost: {alpha}\r\n\r\n", 400),
    ("empty-host", b"GET /SMUGGLED HTTP/1.1\r\nHost: \r\n\r\n", 400),
    ("port-only-host", b"GET /SMUGGLED HTTP/1.1\r\nHost: :80\r\n\r\n", 400),
    ("non-numeric-port", b"GET /SMUGGLED HTTP/1.1\r\nHost: alpha.pw.test:80x\r\n\r\n", 400),
    ("double-port", b"GET /SMUGGLED HTTP/1.1\r\nHost: alpha.pw.test:80:80\r\n\r\n", 400),
    ("unclosed-ipv6", b"GET /SMUGGLED HTTP/1.1\r\nHost: [::1\r\n\r\n", 400),
    ("nul-in-host", b"GET /SMUGGLED HTTP/1.1\r\nHost: alpha.pw.test\x00.evil\r\n\r\n", 400),
    ("cr-in-host", b"GET /SMUGGLED HTTP/1.1\r\nHost: alpha.pw.test\rX\r\n\r\n", 400),
]


@pytest.mark.parametrize("raw, expected", [row[1:] for row in BAD_HOSTS], ids=[row[0] for row in BAD_HOSTS])
def test_bad_host_is_refused(world, raw, expected):
    raw = raw.replace(b"{alpha}", world.host("alpha").encode()).replace(b"{beta}", world.host("beta").encode())
    assert_refused(talk(world.port, raw), expected, "bad host")
    never_reached(world)


FOREIGN_HOSTS = [
    ("suffix-appended", "alpha.pw.test.evil.test", "alpha.pw.test.evil.test"),
    ("prefix-glued", "xalpha.pw.test", "xalpha.pw.test"),
    ("sub-subdomain", "x.alpha.pw.test", "x.alpha.pw.test"),
    ("lookalike-domain", "evilpw.test", "evilpw.test"),
    ("domain-as-label", "pw.test.evil", "pw.test.evil"),
    ("userinfo-like", "alpha.pw.test@evil.test", "alpha.pw.test@evil.test"),
    ("empty-label", "alpha..pw.test", "alpha..pw.test"),
    ("punycode-unregistered", "xn--bcher-kva.pw.test", "xn--bcher-kva.pw.test"),
    ("raw-utf8", "b\xc3\xbccher.pw.test", "cher.pw.test"),
]


@pytest.mark.parametrize("host, named", [row[1:] for row in FOREIGN_HOSTS], ids=[row[0] for row in FOREIGN_HOSTS])
def test_foreign_host_gets_404_naming_it_and_never_a_tunnel(world, host, named):
    before = {name: len(origin.requests()) for name, origin in world.origins.items()}
    response = get(world.port, host, "/SMUGGLED")
    assert response.status == 404 and named.encode() in response.body
    assert {name: len(origin.requests()) for name, origin in world.origins.items()} == before


def test_reflected_host_is_escaped_on_the_404_page(world):
    response = get(world.port, '<script>alert(1)</script>"x.pw.test', "/SMUGGLED")
    assert response.status == 404 and b"<script>" not in response.body and b"&lt;script&gt;" in response.body
    assert (response.header("Content-Type") or "").startswith("text/html")


NORMALISED = [
    ("upper-case", "ALPHA.PW.TEST:{port}"),
    ("trailing-dot", "alpha.pw.test.:{port}"),
    ("no-port", "alpha.pw.test"),
    ("empty-port", "alpha.pw.test:"),
    ("mixed-case-dot", "Alpha.Pw.Test."),
]


@pytest.mark.parametrize("host", [row[1] for row in NORMALISED], ids=[row[0] for row in NORMALISED])
def test_host_variants_normalise_to_the_same_tunnel(world, host):
    host = host.format(port=world.port)
    path = f"/norm-{secrets.token_hex(4)}"
    response = get(world.port, host, path)
    assert response.status == 200 and response.body == f"alpha GET {path}".encode()
    assert world.origins["alpha"].requests()[-1].host == host


def test_absolute_form_matching_host_is_routed_in_origin_form(world):
    path = f"/abs-{secrets.token_hex(4)}"
    raw = f"GET http://{world.host('alpha')}{path}?q=1 HTTP/1.1\r\nHost: {world.host('alpha')}\r\n\r\n".encode()
    outcome = talk(world.port, raw)
    assert outcome.statuses == [200]
    assert world.origins["alpha"].requests()[-1].path == path + "?q=1"


def test_forwarding_headers_from_visitors_are_replaced(world):
    path = f"/fwd-{secrets.token_hex(4)}"
    response = get(world.port, world.host("alpha"), path, headers={
        "X-Forwarded-For": "6.6.6.6", "X-Forwarded-Host": world.host("beta"), "X-Forwarded-Proto": "https",
        "X-Forwarded-Port": "443", "Forwarded": "for=6.6.6.6;host=evil", "X_Forwarded_For": "6.6.6.6",
        "X-Forwarded_Host": "evil",
    })
    assert response.status == 200 and response.body == f"alpha GET {path}".encode()
    seen = world.origins["alpha"].requests()[-1]
    assert seen.path == path
    assert seen.header("X-Forwarded-For") == ["127.0.0.1"]
    assert seen.header("X-Forwarded-Proto") == ["http"]
    assert seen.header("X-Forwarded-Host") == [world.host("alpha")]
    assert seen.header("Forwarded") == [] and seen.header("X-Forwarded-Port") == []
    spoofed = [(key, value) for key, value in seen.headers if "6.6.6.6" in value or "evil" in value]
    assert spoofed == [], f"spoofed forwarding headers reached the origin: {spoofed}"
    assert not any(path in s.path for s in world.origins["beta"].requests())  # routed by Host, never X-F-Host


def test_pipelined_requests_for_two_tunnels_each_reach_their_own(world):
    tag = secrets.token_hex(4)
    raw = (f"GET /pipe-{tag}-a HTTP/1.1\r\nHost: {world.host('alpha')}\r\n\r\n"
           f"GET /pipe-{tag}-b HTTP/1.1\r\nHost: {world.host('beta')}\r\n\r\n"
           f"GET /pipe-{tag}-c HTTP/1.1\r\nHost: {world.host('alpha')}\r\nConnection: close\r\n\r\n").encode()
    outcome = talk(world.port, raw, responses=3)
    assert [r.body for r in outcome.responses] == [
        f"alpha GET /pipe-{tag}-a".encode(), f"beta GET /pipe-{tag}-b".encode(), f"alpha GET /pipe-{tag}-c".encode()]
    assert outcome.closed
    assert [p for p in world.origins["beta"].paths() if tag in p] == [f"/pipe-{tag}-b"]


# =============================================================================================== smuggling

SMUGGLE = b"GET /SMUGGLED HTTP/1.1\r\nHost: {alpha}\r\n\r\n"


def post(headers: bytes, body: bytes = b"", version: bytes = b"1.1") -> bytes:
    return b"POST /SMUGGLED-outer HTTP/" + version + b"\r\nHost: {alpha}\r\n" + headers + b"\r\n" + body


SMUGGLING = [
    # Content-Length and Transfer-Encoding together, in both orders
    ("cl-te", post(b"Content-Length: 6\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n" + SMUGGLE), 400),
    ("te-cl", post(b"Transfer-Encoding: chunked\r\nContent-Length: 40\r\n", b"0\r\n\r\n" + SMUGGLE), 400),
    # Content-Length: duplicated, conflicting, malformed
    ("cl-duplicate-conflicting", post(b"Content-Length: 1\r\nContent-Length: 0\r\n", b"G" + SMUGGLE), 400),
    ("cl-duplicate-equal", post(b"Content-Length: 5\r\nContent-Length: 5\r\n", b"hello" + SMUGGLE), 400),
    ("cl-list", post(b"Content-Length: 5, 6\r\n", b"hello!" + SMUGGLE), 400),
    ("cl-list-equal", post(b"Content-Length: 5, 5\r\n", b"hello" + SMUGGLE), 400),
    ("cl-empty", post(b"Content-Length: \r\n", SMUGGLE), 400),
    ("cl-plus", post(b"Content-Length: +5\r\n", b"hello" + SMUGGLE), 400),
    ("cl-hex", post(b"Content-Length: 0x5\r\n", b"hello" + SMUGGLE), 400),
    ("cl-underscore", post(b"Content-Length: 5_0\r\n", b"hello" + SMUGGLE), 400),
    ("cl-negative", post(b"Content-Length: -1\r\n", SMUGGLE), 400),
    ("cl-trailing-junk", post(b"Content-Length: 1Z\r\n", b"h" + SMUGGLE), 400),
    ("cl-25-digits", post(b"Content-Length: 1000000000000000000000000\r\n", SMUGGLE), 400),
    ("cl-space-before-colon", post(b"Content-Length : 5\r\n", b"hello" + SMUGGLE), 400),
    ("cl-non-ascii-name", post(b"Content-Length\x85: 5\r\n", b"hello" + SMUGGLE), 400),
    # Transfer-Encoding obfuscations
    ("te-chunked-twice", post(b"Transfer-Encoding: chunked, chunked\r\n", b"0\r\n\r\n" + SMUGGLE), 400),
    ("te-two-headers", post(b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n" + SMUGGLE), 400),
    ("te-gzip-only", post(b"Transfer-Encoding: gzip\r\n", SMUGGLE), 400),
    ("te-chunked-then-gzip", post(b"Transfer-Encoding: chunked, gzip\r\n", b"0\r\n\r\n" + SMUGGLE), 400),
    ("te-quoted", post(b'Transfer-Encoding: "chunked"\r\n', b"0\r\n\r\n" + SMUGGLE), 400),
    ("te-chunk", post(b"Transfer-Encoding: chunk\r\n", b"0\r\n\r\n" + SMUGGLE), 400),
    ("te-xchunked", post(b"Transfer-Encoding: xchunked\r\n", b"0\r\n\r\n" + SMUGGLE), 400),
    ("te-vertical-tab", post(b"Transfer-Encoding: \x0bchunked\r\n", b"0\r\n\r\n" + SMUGGLE), 400),
    ("te-space-before-colon", post(b"Transfer-Encoding : chunked\r\n", b"0\r\n\r\n" + SMUGGLE), 400),
    ("te-space-in-name", post(b"Transfer Encoding: chunked\r\n", b"0\r\n\r\n" + SMUGGLE), 400),
    ("te-obs-fold", post(b"Transfer-Encoding:\r\n chunked\r\n", b"0\r\n\r\n" + SMUGGLE), 400),
    ("te-leading-space-first-header", b"POST /SMUGGLED-outer HTTP/1.1\r\n Transfer-Encoding: chunked\r\n"
     b"Host: {alpha}\r\n\r\n0\r\n\r\n" + SMUGGLE, 400),
    # chunk sizes
    ("chunk-size-0x", post(b"Transfer-Encoding: chunked\r\n", b"0x5\r\nhello\r\n0\r\n\r\n" + SMUGGLE), 400),
    ("chunk-size-underscore", post(b"Transfer-Encoding: chunked\r\n", b"0_5\r\nhello\r\n0\r\n\r\n" + SMUGGLE), 400),
    ("chunk-size-negative", post(b"Transfer-Encoding: chunked\r\n", b"-0\r\n\r\n" + SMUGGLE), 400),
    ("chunk-size-leading-space", post(b"Transfer-Encoding: chunked\r\n", b" 5\r\nhello\r\n0\r\n\r\n" + SMUGGLE), 400),
    ("chunk-size-empty", post(b"Transfer-Encoding: chunked\r\n", b"\r\nhello\r\n0\r\n\r\n" + SMUGGLE), 400),
    ("chunk-size-overflow", post(b"Transfer-Encoding: chunked\r\n", b"fffffffffffffffff\r\n" + SMUGGLE), 400),
    ("chunk-size-not-hex", post(b"Transfer-Encoding: chunked\r\n", b"zz\r\n" + SMUGGLE), 400),
    ("chunk-bare-lf", post(b"Transfer-Encoding: chunked\r\n", b"5\nhello\n0\n\n" + SMUGGLE), 400),
    ("chunk-data-overrun", post(b"Transfer-Encoding: chunked\r\n", b"3\r\nhello\r\n0\r\n\r\n" + SMUGGLE), 400),
    # line endings and control characters
    ("bare-lf-head", b"GET /SMUGGLED HTTP/1.1\nHost: {alpha}\n\n", 400),
    ("bare-lf-one-line", b"GET /SMUGGLED HTTP/1.1\r\nHost: {alpha}\nX: y\r\n\r\n", 400),
    ("bare-cr-in-value", b"GET /SMUGGLED HTTP/1.1\r\nHost: {alpha}\r\nX: a\rb\r\n\r\n", 400),
    ("nul-in-value", b"GET /SMUGGLED HTTP/1.1\r\nHost: {alpha}\r\nX: a\x00b\r\n\r\n", 400),
    ("nul-in-target", b"GET /SMUGGLED\x00 HTTP/1.1\r\nHost: {alpha}\r\n\r\n", 400),
    ("cr-x-ending-head", b"GET /SMUGGLED HTTP/1.1\r\nHost: {alpha}\r\n\rX", 400),
    ("obs-fold", b"GET /SMUGGLED HTTP/1.1\r\nHost: {alpha}\r\nX: a\r\n b\r\n\r\n", 400),
    ("obs-fold-tab", b"GET /SMUGGLED HTTP/1.1\r\nHost: {alpha}\r\nX: a\r\n\tb\r\n\r\n", 400),
    ("header-without-colon", b"GET /SMUGGLED HTTP/1.1\r\nHost: {alpha}\r\nNoColonHere\r\n\r\n", 400),
    ("empty-header-name", b"GET /SMUGGLED HTTP/1.1\r\nHost: {alpha}\r\n: x\r\n\r\n", 400),
    # request line
    ("http-1-32", b"GET /SMUGGLED HTTP/1.32\r\nHost: {alpha}\r\n\r\n", 400),
    ("http-huge-version", b"GET /SMUGGLED HTTP/4294967295.255\r\nHost: {alpha}\r\n\r\n", 400),
    ("bad-method", b"G@T /SMUGGLED HTTP/1.1\r\nHost: {alpha}\r\n\r\n", 400),
    ("lf-separated-request-line", b"GET\n/SMUGGLED HTTP/1.1\r\nHost: {alpha}\r\n\r\n", 400),
    ("connect", b"CONNECT {alpha} HTTP/1.1\r\nHost: {alpha}\r\n\r\n" + SMUGGLE, 405),
    # pipelining after a refusal: the rest of the buffer is never read as requests
    ("pipelined-after-400", b"GET / HTTP/1.1\r\n\r\n" + SMUGGLE, 400),
    ("pipelined-after-bad-cl", post(b"Content-Length: x\r\n") + SMUGGLE, 400),
]


@pytest.mark.parametrize("raw, expected", [row[1:] for row in SMUGGLING], ids=[row[0] for row in SMUGGLING])
def test_smuggling_attempt_is_refused_and_closed(world, raw, expected):
    raw = raw.replace(b"{alpha}", world.host("alpha").encode())
    assert_refused(talk(world.port, raw), expected, "smuggling")
    never_reached(world)


def test_http10_with_transfer_encoding_is_answered_then_closed(world):
    """RFC 9112 §6.1: an HTTP/1.0 message with Transfer-Encoding may be processed, and the connection must close
    after it. The chunked body is read as such (here empty) and the connection ends after the answer."""
    tag = secrets.token_hex(4)
    raw = f"POST /te10-{tag} HTTP/1.0\r\nHost: {world.host('alpha')}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    outcome = talk(world.port, raw.encode())
    assert outcome.statuses == [200] and outcome.closed and outcome.rest == b""
    assert outcome.responses[0].body == f"alpha POST /te10-{tag}".encode()
    seen = [request for request in world.origins["alpha"].requests() if request.path == f"/te10-{tag}"]
    assert len(seen) == 1 and seen[0].body == b""


def test_request_glued_after_an_http10_transfer_encoding_request_is_never_parsed(world):
    """The same request with another one glued to it in one write: the relay reads both at once, and bytes after
    a message that must end the connection are refused as a whole (400, closed); neither reaches an origin."""
    tag = secrets.token_hex(4)
    raw = (f"POST /SMUGGLED-te10-{tag} HTTP/1.0\r\nHost: {{alpha}}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
           .encode() + SMUGGLE)
    outcome = talk(world.port, raw.replace(b"{alpha}", world.host("alpha").encode()))
    assert_refused(outcome, 400, "bytes after an HTTP/1.0 request with Transfer-Encoding")
    never_reached(world)


def test_underscore_framing_headers_are_not_forwarded(world):
    """`Transfer_Encoding` is not Transfer-Encoding for the relay, and must not become one behind it (CGI/WSGI
    servers fold `_` and `-` together): the origin gets the relay's own framing and nothing that looks like it."""
    tag = secrets.token_hex(4)
    raw = (f"POST /underscore-{tag} HTTP/1.1\r\nHost: {world.host('alpha')}\r\nTransfer_Encoding: chunked\r\n"
           f"Content_Length: 99\r\nContent-Length: 5\r\n\r\nhello").encode()
    outcome = talk(world.port, raw)
    assert outcome.statuses == [200]
    seen = world.origins["alpha"].requests()[-1]
    assert seen.path == f"/underscore-{tag}" and seen.body == b"hello"
    framing = [key for key, _ in seen.headers if key.lower().replace("_", "-") in ("transfer-encoding", "content-length")]
    assert framing == ["Content-Length"]


def test_upgrade_refused_by_origin_never_becomes_a_raw_tunnel(world):
    """The origin answers 200 to an Upgrade: the relay must not splice, and bytes after the head are dropped."""
    for upgrade in (b"websocket", b"h2c"):
        tag = secrets.token_hex(4).encode()
        raw = (b"GET /upgrade-" + tag + b" HTTP/1.1\r\nHost: {alpha}\r\nConnection: Upgrade\r\nUpgrade: " + upgrade
               + b"\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n" + SMUGGLE)
        outcome = talk(world.port, raw.replace(b"{alpha}", world.host("alpha").encode()), responses=None)
        assert outcome.statuses == [200] and outcome.closed and outcome.rest == b"", outcome
        assert outcome.responses[0].body == b"alpha GET /upgrade-" + tag
    never_reached(world)


def test_body_of_a_refused_request_is_skipped_not_parsed(world):
    """A 401 keeps the connection when the body is small, but the body is skipped as a body: the smuggled request
    inside it is never parsed, and the next real request gets the next answer."""
    inner = SMUGGLE.replace(b"{alpha}", world.host("alpha").encode())
    tag = secrets.token_hex(4)
    raw = (f"POST /SMUGGLED-guarded HTTP/1.1\r\nHost: {world.host('guarded')}\r\nContent-Length: {len(inner)}\r\n\r\n"
           .encode() + inner + f"GET /after-{tag} HTTP/1.1\r\nHost: {world.host('alpha')}\r\n\r\n".encode())
    outcome = talk(world.port, raw, responses=2)
    assert outcome.statuses == [401, 200]
    assert outcome.responses[1].body == f"alpha GET /after-{tag}".encode()
    never_reached(world)


# =============================================================================================== size and time

def test_head_over_32_kib_gets_431(world):
    rows = {
        "one-40k-header": b"GET /SMUGGLED HTTP/1.1\r\nHost: {alpha}\r\nX-Big: " + b"a" * 40_000 + b"\r\n\r\n",
        "40k-request-line": b"GET /SMUGGLED" + b"a" * 40_000 + b" HTTP/1.1\r\nHost: {alpha}\r\n\r\n",
        "2500-small-headers": b"GET /SMUGGLED HTTP/1.1\r\nHost: {alpha}\r\n" + b"X-a: b\r\n" * 2500 + b"\r\n",
        "64k-host": b"GET /SMUGGLED HTTP/1.1\r\nHost: " + b"a" * 65_536 + b".pw.test\r\n\r\n",
    }
    for what, raw in rows.items():
        outcome = talk(world.port, raw.replace(b"{alpha}", world.host("alpha").encode()))
        assert_refused(outcome, 431, what)
    never_reached(world)


def test_head_under_the_limit_is_served(world):
    path = f"/big-{secrets.token_hex(4)}"
    response = get(world.port, world.host("alpha"), path, headers={"X-Big": "b" * 30_000})
    assert response.status == 200 and world.origins["alpha"].requests()[-1].header("X-Big") == ["b" * 30_000]


GARBAGE = [
    ("tls-client-hello", bytes.fromhex("16030100a5010000a10303") + bytes(range(32)), 400),
    ("ssh-banner", b"SSH-2.0-OpenSSH_9.6\r\n", 400),
    ("http2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400),
    ("random-binary", random.Random(4).randbytes(1024), 400),
    ("nul-bytes", b"\x00" * 100, 400),
    ("long-method", b"A" * 8192, 400),
    ("only-crlf", b"\r\n\r\n\r\n", 408),  # a head that started and never finished: the head deadline answers
]


@pytest.mark.parametrize("raw, expected", [row[1:] for row in GARBAGE], ids=[row[0] for row in GARBAGE])
def test_garbage_on_the_relay_port(world, raw, expected):
    assert_refused(talk(world.port, raw), expected, "garbage")


def test_idle_connection_is_closed_after_idle_timeout(world):
    started = time.monotonic()
    with connect(world.port) as sock:
        outcome = read_outcome(sock, timeout=IDLE_TIMEOUT + 5)
    assert outcome.responses == [] and outcome.closed
    assert IDLE_TIMEOUT - 0.5 <= time.monotonic() - started < IDLE_TIMEOUT + 5


def test_idle_keep_alive_after_a_response_is_closed(world):
    with connect(world.port) as sock:
        sock.sendall(f"GET /keepalive HTTP/1.1\r\nHost: {world.host('alpha')}\r\n\r\n".encode())
        first = read_outcome(sock, responses=1)
        assert first.statuses == [200] and first.ending == "open"
        started = time.monotonic()
        rest = read_outcome(sock, timeout=IDLE_TIMEOUT + 5)
    assert rest.responses == [] and rest.closed and time.monotonic() - started < IDLE_TIMEOUT + 5


SLOW_CLIENTS = 20


def test_slowloris_is_cut_at_the_head_deadline_while_others_are_served(world):
    """20 clients trickle a head one byte every 200 ms; each gets 408 and is closed about HEAD_TIMEOUT after its
    first byte, while an honest client keeps getting 200s the whole time."""
    partial = f"GET /SMUGGLED-slow HTTP/1.1\r\nHost: {world.host('alpha')}\r\nX-Slow: ".encode()
    stop = threading.Event()

    def slow_client(index: int) -> tuple[float, Outcome]:
        with connect(world.port) as sock:
            sock.sendall(partial[:10])
            started = time.monotonic()
            position = 10
            for _ in range(int((HEAD_TIMEOUT + 5) / 0.2)):  # bounded: at most ~6 s of trickling
                readable, _, _ = select.select([sock], [], [], 0.2)
                if readable:
                    return time.monotonic() - started, read_outcome(sock)
                try:
                    sock.sendall(partial[position:position + 1] if position < len(partial) else b"a")
                except (BrokenPipeError, ConnectionResetError):
                    return time.monotonic() - started, read_outcome(sock)
                position += 1
            return time.monotonic() - started, Outcome([], "open")

    honest: list[int] = []

    def honest_client() -> None:
        while not stop.is_set() and len(honest) < 200:
            honest.append(get(world.port, world.host("beta"), "/honest-during-slowloris").status)

    with ThreadPoolExecutor(SLOW_CLIENTS + 1) as pool:
        watcher = pool.submit(honest_client)
        results = list(pool.map(slow_client, range(SLOW_CLIENTS)))
        stop.set()
        watcher.result()
    for elapsed, outcome in results:
        assert outcome.statuses == [408] and outcome.closed, outcome
        assert HEAD_TIMEOUT - 0.3 <= elapsed < HEAD_TIMEOUT + 3
    assert honest and set(honest) == {200}
    never_reached(world)


def test_half_closed_visitor_still_gets_the_whole_response(world):
    tag = secrets.token_hex(4)
    outcome = talk(world.port, f"GET /half-{tag} HTTP/1.1\r\nHost: {world.host('alpha')}\r\n\r\n".encode(),
                   shutdown_write=True)
    assert outcome.statuses == [200] and outcome.responses[0].body == f"alpha GET /half-{tag}".encode()


# =============================================================================================== visitor access

GUARD_ROWS = [
    ("no-credentials", {}, 401),
    ("wrong-password", {"Authorization": basic(BASIC[0], "wrong")}, 401),
    ("wrong-user", {"Authorization": basic("admin", BASIC[1])}, 401),
    ("in-proxy-authorization", {"Proxy-Authorization": basic(*BASIC)}, 401),
    ("lowercase-scheme-wrong", {"Authorization": basic(BASIC[0], "wrong", scheme="basic")}, 401),
    ("bearer-scheme", {"Authorization": "Bearer " + base64.b64encode(f"{BASIC[0]}:{BASIC[1]}".encode()).decode()}, 401),
    ("credentials-with-suffix", {"Authorization": basic(*BASIC) + "x"}, 401),
    ("password-prefix-only", {"Authorization": basic(BASIC[0], BASIC[1][:-1])}, 401),
    ("empty-authorization", {"Authorization": ""}, 401),
]


@pytest.mark.parametrize("headers, expected", [row[1:] for row in GUARD_ROWS], ids=[row[0] for row in GUARD_ROWS])
def test_basic_auth_tunnel_refuses_without_the_right_credentials(world, headers, expected):
    response = get(world.port, world.host("guarded"), "/SMUGGLED-guard", headers=headers)
    assert response.status == expected
    assert response.header("WWW-Authenticate") == 'Basic realm="guarded"'
    never_reached(world)


def test_basic_auth_refusals_for_other_request_shapes(world):
    guarded = world.host("guarded")
    rows = {
        "head": (f"HEAD /SMUGGLED HTTP/1.1\r\nHost: {guarded}\r\n\r\n", "HEAD"),
        "options-star": (f"OPTIONS * HTTP/1.1\r\nHost: {guarded}\r\n\r\n", "OPTIONS"),
        "absolute-form": (f"GET http://{guarded}/SMUGGLED HTTP/1.1\r\nHost: {guarded}\r\n\r\n", "GET"),
        "userinfo-in-target": (f"GET http://{BASIC[0]}:{BASIC[1]}@{guarded}/SMUGGLED HTTP/1.1\r\nHost: {guarded}"
                               "\r\n\r\n", "GET"),
        "host-upper-case-dot": (f"GET /SMUGGLED HTTP/1.1\r\nHost: GUARDED.PW.TEST.:{world.port}\r\n\r\n", "GET"),
        "wrong-then-right": (f"GET /SMUGGLED HTTP/1.1\r\nHost: {guarded}\r\nAuthorization: {basic('x', 'y')}\r\n"
                             f"Authorization: {basic(*BASIC)}\r\n\r\n", "GET"),
        "websocket-upgrade": (f"GET /SMUGGLED HTTP/1.1\r\nHost: {guarded}\r\nConnection: Upgrade\r\nUpgrade: websocket"
                              "\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
                              "GET"),
    }
    for what, (raw, method) in rows.items():
        outcome = talk(world.port, raw.encode("latin-1"), methods=[method])
        assert outcome.statuses[:1] == [401], (what, outcome)
        assert outcome.responses[0].header("WWW-Authenticate") == 'Basic realm="guarded"', what
        if method == "HEAD":
            assert outcome.rest == b"", f"a body followed the answer to HEAD: {outcome.rest[:80]!r}"
        if what == "websocket-upgrade":
            assert outcome.closed
    never_reached(world)


def test_each_request_on_a_keep_alive_connection_is_authorised(world):
    """Authorisation is per request: a connection that passed once is not trusted for the next request."""
    guarded = world.host("guarded")
    tag = secrets.token_hex(4)
    raw = (f"GET /ok-{tag} HTTP/1.1\r\nHost: {guarded}\r\nAuthorization: {basic(*BASIC)}\r\n\r\n"
           f"GET /SMUGGLED-{tag} HTTP/1.1\r\nHost: {guarded}\r\n\r\n"
           f"GET /after-{tag} HTTP/1.1\r\nHost: {world.host('alpha')}\r\n\r\n").encode()
    outcome = talk(world.port, raw, responses=3)
    assert outcome.statuses == [200, 401, 200]
    assert outcome.responses[0].body == f"guarded GET /ok-{tag}".encode()
    assert [p for p in world.origins["guarded"].paths() if tag in p] == [f"/ok-{tag}"]


ALLOW_ROWS = [
    ("walled-from-loopback", "walled", "127.0.0.1", {}, 403),
    ("walled-spoofed-xff", "walled", "127.0.0.1", {"X-Forwarded-For": "10.1.2.3"}, 403),
    ("walled-spoofed-forwarded", "walled", "127.0.0.1", {"Forwarded": "for=10.1.2.3", "X-Real-IP": "10.1.2.3",
                                                          "X-Forwarded-For": "10.1.2.3, 10.9.9.9"}, 403),
    ("walled-websocket", "walled", "127.0.0.1", {"Connection": "Upgrade", "Upgrade": "websocket",
                                                  "X-Forwarded-For": "10.1.2.3"}, 403),
    ("local2-from-other-address", "local2", "127.0.0.1", {}, 403),
    ("local2-spoofed-xff", "local2", "127.0.0.1", {"X-Forwarded-For": "127.0.0.2"}, 403),
    ("local2-from-allowed-address", "local2", "127.0.0.2", {"X-Forwarded-For": "10.1.2.3"}, 200),
]


@pytest.mark.parametrize("name, source, headers, expected", [row[1:] for row in ALLOW_ROWS],
                         ids=[row[0] for row in ALLOW_ROWS])
def test_allow_ip_is_decided_on_the_real_peer_address(world, name, source, headers, expected):
    path = f"/allow-{secrets.token_hex(4)}" if expected == 200 else "/SMUGGLED-allow"
    response = get(world.port, world.host(name), path, headers=headers, source=source)
    assert response.status == expected
    if expected == 200:
        seen = world.origins[name].requests()[-1]
        assert seen.path == path and seen.header("X-Forwarded-For") == [source]
    never_reached(world)


# =============================================================================================== registration

REGISTRATION_ROWS = [
    # (id, name query, headers, token, source, status, message fragment)
    ("no-upgrade", "ok-name", {"Upgrade": "", "Connection": ""}, TOKEN, "127.0.0.1", 426, "Upgrade: portway-mux"),
    ("websocket-upgrade", "ok-name", {"Upgrade": "websocket"}, TOKEN, "127.0.0.1", 426, "Upgrade: portway-mux"),
    ("missing-token", "ok-name", {}, None, "127.0.0.3", 401, "valid token"),
    ("wrong-token", "ok-name", {}, "guess", "127.0.0.3", 401, "not accepted"),
    ("token-prefix", "ok-name", {}, TOKEN[:-1], "127.0.0.3", 401, "not accepted"),
    ("dot-dot-slash", "../etc", {}, TOKEN, "127.0.0.1", 400, "DNS label"),
    ("encoded-dot-dot", "%2e%2e", {}, TOKEN, "127.0.0.1", 400, "DNS label"),
    ("encoded-slash", "a%2fb", {}, TOKEN, "127.0.0.1", 400, "DNS label"),
    ("system-admin", "admin", {}, TOKEN, "127.0.0.1", 400, "reserved for the relay"),
    ("system-www", "WWW", {}, TOKEN, "127.0.0.1", 400, "reserved for the relay"),
    ("system-portway", "_portway", {}, TOKEN, "127.0.0.1", 400, "DNS label"),
    ("64-chars", "a" * 64, {}, TOKEN, "127.0.0.1", 400, "limit is 63"),
    ("unicode", "b%C3%BCcher", {}, TOKEN, "127.0.0.1", 400, "DNS label"),
    ("leading-hyphen", "-a", {}, TOKEN, "127.0.0.1", 400, "DNS label"),
    ("trailing-hyphen", "a-", {}, TOKEN, "127.0.0.1", 400, "DNS label"),
    ("dotted", "a.b", {}, TOKEN, "127.0.0.1", 400, "DNS label"),
    ("underscore", "a_b", {}, TOKEN, "127.0.0.1", 400, "DNS label"),
    ("proto-key", "__proto__", {}, TOKEN, "127.0.0.1", 400, "DNS label"),
    ("nul", "a%00b", {}, TOKEN, "127.0.0.1", 400, "DNS label"),
    ("wildcard", "%2A", {}, TOKEN, "127.0.0.1", 400, "DNS label"),
    ("taken-live-name", "alpha", {}, TOKEN, "127.0.0.1", 409, "already in use"),
    ("taken-with-guessed-resume-key", "alpha", {"Portway-Resume": "guessed"}, TOKEN, "127.0.0.1", 409, "in use"),
    ("bad-allow-ip", "ok-name", {"Portway-Allow-Ip": "300.1.1.1/8"}, TOKEN, "127.0.0.1", 400, "allow-ip"),
]


@pytest.mark.parametrize("name, headers, token, source, status, fragment", [row[1:] for row in REGISTRATION_ROWS],
                         ids=[row[0] for row in REGISTRATION_ROWS])
def test_hostile_registration_is_refused_with_a_clear_message(world, name, headers, token, source, status, fragment):
    link = RawAgentLink(world.port, name, token=token, source=source, extra_headers=headers)
    try:
        assert link.status == status, (link.status, link.message)
        assert fragment in link.message and link.ending in ("eof", "reset")
    finally:
        link.close()
    if status != 409:
        assert get(world.port, world.host("ok-name"), "/SMUGGLED").status == 404  # nothing got registered


# =============================================================================================== hostile agents

def register_hostile(world: World, name: str, trailing: bytes = b"") -> RawAgentLink:
    link = RawAgentLink(world.port, name, trailing=trailing)
    assert link.status == 101, link.message
    assert link.headers["portway-name"] == name
    world.offline.add(name)
    return link


def honest_tunnels_still_serve(world: World) -> None:
    for name in ("alpha", "beta"):
        response = get(world.port, world.host(name), "/still-alive")
        assert response.status == 200 and response.body == f"{name} GET /still-alive".encode()


def assert_link_closed_for_protocol_error(world: World, link: RawAgentLink, name: str) -> None:
    received, ending = link.wait_closed()
    link.close()
    assert ending in ("eof", "reset"), "the relay kept a hostile link open"
    if ending == "eof":
        assert PROTOCOL_ERROR in go_away_codes(received), f"no GO_AWAY(protocol error) in {received[-48:]!r}"
    world.relay.proc.wait_for_line(rf"tunnel {name} offline: protocol error", timeout=ANSWER_TIMEOUT)
    response = get(world.port, world.host(name), "/SMUGGLED-offline")
    assert response.status == 502 and b"not connected" in response.body
    honest_tunnels_still_serve(world)


FLOOD = 2500  # over the mux's budget of 2000 control frames per second

HOSTILE_FRAMES = [
    ("garbage-bytes", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("random-bytes", random.Random(7).randbytes(4096)),
    ("wrong-version", frame(PING, SYN, 0, 1, version=VERSION + 1)),
    ("version-0", frame(PING, SYN, 0, 1, version=0)),
    ("unknown-type", frame(9, 0, 0, 0)),
    ("unknown-flags", frame(WINDOW_UPDATE, 0x40, 1, 0)),
    ("oversize-data-length", frame(DATA, 0, 1, 2**31)),
    ("data-on-stream-zero", data_frame(0, b"x")),
    ("data-never-opened-odd", data_frame(99, b"HTTP/1.1 200 OK\r\n\r\n")),
    ("window-update-never-opened-even", frame(WINDOW_UPDATE, 0, 1000, 5)),
    ("syn-on-relay-id", frame(WINDOW_UPDATE, SYN, 2, 0)),
    ("syn-ids-going-down", frame(WINDOW_UPDATE, SYN, 5, 0) + frame(WINDOW_UPDATE, SYN, 3, 0)),
    ("ping-on-a-stream", frame(PING, SYN, 7, 1)),
    ("ping-with-both-flags", frame(PING, SYN | ACK, 0, 1)),
    ("go-away-unknown-code", frame(GO_AWAY, 0, 0, 99)),
    ("ping-flood", b"".join(frame(PING, SYN, 0, i) for i in range(FLOOD))),
    ("open-reset-flood", b"".join(frame(WINDOW_UPDATE, SYN, 2 * i + 1, 0) + frame(WINDOW_UPDATE, RST, 2 * i + 1, 0)
                                  for i in range(FLOOD))),
    ("window-update-flood-on-refused-stream", frame(WINDOW_UPDATE, SYN, 1, 0)
     + b"".join(frame(WINDOW_UPDATE, 0, 1, 0) for _ in range(FLOOD))),
]


@pytest.mark.parametrize("payload", [row[1] for row in HOSTILE_FRAMES], ids=[row[0] for row in HOSTILE_FRAMES])
def test_hostile_frames_close_only_that_link(world, request, payload):
    name = "hostile-" + request.node.callspec.id.replace("_", "-")[:40].strip("-")
    link = register_hostile(world, name)
    link.send(payload)
    assert_link_closed_for_protocol_error(world, link, name)


def test_garbage_glued_to_the_registration_request_closes_the_link(world):
    link = register_hostile(world, "hostile-glued", trailing=frame(9, 0, 0, 0))
    assert_link_closed_for_protocol_error(world, link, "hostile-glued")


def visitor_in_background(world: World, name: str, path: str):
    pool = ThreadPoolExecutor(1)
    future = pool.submit(get, world.port, world.host(name), path)
    pool.shutdown(wait=False)
    return future


RELAY_STREAM_ABUSE = [
    ("window-overflow", lambda sid: frame(WINDOW_UPDATE, ACK, sid, 2**31 - 1)),
    ("data-before-accept", lambda sid: data_frame(sid, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")),
    ("data-after-fin", lambda sid: frame(WINDOW_UPDATE, ACK, sid, 0)
     + data_frame(sid, b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\npart", FIN) + data_frame(sid, b"more!")),
    ("ack-twice", lambda sid: frame(WINDOW_UPDATE, ACK, sid, 0) + frame(WINDOW_UPDATE, ACK, sid, 0)),
    ("fin-twice", lambda sid: frame(WINDOW_UPDATE, ACK | FIN, sid, 0) + frame(WINDOW_UPDATE, FIN, sid, 0)),
]


@pytest.mark.parametrize("answer", [row[1] for row in RELAY_STREAM_ABUSE], ids=[row[0] for row in RELAY_STREAM_ABUSE])
def test_hostile_answer_on_a_visitor_stream(world, request, answer):
    """The relay opens a stream for a visitor; the agent answers it in a way the protocol forbids. The link is
    closed, the visitor gets a 502 (never a half-made response), other tunnels are untouched."""
    name = "hostile-" + request.node.callspec.id
    link = register_hostile(world, name)
    visitor = visitor_in_background(world, name, "/SMUGGLED-visitor")
    frames = link.read_frames_until(lambda f: f[0] == WINDOW_UPDATE and f[1] & SYN)
    stream_id = frames[-1][2]
    link.send(answer(stream_id))
    response = visitor.result(ANSWER_TIMEOUT)
    assert response.status == 502 and b"went away" in response.body
    assert_link_closed_for_protocol_error(world, link, name)


def test_hostile_agent_cannot_answer_another_tunnels_streams(world):
    """Stream ids are per link: while a visitor waits on alpha, a hostile agent sprays DATA for every small stream
    id. Its link is closed; alpha's visitor gets alpha's answer and nothing else."""
    alpha = world.origins["alpha"]
    visitor = visitor_in_background(world, "alpha", "/gate/cross")
    alpha.wait_arrived("cross")
    link = register_hostile(world, "hostile-cross")
    link.send(b"".join(data_frame(sid, b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nLEAK") for sid in range(1, 64)))
    received, ending = link.wait_closed()
    link.close()
    assert ending in ("eof", "reset")
    alpha.open_gate("cross")
    response = visitor.result(ANSWER_TIMEOUT)
    assert response.status == 200 and response.body == b"alpha GET /gate/cross"
    honest_tunnels_still_serve(world)


def test_agent_that_registers_and_hangs_up_is_just_offline(world):
    link = register_hostile(world, "hostile-hangup")
    link.close()
    world.relay.proc.wait_for_line(r"tunnel hostile-hangup offline", timeout=ANSWER_TIMEOUT)
    assert get(world.port, world.host("hostile-hangup"), "/SMUGGLED").status == 502
    honest_tunnels_still_serve(world)


# =============================================================================================== dying agents

@pytest.fixture
def doomed(world, procs, request):
    name = "doomed-" + secrets.token_hex(4)
    agent = launch_agent(procs, world.relay, world.origins["doomed"].port, "--token", TOKEN, name=name)
    world.offline.add(name)
    return name, agent


def start_request(world: World, name: str, path: str) -> socket.socket:
    sock = connect(world.port)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {world.host(name)}\r\n\r\n".encode())
    return sock


def read_until(sock: socket.socket, needle: bytes) -> bytes:
    """Read until `needle` has arrived (the visitor really holds part of the response)."""
    received = b""
    sock.settimeout(ANSWER_TIMEOUT)
    while needle not in received:
        data = sock.recv(65536)
        assert data, f"connection ended before {needle!r}: {received[:300]!r}"
        received += data
    return received


def read_to_the_end(sock: socket.socket, received: bytes = b"") -> tuple[bytes, str]:
    sock.settimeout(ANSWER_TIMEOUT)
    while True:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            return received, "reset"
        except socket.timeout:
            return received, "open"
        if not data:
            return received, "eof"
        received += data


def test_agent_dying_mid_content_length_body_resets_the_visitor(world, doomed):
    name, agent = doomed
    with start_request(world, name, "/partial-cl") as sock:
        received = read_until(sock, b"\r\n\r\nx")
        agent.kill(signal.SIGKILL)
        received, ending = read_to_the_end(sock, received)
    head, _, body = received.partition(b"\r\n\r\n")
    assert ending == "reset", f"a cut-short response ended as {ending}"
    assert b"Content-Length: 100000" in head and len(body) < 100000


def test_agent_dying_mid_chunked_body_resets_the_visitor(world, doomed):
    name, agent = doomed
    with start_request(world, name, "/partial-chunked") as sock:
        received = read_until(sock, b"\r\n\r\n3e8\r\ny")
        agent.kill(signal.SIGKILL)
        received, ending = read_to_the_end(sock, received)
    assert ending == "reset", f"a cut-short response ended as {ending}"
    assert b"Transfer-Encoding: chunked" in received and not received.endswith(b"0\r\n\r\n")


def test_agent_dying_before_the_response_head_gives_502(world, doomed):
    name, agent = doomed
    with start_request(world, name, "/gate/doomed-head") as sock:
        world.origins["doomed"].wait_arrived("doomed-head")
        agent.kill(signal.SIGKILL)
        outcome = read_outcome(sock)
    assert outcome.statuses == [502] and outcome.closed
    honest_tunnels_still_serve(world)
