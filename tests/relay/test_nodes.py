"""NodeLinks (relay/nodes.py) without whole relays: visitors that arrive together share one lookup of a lease in a
real redis-server, so a busy tunnel's cached lease running out doesn't turn into a burst of Redis reads (and 503s
past the registry's bound on lookups at once); node links that don't open are counted by why, and the counts
reach the metrics."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from portway.config import ClusterTarget, RelayConfig
from portway.errors import HttpError
from portway.relay.cluster import MAX_LOOKUPS, RedisRegistry
from portway.relay.localtunnel import LtTunnel
from portway.relay.metrics import RelayCollector, RelayCounters, exposition
from portway.relay.nodes import NodeLinks, RemoteTunnel
from portway.relay.registry import MemoryRegistry, RemoteLease
from tests.redis_server import redis_server  # noqa: F401 (a fixture)
from tests.relay.test_cluster import redis, run  # noqa: F401 (a fixture)


def test_visitors_arriving_together_share_one_lookup_of_the_lease(redis):  # noqa: F811
    async def scenario():
        node_a = RedisRegistry(redis.url, "node-a", "127.0.0.1:9100")
        node_b = RedisRegistry(redis.url, "node-b", "127.0.0.1:9101")
        config = RelayConfig(cluster=ClusterTarget.parse(redis.url), node_id="node-b", advertise="127.0.0.1:9101",
                             cluster_secret="s")
        links = NodeLinks(config, node_b, RelayCounters())
        lookups = 0
        held_elsewhere = node_b.held_elsewhere

        async def counted(name):
            nonlocal lookups
            lookups += 1
            return await held_elsewhere(name)

        node_b.held_elsewhere = counted
        try:
            # an lt tunnel's lease: its rules are known without asking node A, so no node link is needed here
            await node_a.lease("burst", owner="", kind=LtTunnel.kind, max_tunnels=0)
            visitors = 4 * MAX_LOOKUPS
            found = await asyncio.gather(*(links.find("burst") for _ in range(visitors)), return_exceptions=True)
            assert all(isinstance(tunnel, RemoteTunnel) for tunnel in found), found
            assert len({id(tunnel) for tunnel in found}) == 1 and found[0].lease.node == "node-a"
            assert lookups == 1
            unknown = await asyncio.gather(*(links.find("nobody") for _ in range(visitors)))
            assert unknown == [None] * visitors and lookups == 2
            assert not links._lookups  # nothing left behind once the lookups are done
        finally:
            links.close()
            await node_a.close()
            await node_b.close()

    run(scenario)


def node_link_metrics(counters: RelayCounters, links: NodeLinks) -> dict:
    text = exposition(RelayCollector(counters, MemoryRegistry(), lambda: 0, links.open_links)).decode()
    return {(sample.name, tuple(sample.labels.values())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples
            if "node_link" in sample.name or "forwarded" in sample.name}


@pytest.mark.parametrize("answer", [None, b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\n"
                                          b"Content-Length: 23\r\nConnection: close\r\n\r\n"
                                          b'{"message": "not you"}\n'])
def test_a_node_link_that_does_not_open_is_counted_by_why(answer):
    """No listener at the advertised address: unreachable; a node that answers the upgrade with a refusal:
    refused, its message in the visitor's 502."""

    async def scenario():
        async def refuse(reader, writer):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(answer)
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(refuse, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        if answer is None:
            server.close()
            await server.wait_closed()
        counters = RelayCounters()
        config = RelayConfig(cluster=ClusterTarget.parse("redis://127.0.0.1:1/0"), node_id="node-b",
                             advertise="127.0.0.1:9101", cluster_secret="s")
        links = NodeLinks(config, MemoryRegistry(), counters)
        try:
            with pytest.raises(HttpError) as refused:
                await links.session(RemoteLease("node-a", f"127.0.0.1:{port}", "portway", 1), "web")
            assert refused.value.status == 502 and "relay node node-a" in refused.value.message
            reason = "unreachable" if answer is None else "refused"
            if answer is not None:
                assert "not you" in refused.value.message
            metrics = node_link_metrics(counters, links)
            assert metrics[("portway_node_link_failures_total", (reason,))] == 1
            assert sum(value for (name, _), value in metrics.items() if name == "portway_node_link_failures_total") == 1
            assert metrics[("portway_node_links", ("out",))] == metrics[("portway_node_links", ("in",))] == 0
            assert metrics[("portway_forwarded_streams_total", ("out",))] == 0
        finally:
            links.close()
            server.close()

    run(scenario)


def test_a_relay_of_its_own_has_no_node_link_series():
    text = exposition(RelayCollector(RelayCounters(), MemoryRegistry(), lambda: 0)).decode()
    assert "portway_node_link" not in text and "portway_forwarded_streams" not in text


def test_visitors_refused_by_a_node_the_name_left_all_follow_it_to_its_new_node():
    """Two visitors of one tunnel ask node A for a stream at once, just as its agent moved to node B: A refuses
    both (404: not here any more) and each reads the lease again. The first follows the name to B; the second,
    finding B too, must not take the tunnel's lease (already B's, moved by the first) for the one it was refused
    under, and goes to B as well instead of passing A's 404 on."""

    async def scenario():
        moved = RemoteLease("node-b", "127.0.0.1:9102", "portway", 2)
        both_asked = asyncio.Event()
        asked_a = 0

        class Registry:
            async def held_elsewhere(self, name):
                return moved

            def get(self, name):
                return None

        class MovingTunnel(RemoteTunnel):
            async def _conduit_from_holder(self):
                nonlocal asked_a
                if self.lease.node == "node-a":
                    asked_a += 1
                    if asked_a == 2:
                        both_asked.set()
                    await both_asked.wait()
                    raise HttpError(404, "There is no tunnel 'web' on relay node node-a.")
                return f"a stream through {self.lease.node}"

        tunnel = MovingTunnel("web", RemoteLease("node-a", "127.0.0.1:9100", "portway", 1),
                              SimpleNamespace(registry=Registry()))
        got = await asyncio.wait_for(asyncio.gather(tunnel.fresh_conduit(), tunnel.fresh_conduit(),
                                                    return_exceptions=True), 5)
        assert got == ["a stream through node-b"] * 2
        assert tunnel.lease == moved

    run(scenario)
