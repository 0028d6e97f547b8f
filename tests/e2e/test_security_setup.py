"""Issue 4's catalogue, part two: hostile inputs that need a relay of their own (tokens and throttling, a tokens
file with reserved names and quotas, the secure default, TLS, the per-address limit) and name abuse at the
agent's command line. Every relay listens on 127.0.0.1 only; the secure-default checks never get to listen.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as ws_connect

from .conftest import PORTWAY, ROOT, free_port, start_origin, wait_until
from .test_security import (
    ANSWER_TIMEOUT,
    DOMAIN,
    RawAgentLink,
    RecordingOrigin,
    assert_clean_log,
    connect,
    get,
    launch_agent,
    launch_relay,
    read_outcome,
    talk,
)

AGENT_EXIT_TIMEOUT = 15.0  # an agent refused for good exits at once; a retry loop would blow this bound


@pytest.fixture
def origin():
    server = RecordingOrigin("origin")
    yield server
    server.close()


def run_agent_expecting_failure(procs, relay_url: str, *args: str, env: dict | None = None) -> tuple[int, str]:
    proc = procs.start(PORTWAY + ["http", "9", "--relay", relay_url, *args], "failing agent", env=env)
    code = proc.wait_exit(AGENT_EXIT_TIMEOUT)  # raises if it is still running then (a retry loop)
    return code, proc.output()


# =============================================================================================== tokens

def test_agent_without_token_gets_401_and_exits_nonzero(procs):
    relay = launch_relay(procs, "--token", "right-token")
    code, output = run_agent_expecting_failure(procs, relay.url, "--name", "notoken")
    assert code != 0 and "needs a valid token" in output and "--token" in output
    assert "retrying" not in output and "reconnect" not in output


def test_agent_with_wrong_token_gets_401_and_exits_nonzero(procs):
    relay = launch_relay(procs, "--token", "right-token")
    code, output = run_agent_expecting_failure(procs, relay.url, "--name", "wrongtoken", "--token", "wrong-token")
    assert code != 0 and "token was not accepted" in output
    assert "retrying" not in output and "reconnect" not in output


def test_token_from_the_environment_is_accepted(procs, origin):
    relay = launch_relay(procs, "--token", "env-token")
    launch_agent(procs, relay, origin.port, name="fromenv", env={"PORTWAY_TOKEN": "env-token"})
    assert get(relay.port, relay.host("fromenv"), "/env").status == 200


def test_token_guessing_is_throttled_per_address_while_valid_agents_still_register(procs, origin):
    relay = launch_relay(procs, "--token", "right-token")
    statuses = []
    for attempt in range(12):
        link = RawAgentLink(relay.port, "guess", token=f"guess-{attempt}", source="127.0.0.2")
        statuses.append(link.status)
        link.close()
    assert statuses == [401] * 10 + [429] * 2
    # the guessing address is refused even with the right token: it is told to wait, nothing is revealed
    link = RawAgentLink(relay.port, "guess", token="right-token", source="127.0.0.2")
    assert link.status == 429 and "too many failed" in link.message
    link.close()
    # another address registers normally, with the same relay, at the same time
    launch_agent(procs, relay, origin.port, "--token", "right-token", name="honest")
    assert get(relay.port, relay.host("honest"), "/after-guessing").status == 200
    assert_clean_log(relay.proc)


def test_auth_is_checked_before_the_name_so_refusals_reveal_nothing(procs, origin):
    relay = launch_relay(procs, "--token", "right-token")
    launch_agent(procs, relay, origin.port, "--token", "right-token", name="taken")
    answers = set()
    for name in ("taken", "free-name", "../etc", "admin"):
        link = RawAgentLink(relay.port, name, token="wrong", source="127.0.0.4")
        answers.add((link.status, link.message))
        link.close()
    assert answers == {(401, "the token was not accepted by this relay")}


# =============================================================================================== tokens file

def hash_line(secret: str) -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])))
    out = subprocess.run(PORTWAY + ["hash-token", secret], capture_output=True, text=True, timeout=30, check=True,
                         env=env)
    return out.stdout.strip()


@pytest.fixture
def tokens_relay(procs, tmp_path):
    path = tmp_path / "tokens.toml"
    path.write_text(
        "[[token]]\n" + hash_line("team-a-secret") + '\nlabel = "team-a"\nnames = ["reserved-a"]\nmax_tunnels = 2\n\n'
        "[[token]]\n" + hash_line("team-b-secret") + '\nlabel = "team-b"\n'
    )
    assert "team-a-secret" not in path.read_text()  # the file only ever holds digests
    return launch_relay(procs, "--tokens", str(path))


def test_hash_token_prints_a_sha256_line():
    import hashlib

    assert hash_line("s3cret") == f'sha256 = "{hashlib.sha256(b"s3cret").hexdigest()}"'


def test_reserved_name_belongs_to_its_token_only(procs, tokens_relay, origin):
    code, output = run_agent_expecting_failure(procs, tokens_relay.url, "--name", "reserved-a", "--token", "team-b-secret")
    assert code != 0 and "'reserved-a' is reserved for another token" in output
    launch_agent(procs, tokens_relay, origin.port, "--token", "team-a-secret", name="reserved-a")
    assert get(tokens_relay.port, tokens_relay.host("reserved-a"), "/mine").status == 200


def test_reserved_name_is_refused_even_while_its_owner_is_offline(procs, tokens_relay):
    link = RawAgentLink(tokens_relay.port, "reserved-a", token="team-b-secret")
    assert link.status == 403 and "reserved for another token" in link.message
    link.close()


def test_max_tunnels_per_token(procs, tokens_relay, origin):
    launch_agent(procs, tokens_relay, origin.port, "--token", "team-a-secret", name="a-one")
    launch_agent(procs, tokens_relay, origin.port, "--token", "team-a-secret", name="a-two")
    code, output = run_agent_expecting_failure(procs, tokens_relay.url, "--name", "a-three", "--token", "team-a-secret")
    assert code != 0 and "may hold 2 tunnel(s)" in output
    # the quota is per token: team-b is not affected
    launch_agent(procs, tokens_relay, origin.port, "--token", "team-b-secret", name="b-one")


def test_random_names_never_hand_out_a_reserved_name(procs, tmp_path):
    """team-a reserves every plain name a random draw can give (`quiet-river`…): team-b's random names must all
    come from past them."""
    from tests.proto.test_names import PLAIN, suffixed

    path = tmp_path / "tokens.toml"
    path.write_text("[[token]]\n" + hash_line("team-a-secret") + "\nnames = [" + ", ".join(f'"{name}"' for name in sorted(PLAIN))
                    + "]\n\n[[token]]\n" + hash_line("team-b-secret") + "\n")
    relay = launch_relay(procs, "--tokens", str(path))
    links = [RawAgentLink(relay.port, None, token="team-b-secret") for _ in range(5)]
    try:
        assert [link.status for link in links] == [101] * 5
        names = {link.headers.get("portway-name") for link in links}
        assert len(names) == 5 and not names & PLAIN, names
        for name in names:
            suffixed(name)
    finally:
        for link in links:
            link.close()


BAD_TOKEN_FILES = [
    ("not-toml", "this is = = not toml", "cannot read tokens file"),
    ("no-entries", "# nothing\n", "defines no [[token]] entries"),
    ("short-digest", '[[token]]\nsha256 = "abc"\n', "sha256 must be 64 hex digits"),
    ("no-secret", '[[token]]\nlabel = "x"\n', "needs `sha256"),
    ("bad-reserved-name", '[[token]]\nsha256 = "' + "0" * 64 + '"\nnames = ["../etc"]\n', "DNS label"),
    ("system-reserved-name", '[[token]]\nsha256 = "' + "0" * 64 + '"\nnames = ["admin"]\n', "reserved for the relay"),
    ("negative-quota", '[[token]]\nsha256 = "' + "0" * 64 + '"\nmax_tunnels = -1\n', "can't be negative"),
]


@pytest.mark.parametrize("text, message", [row[1:] for row in BAD_TOKEN_FILES], ids=[row[0] for row in BAD_TOKEN_FILES])
def test_bad_tokens_file_stops_the_relay_with_a_message(procs, tmp_path, text, message):
    path = tmp_path / "tokens.toml"
    path.write_text(text)
    proc = procs.start(PORTWAY + ["server", "--port", str(free_port()), "--tokens", str(path)], "relay")
    assert proc.wait_exit(30) == 2
    assert message in proc.output() and "listening" not in proc.output()


# =============================================================================================== secure default

@pytest.mark.parametrize("bind", ["0.0.0.0", "::", "192.0.2.10", "relay.example.invalid"])
def test_open_relay_on_a_public_address_refuses_to_start(procs, bind):
    """It exits before listening (the check runs first, so nothing is ever bound to these addresses)."""
    port = free_port()
    proc = procs.start(PORTWAY + ["server", "--bind", bind, "--port", str(port)], "relay")
    assert proc.wait_exit(30) == 2
    output = proc.output()
    assert "--open" in output and "refusing to listen" in output and "--token" in output and "--tokens" in output
    assert "listening on" not in output
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_tls_cert_without_key_is_refused(procs, tmp_path):
    proc = procs.start(PORTWAY + ["server", "--port", str(free_port()), "--tls-cert", str(tmp_path / "c.pem")], "relay")
    assert proc.wait_exit(30) == 2
    assert "--tls-cert and --tls-key go together" in proc.output()


# =============================================================================================== per-address limit

def test_connections_per_address_are_capped(procs):
    """Connections in the middle of a head (a slowloris, a flood of half-open requests) hold their slots: past
    the cap the next one gets 429, another address is served, and a slot frees when one closes."""
    relay = launch_relay(procs, "--max-connections-per-ip", "3")
    status = f"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1:{relay.port}\r\n\r\n".encode()
    half_head = f"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1:{relay.port}\r\n".encode()
    held = []
    try:
        for _ in range(3):
            sock = connect(relay.port)
            held.append(sock)
            sock.sendall(half_head)
        wait_until(lambda: talk(relay.port, status).statuses == [429], 10, what="the half-open heads to count")
        refused = talk(relay.port, status)
        assert refused.statuses == [429] and refused.closed
        assert b"Too many connections" in refused.responses[0].body
        # the limit is per address: another one is served
        assert talk(relay.port, status, source="127.0.0.2").statuses == [200]
        held.pop().close()
        wait_until(lambda: talk(relay.port, status).statuses == [200], 10, what="a slot to free up")
    finally:
        for sock in held:
            sock.close()
    assert_clean_log(relay.proc)


def test_idle_keep_alive_connections_make_room_at_the_cap(procs):
    """Idle keep-alive connections cost the relay little: at the cap one of them is closed for a newcomer
    instead of locking the address out."""
    relay = launch_relay(procs, "--max-connections-per-ip", "3")
    status = f"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1:{relay.port}\r\n\r\n".encode()
    held = []
    try:
        for _ in range(3):
            sock = connect(relay.port)
            held.append(sock)
            sock.sendall(status)
            assert read_outcome(sock, responses=1).statuses == [200]
        assert talk(relay.port, status).statuses == [200]
        # one of the idle ones was closed to make room
        closed = [sock for sock in held if read_outcome(sock, timeout=0.5).ending != "open"]
        assert len(closed) >= 1
    finally:
        for sock in held:
            sock.close()
    assert_clean_log(relay.proc)


def test_many_websockets_from_one_address_do_not_lock_it_out(procs):
    """An office behind one NAT address: 300 open WebSockets through a tunnel (more than the HTTP cap of 256),
    and a plain request from the same address is still served; WebSockets have their own, larger cap."""
    metrics_port = free_port()
    # the agent's link, from this address too, is one of the 301
    relay = launch_relay(procs, "--max-upgraded-per-ip", "301", "--metrics", f"127.0.0.1:{metrics_port}")
    origin = start_origin(procs)
    launch_agent(procs, relay, origin, "--no-inspect", name="office")
    host = relay.host("office")
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(open_websocket(relay.port, host)) for _ in range(300)]
        sockets[0].send("still here")
        assert sockets[0].recv(timeout=ANSWER_TIMEOUT) == "Echo: still here"
        plain = talk(relay.port, f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        assert plain.statuses == [200]
        over = talk(relay.port, (f"GET / HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                                 "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        assert over.statuses == [429] and b"Too many open WebSockets" in over.responses[0].body
        assert refused_by_limit(metrics_port) == {"connections": 0, "rate": 0, "upgraded": 1}
        sockets[-1].close()
        wait_until(lambda: websocket_echoes(relay.port, host), 10, what="the closed WebSocket's slot to free up")
    assert_clean_log(relay.proc)


def refused_by_limit(metrics_port: int) -> dict[str, float]:
    """The relay's portway_refused_connections_total, by limit."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=ANSWER_TIMEOUT) as answer:
        text = answer.read().decode()
    return {sample.labels["limit"]: sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.name == "portway_refused_connections_total"}


def open_websocket(port: int, host: str):
    return ws_connect(f"ws://{host}/", sock=socket.create_connection(("127.0.0.1", port), timeout=ANSWER_TIMEOUT),
                      open_timeout=ANSWER_TIMEOUT)


def websocket_echoes(port: int, host: str) -> bool:
    """Whether a WebSocket to `host` is accepted now and echoes a message."""
    try:
        with open_websocket(port, host) as ws:
            ws.send("again")
            return ws.recv(timeout=ANSWER_TIMEOUT) == "Echo: again"
    except InvalidStatus:  # refused (429): not yet
        return False


def test_new_connections_from_one_address_are_rate_limited(procs):
    metrics_port = free_port()
    relay = launch_relay(procs, "--max-connection-rate-per-ip", "1", "--metrics", f"127.0.0.1:{metrics_port}")  # bursts of 2
    status = f"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1:{relay.port}\r\n\r\n".encode()
    outcomes = [talk(relay.port, status) for _ in range(6)]
    assert [outcome.statuses for outcome in outcomes[:2]] == [[200], [200]]
    refused = [outcome for outcome in outcomes if outcome.statuses == [429]]
    assert refused, "six connections within a few seconds from one address, none refused"
    assert all(b"slow down" in outcome.responses[0].body and outcome.closed for outcome in refused)
    assert talk(relay.port, status, source="127.0.0.2").statuses == [200]
    assert refused_by_limit(metrics_port)["rate"] == len(refused)
    wait_until(lambda: talk(relay.port, status).statuses == [200], 10, what="a token to come back")
    assert_clean_log(relay.proc)


# =============================================================================================== TLS

@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    trustme = pytest.importorskip("trustme")
    authority = trustme.CA()
    directory = tmp_path_factory.mktemp("tls")
    cert = authority.issue_cert("127.0.0.1", DOMAIN, f"*.{DOMAIN}")
    paths = {"ca": directory / "ca.pem", "cert": directory / "cert.pem", "key": directory / "key.pem"}
    authority.cert_pem.write_to_path(str(paths["ca"]))
    cert.cert_chain_pems[0].write_to_path(str(paths["cert"]))
    for extra in cert.cert_chain_pems[1:]:
        extra.write_to_path(str(paths["cert"]), append=True)
    cert.private_key_pem.write_to_path(str(paths["key"]))
    return paths


@pytest.fixture
def tls_relay(procs, ca):
    return launch_relay(procs, "--tls-cert", str(ca["cert"]), "--tls-key", str(ca["key"]), "--head-timeout", "1")


def https_url(relay) -> str:
    return f"https://127.0.0.1:{relay.port}"


def tls_visitor(relay, ca, hostname: str) -> ssl.SSLSocket:
    context = ssl.create_default_context(cafile=str(ca["ca"]))
    raw = socket.create_connection(("127.0.0.1", relay.port), timeout=ANSWER_TIMEOUT)
    return context.wrap_socket(raw, server_hostname=hostname)


def test_tls_relay_serves_https_to_visitors_and_tls_to_agents(procs, tls_relay, ca, origin):
    launch_agent(procs, tls_relay, origin.port, "--ca", str(ca["ca"]), name="secure", scheme="https",
                 relay_url=https_url(tls_relay))
    with tls_visitor(tls_relay, ca, f"secure.{DOMAIN}") as sock:
        sock.sendall(f"GET /over-tls HTTP/1.1\r\nHost: {tls_relay.host('secure')}\r\n\r\n".encode())
        outcome = read_outcome(sock, responses=1)
    assert outcome.statuses == [200] and outcome.responses[0].body == b"origin GET /over-tls"
    assert origin.requests()[-1].header("X-Forwarded-Proto") == ["https"]
    assert_clean_log(tls_relay.proc)


def test_tls_visitors_are_counted_by_their_own_address(procs, ca):
    """The per-address limits see a TLS visitor's address (known once its handshake is done), not one shared
    count for all of them."""
    relay = launch_relay(procs, "--tls-cert", str(ca["cert"]), "--tls-key", str(ca["key"]),
                         "--max-connections-per-ip", "1")
    context = ssl.create_default_context(cafile=str(ca["ca"]))
    status = f"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1:{relay.port}\r\n\r\n".encode()

    def visit_from(source: str):
        raw = socket.create_connection(("127.0.0.1", relay.port), timeout=ANSWER_TIMEOUT, source_address=(source, 0))
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
            sock.sendall(status)
            return read_outcome(sock, responses=1).statuses

    raw = socket.create_connection(("127.0.0.1", relay.port), timeout=ANSWER_TIMEOUT)
    with context.wrap_socket(raw, server_hostname="127.0.0.1") as held:
        held.sendall(status[:20])  # a head under way holds the address's only slot
        wait_until(lambda: visit_from("127.0.0.1") == [429], 10, what="the held connection to count")
        assert visit_from("127.0.0.2") == [200]
    assert_clean_log(relay.proc)


def test_a_tls_visitor_closing_its_connection_is_no_warning(procs, tls_relay, ca, origin):
    """asyncio warns for every TLS connection whose protocol asks to stay half-open after the peer's EOF."""
    launch_agent(procs, tls_relay, origin.port, "--ca", str(ca["ca"]), name="closer", scheme="https",
                 relay_url=https_url(tls_relay))
    for path in ("/first", "/second"):
        # the relay reads the first connection's end before it can answer the second request through the agent
        with tls_visitor(tls_relay, ca, f"closer.{DOMAIN}") as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {tls_relay.host('closer')}\r\n\r\n".encode())
            assert read_outcome(sock, responses=1).statuses == [200]
            try:
                sock.unwrap()  # TLS close_notify: the relay's end of input
            except (OSError, ssl.SSLError):
                pass
    tls_relay.proc.wait_for_line(r" /second 200 ")
    assert "eof_received" not in tls_relay.proc.output()
    assert_clean_log(tls_relay.proc)


def test_wss_through_a_tls_relay(procs, tls_relay, ca):
    node_origin = start_origin(procs, "wss-origin")
    launch_agent(procs, tls_relay, node_origin, "--ca", str(ca["ca"]), name="wss", scheme="https",
                 relay_url=https_url(tls_relay))
    context = ssl.create_default_context(cafile=str(ca["ca"]))
    sock = socket.create_connection(("127.0.0.1", tls_relay.port), timeout=ANSWER_TIMEOUT)
    with ws_connect(f"wss://{tls_relay.host('wss')}/", sock=sock, ssl=context, server_hostname=f"wss.{DOMAIN}",
                    open_timeout=10) as ws:
        ws.send("over tls")
        assert ws.recv(timeout=10) == "Echo: over tls"


def test_agent_without_the_ca_refuses_the_relay_with_a_clear_error(procs, tls_relay):
    code, output = run_agent_expecting_failure(procs, https_url(tls_relay), "--name", "noca")
    assert code != 0 and "certificate verify failed" in output and "cannot reach the relay" in output


def test_agent_with_the_wrong_ca_refuses_the_relay(procs, tls_relay, tmp_path):
    trustme = pytest.importorskip("trustme")
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    code, output = run_agent_expecting_failure(procs, https_url(tls_relay), "--name", "wrongca", "--ca", str(other))
    assert code != 0 and "certificate verify failed" in output


def test_plaintext_agent_on_a_tls_relay_fails_cleanly(procs, tls_relay):
    code, output = run_agent_expecting_failure(procs, f"http://127.0.0.1:{tls_relay.port}", "--name", "plain")
    assert code != 0 and "error" in output and "Traceback" not in output


def test_plaintext_visitor_gets_no_http_from_a_tls_relay(tls_relay):
    outcome = talk(tls_relay.port, f"GET / HTTP/1.1\r\nHost: {tls_relay.host('x')}\r\n\r\n".encode(), responses=None)
    assert outcome.responses == [] and outcome.closed


def test_tls_handshake_is_bounded_by_the_head_timeout(tls_relay):
    """A connection that never finishes its TLS handshake is a slowloris too, and one the per-address limit can't
    see yet: it is dropped after --head-timeout, not the TLS library's default minute."""
    for opening in (b"", bytes.fromhex("160301")):
        started = time.monotonic()
        with connect(tls_relay.port) as sock:
            sock.sendall(opening)
            outcome = read_outcome(sock, timeout=15)
        assert outcome.closed and time.monotonic() - started < 1 + 4, outcome


# =============================================================================================== names at the agent

BAD_NAMES = [
    ("dot-dot-slash", "../etc", "not a DNS label"),
    ("empty", "", "can't be empty"),
    ("blank", "   ", "can't be empty"),
    ("64-chars", "a" * 64, "the limit is 63"),
    ("system-admin", "admin", "reserved for the relay itself"),
    ("system-www", "WWW", "reserved for the relay itself"),
    ("system-portway", "portway", "reserved for the relay itself"),
    ("unicode", "bücher", "not a DNS label"),
    ("leading-hyphen", "=-a", "not a DNS label"),
    ("dotted", "a.b", "not a DNS label"),
    ("slash", "a/b", "not a DNS label"),
    ("percent-encoded", "%2e%2e", "not a DNS label"),
]


@pytest.mark.parametrize("name, message", [row[1:] for row in BAD_NAMES], ids=[row[0] for row in BAD_NAMES])
def test_bad_name_is_refused_by_the_agent_before_dialling(procs, name, message):
    option = ["--name" + name] if name.startswith("=") else ["--name", name]
    code, output = run_agent_expecting_failure(procs, f"http://127.0.0.1:{free_port()}", *option)
    assert code == 2 and message in output, output
    assert "cannot reach the relay" not in output  # refused locally, nothing was sent anywhere


def test_registration_json_errors_are_json(procs):
    """Every refusal of a registration is `application/json` with a `message`: what the agent prints, and what
    scripts driving the relay's agent endpoint can parse."""
    relay = launch_relay(procs, "--token", "t")
    refusals = [
        RawAgentLink(relay.port, "x", token=None, source="127.0.0.5"),  # 401
        RawAgentLink(relay.port, "../etc", token="t", source="127.0.0.5"),  # 400
        RawAgentLink(relay.port, "x", token="t", source="127.0.0.5", extra_headers={"Upgrade": "websocket"}),  # 426
    ]
    try:
        assert [link.status for link in refusals] == [401, 400, 426]
        for link in refusals:
            assert link.content_type == "application/json"
            assert json.loads(link.body) == {"message": link.message}
        assert re.search(r"token", refusals[0].message)
    finally:
        for link in refusals:
            link.close()


# =============================================================================================== a hostile relay

def test_agent_survives_a_relay_that_opens_and_resets_a_stream_at_once(procs, origin):
    """The agent trusts its relay, but not to the point of crashing: a stream opened and reset in the same frame
    (or the same read) is legal, and the link must go on serving the next stream."""
    from .test_security import ACK, DATA, HEADER, RST, SYN, WINDOW_UPDATE, data_frame, frame

    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(ANSWER_TIMEOUT)
        port = server.getsockname()[1]
        agent = procs.start(PORTWAY + ["http", str(origin.port), "--relay", f"http://127.0.0.1:{port}",
                                       "--name", "victim"], "agent")
        link, _ = server.accept()
        with link:
            link.settimeout(ANSWER_TIMEOUT)
            request = b""
            while b"\r\n\r\n" not in request:
                request += link.recv(4096)
            link.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: portway-mux\r\nConnection: Upgrade\r\n"
                         b"Portway-Name: victim\r\nPortway-Url: http://victim.pw.test:1\r\nPortway-Resume: k\r\n\r\n")
            agent.wait_for_line(r"http://victim\.pw\.test:1")
            link.sendall(frame(WINDOW_UPDATE, SYN | RST, 2, 0)
                         + frame(WINDOW_UPDATE, SYN, 4, 0) + frame(WINDOW_UPDATE, RST, 4, 0))
            link.sendall(frame(WINDOW_UPDATE, SYN, 6, 0)
                         + data_frame(6, b"GET /after-reset HTTP/1.1\r\nHost: victim.pw.test\r\n\r\n"))
            received = b""
            deadline = time.monotonic() + ANSWER_TIMEOUT
            while b"origin GET /after-reset" not in received:
                assert time.monotonic() < deadline, f"no answer on stream 6: {received[-200:]!r}"
                data = link.recv(65536)
                assert data, f"the agent dropped the link:\n{agent.output()}"
                received += data
    kinds = set()
    while len(received) >= HEADER.size:
        _, kind, flags, stream_id, length = HEADER.unpack_from(received)
        kinds.add((kind, stream_id, flags & ACK))
        received = received[HEADER.size + (length if kind == DATA else 0):]
    assert (WINDOW_UPDATE, 6, ACK) in kinds
    assert_clean_log(agent)


def served_certificate(relay, ca_file) -> bytes:
    context = ssl.create_default_context(cafile=str(ca_file))
    with socket.create_connection(("127.0.0.1", relay.port), timeout=ANSWER_TIMEOUT) as raw:
        with context.wrap_socket(raw, server_hostname=DOMAIN) as sock:
            return sock.getpeercert(binary_form=True)


@pytest.fixture
def renewable(tmp_path):
    """A CA and a way to (re)issue the relay's certificate files in place, as certbot renews them."""
    trustme = pytest.importorskip("trustme")
    authority = trustme.CA()
    paths = {"ca": tmp_path / "ca.pem", "cert": tmp_path / "cert.pem", "key": tmp_path / "key.pem"}
    authority.cert_pem.write_to_path(str(paths["ca"]))

    def issue() -> None:
        cert = authority.issue_cert("127.0.0.1", DOMAIN, f"*.{DOMAIN}")
        cert.private_key_pem.write_to_path(str(paths["key"]))
        cert.cert_chain_pems[0].write_to_path(str(paths["cert"]))

    issue()
    paths["issue"] = issue
    return paths


def test_a_renewed_certificate_is_served_after_sighup_without_a_restart(procs, renewable):
    relay = launch_relay(procs, "--tls-cert", str(renewable["cert"]), "--tls-key", str(renewable["key"]),
                         "--tls-reload-interval", "3600")
    first = served_certificate(relay, renewable["ca"])
    renewable["issue"]()
    relay.proc.popen.send_signal(signal.SIGHUP)
    relay.proc.wait_for_line(r"TLS certificate reloaded")
    assert served_certificate(relay, renewable["ca"]) != first
    assert relay.proc.popen.poll() is None  # same process


def test_changed_certificate_files_are_picked_up_and_a_bad_one_keeps_the_last_good(procs, renewable):
    relay = launch_relay(procs, "--tls-cert", str(renewable["cert"]), "--tls-key", str(renewable["key"]),
                         "--tls-reload-interval", "0.2")
    first = served_certificate(relay, renewable["ca"])
    renewable["issue"]()
    relay.proc.wait_for_line(r"TLS certificate reloaded .*the files changed")
    second = served_certificate(relay, renewable["ca"])
    assert second != first
    kept_before = relay.proc.output().count("keeping the current TLS certificate")  # a half-written renewal may too
    renewable["cert"].write_text("not a certificate\n")
    wait_until(lambda: relay.proc.output().count("keeping the current TLS certificate") > kept_before,
               what="the relay to refuse the broken certificate file")
    assert served_certificate(relay, renewable["ca"]) == second
    assert_clean_log(relay.proc)
