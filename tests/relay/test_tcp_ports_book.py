"""relay/agents.py's TcpPorts: which TCP tunnel holds which port, and an offline tunnel's port kept (its listener
bound) for the grace period, then freed and its listener closed, unless the tunnel came back meanwhile."""

from __future__ import annotations

import asyncio

from portway.relay.agents import TcpPorts, TcpTunnel
from portway.relay.registry import MemoryRegistry
from portway.relay.tcp_listeners import TcpListener


class FakeSession:
    """What TcpTunnel.online reads of a session: closed or not, parked or not."""

    def __init__(self, closed: bool) -> None:
        self.ended = closed
        self.parked = False


async def tunnel_on_a_port(owner: str, closed: bool) -> TcpTunnel:
    listener = TcpListener("127.0.0.1", 0, lambda conn: None)
    port = await listener.open()
    return TcpTunnel(port, 0, FakeSession(closed), "key", listener, owner=owner)


async def until(condition, timeout: float = 5.0) -> None:
    async def poll():
        while not condition():
            await asyncio.sleep(0.01)
    await asyncio.wait_for(poll(), timeout)


def test_an_offline_tunnels_port_is_held_for_the_grace_period_then_freed():
    async def main():
        book = TcpPorts(MemoryRegistry())
        tunnel = await tunnel_on_a_port("alice", closed=True)
        book.add(tunnel)
        book.free_after(tunnel, 0.05)
        assert book.get(tunnel.port) is tunnel and book.frees_at(tunnel.port) is not None
        assert tunnel.listener.listening  # bound meanwhile: no other program takes the port
        assert book.held_by("alice") == 1 and book.held_by("bob") == 0
        await until(lambda: book.get(tunnel.port) is None)
        assert not tunnel.listener.listening and book.ports() == frozenset()

    asyncio.run(main())


def test_a_tunnel_back_online_keeps_its_port_past_the_grace_period():
    async def main():
        book = TcpPorts(MemoryRegistry())
        tunnel = await tunnel_on_a_port("alice", closed=False)  # online: the expiry finds it back
        book.add(tunnel)
        book.free_after(tunnel, 0.01)
        await until(lambda: book.frees_at(tunnel.port) is None)  # the grace period ran out...
        assert book.get(tunnel.port) is tunnel and tunnel.listener.listening  # ...and found it online
        book.close()
        assert not tunnel.listener.listening and book.ports() == frozenset()

    asyncio.run(main())
