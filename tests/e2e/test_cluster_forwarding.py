"""Any node serves any tunnel: three real `portway server --cluster` nodes on one real redis-server, the agent on
node A, visitors spread over all three (an `lt` client's tunnel on node A too). Bodies arrive whole (checksummed 50 MB each way), WebSockets echo through
node B, node B enforces the tunnel's own access rules, a node link without the cluster secret is refused, and with
node A gone node B answers a quick 502 naming it."""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import signal
import time

import pytest

from portway.proto.node_link import NodeLinkRequest
from .cluster_nodes import redis_server, start_node  # noqa: F401 (a fixture)
from .conftest import assert_websocket_echo, free_port, start_agent, start_origin, wait_until
from .payload import expected_sha256
from .test_cluster import lt_register
from .test_localtunnel import POOL, lt_url, start_lt, wait_for_sockets
from .test_metrics import samples, scrape

TOKEN = "cluster-e2e-token"
LOGIN = "Basic " + base64.b64encode(b"user:pass").decode()


@pytest.fixture
def cluster(procs, redis_server, tmp_path):
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(f'[[token]]\nlabel = "team"\ntoken = "{TOKEN}"\n')
    nodes = [start_node(procs, redis_server, f"node-{letter}", tokens) for letter in "abc"]
    origin = start_origin(procs)
    start_agent(procs, nodes[0], origin, "--token", TOKEN, "--no-inspect", name="web")
    start_agent(procs, nodes[0], origin, "--token", TOKEN, "--no-inspect", "--basic-auth", "user:pass",
                name="guarded")
    return nodes


def request(relay, name, method="GET", path="/", body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", relay.port, timeout=60)
    try:
        conn.request(method, path, body=body, headers={"Host": relay.host(name), **(headers or {})})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_visitors_on_every_node_reach_the_tunnel_on_node_a(cluster):
    for index in range(12):  # round robin over the nodes
        assert request(cluster[index % 3], "web") == (200, b"hello from origin")
    status, body = request(cluster[1], "web", path="/whoami", headers={"X-Forwarded-For": "6.6.6.6"})
    seen = json.loads(body)["headers"]
    assert status == 200 and seen["x-forwarded-for"] == "127.0.0.1" and seen["host"] == cluster[1].host("web")
    assert request(cluster[2], "nowhere")[0] == 404


def test_keep_alive_connection_on_node_b_serves_many_requests(cluster):
    conn = http.client.HTTPConnection("127.0.0.1", cluster[1].port, timeout=30)
    try:
        for _ in range(20):
            conn.request("GET", "/", headers={"Host": cluster[1].host("web")})
            response = conn.getresponse()
            assert (response.status, response.read()) == (200, b"hello from origin")
    finally:
        conn.close()


def test_50mb_each_way_through_node_b_intact(cluster):
    node_b = cluster[1]
    size = 50 * 1024 * 1024
    status, body = request(node_b, "web", path=f"/download?bytes={size}&seed=fw")
    assert status == 200 and len(body) == size and hashlib.sha256(body).hexdigest() == expected_sha256(size, "fw")
    payload = os.urandom(1024 * 1024) * 50
    status, body = request(node_b, "web", method="POST", path="/upload", body=payload,
                           headers={"Content-Length": str(size)})
    answer = json.loads(body)
    assert status == 200 and answer["bytes"] == size and answer["sha256"] == hashlib.sha256(payload).hexdigest()


def test_websocket_echo_through_node_b(cluster):
    assert_websocket_echo(cluster[1], "web")


def test_node_b_enforces_the_rules_the_agent_gave_node_a(cluster):
    node_b = cluster[1]
    assert request(node_b, "guarded")[0] == 401
    assert request(node_b, "guarded", headers={"Authorization": "Basic " + base64.b64encode(b"u:x").decode()})[0] \
        == 401
    status, body = request(node_b, "guarded", path="/whoami", headers={"Authorization": LOGIN})
    assert status == 200 and "authorization" not in json.loads(body)["headers"]  # kept from the origin, as on A


def node_link_status(node, request: NodeLinkRequest) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", node.port, timeout=10)
    try:
        conn.putrequest("GET", "/_portway/node", skip_host=True)
        for line in request.encode(f"localhost:{node.port}").decode().split("\r\n")[1:]:
            if line:
                key, _, value = line.partition(": ")
                conn.putheader(key, value)
        conn.endheaders()
        response = conn.getresponse()
        return response.status, response.read() if response.status != 101 else b""
    finally:
        conn.close()


def test_a_node_link_needs_the_cluster_secret(cluster):
    node_a = cluster[0]
    wrong = NodeLinkRequest.make("not-the-secret", "node-x", "node-a", time.time(), os.urandom(16).hex())
    status, body = node_link_status(node_a, wrong)
    assert status == 403 and b"does not match this node's --cluster-secret" in body
    right = NodeLinkRequest.make("e2e-secret", "node-x", "node-a", time.time(), os.urandom(16).hex())
    assert node_link_status(node_a, right)[0] == 101
    assert node_link_status(node_a, right)[0] == 403  # a proof is good once


def test_node_a_gone_gives_a_quick_502_naming_it(cluster):
    node_a, node_b, _ = cluster
    assert request(node_b, "web")[0] == 200
    node_a.proc.kill(signal.SIGKILL)
    node_a.proc.wait_exit()
    started = time.monotonic()
    status, body = request(node_b, "web")
    assert status == 502 and b"relay node node-a" in body
    assert time.monotonic() - started < 30  # a bound against hanging, not a performance figure


@pytest.fixture
def lt_on_node_a(procs, redis_server, tmp_path):
    """Two nodes; the stock `lt` client holds `ltweb` on node A under a token allowed one tunnel."""
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(f'[[token]]\nlabel = "team"\ntoken = "{TOKEN}"\nmax_tunnels = 1\n')
    node_a, node_b = (start_node(procs, redis_server, f"node-{letter}", tokens) for letter in "ab")
    origin = start_origin(procs)
    lt = start_lt(procs, node_a, origin, "ltweb", credentials=f":{TOKEN}@")
    assert lt_url(lt) == f"http://{node_a.host('ltweb')}"
    wait_for_sockets(node_a, "ltweb", POOL)
    return node_a, node_b


def test_an_lt_tunnel_on_node_a_serves_visitors_on_node_b(lt_on_node_a):
    node_a, node_b = lt_on_node_a
    # more exchanges than the pool has sockets: each forwarded one uses a socket once, and lt opens another
    for _ in range(POOL + 5):
        assert request(node_b, "ltweb") == (200, b"hello from origin")
    status, body = request(node_b, "ltweb", path="/whoami")
    assert status == 200 and json.loads(body)["headers"]["x-forwarded-for"] == "127.0.0.1"
    payload = os.urandom(2 * 1024 * 1024)
    status, body = request(node_b, "ltweb", method="POST", path="/upload", body=payload,
                           headers={"Content-Length": str(len(payload))})
    answer = json.loads(body)
    assert status == 200 and answer["sha256"] == hashlib.sha256(payload).hexdigest()
    assert_websocket_echo(node_b, "ltweb")
    wait_for_sockets(node_a, "ltweb", POOL)  # the pool is whole again
    assert request(node_a, "ltweb") == (200, b"hello from origin")
    # the lt tunnel holds the name and counts in the token's quota over the whole cluster
    assert lt_register(node_b, "ltweb")[1] == {"message": "name ltweb is taken"}
    status, answer = lt_register(node_b, "other")
    assert "1" in answer["message"] and "cluster" in answer["message"], answer


def test_node_links_are_in_the_metrics(procs, redis_server, tmp_path):
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(f'[[token]]\nlabel = "team"\ntoken = "{TOKEN}"\n')
    metrics_a, metrics_b = free_port(), free_port()
    node_a = start_node(procs, redis_server, "node-a", tokens, "--metrics", f"127.0.0.1:{metrics_a}")
    node_b = start_node(procs, redis_server, "node-b", tokens, "--metrics", f"127.0.0.1:{metrics_b}")
    agent, _ = start_agent(procs, node_a, start_origin(procs), "--token", TOKEN, "--no-inspect", name="web")

    def node_metrics(port):
        found = samples(scrape(port))
        return {(name.removeprefix("portway_"), *dict(labels).values()): value for (name, labels), value in found.items()
                if "node_link" in name or "forwarded_streams" in name}

    for _ in range(3):
        assert request(node_b, "web") == (200, b"hello from origin")
    on_a, on_b = node_metrics(metrics_a), node_metrics(metrics_b)
    assert on_b[("node_links", "out")] == 1 and on_b[("node_links", "in")] == 0
    assert on_a[("node_links", "in")] == 1 and on_a[("node_links", "out")] == 0
    assert on_b[("forwarded_streams_total", "out")] >= 1  # streams are pooled: fewer than the requests
    assert on_a[("forwarded_streams_total", "in")] == on_b[("forwarded_streams_total", "out")]
    assert on_a[("forwarded_streams_total", "out")] == on_b[("forwarded_streams_total", "in")] == 0
    wrong = NodeLinkRequest.make("not-the-secret", "node-x", "node-a", time.time(), os.urandom(16).hex())
    assert node_link_status(node_a, wrong)[0] == 403
    assert node_metrics(metrics_a)[("node_link_failures_total", "rejected")] == 1
    # node A dies with the name still leased to it (its agent is killed first: on its own it waits for a relay)
    agent.kill(signal.SIGKILL)
    node_a.proc.kill(signal.SIGKILL)
    node_a.proc.wait_exit()
    assert request(node_b, "web")[0] == 502
    on_b = wait_until(lambda: (found := node_metrics(metrics_b))[("node_links", "out")] == 0 and found,
                      what="node B's link to node A counted as closed")
    assert on_b[("node_link_failures_total", "unreachable")] >= 1 and on_b[("node_link_failures_total", "refused")] == 0


def test_an_agent_stopping_finishes_what_node_b_forwards_and_leaves(procs, redis_server, tmp_path):
    """Node B keeps a stream to the agent idle after each exchange; when the agent stops (SIGTERM), node A tells
    node B, which lets go of its idle streams: the agent leaves once the exchange in flight is done, not at its
    drain timeout, and that exchange arrives whole."""
    from concurrent.futures import ThreadPoolExecutor

    tokens = tmp_path / "tokens.toml"
    tokens.write_text(f'[[token]]\nlabel = "team"\ntoken = "{TOKEN}"\n')
    node_a = start_node(procs, redis_server, "node-a", tokens)
    node_b = start_node(procs, redis_server, "node-b", tokens)
    agent, _ = start_agent(procs, node_a, start_origin(procs), "--token", TOKEN, "--no-inspect",
                           "--drain-timeout", "60", name="web")
    for _ in range(3):  # streams node B keeps idle afterwards
        assert request(node_b, "web") == (200, b"hello from origin")
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(request, node_b, "web", "GET", "/slow?ms=1500&bytes=20000&seed=drain")
        wait_until(lambda: request(node_a, "web", path="/whoami")[0] == 200)  # (the agent serves, the slow one runs)
        agent.kill(signal.SIGTERM)
        status, body = slow.result(timeout=30)
    assert status == 200 and hashlib.sha256(body).hexdigest() == expected_sha256(20000, "drain")
    assert agent.wait_exit(timeout=20) == 0  # bound well below --drain-timeout 60: the idle streams did not count
    assert "open stream(s) get up to 60 s" in agent.output()
