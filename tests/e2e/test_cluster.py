"""Two real `portway server --cluster` nodes sharing one real redis-server on 127.0.0.1: a name held on one node is
refused on the other, a token's quota counts both nodes, a visitor on either node is served,
and losing Redis leaves established tunnels serving while new ones are refused with 503 until it is back."""

from __future__ import annotations

import base64
import http.client
import json
import signal
import socket

from .cluster_nodes import CLUSTER_SECRET, redis_server, start_node  # noqa: F401 (a fixture)
from .conftest import PORTWAY, Processes, Relay, free_port, free_ports, start_agent, start_origin, wait_until

TOKEN = "cluster-e2e-token"


def get(relay: Relay, name: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", relay.port, timeout=10)
    try:
        conn.request("GET", "/", headers={"Host": relay.host(name)})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def register(relay: Relay, name: str) -> tuple[int, bytes]:
    """An agent's registration request, answered with a refusal (the status and its JSON)."""
    conn = http.client.HTTPConnection("127.0.0.1", relay.port, timeout=10)
    try:
        conn.request("GET", f"/_portway/agent?name={name}", headers={
            "Host": f"localhost:{relay.port}", "Connection": "Upgrade", "Upgrade": "portway-mux",
            "Authorization": f"Bearer {TOKEN}"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def lt_register(relay: Relay, name: str) -> tuple[int, dict]:
    """A localtunnel client's registration of `name` (`lt -h http://:TOKEN@relay --subdomain NAME`)."""
    conn = http.client.HTTPConnection("127.0.0.1", relay.port, timeout=10)
    try:
        credentials = base64.b64encode(f":{TOKEN}".encode()).decode()
        conn.request("GET", f"/{name}", headers={"Host": f"localhost:{relay.port}",
                                                 "Authorization": f"Basic {credentials}"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def refused_agent(procs: Processes, relay: Relay, origin: int, name: str) -> str:
    """Start an agent that the relay must refuse; its one line of output, once it has exited."""
    proc = procs.start(PORTWAY + ["http", str(origin), "--relay", relay.url, "--name", name, "--token", TOKEN,
                                  "--no-inspect"], f"agent {name}")
    assert proc.wait_exit(timeout=20) == 1
    return proc.output()


def test_two_nodes_share_names_quotas_and_survive_losing_redis(procs, redis_server, tmp_path):
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(f'[[token]]\nlabel = "team"\ntoken = "{TOKEN}"\nmax_tunnels = 2\n')
    node_a = start_node(procs, redis_server, "node-a", tokens)
    node_b = start_node(procs, redis_server, "node-b", tokens)
    origin = start_origin(procs)

    start_agent(procs, node_a, origin, "--token", TOKEN, "--no-inspect", name="web")
    assert get(node_a, "web")[0] == 200
    assert get(node_b, "web")[0] == 200  # the other node: forwarded to node A over a node link
    assert get(node_b, "nowhere")[0] == 404

    output = refused_agent(procs, node_b, origin, "web")
    assert "tunnel name 'web' is already in use (on relay node node-a)" in output
    assert lt_register(node_b, "web")[1] == {"message": "name web is taken"}  # lt clients meet the same lease

    shop, _ = start_agent(procs, node_b, origin, "--token", TOKEN, "--no-inspect", name="shop")  # the second name
    assert get(node_b, "shop")[0] == 200
    output = refused_agent(procs, node_a, origin, "third")  # node A holds one of the token's names, the cluster two
    assert "this token may hold 2 tunnel(s) at once and holds 2 over the cluster" in output

    redis_server.stop()
    assert get(node_a, "web")[0] == 200 and get(node_b, "shop")[0] == 200  # established tunnels keep serving
    assert register(node_b, "fresh")[0] == 503  # refused, not a hang
    waiting = procs.start(PORTWAY + ["http", str(origin), "--relay", node_b.url, "--name", "fresh", "--token", TOKEN,
                                     "--no-inspect"], "agent fresh, waiting")
    # a refusal for now, not for good: the agent says so and asks again later
    waiting.wait_for_line(r"retrying in [0-9.]+ s \(attempt \d+\): the relay refused for now \(registry unavailable")
    waiting.kill(signal.SIGTERM)
    waiting.wait_exit()

    redis_server.start()  # empty: the nodes re-assert their leases without a restart
    with redis_server.client() as client:
        wait_until(lambda: client.hget("portway:lease:web", "node") == b"node-a"
                   and client.hget("portway:lease:shop", "node") == b"node-b", timeout=30,
                   what="node A's lease on 'web' and node B's on 'shop' re-asserted")  # each on its own heartbeat
    assert "already in use (on relay node node-a)" in refused_agent(procs, node_b, origin, "web")
    assert get(node_a, "web")[0] == 200
    assert "holds 2 over the cluster" in refused_agent(procs, node_b, origin, "fresh")  # re-asserted: the quota too
    shop.kill(signal.SIGTERM)  # stopped on purpose: its name, and its place in the quota, are free at once
    shop.wait_exit()
    with redis_server.client() as client:
        wait_until(lambda: not client.exists("portway:lease:shop"), what="the lease on 'shop' released")
    start_agent(procs, node_b, origin, "--token", TOKEN, "--no-inspect", name="fresh")  # no node was restarted
    assert get(node_b, "fresh")[0] == 200

    # a node stopped on purpose hands its agents over (the lease moves with the agent) rather than letting its
    # leases lapse; the handover itself is tests/e2e/test_cluster_failover.py's
    node_a.proc.kill(signal.SIGTERM)
    node_a.proc.wait_exit()
    with redis_server.client() as client:
        assert client.hget("portway:lease:web", "node") == b"node-b"


def test_a_node_that_cannot_reach_its_redis_stops_with_one_line(procs):
    port = free_port()  # nothing listens there
    proc = procs.start(PORTWAY + ["server", "--port", str(free_port()), "--cluster", f"redis://127.0.0.1:{port}/0",
                                  "--node-id", "node-a", "--advertise", "127.0.0.1:1"], "relay")
    assert proc.wait_exit() == 2
    lines = [line for line in proc.output().splitlines() if line.strip()]
    assert len(lines) == 1 and f"cannot reach the cluster registry at redis://127.0.0.1:{port}/0" in lines[0]


def test_a_node_id_is_used_by_one_live_node_at_a_time(procs, redis_server, tmp_path):
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(f'[[token]]\nlabel = "team"\ntoken = "{TOKEN}"\n')
    node_a = start_node(procs, redis_server, "node-a", tokens)
    port = free_port()
    twin = procs.start(PORTWAY + ["server", "--port", str(port), "--cluster", redis_server.url, "--node-id", "node-a",
                                  "--advertise", f"127.0.0.1:{port}", "--cluster-secret", CLUSTER_SECRET], "twin")
    assert twin.wait_exit() == 2
    line = twin.output().strip().splitlines()[-1]
    assert "node id 'node-a' is live in the cluster (heartbeat " in line and f"from 127.0.0.1:{node_a.port}); " \
        "pick another --node-id" in line, twin.output()
    assert get(node_a, "anything")[0] == 404  # the running node is untouched
    node_a.proc.kill(signal.SIGKILL)  # a node that died...
    node_a.proc.wait_exit()
    restarted = start_node(procs, redis_server, "node-a", tokens)  # ...restarts under its id at once
    assert "waiting up to" in restarted.proc.output() and get(restarted, "anything")[0] == 404


def test_tcp_ports_are_leased_over_the_cluster_and_named_by_their_node(procs, redis_server, tmp_path):
    """Two nodes offering the same two TCP ports: a port goes to one tunnel over the cluster, a port picked at
    random skips those other nodes hold, a TCP tunnel counts in its token's quota everywhere, and its address
    names the node whose port it is."""
    from .test_tcp_tunnels import refused

    tokens = tmp_path / "tokens.toml"
    tokens.write_text(f'[[token]]\nlabel = "team"\ntoken = "{TOKEN}"\nmax_tunnels = 3\n')
    port_a, port_b, first, second = free_ports(4)
    offered = ("--tcp-ports", f"{first},{second}")
    node_a = start_node(procs, redis_server, "node-a", tokens, *offered, port=port_a)
    node_b = start_node(procs, redis_server, "node-b", tokens, *offered, port=port_b)
    origin = start_origin(procs)
    tcp_a = procs.start(PORTWAY + ["tcp", str(origin), "--relay", node_a.url, "--token", TOKEN,
                                   "--remote-port", str(first)], "tcp agent a")
    tcp_a.wait_for_line(rf"^tcp://node-a\.localhost:{first}$")
    assert f"TCP port {first} is already in use (on relay node node-a)" in refused(
        procs, node_b, "tcp", str(origin), "--token", TOKEN, "--remote-port", str(first))
    tcp_b = procs.start(PORTWAY + ["tcp", str(origin), "--relay", node_b.url, "--token", TOKEN], "tcp agent b")
    tcp_b.wait_for_line(rf"^tcp://node-b\.localhost:{second}$")  # the only port no node holds
    start_agent(procs, node_b, origin, "--token", TOKEN, "--no-inspect", name="web")  # the token's third tunnel
    assert "holds 3 over the cluster" in refused_agent(procs, node_a, origin, "shop")
    for port in (first, second):  # each port is served by its own node
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert b"hello from origin" in read_all(sock)


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)
