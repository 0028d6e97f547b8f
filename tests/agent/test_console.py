"""The agent console's model and formatters, without a terminal: the tally fed by the inspector's store, the
plain and JSON lines, the display's head; and the agent's metrics built from the same tally."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console

from portway.agent.console import (AgentConsole, LinkView, Tally, human_bytes, human_duration, json_line, link_view,
                                   plain_line, summary_lines)
from portway.agent.metrics import AgentCollector, exposition
from portway.inspector.capture import StreamCapture
from portway.inspector.store import Store

from ..inspector.test_capture import SWITCHED, UPGRADE, request, response, service_frames, visitor_frames


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def tallied(**kwargs) -> tuple[Store, Tally]:
    store, tally = Store(), Tally(**kwargs)
    store.listen(tally.on_event)
    return store, tally


def http_exchange(store: Store, method="GET", path="/", status=200, body=b"", start=1.0, end=1.0123):
    capture = StreamCapture(store, store.new_connection())
    capture.to_service([request(method, path, body)], start)
    if status is not None:
        capture.to_visitor(response(status, b"x" * 1234), end)
    return capture


def websocket_exchange(store: Store, messages: int = 2) -> StreamCapture:
    capture = StreamCapture(store, store.new_connection())
    capture.to_service([UPGRADE], 5.0)
    capture.to_visitor(SWITCHED, 5.01)
    client, server = visitor_frames(), service_frames()
    for i in range(messages):
        capture.to_service([bytes(client.send_data(f"m{i}"))], 5.1)
        capture.to_visitor(bytes(server.send_data(f"Echo: m{i}")), 5.2)
    return capture


def test_a_finished_request_is_counted_once_with_its_status_duration_and_size():
    store, tally = tallied()
    heard = []
    tally.listeners.append(heard.append)
    capture = http_exchange(store, "POST", "/api?x=1", 201, body=b"hello")
    assert len(heard) == 1
    done = heard[0]
    assert (done.method, done.path, done.status, done.bytes_in, done.bytes_out) == ("POST", "/api?x=1", 201, 5, 1234)
    assert done.duration == pytest.approx(0.0123)
    capture.closed(3.0)  # later events about the same exchange count nothing more
    assert tally.answers == [0, 1, 0, 0, 0] and tally.requests == 1 and len(heard) == 1
    assert (tally.bytes_in, tally.bytes_out) == (5, 1234)
    assert tally.duration.observations == 1


def test_the_inspectors_replays_are_not_tunnel_traffic():
    store, tally = tallied()
    capture = StreamCapture(store, store.new_connection(), replay_of=1)
    capture.to_service([request("GET", "/again")], 1.0)
    capture.to_visitor(response(200, b"ok"), 1.1)
    assert tally.requests == 0 and tally.in_progress == 0 and not tally.recent


def test_requests_in_progress_and_unanswered_ones():
    store, tally = tallied()
    capture = http_exchange(store, status=None)
    assert tally.in_progress == 1 and tally.requests == 0
    capture.closed(2.0)
    assert tally.in_progress == 0 and tally.unanswered == 1 and tally.recent[-1].status is None


def test_a_websocket_is_open_until_closed_then_one_line_with_its_messages():
    store, tally = tallied()
    capture = websocket_exchange(store, messages=3)
    assert tally.websockets_open == 1 and tally.websockets_total == 1 and tally.in_progress == 0
    assert tally.requests == 0  # not finished before it closes
    capture.closed(9.0)
    assert tally.websockets_open == 0 and tally.answers[0] == 1
    done = tally.recent[-1]
    assert done.websocket and done.messages == 6 and done.status == 101
    assert tally.ws_messages == {"visitor": 3, "service": 3}
    assert tally.duration.observations == 0  # a WebSocket's lifetime is no request duration


def test_an_exchange_the_store_lets_go_is_forgotten():
    store = Store(max_exchanges=1)
    tally = Tally()
    store.listen(tally.on_event)
    http_exchange(store, status=None)
    http_exchange(store, status=None)  # evicts the first, still unanswered
    assert tally.in_progress == 1


def test_the_rate_counts_the_last_ten_seconds():
    clock = Clock()
    store, tally = tallied(clock=clock)
    for _ in range(5):
        http_exchange(store)
    assert tally.rate() == pytest.approx(0.5)
    clock.now += 11
    assert tally.rate() == 0


def test_the_last_requests_are_kept_newest_last_and_bounded():
    store, tally = tallied(recent=3)
    for i in range(5):
        http_exchange(store, path=f"/{i}")
    assert [done.path for done in tally.recent] == ["/2", "/3", "/4"]


def test_plain_and_json_lines():
    store, tally = tallied()
    http_exchange(store, "GET", "/path", 200)
    line = plain_line(tally.recent[-1])
    assert re.fullmatch(r"\d\d:\d\d:\d\d GET /path 200 12\.3ms 1234B", line), line
    websocket_exchange(store, messages=3).closed(9.0)
    assert re.fullmatch(r"\d\d:\d\d:\d\d WS /chat 101 closed 6 msgs", plain_line(tally.recent[-1]))
    record = json.loads(json_line(tally.recent[-2]))
    assert record["method"] == "GET" and record["path"] == "/path" and record["status"] == 200
    assert record["duration_ms"] == pytest.approx(12.3) and record["bytes_out"] == 1234
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", record["time"])
    ws = json.loads(json_line(tally.recent[-1]))
    assert ws["method"] == "WS" and ws["messages"] == 6


def test_human_units():
    assert human_duration(None) == "-" and human_duration(0.0123) == "12.3ms" and human_duration(2.5) == "2.50s"
    assert human_bytes(999) == "999B" and human_bytes(2048) == "2.0KiB" and human_bytes(3 * 1024 ** 3) == "3.0GiB"


def test_the_head_states_url_relay_link_and_counts():
    store, tally = tallied()
    http_exchange(store, body=b"abc")
    lines = summary_lines(["http://a.localhost:8000"], "localhost:3000", "http://127.0.0.1:8000",
                          LinkView("connected", 0.0042, 1), tally)
    text = "\n".join(lines)
    assert "http://a.localhost:8000 → localhost:3000" in text and "http://127.0.0.1:8000" in text
    assert "connected, rtt 4.2ms, 1 reconnect(s)" in text
    assert "1 total" in text and "in 3B, out 1.2KiB" in text
    bare = "\n".join(summary_lines([], "localhost:3000", "r", LinkView("reconnecting"), None))
    assert "reconnecting" in bare and "--no-inspect" in bare


def fake_agent(connected: bool, rtt: float | None = None, reconnects: int = 0):
    session = SimpleNamespace(ended=not connected, parked=False, mux=SimpleNamespace(last_rtt=rtt))
    return SimpleNamespace(session=session, reconnects=reconnects)


def test_the_link_view_follows_the_agent():
    assert link_view(None).state == "connecting"
    assert link_view(fake_agent(True, 0.01, 2)) == LinkView("connected", 0.01, 2)
    assert link_view(fake_agent(False)).state == "reconnecting"
    agent = fake_agent(True)
    agent.session.parked = True  # the link is lost, its streams wait for the next one
    assert link_view(agent).state == "reconnecting"


def test_plain_mode_writes_a_line_per_request_and_prints_statuses():
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, highlight=False, soft_wrap=True)
    store, tally = tallied()
    agent_console = AgentConsole(console, "http://r", "localhost:1", tally, live=False, log_format="json")
    agent_console.start()
    agent_console.status("link to relay lost ([x]); reconnecting")
    http_exchange(store, path="/j")
    agent_console.stop()
    lines = out.getvalue().splitlines()
    assert lines[0] == "link to relay lost ([x]); reconnecting"
    assert json.loads(lines[1])["path"] == "/j"


def test_the_display_renders_requests_and_statuses():
    console = Console(record=True, width=100, force_terminal=False)
    store, tally = tallied()
    agent_console = AgentConsole(console, "http://r", "localhost:1", tally, live=True)
    agent_console.url("http://n.localhost:8000")
    agent_console.statuses.append("07:00:00 reconnected: http://n.localhost:8000")
    http_exchange(store, "DELETE", "/thing", 404)
    websocket_exchange(store).closed(9.0)
    console.print(agent_console.render())
    screen = console.export_text()
    assert "http://n.localhost:8000 → localhost:1" in screen
    assert re.search(r"DELETE\s+/thing\s+404\s+12\.3ms\s+1\.2KiB", screen), screen
    assert re.search(r"WS\s+/chat\s+101 closed\s+\S+\s+4 msgs", screen), screen
    assert "reconnected" in screen


def metrics_of(text: str) -> dict:
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def test_the_agent_metrics_come_from_the_tally():
    store, tally = tallied()
    http_exchange(store, body=b"abc")
    http_exchange(store, status=502)
    websocket_exchange(store).closed(9.0)
    websocket_exchange(store)
    text = exposition(AgentCollector(tally, fake_agent(True, 0.02, 3))).decode()
    values = metrics_of(text)
    assert values[("portway_agent_requests_total", (("status_class", "2xx"),))] == 1
    assert values[("portway_agent_requests_total", (("status_class", "5xx"),))] == 1
    assert values[("portway_agent_requests_total", (("status_class", "1xx"),))] == 1
    assert values[("portway_agent_request_duration_seconds_count", ())] == 2
    assert values[("portway_agent_received_bytes_total", ())] == 3
    assert values[("portway_agent_sent_bytes_total", ())] == 2468
    assert values[("portway_agent_websocket_connections_total", ())] == 2
    assert values[("portway_agent_websocket_connections_open", ())] == 1
    assert values[("portway_agent_websocket_messages_total", (("sender", "visitor"),))] == 2
    assert values[("portway_agent_link_up", ())] == 1
    assert values[("portway_agent_link_rtt_seconds", ())] == 0.02
    assert values[("portway_agent_reconnects_total", ())] == 3
    promtool = shutil.which("promtool")
    assert promtool, "promtool (Debian's prometheus package) is needed: run `bash scripts/test.sh`"
    checked = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_a_dropped_link_reads_as_down_without_rtt():
    values = metrics_of(exposition(AgentCollector(Tally(), fake_agent(False, 0.02))).decode())
    assert values[("portway_agent_link_up", ())] == 0
    assert ("portway_agent_link_rtt_seconds", ()) not in values
