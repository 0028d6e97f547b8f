"""A new user's first minutes, with the real CLI: mistakes get one clear line (never a traceback, never a
stranger's HTML), and the agent waits for a relay that isn't up yet."""

from __future__ import annotations

import http.client
import signal
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from .conftest import PORTWAY, ROOT, free_port, start_agent, start_origin, start_relay

EXIT_TIMEOUT = 20.0


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(PORTWAY + list(args), input=stdin, capture_output=True, text=True, timeout=EXIT_TIMEOUT,
                          env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"})


def assert_one_clear_line(output: str, fragment: str) -> None:
    assert fragment in output and "Traceback" not in output, output


@pytest.mark.parametrize("port", ["80900", "0", "-1", "http", "localhost:", "[::1]"])
def test_a_port_that_cant_be_is_refused_at_start(port):
    done = run("http", port, "--relay", "http://127.0.0.1:9", "--no-inspect")
    assert done.returncode == 2
    assert_one_clear_line(done.stderr, "is not a port (1-65535) or HOST:PORT")


def test_host_and_port_are_accepted_like_ngroks(procs):
    relay = start_relay(procs)
    origin = start_origin(procs)
    agent, name = start_agent(procs, relay, f"127.0.0.1:{origin}", "--no-inspect", name="hostport")
    assert f"→ 127.0.0.1:{origin}" in agent.wait_for_line(r"forwarding").string


def test_verbose_goes_after_the_subcommand_too():
    for argv in (["-v", "hash-token", "x"], ["hash-token", "-v", "x"]):
        assert run(*argv).returncode == 0


def test_hash_token_reads_the_secret_from_standard_input():
    piped = run("hash-token", stdin="s3cret\n")
    assert piped.returncode == 0 and piped.stdout == run("hash-token", "s3cret").stdout
    assert "1ec1c26b50d5d3c58d9583181af8076655fe00756bf7285940ba3670f99fcba0" in piped.stdout
    empty = run("hash-token", stdin="")
    assert empty.returncode == 2 and "no token given" in empty.stderr


def test_an_agent_started_before_its_relay_waits_for_it(procs):
    port = free_port()
    origin = start_origin(procs)
    agent = procs.start(PORTWAY + ["http", str(origin), "--relay", f"http://127.0.0.1:{port}", "--name", "early",
                                   "--no-inspect"], "early agent")
    agent.wait_for_line(rf"retrying in [0-9.]+ s \(attempt \d+\): the relay at 127\.0\.0\.1:{port} is unreachable")
    # let the backoff grow past the probes' period: the relay is dialled when it listens, not when a delay ends
    agent.wait_for_line(r"retrying in [0-9.]+ s \(attempt 4\)", timeout=30)
    procs.start(PORTWAY + ["server", "--port", str(port)], "late relay").wait_for_line("listening on")
    # within 5 s of listening (the probe's period plus its dial), whatever the backoff had reached
    agent.wait_for_line(rf"^http://early\.localhost:{port}$", timeout=5 + 3)


def test_an_agent_told_not_to_wait_exits_at_once():
    done = run("http", "9", "--relay", f"http://127.0.0.1:{free_port()}", "--no-wait-for-relay", "--no-inspect")
    assert done.returncode == 1
    assert_one_clear_line(done.stderr, "cannot reach the relay")


def test_a_name_held_through_a_grace_period_says_when_it_frees(procs):
    relay = start_relay(procs, "--grace-period", "30", "-v")
    origin = start_origin(procs)
    first, _ = start_agent(procs, relay, origin, "--no-inspect", name="held")
    first.kill(signal.SIGKILL)
    relay.proc.wait_for_line(r"tunnel held offline")
    again = procs.start(PORTWAY + ["http", str(origin), "--relay", relay.url, "--name", "held", "--no-inspect"],
                        "second agent")
    assert again.wait_exit(EXIT_TIMEOUT) == 1
    assert_one_clear_line(again.output(), "its link dropped")
    assert "free in" in again.output()


def test_a_crashed_agent_restarted_with_its_token_gets_its_name_back_at_once(procs):
    """No resume key survives a crash, but the token proves the name is the agent's own; another token waits."""
    relay = start_relay(procs, "--token", "crash-secret", "--token", "other-secret", "-v")
    origin = start_origin(procs)
    first, _ = start_agent(procs, relay, origin, "--no-inspect", "--token", "crash-secret", name="mine")
    first.kill(signal.SIGKILL)
    relay.proc.wait_for_line(r"tunnel mine offline")
    other = procs.start(PORTWAY + ["http", str(origin), "--relay", relay.url, "--name", "mine", "--no-inspect",
                                   "--token", "other-secret"], "other token")
    assert other.wait_exit(EXIT_TIMEOUT) == 1 and "its link dropped" in other.output()
    start_agent(procs, relay, origin, "--no-inspect", "--token", "crash-secret", name="mine")
    conn = http.client.HTTPConnection("127.0.0.1", relay.port, timeout=10)
    conn.request("GET", "/", headers={"Host": relay.host("mine")})
    assert conn.getresponse().status == 200
    conn.close()


@pytest.fixture
def foreign_web_server():
    class Page(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"<html><body><h1>Welcome to nginx!</h1></body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()
    thread.join(10)


def test_a_relay_url_that_is_another_web_server_is_named_as_such(foreign_web_server):
    done = run("http", "9", "--relay", f"http://127.0.0.1:{foreign_web_server}", "--no-inspect")
    assert done.returncode == 1
    assert_one_clear_line(done.stderr, "not as a Portway relay")
    assert "nginx" not in done.stderr and "<html" not in done.stderr


def test_a_missing_ca_file_is_a_clear_message(tmp_path):
    done = run("http", "9", "--relay", "https://127.0.0.1:9", "--ca", str(tmp_path / "nope.pem"), "--no-inspect")
    assert done.returncode == 2
    assert_one_clear_line(done.stderr, f"--ca {tmp_path / 'nope.pem'}: cannot load CA certificates")


def test_a_ca_file_that_is_not_a_certificate_is_a_clear_message(tmp_path):
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    done = run("http", "9", "--relay", "https://127.0.0.1:9", "--ca", str(junk), "--no-inspect")
    assert done.returncode == 2
    assert_one_clear_line(done.stderr, "cannot load CA certificates")


def test_the_embedded_relay_says_its_url_is_local_and_which_guards_are_on(procs):
    origin = start_origin(procs)
    agent = procs.start(PORTWAY + ["http", str(origin), "--basic-auth", "u:p", "--allow-ip", "127.0.0.0/8",
                                   "--no-inspect"], "embedded")
    agent.wait_for_line(r"^http://[a-z0-9-]+\.localhost:\d+$")
    output = agent.output()
    assert "works on this machine only" in output and "--relay URL" in output
    assert "visitors must log in (--basic-auth)" in output and "127.0.0.0/8 (--allow-ip)" in output


def test_the_embedded_relay_gives_clients_that_cant_resolve_localhost_names_an_address(procs):
    """Node's ws, Python and wscat don't resolve NAME.localhost: a direct 127.0.0.1 address reaches the tunnel."""
    import urllib.request

    from websockets.sync.client import connect as ws_connect

    origin = start_origin(procs)
    agent = procs.start(PORTWAY + ["http", str(origin), "--no-inspect"], "embedded")
    agent.wait_for_line(r"^http://[a-z0-9-]+\.localhost:\d+$")
    port = int(agent.wait_for_line(r"also at http://127\.0\.0\.1:(\d+) for clients").group(1))
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as answer:
        assert answer.read() == b"hello from origin"
    with ws_connect(f"ws://127.0.0.1:{port}/", open_timeout=10) as ws:
        ws.send("hello")
        assert ws.recv(timeout=10) == "Echo: hello"
    with urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/name", headers={"Host": "evil.example"}),
                                timeout=10) as answer:
        assert answer.status == 200  # any valid Host: this address serves the one tunnel
