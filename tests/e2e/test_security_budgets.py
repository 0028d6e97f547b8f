"""Issue 17's budgets against real processes: password guessing on tunnels' basic auth is throttled per address and
per tunnel, and a hostile agent can't make the relay buffer more than one link window of visitor data.

Every relay listens on 127.0.0.1 only; visitors speak from several loopback addresses (127.0.0.0/8 is all local on
Linux) to play different internet addresses.
"""

from __future__ import annotations

import select
import secrets
import socket
import struct
import time

import pytest

from portway.proto.frame import INITIAL_LINK_WINDOW
from portway.proto.mux import MuxConfig

from .conftest import wait_until
from .test_security import (
    ANSWER_TIMEOUT,
    RawAgentLink,
    RecordingOrigin,
    assert_clean_log,
    basic,
    connect,
    get,
    launch_agent,
    launch_relay,
    read_outcome,
)

USER, PASSWORD = "user", "s3cret-pass"
RIGHT = basic(USER, PASSWORD)


@pytest.fixture
def origin():
    server = RecordingOrigin("origin")
    yield server
    server.close()


def pipelined(port: int, host: str, authorizations: list[str | None], source: str, path: str = "/SMUGGLED"):
    """Send one request per entry on one keep-alive connection, all at once; returns the answers in order."""
    raw = b""
    for authorization in authorizations:
        lines = [f"GET {path} HTTP/1.1", f"Host: {host}"]
        if authorization is not None:
            lines.append(f"Authorization: {authorization}")
        raw += ("\r\n".join(lines) + "\r\n\r\n").encode()
    with connect(port, source) as sock:
        sock.sendall(raw)
        outcome = read_outcome(sock, responses=len(authorizations), timeout=4 * ANSWER_TIMEOUT)
    assert len(outcome.responses) == len(authorizations), outcome
    return outcome.responses


def guesses(count: int) -> list[str]:
    return [basic(USER, f"guess-{secrets.token_hex(4)}") for _ in range(count)]


def assert_throttled(response) -> None:
    assert response.status == 429, response
    assert int(response.header("Retry-After")) >= 1
    assert response.header("WWW-Authenticate") is None
    assert response.header("Connection") != "close"


# =============================================================================================== basic-auth guessing

def test_guessing_from_one_address_is_throttled_while_other_addresses_log_in(procs, origin):
    relay = launch_relay(procs)
    launch_agent(procs, relay, origin.port, "--basic-auth", f"{USER}:{PASSWORD}", name="guarded")
    launch_agent(procs, relay, origin.port, name="open")
    guarded = relay.host("guarded")
    # a browser's first request carries no credentials: those are answered 401 and never count
    assert [r.status for r in pipelined(relay.port, guarded, [None] * 30, "127.0.0.5")] == [401] * 30
    # 1,000 guesses at line rate on one connection: 10 are compared, every other one is refused unseen
    answers = pipelined(relay.port, guarded, guesses(1000), "127.0.0.5")
    assert [r.status for r in answers[:10]] == [401] * 10
    for response in answers[10:]:
        assert_throttled(response)
    # the right password from the guessing address is refused the same way: no oracle
    right_but_throttled, no_credentials = pipelined(relay.port, guarded, [RIGHT, None], "127.0.0.5")
    assert_throttled(right_but_throttled)
    assert_throttled(no_credentials)
    assert not [seen for seen in origin.requests() if "SMUGGLED" in seen.path]
    # another address logs in; the guessing address still reaches tunnels without basic auth
    tag = secrets.token_hex(4)
    assert get(relay.port, guarded, f"/in-{tag}", headers={"Authorization": RIGHT}, source="127.0.0.6").status == 200
    assert get(relay.port, relay.host("open"), f"/open-{tag}", source="127.0.0.5").status == 200
    assert origin.paths()[-2:] == [f"/in-{tag}", f"/open-{tag}"]
    assert_clean_log(relay.proc)


def test_guessing_spread_over_many_addresses_locks_the_tunnel_but_not_for_known_visitors(procs, origin):
    relay = launch_relay(procs)
    launch_agent(procs, relay, origin.port, "--basic-auth", f"{USER}:{PASSWORD}", name="guarded")
    guarded = relay.host("guarded")
    tag = secrets.token_hex(4)
    known = {"headers": {"Authorization": RIGHT}, "source": "127.0.1.100"}
    assert get(relay.port, guarded, f"/known-{tag}", **known).status == 200
    # 12 addresses with 9 guesses each: none reaches the per-address limit, the tunnel's 100 is reached
    statuses = []
    for host in range(1, 13):
        statuses += [r.status for r in pipelined(relay.port, guarded, guesses(9), f"127.0.1.{host}")]
    assert statuses == [401] * 100 + [429] * 8
    # locked: a newcomer is refused even with the right password, and still gets its 401 without credentials
    assert_throttled(get(relay.port, guarded, "/SMUGGLED", headers={"Authorization": RIGHT}, source="127.0.1.50"))
    assert get(relay.port, guarded, "/SMUGGLED", source="127.0.1.50").status == 401
    # the visitor who logged in before the attack carries on
    assert get(relay.port, guarded, f"/still-{tag}", **known).status == 200
    assert [p for p in origin.paths() if tag in p] == [f"/known-{tag}", f"/still-{tag}"]
    assert_clean_log(relay.proc)


def test_a_throttled_address_may_log_in_again_once_the_window_has_passed(procs, origin):
    relay = launch_relay(procs, "--auth-failure-window", "3")
    launch_agent(procs, relay, origin.port, "--basic-auth", f"{USER}:{PASSWORD}", name="guarded")
    guarded = relay.host("guarded")
    answers = pipelined(relay.port, guarded, guesses(10) + [RIGHT], "127.0.2.1")
    assert [r.status for r in answers] == [401] * 10 + [429]
    tag = secrets.token_hex(4)
    wait_until(lambda: get(relay.port, guarded, f"/back-{tag}", headers={"Authorization": RIGHT},
                           source="127.0.2.1").status == 200, timeout=30, interval=0.25, what="the window to pass")
    assert f"/back-{tag}" in origin.paths()
    assert_clean_log(relay.proc)


# ========================================================================================= buffered bytes per link

MiB = 1024 * 1024
HEADER = struct.Struct(">BBHII")
VERSION = 1  # the frame protocol this hostile agent speaks (portway.proto.frame.PROTOCOL_VERSION)
DATA, WINDOW_UPDATE = 0, 1
SYN, ACK, RST = 0x1, 0x2, 0x8
STREAM_WINDOW = 256 * 1024
RELAY_LINK_WINDOW = MuxConfig().link_window
SLOW_VISITORS = 600  # before the link window, a relay held 464 MiB for them (about 770 KiB a stream)
RESPONSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: 1000000000000\r\n\r\n"


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in KiB, from /proc."""
    values = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(value.split()[0])
    return values


class GreedyAgent:
    """A hostile agent on a raw link: it answers every stream the relay opens with a response that never ends and
    pushes as many bytes as the relay's windows allow: each stream's and, unless `ignore_link_window`, the link's."""

    def __init__(self, link: RawAgentLink, ignore_link_window: bool = False) -> None:
        self.link = link
        self.sock = link.sock
        self.buffer = link.buffer
        self.stream_windows: dict[int, int] = {}
        self.link_window = float("inf") if ignore_link_window else INITIAL_LINK_WINDOW
        self.link_granted = 0  # link credit the relay announced, beyond the protocol's base
        self.opened = 0
        self.pushed = 0
        self.ended = ""  # how the relay ended the link, once it did

    def _take_frames(self) -> None:
        while len(self.buffer) >= HEADER.size:
            _, kind, flags, stream_id, length = HEADER.unpack_from(self.buffer)
            size = HEADER.size + (length if kind == DATA else 0)
            if len(self.buffer) < size:
                return
            self.buffer = self.buffer[size:]
            if kind == WINDOW_UPDATE and stream_id == 0:
                self.link_window += length
                self.link_granted += length
            elif kind == WINDOW_UPDATE and flags & SYN:
                self.opened += 1
                self.stream_windows[stream_id] = STREAM_WINDOW + length
                self._send(HEADER.pack(VERSION, WINDOW_UPDATE, ACK, stream_id, 0))
                self._push(stream_id, RESPONSE_HEAD)
            elif kind == WINDOW_UPDATE and flags & RST:
                self.stream_windows.pop(stream_id, None)
            elif kind == WINDOW_UPDATE and stream_id in self.stream_windows:
                self.stream_windows[stream_id] += length

    def _push(self, stream_id: int, payload: bytes = b"") -> None:
        """Send `payload`, then filler, while both windows allow."""
        frames = []
        while True:
            room = min(self.stream_windows[stream_id], self.link_window, 65536)
            if payload:
                chunk, payload = payload[:room], payload[room:]
            else:
                chunk = b"x" * room
            if not chunk:
                break
            frames.append(HEADER.pack(VERSION, DATA, 0, stream_id, len(chunk)) + chunk)
            self.stream_windows[stream_id] -= len(chunk)
            self.link_window -= len(chunk)
            self.pushed += len(chunk)
        if frames:
            self._send(b"".join(frames))

    def _send(self, data: bytes) -> None:
        if self.ended:
            return
        try:
            self.sock.sendall(data)
        except OSError as error:
            self.ended = f"send failed: {error}"

    def run(self, streams: int, quiet: float = 3.0, limit: float = 120.0) -> None:
        """Serve until `streams` streams were opened and the relay then granted nothing for `quiet` seconds, or the
        relay ended the link."""
        deadline = time.monotonic() + limit
        last_change = time.monotonic()
        while time.monotonic() < deadline and not self.ended:
            readable, _, _ = select.select([self.sock], [], [], 0.2)
            if readable:
                try:
                    data = self.sock.recv(1 << 20)
                except ConnectionResetError:
                    data = b""
                if not data:
                    self.ended = "closed"
                    break
                self.buffer += data
                self._take_frames()
                for stream_id in list(self.stream_windows):
                    self._push(stream_id)
                last_change = time.monotonic()
            elif self.opened >= streams and time.monotonic() - last_change > quiet:
                return
        if not self.ended:
            assert self.opened >= streams, f"only {self.opened} of {streams} streams were opened"


def slow_visitors(port: int, host: str, count: int) -> list[socket.socket]:
    """`count` visitors asking for a huge download and never reading it, with tiny receive buffers, spread over a
    few addresses (the relay allows 256 connections per address)."""
    visitors = []
    for index in range(count):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        # a small segment size keeps the relay's kernel from buffering ~1 MB for each of them (its send buffer
        # starts at a few dozen segments): what the relay holds must show in its own memory
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 536)
        sock.bind((f"127.0.4.{1 + index // 200}", 0))
        sock.connect(("127.0.0.1", port))
        sock.sendall(f"GET /huge-{index} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        visitors.append(sock)
    return visitors


@pytest.mark.parametrize("ignore_link_window", [False, True], ids=["within-the-windows", "past-the-link-window"])
def test_a_hostile_agent_cannot_make_the_relay_hold_more_than_a_link_window(procs, origin, ignore_link_window):
    relay = launch_relay(procs)
    launch_agent(procs, relay, origin.port, name="honest")
    link = RawAgentLink(relay.port, "hoarder", token=None)
    assert link.status == 101, link.message
    agent = GreedyAgent(link, ignore_link_window)
    pid = relay.proc.popen.pid
    assert get(relay.port, relay.host("honest"), "/before").status == 200
    before = memory_kib(pid)
    visitors = slow_visitors(relay.port, relay.host("hoarder"), SLOW_VISITORS)
    try:
        agent.run(SLOW_VISITORS)
        after = memory_kib(pid)
        growth = (after["VmHWM"] - before["VmRSS"]) / 1024
        print(f"\nrelay RSS {before['VmRSS'] / 1024:.1f} MiB before, peak {after['VmHWM'] / 1024:.1f} MiB "
              f"(+{growth:.1f} MiB); agent pushed {agent.pushed / MiB:.1f} MiB on {agent.opened} streams, "
              f"link credit granted {agent.link_granted / MiB:.1f} MiB beyond the base; ended: {agent.ended or 'no'}")
        assert relay.proc.popen.poll() is None, relay.proc.output()
        if ignore_link_window:
            assert agent.ended, "the relay kept a link that sent past its window"
            relay.proc.wait_for_line(r"tunnel hoarder offline: protocol error: .*link's receive window")
        else:
            assert not agent.ended  # it kept within the windows: link credit came back only for what the
            # visitors' kernels took off the relay (tens of KiB each), never for what the relay holds for them
        # what the relay held is bounded by its link window (plus allocator slack and 600 connections' worth of
        # visitor and stream bookkeeping), where each of the 600 streams could hold a window without one
        assert growth < (RELAY_LINK_WINDOW + 40 * MiB) / MiB
        assert get(relay.port, relay.host("honest"), "/during").status == 200
    finally:
        for sock in visitors:
            sock.close()
        link.close()
    assert get(relay.port, relay.host("honest"), "/after").status == 200
    assert_clean_log(relay.proc)
