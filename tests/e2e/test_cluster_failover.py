"""Losing a node: three real `portway server --cluster` nodes on one real redis-server, an agent given all three
addresses, visitors sent round robin to every node (each answer checked against its checksum).

SIGKILL of the node holding the busy tunnel: the agent moves to another node, which takes the lease over under a
higher epoch, and visitors through the other nodes are served again within 5 s; the killed node, started again
with its --node-id, doesn't take the name back. SIGTERM of the node holding it: the node sends the agent to another
node and drains, and a stream of new visitors (going on to the next node when one refuses the connection) sees no
failed request."""

from __future__ import annotations

import hashlib
import http.client
import re
import signal
import socket
import threading
import time

import pytest

from .cluster_nodes import redis_server, start_node  # noqa: F401 (a fixture)
from .conftest import PORTWAY, Processes, Relay, assert_cut_short_when_killed, start_origin, wait_until
from .payload import expected_sha256

TOKEN = "failover-e2e-token"
FAST = ("--keepalive-interval", "0.5", "--keepalive-timeout", "2")  # a dead peer is noticed within 2 s
SIZES = (1, 4096, 70_000)  # answers of a few sizes, one seed each: a mixed-up answer fails its checksum
EXPECTED = {size: expected_sha256(size, f"s{size}") for size in SIZES}
FAILOVER_BOUND = 5.0  # the issue's: visitors through the other nodes served again within 5 s of the node's death


class Cluster:
    def __init__(self, procs: Processes, redis, tokens) -> None:
        self.procs = procs
        self.redis = redis
        self.tokens = tokens
        self.nodes = [start_node(procs, redis, f"node-{letter}", tokens, *FAST, "--drain-timeout", "10")
                      for letter in "abc"]

    def holder(self) -> str | None:
        with self.redis.client() as client:
            node = client.hget("portway:lease:web", "node")
        return node.decode() if node else None

    def epoch(self) -> int:
        with self.redis.client() as client:
            return int(client.hget("portway:lease:web", "epoch") or 0)

    def node(self, node_id: str) -> Relay:
        return self.nodes["abc".index(node_id[-1])]


@pytest.fixture
def cluster(procs, redis_server, tmp_path):  # noqa: F811
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(f'[[token]]\nlabel = "team"\ntoken = "{TOKEN}"\n')
    cluster = Cluster(procs, redis_server, tokens)
    origin = start_origin(procs)
    relays = [arg for node in cluster.nodes for arg in ("--relay", node.url)]
    cluster.agent = procs.start(PORTWAY + ["http", str(origin), *relays, "--name", "web", "--token", TOKEN,
                                           "--no-inspect", *FAST], "agent web")
    cluster.agent.wait_for_line(r"^forwarding http://web\.localhost")
    assert cluster.holder() == "node-a"  # the first address given
    return cluster


class NotAnswered(Exception):
    """The node refused the connection, or ended it before a byte of an answer: what a node that stops listening
    does (closing its listener resets the connections still in its accept queue, which it never saw). A client
    retries such a GET elsewhere, as browsers do; a node may not fail one it has answered any part of."""


def visit(relay: Relay, index: int) -> None:
    """One new visitor's GET through `relay`; raises unless it got the whole, right answer (NotAnswered when the
    node doesn't listen, or let go of the connection without answering)."""
    size = SIZES[index % len(SIZES)]
    conn = http.client.HTTPConnection("127.0.0.1", relay.port, timeout=20)
    try:
        try:
            conn.request("GET", f"/download?bytes={size}&seed=s{size}",
                         headers={"Host": relay.host("web"), "Connection": "close"})
            response = conn.getresponse()
        except (ConnectionRefusedError, ConnectionResetError, BrokenPipeError) as error:
            # (http.client's RemoteDisconnected, an end before the status line, is a ConnectionResetError)
            raise NotAnswered(repr(error)) from error
        body = response.read()
    finally:
        conn.close()
    if response.status != 200 or hashlib.sha256(body).hexdigest() != EXPECTED[size]:
        # a relay's own error page says why in its one paragraph (its head is mostly style)
        said = re.search(rb"<p>(.*?)</p>", body) if response.status != 200 else None
        raise AssertionError(f"{relay.port}: {response.status} {said.group(1) if said else body[:200]!r}")


def served_by_all(nodes: list[Relay]) -> bool:
    try:
        for index, node in enumerate(nodes):
            visit(node, index)
    except (NotAnswered, AssertionError, OSError, http.client.HTTPException):
        return False
    return True


def received_by_peer(sock: socket.socket) -> bool:
    """Whether the other end of a loopback TCP connection has read everything sent so far: its socket's receive
    queue (in /proc/net/tcp) is empty."""
    def endpoint(address: tuple[str, int]) -> str:
        return f"{socket.inet_aton(address[0])[::-1].hex().upper()}:{address[1]:04X}"

    theirs, ours = endpoint(sock.getpeername()), endpoint(sock.getsockname())
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            if fields[1] == theirs and fields[2] == ours:
                return int(fields[4].split(":")[1], 16) == 0
    return False


class Visitors(threading.Thread):
    """New visitors one after the other, round robin over the nodes; a visitor whose node refuses the
    connection or ends it unanswered goes on to the next node (as a client of a DNS name with several addresses
    does). Anything else that isn't the right answer is a failure."""

    def __init__(self, nodes: list[Relay]) -> None:
        super().__init__(daemon=True)
        self.nodes = nodes
        self.stopping = threading.Event()
        self.served = 0
        self.failures: list[str] = []

    def run(self) -> None:
        index = 0
        while not self.stopping.is_set():
            for attempt in range(len(self.nodes)):
                node = self.nodes[(index + attempt) % len(self.nodes)]
                try:
                    visit(node, index)
                except NotAnswered:
                    continue
                except (AssertionError, OSError, http.client.HTTPException) as error:
                    self.failures.append(f"visitor {index} via port {node.port}: {error!r}")
                else:
                    self.served += 1
                break
            else:
                self.failures.append(f"visitor {index}: every node refused the connection or left it unanswered")
            index += 1

    def stop(self) -> None:
        self.stopping.set()
        self.join(30)


def test_sigkill_of_the_busy_node_the_agent_serves_through_another_within_5s_and_keeps_the_name(cluster):
    node_a, node_b, node_c = cluster.nodes
    visitors = Visitors(cluster.nodes)
    visitors.start()
    wait_until(lambda: visitors.served >= 30, what="visitors served through all three nodes")
    visitors.stop()
    assert visitors.failures == []
    epoch_before = cluster.epoch()

    # killed in the middle of a download through node B: that visitor sees its answer cut short (no resume
    # across nodes); the time counts from before the download started, so it only overstates the gap
    killed_at = time.monotonic()
    assert_cut_short_when_killed(node_b, "web", node_a.proc)
    wait_until(lambda: served_by_all([node_b, node_c]), timeout=30, interval=0.05,
               what="visitors through nodes B and C served again")
    served_after = time.monotonic() - killed_at
    assert served_after <= FAILOVER_BOUND, f"served again {served_after:.1f} s after the node died"
    new_holder = cluster.holder()
    assert new_holder in ("node-b", "node-c") and cluster.epoch() > epoch_before
    cluster.agent.wait_for_line(r"reconnected: http://web\.localhost:%d \(relay node at 127\.0\.0\.1:%d; the link "
                                r"was on 127\.0\.0\.1:%d\)" % (cluster.node(new_holder).port,
                                                             cluster.node(new_holder).port, node_a.port))

    # node A back on its port with its --node-id: the name stays where the agent is, and A forwards there
    restarted = start_node(cluster.procs, cluster.redis, "node-a", cluster.tokens, *FAST, port=node_a.port)
    assert served_by_all([restarted, node_b, node_c] * 2)
    assert cluster.holder() == new_holder
    print(f"served again through the other nodes {served_after:.2f} s after SIGKILL")


def test_sigterm_hands_the_agent_over_without_a_failed_request(cluster):
    node_a = cluster.nodes[0]
    visitors = Visitors(cluster.nodes)
    visitors.start()
    wait_until(lambda: visitors.served >= 20, what="visitors served through all three nodes")
    served_before = visitors.served
    # a visitor of node A whose request is still on its way when A stops: its connection isn't idle, so A keeps
    # it, and the request, complete only once the agent has moved, is forwarded to the agent's new node
    late = socket.create_connection(("127.0.0.1", node_a.port), timeout=20)
    size = SIZES[-1]
    late.sendall(f"GET /download?bytes={size}&seed=s{size} HTTP/1.1\r\nHost: {node_a.host('web')}\r\n".encode())
    wait_until(lambda: received_by_peer(late), what="node A to read the first part of the request")
    node_a.proc.popen.send_signal(signal.SIGTERM)  # (Proc.kill would wait for the exit)
    cluster.agent.wait_for_line(r"moved to relay node at")
    late.sendall(b"Connection: close\r\n\r\n")
    with late, late.makefile("rb") as answer:
        response = http.client.HTTPResponse(late)
        response.fp = answer
        response.begin()
        body = response.read()
    assert response.status == 200 and hashlib.sha256(body).hexdigest() == EXPECTED[size]
    assert node_a.proc.wait_exit(timeout=15) == 0
    wait_until(lambda: visitors.served >= served_before + 40, what="visitors served after the node stopped")
    visitors.stop()
    assert visitors.failures == []
    print(f"{visitors.served} visitors served round robin across the stop, none failed")
    assert cluster.holder() in ("node-b", "node-c")
    moved_to = cluster.node(cluster.holder())
    cluster.agent.wait_for_line(r"relay node at 127\.0\.0\.1:%d is stopping; moving to 127\.0\.0\.1:%d"
                                % (node_a.port, moved_to.port))
    cluster.agent.wait_for_line(r"moved to relay node at 127\.0\.0\.1:%d" % moved_to.port)
    assert "stopped: all exchanges done" in node_a.proc.output()
