"""Issue 17's budgets against real processes: password guessing on tunnels' basic auth is throttled per address and
per tunnel, and a hostile agent can't make the relay buffer more than one link window of visitor data.

Every relay listens on 127.0.0.1 only; visitors speak from several loopback addresses (127.0.0.0/8 is all local on
Linux) to play different internet addresses.
"""

from __future__ import annotations

import base64
import secrets

import pytest

from .conftest import wait_until
from .test_security import (
    ANSWER_TIMEOUT,
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
