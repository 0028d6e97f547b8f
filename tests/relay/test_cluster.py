"""The cluster semantics of RedisRegistry with two registries ("nodes") on one real redis-server: atomic claims,
leases that expire and are taken over under a higher epoch, quotas and failed-token counts over both nodes,
and what a node does while Redis is gone and once it is back."""

from __future__ import annotations

import asyncio
import logging
import re

import pytest

from portway.auth import FailureThrottle, Grant, TokenBook, hash_token
from portway.config import ClusterTarget, RelayConfig, host_port, node_id
from portway.errors import ConfigurationError, HttpError
from portway.link.session import MuxSession
from portway.proto.mux import Role
from portway.relay.cluster import MAX_LOOKUPS, RedisRegistry
from portway.relay.metrics import RelayCounters
from portway.relay.naming import NameClaims
from portway.relay.registry import REGISTRY_UNAVAILABLE, RemoteLease, port_lease_name
from portway.relay.tunnels import AgentTunnel
from tests.redis_server import SentinelServer, redis_server  # noqa: F401 (a fixture)
from tests.relay.test_registry_contract import FakeTunnel, eventually, taken


@pytest.fixture
def redis(redis_server):  # noqa: F811
    with redis_server.client() as client:
        client.flushdb()
    if redis_server.proc is None:
        redis_server.start()
    return redis_server


def run(scenario, timeout: float = 60.0) -> None:
    asyncio.run(asyncio.wait_for(scenario(), timeout))


class Nodes:
    """Registries of several nodes on one Redis, closed at the end."""

    def __init__(self, server) -> None:
        self.server = server
        self.made: list[RedisRegistry] = []

    def node(self, node_id: str, **options) -> RedisRegistry:
        made = RedisRegistry(self.server.url, node_id, f"127.0.0.1:{9100 + len(self.made)}", **options)
        self.made.append(made)
        return made

    async def close(self) -> None:
        for made in self.made:
            await made.close()


def with_nodes(server, scenario):
    async def main():
        nodes = Nodes(server)
        try:
            await scenario(nodes)
        finally:
            await nodes.close()

    run(main)


def lease_of(server, name: str) -> dict[str, str]:
    with server.client() as client:
        return {key.decode(): value.decode() for key, value in client.hgetall(f"portway:lease:{name}").items()}


async def refusal(call) -> HttpError:
    with pytest.raises(HttpError) as refused:
        await call
    return refused.value


def test_a_name_held_by_a_node_is_refused_on_another_and_located(redis):
    async def scenario(nodes):
        a, b = nodes.node("node-a"), nodes.node("node-b")
        tunnel = await taken(a, "web", owner="alice")
        lease = lease_of(redis, "web")
        assert (lease["node"], lease["owner"], lease["kind"]) == ("node-a", "alice", "portway")
        refused = await refusal(b.lease("web", owner="bob", kind="portway", max_tunnels=0))
        assert (refused.status, refused.message) == (409, "tunnel name 'web' is already in use (on relay node node-a)")
        assert await b.held_elsewhere("web") == RemoteLease("node-a", "127.0.0.1:9100", "portway",
                                                            int(lease["epoch"]))
        assert await a.held_elsewhere("web") is None
        a.remove(tunnel)  # released in Redis too: B may have it now
        await eventually(lambda: not lease_of(redis, "web"))
        await taken(b, "web", owner="bob")
        assert (await a.held_elsewhere("web")).node == "node-b"

    with_nodes(redis, scenario)


def test_two_nodes_racing_for_a_name_make_one_winner_every_time(redis):
    async def scenario(nodes):
        a, b = nodes.node("node-a"), nodes.node("node-b")
        for attempt in range(100):
            name = f"race-{attempt}"
            outcomes = await asyncio.gather(
                a.lease(name, owner="alice", kind="portway", max_tunnels=0),
                b.lease(name, owner="bob", kind="portway", max_tunnels=0), return_exceptions=True)
            winners = [node for node, outcome in zip("ab", outcomes) if outcome is None]
            losers = [outcome for outcome in outcomes if isinstance(outcome, HttpError)]
            assert len(winners) == 1 and len(losers) == 1 and losers[0].status == 409, (attempt, outcomes)
            assert lease_of(redis, name)["node"] == f"node-{winners[0]}"

    with_nodes(redis, scenario)


def test_a_quota_counts_the_names_held_on_every_node(redis):
    async def scenario(nodes):
        a, b = nodes.node("node-a"), nodes.node("node-b")
        await taken(a, "one", owner="alice", max_tunnels=2)
        await taken(b, "two", owner="alice", max_tunnels=2)
        for node in (a, b):
            refused = await refusal(node.lease("three", owner="alice", kind="portway", max_tunnels=2))
            assert refused.status == 403 and "holds 2 over the cluster" in refused.message
        await taken(b, "bobs", owner="bob", max_tunnels=2)  # another token has its own count
        await a.lease("one", owner="alice", kind="portway", max_tunnels=2)  # a name it holds: not one more
        a.remove(a.get("one"))
        await eventually(lambda: not lease_of(redis, "one"))
        await taken(b, "three", owner="alice", max_tunnels=2)

    with_nodes(redis, scenario)


def test_an_expired_lease_goes_to_another_node_under_a_higher_epoch_for_good(redis):
    async def scenario(nodes):
        a = nodes.node("node-a", lease_ttl=0.3)  # never started: no heartbeat renews its lease
        b = nodes.node("node-b", lease_ttl=0.3)
        held_by_a = await taken(a, "web")
        first_epoch = int(lease_of(redis, "web")["epoch"])
        refused = await refusal(b.lease("web", owner="", kind="portway", max_tunnels=0))
        assert refused.status == 409
        await eventually(lambda: not lease_of(redis, "web"))  # A missed its heartbeats
        await taken(b, "web")
        assert int(lease_of(redis, "web")["epoch"]) > first_epoch
        await a.renew()  # A comes back: the name is B's now, so A drops its tunnel
        assert a.get("web") is None and held_by_a.closed
        assert lease_of(redis, "web")["node"] == "node-b"

    with_nodes(redis, scenario)


def test_a_node_back_late_cannot_take_back_a_name_that_moved_on_even_once_free(redis):
    async def scenario(nodes):
        a = nodes.node("node-a", lease_ttl=0.3)
        b = nodes.node("node-b", lease_ttl=0.3)
        await taken(a, "web")
        await eventually(lambda: not lease_of(redis, "web"))
        await taken(b, "web")
        await eventually(lambda: not lease_of(redis, "web"))  # B's lease lapsed too: the fence remembers it
        await a.renew()
        assert a.get("web") is None and not lease_of(redis, "web")

    with_nodes(redis, scenario)


def test_the_heartbeat_renews_a_lease_past_its_ttl(redis):
    async def scenario(nodes):
        a = nodes.node("node-a", lease_ttl=0.3)
        b = nodes.node("node-b", lease_ttl=0.3)
        await a.start()
        await b.start()
        await taken(a, "kept")
        await asyncio.sleep(1.0)  # more than three TTLs: only the heartbeat can have kept it
        assert lease_of(redis, "kept")["node"] == "node-a"
        assert (await refusal(b.lease("kept", owner="", kind="portway", max_tunnels=0))).status == 409

    with_nodes(redis, scenario)


def test_a_tcp_port_is_leased_once_over_the_cluster_and_counts_in_the_quota(redis):
    async def scenario(nodes):
        a, b = nodes.node("node-a"), nodes.node("node-b")
        await a.lease(port_lease_name(20001), owner="alice", kind="tcp", max_tunnels=2)
        a.hold(port_lease_name(20001), owner="alice", kind="tcp", lost=lambda: None)
        assert lease_of(redis, "tcp:20001")["node"] == "node-a"
        refused = await refusal(b.lease(port_lease_name(20001), owner="bob", kind="tcp", max_tunnels=0))
        assert (refused.status, refused.message) == (409, "TCP port 20001 is already in use (on relay node node-a)")
        await taken(b, "web", owner="alice", max_tunnels=2)  # a name and a port: alice's two
        refused = await refusal(b.lease(port_lease_name(20002), owner="alice", kind="tcp", max_tunnels=2))
        assert refused.status == 403 and "holds 2 over the cluster" in refused.message
        a.let_go(port_lease_name(20001))  # released at once
        await eventually(lambda: not lease_of(redis, "tcp:20001"))
        await b.lease(port_lease_name(20001), owner="alice", kind="tcp", max_tunnels=2)

    with_nodes(redis, scenario)


def test_the_heartbeat_keeps_a_held_port_and_tells_when_another_node_has_it(redis):
    async def scenario(nodes):
        a = nodes.node("node-a", lease_ttl=0.3)
        await a.start()
        lost: list[str] = []
        await a.lease(port_lease_name(20001), owner="", kind="tcp", max_tunnels=0)
        a.hold(port_lease_name(20001), owner="", kind="tcp", lost=lambda: lost.append("20001"))
        await asyncio.sleep(1.0)  # more than three TTLs: only the heartbeat can have kept it
        assert lease_of(redis, "tcp:20001")["node"] == "node-a" and not lost
        late = nodes.node("node-c", lease_ttl=0.3)  # never started: nothing renews its lease
        await late.lease(port_lease_name(20002), owner="", kind="tcp", max_tunnels=0)
        late.hold(port_lease_name(20002), owner="", kind="tcp", lost=lambda: lost.append("20002"))
        await eventually(lambda: not lease_of(redis, "tcp:20002"))
        b = nodes.node("node-b", lease_ttl=0.3)
        await b.lease(port_lease_name(20002), owner="", kind="tcp", max_tunnels=0)
        await late.renew()  # back late: the port is node B's now
        assert lost == ["20002"] and lease_of(redis, "tcp:20002")["node"] == "node-b"

    with_nodes(redis, scenario)


def test_redis_gone_keeps_local_names_refuses_new_ones_fast_and_leases_come_back(redis):
    async def scenario(nodes):
        a = nodes.node("node-a", lease_ttl=1.0, call_timeout=0.5)
        b = nodes.node("node-b", lease_ttl=1.0, call_timeout=0.5)
        await a.start()
        held = await taken(a, "web")
        redis.stop()
        assert a.get("web") is held  # a visitor of a name held here never asks Redis
        async with asyncio.timeout(2):  # the bound on a refusal while Redis is gone
            refused = await refusal(a.lease("new", owner="", kind="portway", max_tunnels=0))
        assert (refused.status, refused.message) == (503, REGISTRY_UNAVAILABLE)
        async with asyncio.timeout(2):
            assert (await refusal(b.held_elsewhere("web"))).status == 503
        await eventually(lambda: not a.reachable)
        redis.start()  # empty: Redis lost every lease
        await eventually(lambda: lease_of(redis, "web").get("node") == "node-a")  # re-asserted by the heartbeat
        assert a.reachable and a.get("web") is held
        assert (await refusal(b.lease("web", owner="", kind="portway", max_tunnels=0))).status == 409
        await taken(b, "new")  # registrations work again without restarting anything

    with_nodes(redis, scenario)


def test_a_dropped_agent_tunnel_has_its_link_closed(redis):
    async def scenario(nodes):
        a = nodes.node("node-a", lease_ttl=0.3)
        b = nodes.node("node-b", lease_ttl=0.3)
        session = MuxSession(Role.SERVER)  # a link never connected: what the registry does to it shows
        await taken(a, "web", tunnel=AgentTunnel("web", session, "resume-key"))
        await eventually(lambda: not lease_of(redis, "web"))
        await taken(b, "web")
        await a.renew()
        assert session.closed.done() and a.get("web") is None

    with_nodes(redis, scenario)


def test_a_stopping_node_drops_a_name_its_agent_took_elsewhere_without_cutting_the_link(redis):
    """During a hand-over the agent registers on another node first and says GO_AWAY on the old link after: a
    heartbeat of the stopping node in between must not close that link, whose exchanges in flight finish."""

    async def scenario(nodes):
        a = nodes.node("node-a")
        b = nodes.node("node-b")
        session = MuxSession(Role.SERVER)  # a link never connected: what the registry does to it shows
        await a.lease("web", owner="", kind="portway", max_tunnels=0, key="key-from-a")
        a.add(AgentTunnel("web", session, "key-from-a"))
        await a.leave()
        await b.lease("web", owner="", kind="portway", max_tunnels=0, proof="key-from-a", key="key-from-b")
        await a.renew()
        assert a.get("web") is None and not session.closed.done()
        assert lease_of(redis, "web")["node"] == "node-b"

    with_nodes(redis, scenario)


def test_failed_tokens_count_over_every_node(redis):
    async def scenario(nodes):
        a = nodes.node("node-a", auth_failures_per_address=3, auth_failure_window=0.5)
        b = nodes.node("node-b", auth_failures_per_address=3, auth_failure_window=0.5)
        for _ in range(2):
            await a.failures.record_failure("192.0.2.1")
        assert await b.failures.retry_after("192.0.2.1") is None
        await b.failures.record_failure("192.0.2.1")
        wait = await a.failures.retry_after("192.0.2.1")
        assert wait is not None and 0 < wait <= 0.5
        assert await a.failures.retry_after("192.0.2.2") is None
        await eventually_free(a, "192.0.2.1")

    with_nodes(redis, scenario)


async def eventually_free(registry, address: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while await registry.failures.retry_after(address) is not None:
        assert loop.time() < deadline, "the failure window never moved on"
        await asyncio.sleep(0.05)


def test_name_claims_on_two_nodes_share_the_throttle_and_the_quota(redis):
    grant = Grant("alice", hash_token("alice-secret"), max_tunnels=1)

    def claims_on(registry):
        return NameClaims(TokenBook([grant]), FailureThrottle(3, 60), registry, RelayCounters())

    async def scenario(nodes):
        a = nodes.node("node-a", auth_failures_per_address=3)
        b = nodes.node("node-b", auth_failures_per_address=3)
        on_a, on_b = claims_on(a), claims_on(b)
        no = lambda tunnel: False  # noqa: E731
        first = await on_a.claim(token="alice-secret", peer_ip="198.51.100.1", requested=None, may_replace=no)
        a.add(FakeTunnel(first.name, grant.digest))
        refused = await refusal(on_b.claim(token="alice-secret", peer_ip="198.51.100.1", requested=None,
                                           may_replace=no))
        assert refused.status == 403  # B holds none of alice's names, the cluster holds one
        for node in (on_a, on_b, on_a):
            assert (await refusal(node.claim(token="guess", peer_ip="203.0.113.9", requested="x",
                                             may_replace=no))).status == 401
        for node in (on_a, on_b):  # three failures over two nodes: the address is refused on both
            assert (await refusal(node.claim(token="alice-secret", peer_ip="203.0.113.9", requested="x",
                                             may_replace=no))).status == 429

    with_nodes(redis, scenario)


def test_a_node_with_another_cluster_secret_refuses_to_join(redis):
    async def scenario(nodes):
        await nodes.node("node-a", secret="one").start()
        await nodes.node("node-b", secret="one").start()
        with pytest.raises(ConfigurationError, match="--cluster-secret does not match"):
            await nodes.node("node-c", secret="two").start()
        with pytest.raises(ConfigurationError, match="--cluster-secret does not match"):
            await nodes.node("node-d").start()

    with_nodes(redis, scenario)


def test_a_second_live_node_with_the_same_id_refuses_to_start(redis):
    async def scenario(nodes):
        first = nodes.node("node-a", presence_ttl=0.6)
        await first.start()
        with pytest.raises(ConfigurationError) as refused:
            await nodes.node("node-a", presence_ttl=0.6).start()
        assert re.fullmatch(r"node id 'node-a' is live in the cluster \(heartbeat 0\.\d s ago from 127\.0\.0\.1:9100\); "
                            r"pick another --node-id", str(refused.value)), refused.value
        await taken(first, "web")  # the running node is untouched
        await nodes.node("node-b", presence_ttl=0.6).start()  # another id is welcome

    with_nodes(redis, scenario)


def test_a_node_restarted_after_it_died_waits_for_its_old_presence_to_end(redis, caplog):
    async def scenario(nodes):
        with redis.client() as client:  # what a node killed a moment ago leaves behind: a presence not refreshed
            client.set("portway:node:node-a", "0123456789abcdef 10.0.0.9:8000", px=500)
        restarted = nodes.node("node-a", presence_ttl=0.6)
        with caplog.at_level(logging.WARNING, logger="portway.relay.cluster"):
            await restarted.start()
        assert re.search(r"node id 'node-a' was last seen 0\.\d s ago \(from 10\.0\.0\.9:8000\): waiting up to 0\.\d s "
                         r"to tell a node restarted after it died from one still running", caplog.text), caplog.text
        with redis.client() as client:
            assert client.get("portway:node:node-a").decode() == restarted.presence

    with_nodes(redis, scenario)


def test_a_node_stopped_on_purpose_frees_its_id_at_once(redis, caplog):
    async def scenario(nodes):
        first = nodes.node("node-a", presence_ttl=30)  # a presence that would outlive the test if left behind
        await first.start()
        await first.close()
        with redis.client() as client:
            assert client.get("portway:node:node-a") is None
        with caplog.at_level(logging.WARNING, logger="portway.relay.cluster"):
            async with asyncio.timeout(2):
                await nodes.node("node-a", presence_ttl=30).start()
        assert "was last seen" not in caplog.text

    with_nodes(redis, scenario)


def test_a_running_node_whose_id_was_taken_meanwhile_says_so_once(redis, caplog):
    async def scenario(nodes):
        node = nodes.node("node-a", presence_ttl=0.3)
        await node.start()
        with caplog.at_level(logging.ERROR, logger="portway.relay.cluster"):
            with redis.client() as client:  # what a node started while this one's presence had lapsed writes
                client.set("portway:node:node-a", "fedcba9876543210 10.0.0.7:8000", px=60_000)
            await eventually(lambda: "node id 'node-a' is also used by the node at 10.0.0.7:8000" in caplog.text)
            await asyncio.sleep(0.5)  # several refreshes later: still one line
        assert caplog.text.count("is also used by") == 1
        with redis.client() as client:  # the other node's presence is left alone
            assert client.get("portway:node:node-a") == b"fedcba9876543210 10.0.0.7:8000"

    with_nodes(redis, scenario)


def test_a_presence_without_a_ttl_counts_as_stale(redis):
    async def scenario(nodes):
        with redis.client() as client:
            client.set("portway:node:node-a", "written by hand")
        node = nodes.node("node-a", presence_ttl=0.4)
        async with asyncio.timeout(3):
            await node.start()
        with redis.client() as client:
            assert client.get("portway:node:node-a").decode() == node.presence and client.pttl("portway:node:node-a") > 0

    with_nodes(redis, scenario)


def test_an_unreachable_registry_at_start_is_one_clear_line():
    async def scenario():
        node = RedisRegistry("redis://127.0.0.1:1/0", "node-a", "127.0.0.1:9000", call_timeout=0.5)
        try:
            with pytest.raises(ConfigurationError, match="cannot reach the cluster registry at redis://127.0.0.1:1/0"):
                await node.start()
        finally:
            await node.close()

    run(scenario)


@pytest.mark.parametrize("url, sentinels, service, db, password", [
    ("redis+sentinel://10.0.0.1:26379/mymaster", (("10.0.0.1", 26379),), "mymaster", 0, None),
    ("redis+sentinel://:pw@10.0.0.1:26379,[::1]:26380/cache/3", (("10.0.0.1", 26379), ("::1", 26380)),
     "cache", 3, "pw"),
])
def test_sentinel_urls_name_the_sentinels_the_service_and_the_db(url, sentinels, service, db, password):
    target = ClusterTarget.parse(url)
    assert (target.sentinels, target.service, target.db, target.password) == (sentinels, service, db, password)
    assert "pw" not in str(target) and "pw" not in repr(target)


@pytest.mark.parametrize("url", ["http://x", "redis+sentinel://h:1", "redis+sentinel://h/m", "redis://",
                                 "redis+sentinel://h:1/m/x"])
def test_bad_cluster_urls_are_refused(url):
    with pytest.raises(ValueError):
        ClusterTarget.parse(url)


def test_a_plain_url_keeps_its_password_out_of_logs():
    target = ClusterTarget.parse("redis://:secret@127.0.0.1:6379/2")
    assert str(target) == "redis://127.0.0.1:6379/2" and "secret" not in repr(target)


def test_a_node_finds_its_redis_through_a_sentinel(redis, tmp_path):
    sentinel = SentinelServer(redis, tmp_path)
    sentinel.start()
    try:
        async def scenario(nodes):
            through_sentinel = RedisRegistry(sentinel.url, "node-s", "127.0.0.1:9200")
            nodes.made.append(through_sentinel)
            await through_sentinel.start()
            await taken(through_sentinel, "watched", owner="alice")
            plain = nodes.node("node-p")
            assert (await plain.held_elsewhere("watched")).node == "node-s"

        with_nodes(redis, scenario)
    finally:
        sentinel.stop()


def test_cluster_settings_go_together():
    target = ClusterTarget.parse("redis://127.0.0.1:6379/0")
    with pytest.raises(ConfigurationError, match="--cluster needs --node-id ID and --advertise HOST:PORT"):
        RelayConfig(cluster=target, node_id="node-a")
    with pytest.raises(ConfigurationError, match="go with --cluster"):
        RelayConfig(node_id="node-a")
    assert RelayConfig(cluster=target, node_id="node-a", advertise="10.0.0.1:8000").cluster == target


@pytest.mark.parametrize("parse, bad", [(node_id, ""), (node_id, "a b"), (node_id, "x" * 65), (node_id, "nœud"),
                                        (host_port, "10.0.0.1"), (host_port, ":8000"), (host_port, "h:0")])
def test_node_ids_and_advertised_addresses_are_checked(parse, bad):
    with pytest.raises(ValueError):
        parse(bad)


def test_lookups_for_visitors_are_bounded_and_leave_room_for_registrations(redis):
    async def scenario(nodes):
        a, b = nodes.node("node-a"), nodes.node("node-b")
        await taken(a, "web")
        lookups = await asyncio.gather(*(b.held_elsewhere("web") for _ in range(MAX_LOOKUPS + 20)),
                                       return_exceptions=True)
        refused = [outcome for outcome in lookups if isinstance(outcome, HttpError)]
        assert len(refused) == 20 and all(outcome.status == 503 for outcome in refused)
        assert all(outcome.node == "node-a" for outcome in lookups if not isinstance(outcome, HttpError))
        await taken(b, "mine")  # and the pool still has room for a registration

    with_nodes(redis, scenario)


# ----------------------------------------------------------------------------------------------- failover

class KeyedTunnel(FakeTunnel):
    """A tunnel whose agent was given a resume key with its registration (what an AgentTunnel keeps)."""

    def __init__(self, name: str, owner: str, resume_key: str) -> None:
        super().__init__(name, owner)
        self.resume_key = resume_key


async def moved(registry, name: str, owner: str, proof: str | None, key: str) -> KeyedTunnel:
    await registry.lease(name, owner=owner, kind="portway", max_tunnels=0, proof=proof, key=key)
    tunnel = KeyedTunnel(name, owner, key)
    registry.add(tunnel)
    return tunnel


def test_the_agent_that_held_a_live_lease_takes_it_over_on_another_node_and_only_it(redis):
    async def scenario(nodes):
        a, b, c = nodes.node("node-a"), nodes.node("node-b"), nodes.node("node-c")
        await moved(a, "web", "alice", None, "key-1")
        first_epoch = int(lease_of(redis, "web")["epoch"])
        # A's lease is live (A may be dead, its TTL not run out): only the agent's own key and token take it
        for owner, proof in (("alice", None), ("alice", "wrong"), ("mallory", "key-1")):
            refused = await refusal(b.lease("web", owner=owner, kind="portway", max_tunnels=0, proof=proof,
                                            key="other"))
            assert refused.status == 409 and "node-a" in refused.message
        on_c = await moved(c, "web", "alice", "key-1", "key-2")
        lease = lease_of(redis, "web")
        assert (lease["node"], int(lease["epoch"]) > first_epoch) == ("node-c", True)
        assert (await b.held_elsewhere("web")).node == "node-c"
        # the key of the lease on A is spent: it can't move the name again
        assert (await refusal(b.lease("web", owner="alice", kind="portway", max_tunnels=0, proof="key-1",
                                      key="x"))).status == 409
        await a.renew()  # A, alive or back: its heartbeat finds a newer holder and drops the tunnel
        assert a.get("web") is None and lease_of(redis, "web")["node"] == "node-c"
        await moved(b, "web", "alice", "key-2", "key-3")  # and on it goes with the newest key
        await c.renew()
        assert c.get("web") is None and on_c.closed and lease_of(redis, "web")["node"] == "node-b"

    with_nodes(redis, scenario)


def test_a_node_restarted_after_its_agent_moved_does_not_take_the_name_back(redis):
    async def scenario(nodes):
        a = nodes.node("node-a")
        c = nodes.node("node-c")
        await moved(a, "web", "alice", None, "key-1")
        stale_epoch = a._epochs["web"]
        await moved(c, "web", "alice", "key-1", "key-2")
        # A, back with its old state, would re-assert its lease: a newer holder, or once that lease lapsed too the
        # name's fence, refuses it
        a_again = nodes.node("node-a")
        a_again.add(KeyedTunnel("web", "alice", "key-1"))
        a_again._epochs["web"] = stale_epoch
        with redis.client() as client:
            client.delete("portway:lease:web")  # C's lease lapsed (C is slow, or Redis lost it)
        await a_again.renew()
        assert a_again.get("web") is None and not lease_of(redis, "web")
        await c.renew()  # C's heartbeat re-creates its lease, with the key that proves the agent
        assert lease_of(redis, "web")["node"] == "node-c"
        await moved(a_again, "web", "alice", "key-2", "key-3")
        assert lease_of(redis, "web")["node"] == "node-a"

    with_nodes(redis, scenario)


def test_live_nodes_lists_the_others_with_their_addresses_until_they_leave_or_stop_beating(redis):
    async def scenario(nodes):
        a = nodes.node("node-a", lease_ttl=0.6)
        b = nodes.node("node-b", lease_ttl=0.6)
        c = nodes.node("node-c", lease_ttl=0.6)
        for node in (a, b, c):
            await node.start()
        assert await a.live_nodes() == [("node-b", b.advertise), ("node-c", c.advertise)]
        await b.leave()  # stopping: no agent is sent there any more, though its heartbeat still runs
        await asyncio.sleep(0.5)  # past a heartbeat (TTL/3): leaving must stick
        assert await a.live_nodes() == [("node-c", c.advertise)]
        c._heartbeat.cancel()  # c died: it is gone from the list once its TTL ran out
        deadline = asyncio.get_running_loop().time() + 5
        while await a.live_nodes() and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        assert await a.live_nodes() == []
        assert await c.live_nodes() == [("node-a", a.advertise)]

    with_nodes(redis, scenario)
