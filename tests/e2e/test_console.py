"""The agent's console, end to end: `portway http` in a pseudo-terminal (pexpect) shows its live view (URL,
relay, link, the requests made through the tunnel as they finish, status messages such as a lost link); with
stderr not a terminal it prints a line per request, as text or JSON. And the agent's `/metrics` on the
inspector's port after real traffic: parsed, `promtool check metrics`, scraped by a real Prometheus."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import subprocess

import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import PORTWAY, ROOT, prometheus_sees, start_agent, start_relay, wait_until, ws_open
from .test_inspector import visit

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]|\r")


class Screen:
    """A child in a pseudo-terminal; `wait_for` looks for a pattern in everything it drew, escapes stripped."""

    def __init__(self, args: list[str]) -> None:
        import pexpect

        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"),
                                                                       os.environ.get("PYTHONPATH")])),
                   TERM="xterm-256color", COLUMNS="120", LINES="40")
        self.pexpect = pexpect
        self.child = pexpect.spawn(args[0], args[1:], env=env, dimensions=(40, 120), encoding="utf-8",
                                   codec_errors="replace")
        self.raw = ""

    def _drain(self) -> None:
        while True:
            try:
                self.raw += self.child.read_nonblocking(65536, timeout=0.05)
            except self.pexpect.TIMEOUT:
                return
            except self.pexpect.EOF:
                return

    @property
    def text(self) -> str:
        return ANSI.sub("", self.raw)

    def wait_for(self, pattern: str, since: int = 0, what: str | None = None) -> re.Match:
        regex = re.compile(pattern)

        def found():
            self._drain()
            match = regex.search(self.text, since)
            if match is None and not self.child.isalive():
                raise AssertionError(f"the agent exited; its screen:\n{self.text[-3000:]}")
            return match

        try:
            return wait_until(found, interval=0.05, what=what or pattern)
        except AssertionError as error:
            raise AssertionError(f"{error}; screen:\n{self.text[-3000:]}") from None

    def close(self) -> None:
        if self.child.isalive():
            self.child.kill(2)  # SIGINT: the agent stops as on Ctrl-C
            try:
                self.child.expect(self.pexpect.EOF, timeout=10)
            except self.pexpect.TIMEOUT:
                pass
        self.child.close(force=True)


@pytest.fixture
def screen_agent(procs, origin):
    pytest.importorskip("pexpect")
    screens = []

    def start(relay, name: str, *extra: str) -> Screen:
        screen = Screen(PORTWAY + ["http", str(origin), "--relay", relay.url, "--name", name,
                                   "--inspect", "127.0.0.1:0", *extra])
        screens.append(screen)
        return screen

    yield start
    for screen in screens:
        screen.close()


def test_the_live_view_shows_the_tunnel_and_each_request_as_it_happens(procs, screen_agent, origin):
    relay = start_relay(procs)
    screen = screen_agent(relay, "console")
    screen.wait_for(rf"http://console\.localhost:{relay.port} → localhost:{origin}")
    screen.wait_for(r"link\s+connected")
    screen.wait_for(rf"relay\s+http://127\.0\.0\.1:{relay.port}")
    tag = os.urandom(3).hex()
    assert visit(relay, "console", path=f"/whoami?{tag}")[0] == 200
    screen.wait_for(rf"GET\s+/whoami\?{tag}\s+200\s+[0-9.]+m?s\s+\d", what="the request's row")
    assert visit(relay, "console", path=f"/missing-{tag}")[0] == 404
    screen.wait_for(rf"GET\s+/missing-{tag}\s+404", what="the 404's row")
    with ws_open(relay, "console") as ws:
        ws.send("hello")
        assert ws.recv(timeout=10) == "Echo: hello"
        screen.wait_for(r"1 WebSocket\(s\)", what="the open WebSocket")
    screen.wait_for(r"WS\s+/\s+101 closed\s+\S+\s+4 msgs", what="the closed WebSocket's row")
    screen.wait_for(r"requests\s+3 total")


def test_a_lost_link_shows_in_the_view_and_so_does_the_reconnect(procs, screen_agent, origin):
    relay = start_relay(procs)
    screen = screen_agent(relay, "flaky")
    screen.wait_for(r"link\s+connected")
    relay.proc.kill()
    lost = screen.wait_for(r"link to relay lost .*reconnecting", what="the lost link's status")
    screen.wait_for(r"link\s+reconnecting", since=lost.start())
    again = procs.start(PORTWAY + ["server", "--port", str(relay.port), "--domain", relay.domain], "relay again")
    again.wait_for_line(r"listening on")
    screen.wait_for(r"reconnected: http://flaky\.localhost", what="the reconnect's status")
    screen.wait_for(r"link\s+connected, 1 reconnect\(s\)")
    assert visit(relay, "flaky", path="/after")[0] in (200, 404)
    screen.wait_for(r"GET\s+/after\s+\d{3}")


def test_the_link_rtt_shows_once_a_keepalive_ping_measured_it(procs, screen_agent):
    relay = start_relay(procs)
    screen = screen_agent(relay, "pinged", "--keepalive-interval", "0.2")
    screen.wait_for(r"link\s+connected, rtt [0-9.]+ms", what="the link's RTT")


def test_without_a_terminal_a_plain_line_per_request(procs, relay, origin):
    agent, name = start_agent(procs, relay, origin, "--inspect", "127.0.0.1:0", name="plain")
    assert visit(relay, name, path="/whoami?plain")[0] == 200
    agent.wait_for_line(r"^\d\d:\d\d:\d\d GET /whoami\?plain 200 [0-9.]+m?s \d+B$")
    with ws_open(relay, name) as ws:
        ws.send("one")
        assert ws.recv(timeout=10) == "Echo: one"
    agent.wait_for_line(r"^\d\d:\d\d:\d\d WS / 101 closed 4 msgs$")
    assert agent.stdout == [f"http://plain.localhost:{relay.port}"]  # the URL line, unchanged, alone on stdout


def test_json_lines_with_log_format_json(procs, relay, origin):
    agent, name = start_agent(procs, relay, origin, "--inspect", "127.0.0.1:0", "--log-format", "json",
                              name="jsonl")
    assert visit(relay, name, "POST", "/echo", b"12345")[0] == 200
    agent.wait_for_line(r'"path": "/echo"')
    record = json.loads(next(line for line in agent.stderr if '"path": "/echo"' in line))
    assert record["method"] == "POST" and record["status"] == 200 and record["bytes_in"] == 5
    assert record["bytes_out"] == 5 and isinstance(record["duration_ms"], float)


def test_without_the_inspector_no_request_lines(procs, relay, origin):
    agent, name = start_agent(procs, relay, origin, "--no-inspect", name="blind")
    assert visit(relay, name, path="/whoami?blind")[0] == 200
    agent.wait_for_line(r"forwarding http://blind\.localhost")
    assert not any("/whoami?blind" in line for line in agent.stderr)


# ------------------------------------------------------------------------------------------------ metrics

def scrape(port: int, host: str | None = None) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/metrics", headers={"Host": host or f"127.0.0.1:{port}"})
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


@pytest.fixture
def metered(procs, relay, origin):
    agent, name = start_agent(procs, relay, origin, "--inspect", "127.0.0.1:0", name="metered")
    port = int(agent.wait_for_line(r"^inspector: http://127\.0\.0\.1:(\d+)$").group(1))
    assert visit(relay, name, path="/whoami")[0] == 200
    assert visit(relay, name, "POST", "/echo", b"abcdef")[0] == 200
    assert visit(relay, name, path="/nothing-here")[0] == 404
    with ws_open(relay, name) as ws:
        ws.send("x")
        assert ws.recv(timeout=10) == "Echo: x"
    agent.wait_for_line(r"WS / 101 closed")
    return relay, port, procs


def test_the_agent_metrics_count_the_traffic(metered):
    _, port, _ = metered
    status, text = scrape(port)
    assert status == 200
    values = {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
              for family in text_string_to_metric_families(text) for sample in family.samples}
    assert values[("portway_agent_requests_total", (("status_class", "2xx"),))] == 2
    assert values[("portway_agent_requests_total", (("status_class", "4xx"),))] == 1
    assert values[("portway_agent_requests_total", (("status_class", "1xx"),))] == 1
    assert values[("portway_agent_request_duration_seconds_count", ())] == 3
    assert values[("portway_agent_received_bytes_total", ())] == 6
    assert values[("portway_agent_websocket_connections_total", ())] == 1
    assert values[("portway_agent_websocket_connections_open", ())] == 0
    assert values[("portway_agent_websocket_messages_total", (("sender", "visitor"),))] == 2
    assert values[("portway_agent_link_up", ())] == 1
    assert values[("portway_agent_reconnects_total", ())] == 0
    assert scrape(port, host="evil.example:80")[0] == 403  # the inspector's Host check applies


def test_promtool_accepts_the_agent_exposition(metered):
    promtool = shutil.which("promtool")
    assert promtool, "promtool (Debian's prometheus package) is needed: run `bash scripts/test.sh`"
    _, port, _ = metered
    checked = subprocess.run([promtool, "check", "metrics"], input=scrape(port)[1], capture_output=True, text=True,
                             timeout=30)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_a_real_prometheus_scrapes_the_agent(metered):
    _, port, procs = metered
    prometheus_sees(procs, port, 'portway_agent_requests_total{status_class="2xx"}', "2")
