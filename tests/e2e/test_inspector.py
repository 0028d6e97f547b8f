"""Issue 11's inspector, end to end: a real relay, a real agent with its inspector, the seed's `ws` echo server.
What visitors send through the tunnel shows up in the inspector's JSON API; replays reach the origin; HAR
export; and the inspector refuses pages of other sites (foreign Host, foreign Origin)."""

from __future__ import annotations

import http.client
import json
import re
import socket

import pytest

from .conftest import PORTWAY, start_agent, wait_until, ws_open


def visit(relay, name, method="GET", path="/", body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", relay.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers={"Host": relay.host(name), **(headers or {})})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


class InspectorClient:
    def __init__(self, url: str) -> None:
        match = re.match(r"http://127\.0\.0\.1:(\d+)$", url)
        assert match, url
        self.port = int(match.group(1))

    def call(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()

    def json(self, method: str, path: str, payload: object = None, headers: dict | None = None):
        body = json.dumps(payload).encode() if payload is not None else None
        status, _, data = self.call(method, path, body, {"Content-Type": "application/json", **(headers or {})})
        assert status == 200, (status, data)
        return json.loads(data)

    def requests(self, **query) -> list[dict]:
        suffix = "&".join(f"{key}={value}" for key, value in query.items())
        return self.json("GET", "/api/requests" + (f"?{suffix}" if suffix else ""))["requests"]

    def detail(self, exchange_id: int) -> dict:
        return self.json("GET", f"/api/requests/{exchange_id}")

    def wait_for(self, predicate, what: str) -> list[dict]:
        return wait_until(lambda: (lambda found: found if predicate(found) else None)(self.requests()), what=what)


@pytest.fixture
def inspected(procs, relay, origin):
    agent, name = start_agent(procs, relay, origin, "--inspect", "127.0.0.1:0", name="inspected")
    url = agent.wait_for_line(r"^inspector: (http://127\.0\.0\.1:\d+)$").group(1)
    return relay, name, InspectorClient(url), agent


def header(headers: list[list[str]], name: str) -> str | None:
    return next((value for key, value in headers if key.lower() == name.lower()), None)


def test_requests_and_a_websocket_conversation_show_up_with_headers_bodies_and_messages(inspected):
    relay, name, inspector, _ = inspected
    assert visit(relay, name, path="/whoami?lang=en&x=1", headers={"X-Trace": "abc-123", "Cookie": "sid=s3cret"})[0] == 200
    status, echoed = visit(relay, name, "POST", "/echo", b'{"order": 42}', {"Content-Type": "application/json"})
    assert (status, echoed) == (200, b'{"order": 42}')
    with ws_open(relay, name) as ws:
        ws.send("hello")
        assert ws.recv(timeout=10) == "Echo: hello"
    listed = inspector.wait_for(lambda found: len(found) == 3 and found[0]["state"] == "closed",
                                "three exchanges, the WebSocket closed")
    assert [(item["method"], item["path"], item["status"], item["websocket"]) for item in listed] == [
        ("GET", "/", 101, True), ("POST", "/echo", 200, False), ("GET", "/whoami?lang=en&x=1", 200, False)]
    assert all(isinstance(item["duration_ms"], float) for item in listed)
    assert [item["id"] for item in listed] == sorted((item["id"] for item in listed), reverse=True)

    whoami = inspector.detail(listed[2]["id"])
    assert whoami["remote_addr"] == "127.0.0.1"
    assert whoami["request"]["method"] == "GET" and whoami["request"]["query"] == [["lang", "en"], ["x", "1"]]
    assert header(whoami["request"]["headers"], "X-Trace") == "abc-123"
    assert header(whoami["request"]["headers"], "Cookie") == "sid=s3cret"
    assert header(whoami["request"]["headers"], "X-Forwarded-For") == "127.0.0.1"
    seen_by_origin = json.loads(whoami["response"]["body"])  # the origin's own account of the request
    assert seen_by_origin["headers"]["x-trace"] == "abc-123" and seen_by_origin["url"] == "/whoami?lang=en&x=1"
    assert whoami["response"]["status"] == 200 and whoami["response"]["body_base64"] is False

    post = inspector.detail(listed[1]["id"])
    assert post["request"]["body"] == '{"order": 42}' and post["response"]["body"] == '{"order": 42}'
    assert post["response"]["view"] == {"kind": "json", "pretty": '{\n  "order": 42\n}'}
    assert header(post["response"]["headers"], "Content-Type") == "application/json"

    websocket = inspector.detail(listed[0]["id"])
    texts = [(message["from"], message["kind"], message.get("text")) for message in websocket["messages"]]
    assert texts[:2] == [("visitor", "text", "hello"), ("service", "text", "Echo: hello")]
    assert [message["kind"] for message in websocket["messages"][2:]] == ["close", "close"]
    assert websocket["messages"][2]["close_code"] == 1000


def test_a_replay_gets_the_same_response_and_is_a_new_exchange(inspected):
    relay, name, inspector, _ = inspected
    visit(relay, name, "POST", "/echo", b"ping-pong", {"Content-Type": "text/plain"})
    original = inspector.wait_for(lambda found: found and found[0]["state"] == "complete", "the request")[0]
    replayed_id = inspector.json("POST", f"/api/requests/{original['id']}/replay")["id"]
    assert replayed_id > original["id"]
    replayed = inspector.detail(replayed_id)
    first = inspector.detail(original["id"])
    assert replayed["replay_of"] == original["id"] and replayed["state"] == "complete"
    assert replayed["response"]["status"] == first["response"]["status"] == 200
    assert replayed["response"]["body"] == first["response"]["body"] == "ping-pong"
    assert [item["id"] for item in inspector.requests()] == [replayed_id, original["id"]]
    diff = inspector.json("GET", f"/api/diff?a={original['id']}&b={replayed_id}")
    assert diff["status"]["changed"] is False and diff["body_same"] is True


def test_an_edited_replay_changes_what_the_origin_receives(inspected):
    relay, name, inspector, _ = inspected
    visit(relay, name, path="/whoami")
    original = inspector.wait_for(lambda found: found and found[0]["state"] == "complete", "the request")[0]
    headers = inspector.detail(original["id"])["request"]["headers"] + [["X-Edited", "by the inspector"]]
    replayed_id = inspector.json("POST", f"/api/requests/{original['id']}/replay",
                                 {"method": "POST", "path": "/whoami?edited=1", "headers": headers, "body": "new body"})["id"]
    replayed = inspector.detail(replayed_id)
    seen_by_origin = json.loads(replayed["response"]["body"])
    assert seen_by_origin["method"] == "POST" and seen_by_origin["url"] == "/whoami?edited=1"
    assert seen_by_origin["headers"]["x-edited"] == "by the inspector"
    assert seen_by_origin["headers"]["content-length"] == "8"
    assert replayed["request"]["body"] == "new body" and replayed["replay_of"] == original["id"]


def test_har_export_is_json_with_the_har_fields(inspected):
    relay, name, inspector, _ = inspected
    visit(relay, name, path="/status/404")
    visit(relay, name, "POST", "/echo", b"a=1&b=2", {"Content-Type": "application/x-www-form-urlencoded"})
    inspector.wait_for(lambda found: len(found) == 2 and all(item["state"] == "complete" for item in found), "two")
    status, headers, body = inspector.call("GET", "/api/requests.har")
    assert status == 200 and "attachment" in headers["Content-Disposition"]
    log = json.loads(body)["log"]
    assert log["version"] == "1.2" and {"name", "version"} <= set(log["creator"])
    assert [(entry["request"]["method"], entry["response"]["status"]) for entry in log["entries"]] == [("GET", 404), ("POST", 200)]
    for entry in log["entries"]:
        assert {"startedDateTime", "time", "request", "response", "cache", "timings"} <= set(entry)
        assert entry["request"]["url"].startswith(f"http://{relay.host(name)}/")
    assert log["entries"][1]["request"]["postData"]["params"] == [{"name": "a", "value": "1"}, {"name": "b", "value": "2"}]
    only_posts = json.loads(inspector.call("GET", "/api/requests.har?method=POST")[2])["log"]["entries"]
    assert [entry["request"]["method"] for entry in only_posts] == ["POST"]


def test_requests_with_a_foreign_host_or_origin_are_refused(inspected):
    relay, name, inspector, _ = inspected
    visit(relay, name, path="/")
    original = inspector.wait_for(lambda found: found and found[0]["state"] == "complete", "the request")[0]
    port = inspector.port
    for host in (f"evil.example:{port}", "evil.example", f"127.0.0.1.nip.io:{port}", f"localhost:{port + 1}", ""):
        status, _, _ = inspector.call("GET", "/api/requests", headers={"Host": host})
        assert status == 403, host
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST:{port}"):
        assert inspector.call("GET", "/api/requests", headers={"Host": host})[0] == 200, host
    replay = f"/api/requests/{original['id']}/replay"
    for headers in ({"Origin": "http://evil.example"}, {"Origin": "null"}, {"Origin": f"http://127.0.0.1:{port + 1}"},
                    {"Sec-Fetch-Site": "cross-site"}):
        status, _, _ = inspector.call("POST", replay, headers=headers)
        assert status == 403, headers
    assert inspector.call("GET", "/api/requests", headers={"Origin": "http://evil.example"})[0] == 403
    assert len(inspector.requests()) == 1  # nothing was replayed
    assert inspector.call("POST", replay, headers={"Origin": f"http://127.0.0.1:{port}"})[0] == 200
    assert inspector.call("POST", replay)[0] == 200  # no Origin: scripts and curl
    assert len(inspector.requests()) == 3


def test_the_default_address_is_4040_or_the_next_free_port_and_the_url_line_is_unchanged(procs, relay, origin):
    ports = []
    for index in range(2):
        agent, _ = start_agent(procs, relay, origin, name=f"default-{index}")  # the URL line alone on stdout
        ports.append(int(agent.wait_for_line(r"^inspector: http://127\.0\.0\.1:(\d+)$").group(1)))
        assert agent.stdout == [f"http://default-{index}.{relay.domain}:{relay.port}"]
    assert ports[0] != ports[1] and all(4040 <= port < 4090 for port in ports)


def test_no_inspect_runs_without_it(procs, relay, origin):
    agent, name = start_agent(procs, relay, origin, "--no-inspect", name="uninspected")
    assert visit(relay, name)[0] == 200
    agent.wait_for_line(r"forwarding")
    assert not any("inspector" in line for line in agent.stderr)


def test_an_inspect_address_in_use_is_an_error(procs, relay, origin):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        agent = procs.start(PORTWAY + ["http", str(origin), "--relay", relay.url, "--inspect", f"127.0.0.1:{port}"],
                            "agent")
        assert agent.wait_exit() == 1
        assert "cannot serve the inspector" in agent.output()
    bad = procs.start(PORTWAY + ["http", str(origin), "--relay", relay.url, "--inspect", "nonsense:port"], "agent")
    assert bad.wait_exit() == 2

