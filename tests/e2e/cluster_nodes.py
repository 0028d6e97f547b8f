"""What the cluster's end-to-end tests share: a real redis-server per test, and `portway server --cluster` nodes
on it (each advertised at its own loopback port, all with one cluster secret)."""

from __future__ import annotations

import pytest

from tests.redis_server import RedisServer

from .conftest import PORTWAY, Processes, Relay, free_port

CLUSTER_SECRET = "e2e-secret"


@pytest.fixture
def redis_server():
    server = RedisServer()
    server.start()
    yield server
    server.stop()


def start_node(procs: Processes, redis: RedisServer, node_id: str, tokens_file, *extra: str,
               port: int | None = None) -> Relay:
    """A node of the cluster on `redis`; `port` to start it again where it was."""
    port = port or free_port()
    proc = procs.start(PORTWAY + ["server", "--port", str(port), "--tokens", str(tokens_file),
                                  "--cluster", redis.url, "--node-id", node_id, "--advertise", f"127.0.0.1:{port}",
                                  "--cluster-secret", CLUSTER_SECRET, *extra], f"relay {node_id}")
    proc.wait_for_line(r"listening on")
    return Relay(proc, port, "localhost")
