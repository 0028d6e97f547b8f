"""What a tunnel survives, in the running programs: a relay stopped gracefully (SIGTERM) or killed (SIGKILL) and
restarted, an agent stopped gracefully, a link black-holed or gone altogether for a while, a frozen agent.

The agent's link runs through an in-test TCP proxy (tests/e2e/linkproxy.py) where a test needs to break it. Bounds
are checked with deadlines: what the programs promise (the keepalive timeout, "back within 5 s") plus slack for a
busy 2-core machine, never as a performance figure.
"""

from __future__ import annotations

import hashlib
import http.client
import signal
import socket
import threading
import time

import pytest

from .conftest import PORTWAY, Relay, free_port, start_origin, wait_until
from .linkproxy import LinkProxy
from .payload import expected_sha256

KEEPALIVE_TIMEOUT = 2.0
KEEPALIVE = ["--keepalive-timeout", str(KEEPALIVE_TIMEOUT)]
SLACK = 6.0  # loop wake-ups and a descheduled process on a busy machine
BACK_WITHIN = 5.0  # the agent is back this soon after the relay listens again (or the network returns)


def relay_on(procs, port: int, *extra: str, label: str = "relay") -> Relay:
    proc = procs.start(PORTWAY + ["-v", "server", "--port", str(port), *extra], label)
    proc.wait_for_line(r"listening on")
    return Relay(proc, port, "localhost")


def agent_via(procs, relay_port: int, origin: int, name: str, *extra: str, label: str = "agent"):
    agent = procs.start(PORTWAY + ["http", str(origin), "--relay", f"http://127.0.0.1:{relay_port}", "--name", name,
                                   "--no-inspect", *extra], label)
    return agent


def visit(port: int, name: str, path: str = "/", timeout: float = 10.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Host": f"{name}.localhost:{port}", "Connection": "close"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


class Download(threading.Thread):
    """A slow download through the tunnel, read to its end in a thread: `started` is set once its first bytes
    arrived; then `digest` is the sha256 of all it read, or `error` what cut it."""

    def __init__(self, port: int, name: str, size: int, seconds: float) -> None:
        super().__init__(daemon=True)
        self.port, self.name, self.size, self.seconds = port, name, size, seconds
        self.started = threading.Event()
        self.digest: str | None = None
        self.received = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request("GET", f"/slow?ms={int(self.seconds * 1000)}&bytes={self.size}",
                         headers={"Host": f"{self.name}.localhost:{self.port}"})
            response = conn.getresponse()
            assert response.status == 200
            hasher = hashlib.sha256()
            first = response.read(1)
            hasher.update(first)
            self.received = len(first)
            self.started.set()
            while chunk := response.read(65536):
                hasher.update(chunk)
                self.received += len(chunk)
            self.digest = hasher.hexdigest()
        except BaseException as error:  # reported to the test, which asserts on it
            self.error = error
            self.started.set()
        finally:
            conn.close()

    @property
    def cut_short(self) -> bool:
        """The download visibly failed: a reset, or fewer bytes than its Content-Length before the end
        (http.client's read(amt) returns a short read there instead of raising)."""
        return self.error is not None or self.received < self.size

    def finish(self, timeout: float) -> None:
        self.join(timeout)
        assert not self.is_alive(), f"the download did not end within {timeout}s"


@pytest.fixture
def origin(procs) -> int:
    return start_origin(procs)


# ---------------------------------------------------------------------------------------------- relay restarts

def test_relay_sigterm_lets_a_download_finish_and_the_agent_is_back_soon_after_the_restart(procs, origin):
    port = free_port()
    relay = relay_on(procs, port, "--drain-timeout", "30")
    agent = agent_via(procs, port, origin, "drained")
    agent.wait_for_line(r"^http://drained\.localhost:%d$" % port)
    size = 3_000_000
    download = Download(port, "drained", size, seconds=4)
    download.start()
    assert download.started.wait(20) and download.error is None
    relay.proc.popen.send_signal(signal.SIGTERM)
    relay.proc.wait_for_line(r"stopping: no new visitors; 1 exchange\(s\) in flight")
    # no new visitors meanwhile: the listener is closed
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    download.finish(30)
    assert download.error is None, download.error
    assert (download.received, download.digest) == (size, expected_sha256(size))
    assert relay.proc.wait_exit(20) == 0
    relay.proc.wait_for_line(r"stopped: all exchanges done")
    agent.wait_for_line(r"link to relay lost .*the relay went away")

    restarted = relay_on(procs, port, label="restarted relay")
    listening_at = time.monotonic()
    agent.wait_for_line(r"reconnected: http://drained\.localhost", timeout=BACK_WITHIN + SLACK)
    back_after = time.monotonic() - listening_at
    assert back_after <= BACK_WITHIN + SLACK
    assert visit(port, "drained")[0] == 200
    assert agent.popen.poll() is None, "a relay going away is no reason for the agent to exit"
    assert "Traceback" not in relay.proc.output() + restarted.proc.output() + agent.output()


def test_relay_sigkill_cuts_the_download_visibly_and_the_agent_is_back_after_the_restart(procs, origin):
    port = free_port()
    relay = relay_on(procs, port)
    agent = agent_via(procs, port, origin, "killed")
    agent.wait_for_line(r"^http://killed\.localhost:%d$" % port)
    size = 3_000_000
    download = Download(port, "killed", size, seconds=4)
    download.start()
    assert download.started.wait(20) and download.error is None
    relay.proc.kill(signal.SIGKILL)
    download.finish(20)
    assert download.cut_short and download.received < size
    agent.wait_for_line(r"link to relay lost")
    time.sleep(3)  # a real outage: the agent's backoff grows meanwhile (the restart must not wait for it)
    relay_on(procs, port, label="restarted relay")
    agent.wait_for_line(r"reconnected: http://killed\.localhost", timeout=BACK_WITHIN + SLACK)
    assert visit(port, "killed")[0] == 200


def test_a_second_signal_stops_the_relay_at_once(procs, origin):
    port = free_port()
    relay = relay_on(procs, port, "--drain-timeout", "60")
    agent = agent_via(procs, port, origin, "twice")
    agent.wait_for_line(r"^http://twice\.localhost:%d$" % port)
    download = Download(port, "twice", 3_000_000, seconds=30)
    download.start()
    assert download.started.wait(20) and download.error is None
    relay.proc.popen.send_signal(signal.SIGTERM)
    relay.proc.wait_for_line(r"stopping: no new visitors")
    relay.proc.popen.send_signal(signal.SIGTERM)
    assert relay.proc.wait_exit(10) == 0
    download.finish(20)
    assert download.cut_short


# ---------------------------------------------------------------------------------------------- agent stops

def test_agent_sigterm_finishes_the_download_in_flight_exits_0_and_frees_its_name(procs, origin):
    port = free_port()
    relay_on(procs, port)
    agent = agent_via(procs, port, origin, "leaving")
    agent.wait_for_line(r"^http://leaving\.localhost:%d$" % port)
    size = 2_000_000
    download = Download(port, "leaving", size, seconds=3)
    download.start()
    assert download.started.wait(20) and download.error is None
    agent.popen.send_signal(signal.SIGTERM)
    agent.wait_for_line(r"stopping: no new requests; 1 open stream\(s\)")
    status, body = visit(port, "leaving")  # a new request meanwhile: refused, not taken
    assert status == 502, body
    download.finish(30)
    assert download.error is None, download.error
    assert download.digest == expected_sha256(size)
    assert agent.wait_exit(20) == 0
    # it said goodbye: the name is free at once for anyone
    successor = agent_via(procs, port, origin, "leaving", label="successor")
    successor.wait_for_line(r"^http://leaving\.localhost:%d$" % port)


# ---------------------------------------------------------------------------------------------- broken links

def proxied_agent(procs, origin: int, name: str, relay_flags=(), agent_flags=()):
    port = free_port()
    relay = relay_on(procs, port, *KEEPALIVE, *relay_flags)
    proxy = LinkProxy(port)
    try:
        agent = agent_via(procs, proxy.port, origin, name, *KEEPALIVE, *agent_flags)
        agent.wait_for_line(r"^http://%s\.localhost:%d$" % (name, port))
    except BaseException:
        proxy.close()
        raise
    return port, relay, agent, proxy


def test_a_black_holed_link_is_noticed_by_both_ends_and_visitors_get_an_error_page_not_a_hang(procs, origin):
    port, relay, agent, proxy = proxied_agent(procs, origin, "holed")
    with proxy:
        assert visit(port, "holed")[0] == 200
        proxy.outage()
        went_silent = time.monotonic()
        try:
            status, body = visit(port, "holed", timeout=KEEPALIVE_TIMEOUT + SLACK)
        except socket.timeout:
            pytest.fail("a request to a tunnel whose link is silent hung past the keepalive bound")
        assert status in (502, 504), body
        relay.proc.wait_for_line(r"tunnel holed offline: keepalive timeout", timeout=KEEPALIVE_TIMEOUT + SLACK)
        agent.wait_for_line(r"link to relay lost \(keepalive timeout", timeout=KEEPALIVE_TIMEOUT + SLACK)
        assert time.monotonic() - went_silent <= KEEPALIVE_TIMEOUT + SLACK
        # the link is known dead: the answer is at once, and says why
        status, body = visit(port, "holed", timeout=5)
        assert status == 502 and b"agent reconnecting" in body
        agent.wait_for_line(r"reconnecting in [0-9.]+ s \(attempt \d+\): the relay at .* is unreachable")
        time.sleep(4)  # the outage goes on: the backoff grows past the probes' period
        proxy.restore()
        back = time.monotonic()
        agent.wait_for_line(r"reconnected: http://holed\.localhost", timeout=BACK_WITHIN + SLACK)
        assert visit(port, "holed")[0] == 200
        assert time.monotonic() - back <= BACK_WITHIN + SLACK


def test_nobody_else_can_take_the_name_while_its_agent_is_away(procs, origin):
    port, relay, agent, proxy = proxied_agent(procs, origin, "mine")
    with proxy:
        proxy.outage()
        relay.proc.wait_for_line(r"tunnel mine offline", timeout=KEEPALIVE_TIMEOUT + SLACK)
        usurper = agent_via(procs, port, origin, "mine", label="usurper")
        assert usurper.wait_exit(20) != 0
        assert "is held for the agent that had it" in usurper.output()
        proxy.restore()
        agent.wait_for_line(r"reconnected: http://mine\.localhost", timeout=BACK_WITHIN + SLACK)
        assert visit(port, "mine")[0] == 200


def test_a_reset_link_is_redialled_at_once(procs, origin):
    port, relay, agent, proxy = proxied_agent(procs, origin, "reset")
    with proxy:
        assert proxy.reset() == 1
        agent.wait_for_line(r"link to relay lost")
        agent.wait_for_line(r"reconnected: http://reset\.localhost", timeout=BACK_WITHIN + SLACK)
        assert visit(port, "reset")[0] == 200


def test_a_frozen_agent_gets_visitors_an_error_page_within_the_bound_and_recovers(procs, origin):
    port = free_port()
    relay = relay_on(procs, port, *KEEPALIVE)
    agent = agent_via(procs, port, origin, "frozen", *KEEPALIVE)
    agent.wait_for_line(r"^http://frozen\.localhost:%d$" % port)
    assert visit(port, "frozen")[0] == 200
    agent.popen.send_signal(signal.SIGSTOP)
    try:
        try:
            status, body = visit(port, "frozen", timeout=KEEPALIVE_TIMEOUT + SLACK)
        except socket.timeout:
            pytest.fail("a request to a frozen agent hung past the keepalive bound")
        assert status in (502, 504), body
        relay.proc.wait_for_line(r"tunnel frozen offline: keepalive timeout", timeout=KEEPALIVE_TIMEOUT + SLACK)
    finally:
        agent.popen.send_signal(signal.SIGCONT)
    agent.wait_for_line(r"reconnected: http://frozen\.localhost", timeout=KEEPALIVE_TIMEOUT + BACK_WITHIN + SLACK)
    wait_until(lambda: visit(port, "frozen")[0] == 200, timeout=SLACK, what="the tunnel to serve again")
