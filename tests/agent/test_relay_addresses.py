"""An agent given several relay addresses: which addresses a round tries (a host name counts once per address
it resolves to), and a round that goes on to the next address at once when one can't be reached."""

from __future__ import annotations

import asyncio
import socket

import pytest

from portway.agent.client import CONNECT_TIMEOUT, NEXT_ADDRESS_AFTER, Agent
from portway.agent.reconnect import RelayAddress
from portway.config import AgentConfig, RelayConfig
from portway.relay.server import Relay


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def agent_for(*urls: str, statuses: list[str] | None = None) -> Agent:
    return Agent(AgentConfig(port=9), urls, on_url=lambda url: None,
                 on_status=(statuses.append if statuses is not None else lambda text: None))


def test_every_relay_url_and_every_address_of_a_name_is_one_address_of_the_round():
    async def main():
        agent = agent_for("http://127.0.0.1:8001", "http://localhost:8002", "http://127.0.0.1:8001")
        addresses = await agent.relay_addresses()
        resolved = {info[4][0] for info in socket.getaddrinfo("localhost", 8002, type=socket.SOCK_STREAM)}
        assert addresses[0] == RelayAddress("127.0.0.1", 8001, "127.0.0.1")
        assert {address.host for address in addresses[1:]} == resolved  # the system resolver's, each once
        assert all(address == RelayAddress(address.host, 8002, "localhost") for address in addresses[1:])

    asyncio.run(main())


@pytest.mark.parametrize("urls", [("http://127.0.0.1", "https://127.0.0.1"), ("ftp://127.0.0.1",), ()])
def test_relay_urls_must_be_http_or_https_alike(urls):
    with pytest.raises(ValueError, match="--relay"):
        agent_for(*urls)


def test_a_round_goes_on_at_once_past_an_address_that_refuses():
    async def main():
        relay = Relay(RelayConfig(port=0))
        await relay.start()
        dead = unused_port()
        statuses: list[str] = []
        agent = agent_for(f"http://127.0.0.1:{dead}", f"http://127.0.0.1:{relay.port}", statuses=statuses)
        try:
            async with asyncio.timeout(5):  # no backoff between the addresses of one round
                registered = await agent.connect_round(stay=True)
            assert registered.url.endswith(f".localhost:{relay.port}")
            assert statuses == [f"relay at 127.0.0.1:{dead} is unreachable (Connection refused); trying "
                                f"127.0.0.1:{relay.port}"]
            assert agent.rotation.current == RelayAddress("127.0.0.1", relay.port, "127.0.0.1")
            registered.session.close()
        finally:
            await relay.close()

    asyncio.run(main())


def test_an_address_that_never_answers_gives_way_to_the_next_before_the_full_connect_timeout():
    async def main():
        # a listener that accepts nothing, its backlog full: further connects get no answer at all, like a
        # machine that vanished
        black_hole = socket.socket()
        black_hole.bind(("127.0.0.1", 0))
        black_hole.listen(0)
        filling = []
        for _ in range(4):
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(black_hole.getsockname())
            filling.append(sock)
        assert NEXT_ADDRESS_AFTER + 2 < CONNECT_TIMEOUT
        relay = Relay(RelayConfig(port=0))
        await relay.start()
        statuses: list[str] = []
        hole = black_hole.getsockname()[1]
        agent = agent_for(f"http://127.0.0.1:{hole}", f"http://127.0.0.1:{relay.port}", statuses=statuses)
        try:
            async with asyncio.timeout(NEXT_ADDRESS_AFTER + 2):  # well below CONNECT_TIMEOUT
                registered = await agent.connect_round(stay=True)
            assert statuses == [f"relay at 127.0.0.1:{hole} is unreachable (timed out); trying "
                                f"127.0.0.1:{relay.port}"]
            registered.session.close()
        finally:
            await relay.close()
            for sock in (*filling, black_hole):
                sock.close()

    asyncio.run(main())
