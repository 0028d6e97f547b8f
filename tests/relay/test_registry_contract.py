"""The registry contract (relay/registry.py), run against both implementations: the memory registry of a relay
that runs alone and the Redis registry of a cluster node (a real redis-server on a free port). What one node sees
of its own tunnels must not depend on which registry it has."""

from __future__ import annotations

import asyncio

import pytest

from portway.relay.cluster import RedisRegistry
from portway.relay.registry import MemoryRegistry
from portway.relay.tunnels import Tunnel
from tests.redis_server import redis_server  # noqa: F401 (a fixture)


class FakeTunnel(Tunnel):
    kind = "portway"

    def __init__(self, name: str, owner: str = "", online: bool = True) -> None:
        super().__init__(name, owner=owner)
        self.is_online = online
        self.closed = False

    @property
    def online(self) -> bool:
        return self.is_online

    def close(self) -> None:
        self.closed = True
        super().close()


class World:
    """Makes registries of one kind inside the test's event loop and closes them all at the end."""

    def __init__(self, kind: str, server) -> None:
        self.kind = kind
        self.server = server
        self.made: list = []

    def registry(self, node: str = "node-a", **options):
        if self.kind == "memory":
            made = MemoryRegistry()
        else:
            made = RedisRegistry(self.server.url, node, f"127.0.0.1:{9000 + len(self.made)}", **options)
        self.made.append(made)
        return made

    def run(self, scenario) -> None:
        async def main():
            try:
                await asyncio.wait_for(scenario(self), 30)
            finally:
                for made in self.made:
                    await made.close()

        asyncio.run(main())


@pytest.fixture(params=["memory", "redis"])
def world(request):
    server = None
    if request.param == "redis":
        server = request.getfixturevalue("redis_server")
        with server.client() as client:
            client.flushdb()
    return World(request.param, server)


async def taken(registry, name: str, owner: str = "", max_tunnels: int = 0, tunnel: FakeTunnel | None = None):
    """What a relay does on a registration the claim policy allowed: lease the name, then add its tunnel."""
    await registry.lease(name, owner=owner, kind="portway", max_tunnels=max_tunnels)
    tunnel = tunnel or FakeTunnel(name, owner)
    registry.add(tunnel)
    return tunnel


def test_a_registered_tunnel_is_found_counted_and_listed(world):
    async def scenario(world):
        registry = world.registry()
        assert registry.get("web") is None and len(registry) == 0 and registry.names() == frozenset()
        web = await taken(registry, "web", owner="alice")
        api = await taken(registry, "api", owner="alice")
        await taken(registry, "other", owner="bob")
        assert registry.get("web") is web and registry.get("api") is api
        assert registry.names() == {"web", "api", "other"} and len(registry) == 3
        assert set(registry) == {web, api, registry.get("other")}
        assert (registry.held_by("alice"), registry.held_by("bob"), registry.held_by("carol")) == (2, 1, 0)
        assert await registry.held_elsewhere("web") is None  # held here
        assert await registry.held_elsewhere("nobody") is None

    world.run(scenario)


def test_remove_forgets_and_closes_only_the_holder(world):
    async def scenario(world):
        registry = world.registry()
        first = await taken(registry, "web")
        second = await taken(registry, "web")  # replaced (the claim policy allowed it)
        assert registry.get("web") is second and len(registry) == 1
        registry.remove(first)  # no longer the holder: nothing happens
        assert registry.get("web") is second and not second.closed
        registry.remove(second)
        assert registry.get("web") is None and second.closed and len(registry) == 0
        await taken(registry, "web")  # free again
        assert registry.get("web") is not None

    world.run(scenario)


def test_an_offline_tunnel_keeps_its_name_for_the_grace_period(world):
    async def scenario(world):
        registry = world.registry()
        loop = asyncio.get_running_loop()
        gone = await taken(registry, "gone")
        back = await taken(registry, "back")
        assert registry.frees_at("gone") is None
        gone.is_online = back.is_online = False
        started = loop.time()
        registry.free_after(gone, 0.05)
        registry.free_after(back, 0.05)
        assert started + 0.05 <= registry.frees_at("gone") <= loop.time() + 0.05
        back.is_online = True
        registry.keep(back)
        assert registry.frees_at("back") is None
        await eventually(lambda: registry.get("gone") is None)
        assert gone.closed and registry.frees_at("gone") is None
        assert registry.get("back") is back

    world.run(scenario)


def test_a_tunnel_online_again_when_its_grace_ends_is_kept(world):
    async def scenario(world):
        registry = world.registry()
        tunnel = await taken(registry, "flaky")
        tunnel.is_online = False
        registry.free_after(tunnel, 0.02)
        tunnel.is_online = True  # came back without keep(): the expiry looks at the tunnel itself
        await asyncio.sleep(0.1)
        assert registry.get("flaky") is tunnel and not tunnel.closed

    world.run(scenario)


def test_keep_from_a_tunnel_that_no_longer_holds_the_name_changes_nothing(world):
    async def scenario(world):
        registry = world.registry()
        old = await taken(registry, "web")
        new = await taken(registry, "web")
        new.is_online = False
        registry.free_after(new, 0.05)
        registry.keep(old)
        assert registry.frees_at("web") is not None

    world.run(scenario)


async def eventually(condition, timeout: float = 10.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError("timed out waiting for a condition")
        await asyncio.sleep(0.02)


def test_the_memory_registry_leases_anything_its_claim_policy_allowed():
    async def scenario():
        registry = MemoryRegistry()
        await registry.start()
        assert registry.failures is None  # the relay's own FailureThrottle counts
        for _ in range(3):
            await registry.lease("web", owner="o", kind="portway", max_tunnels=1)
        await registry.close()

    asyncio.run(scenario())
