"""Keepalive in the running programs: an agent link that dies silently (a NAT drops it, a peer freezes) is
noticed by the keepalive of both ends, within the `--keepalive-timeout` they promise.

Killing an agent is no test of this: the kernel closes its socket, and the relay hears at once. Here the link
runs through an in-test proxy (tests/e2e/linkproxy.py) that stops forwarding without closing anything.
"""

from __future__ import annotations

import http.client
import re
import socket

import pytest

from .conftest import PORTWAY, free_port, start_origin
from .linkproxy import LinkProxy

TIMEOUT = 2.0  # --keepalive-timeout of the end under test (it pings after a third of that)
# A silent link is declared dead TIMEOUT after the last frame heard from the peer. Everything else here (loop
# wake-ups, a process descheduled on a busy 2-core machine) is slack, and it is generous.
SLACK = 6.0
DETECTED_WITHIN = TIMEOUT + SLACK
RESPONSE_TIMEOUT = 60.0  # far beyond DETECTED_WITHIN: no 504 can be mistaken for the keepalive's 502
KEEPALIVE = ["--keepalive-timeout", str(TIMEOUT)]
DEAF = ["--keepalive-timeout", "60"]  # the other end: it does not notice anything within the test
# A link declared dead parks its open streams for the agent to resume them; the frozen agent never does, and the
# request in flight fails once that window has passed too (tests/e2e/test_resume.py has agents that come back).
RESUME_WINDOW = 1.0


def proxied(procs, relay_flags: list[str], agent_flags: list[str]):
    """A relay (verbose: it logs why a tunnel went offline), and an agent whose link to it runs through a
    LinkProxy; returns (relay port, relay, agent, proxy). The proxy is closed by the caller."""
    origin = start_origin(procs)
    port = free_port()
    relay = procs.start(PORTWAY + ["-v", "server", "--port", str(port), "--response-timeout", str(RESPONSE_TIMEOUT),
                                   *relay_flags], "relay")
    relay.wait_for_line(r"listening on")
    proxy = LinkProxy(port)
    try:
        agent = procs.start(PORTWAY + ["http", str(origin), "--relay", f"http://127.0.0.1:{proxy.port}",
                                       "--name", "frozen", *agent_flags], "agent")
        agent.wait_for_line(r"^http://frozen\.localhost:%d$" % port)
    except BaseException:
        proxy.close()
        raise
    return port, relay, agent, proxy


def visit(port: int, timeout: float, keep_alive: bool = True) -> tuple[int, bytes]:
    """A GET to the tunnel. With keep_alive=False the relay keeps no idle stream for the next request."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", "/", headers={"Host": f"frozen.localhost:{port}",
                                          **({} if keep_alive else {"Connection": "close"})})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def assert_clean(*processes) -> None:
    for proc in processes:
        assert not re.search(r"Traceback|Exception in callback|never retrieved", proc.output()), proc.output()


@pytest.mark.parametrize("pooled", [
    pytest.param(False, id="fresh-stream"),
    # a GET retried after its pooled stream was reset, then refused: it must not wait for an end already read
    pytest.param(True, id="pooled-stream"),
])
def test_relay_gives_up_on_a_silent_link_and_visitors_get_a_502_not_a_hang(procs, pooled):
    """The agent is the frozen peer here (its own keepalive timeout is 60 s, so it never comes back within the
    test): only the relay's keepalive can notice. The visitor's request goes on a new stream, or on the
    idle one the first request left in the relay's pool."""
    port, relay, agent, proxy = proxied(procs, KEEPALIVE + ["--resume-window", str(RESUME_WINDOW)], DEAF)
    with proxy:
        assert visit(port, 10, keep_alive=pooled) == (200, b"hello from origin")
        assert proxy.black_hole() == 1
        # The request goes into the black hole. Without keepalive it waits for an answer until --response-timeout
        # (then a 504); with it, the relay gives up on the link and answers 502.
        try:
            status, body = visit(port, DETECTED_WITHIN + RESUME_WINDOW)
        except socket.timeout:
            pytest.fail(f"no answer within {DETECTED_WITHIN + RESUME_WINDOW}s of the link going silent: the relay's "
                        "keepalive never fired")
        assert status == 502, body
        relay.wait_for_line(r"tunnel frozen offline: keepalive timeout", timeout=DETECTED_WITHIN)
        # from now on the tunnel is known to be gone: the answer is immediate
        status, body = visit(port, 10)
        assert status == 502 and b"not connected" in body
        assert proxy.accepted == 1 and proxy.dropped_bytes > 0
    assert_clean(relay, agent)


def test_agent_gives_up_on_a_silent_link_and_comes_back_under_its_name(procs):
    """Now the relay is the frozen peer (60 s keepalive timeout): only the agent's keepalive can notice. It dials
    again, through the same proxy, which forwards new connections, and its tunnel serves again."""
    port, relay, agent, proxy = proxied(procs, DEAF, KEEPALIVE)
    with proxy:
        assert visit(port, 10) == (200, b"hello from origin")
        assert proxy.black_hole() == 1
        agent.wait_for_line(r"link to relay lost \(keepalive timeout", timeout=DETECTED_WITHIN)
        agent.wait_for_line(r"reconnected: http://frozen\.localhost:%d" % port, timeout=DETECTED_WITHIN)
        assert proxy.accepted == 2
        assert visit(port, 10) == (200, b"hello from origin")
    assert_clean(relay, agent)
