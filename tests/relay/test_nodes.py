"""NodeLinks' lookups of tunnels held by other nodes, against a real redis-server: visitors that arrive together
share one lookup of a lease, so a busy tunnel's cached lease running out doesn't turn into a burst of Redis reads
(and 503s past the registry's bound on lookups at once)."""

from __future__ import annotations

import asyncio

from portway.config import ClusterTarget, RelayConfig
from portway.relay.cluster import MAX_LOOKUPS, RedisRegistry
from portway.relay.localtunnel import LtTunnel
from portway.relay.nodes import NodeLinks, RemoteTunnel
from tests.redis_server import redis_server  # noqa: F401 (a fixture)
from tests.relay.test_cluster import redis, run  # noqa: F401 (a fixture)


def test_visitors_arriving_together_share_one_lookup_of_the_lease(redis):  # noqa: F811
    async def scenario():
        node_a = RedisRegistry(redis.url, "node-a", "127.0.0.1:9100")
        node_b = RedisRegistry(redis.url, "node-b", "127.0.0.1:9101")
        config = RelayConfig(cluster=ClusterTarget.parse(redis.url), node_id="node-b", advertise="127.0.0.1:9101",
                             cluster_secret="s")
        links = NodeLinks(config, node_b)
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
