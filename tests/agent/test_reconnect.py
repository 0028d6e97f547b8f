"""Reconnecting to the relay: the backoff schedule (pure, rng and clock passed in) and the wait that probes an
unreachable relay instead of sleeping through its return."""

from __future__ import annotations

import asyncio
import random
import socket

import pytest

from portway.agent.client import PROBE_INTERVAL, PROBE_TIMEOUT, Agent
from portway.agent.reconnect import (FIRST_DELAY, HEALTHY_AFTER, MAX_DELAY, Backoff, RelayAddress, Rotation,
                                     retry_status)
from portway.config import AgentConfig


class Extremes(random.Random):
    """An rng whose uniform() always returns the lower or the upper bound."""

    def __init__(self, high: bool) -> None:
        super().__init__(0)
        self.high = high

    def uniform(self, a: float, b: float) -> float:
        return b if self.high else a


def schedule(backoff: Backoff, attempts: int) -> list[float]:
    return [backoff.next_delay() for _ in range(attempts)]


def test_delays_double_from_half_a_second_up_to_thirty():
    assert schedule(Backoff(Extremes(high=True)), 9) == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]
    assert (FIRST_DELAY, MAX_DELAY) == (0.5, 30.0)


def test_jitter_keeps_each_delay_between_half_and_all_of_its_step():
    assert schedule(Backoff(Extremes(high=False)), 8) == [0.25, 0.5, 1, 2, 4, 8, 15, 15]
    rng = random.Random(12)
    delays = schedule(Backoff(rng), 200)
    ceilings = [min(0.5 * 2**i, 30.0) for i in range(200)]
    assert all(ceiling / 2 <= delay <= ceiling for delay, ceiling in zip(delays, ceilings))
    assert len({round(delay, 6) for delay in delays[10:]}) > 100, "agents dropped together spread out"


def test_attempts_count_and_a_huge_count_does_not_overflow():
    backoff = Backoff(Extremes(high=True))
    schedule(backoff, 2000)
    assert backoff.attempt == 2000 and backoff.next_delay() == 30.0


def test_a_healthy_link_starts_the_schedule_over():
    backoff = Backoff(Extremes(high=True))
    schedule(backoff, 5)
    backoff.link_up(100.0)
    assert backoff.link_down(100.0 + HEALTHY_AFTER) is True
    assert backoff.attempt == 0 and backoff.next_delay() == 0.5


def test_a_link_that_drops_soon_after_it_came_up_keeps_counting():
    backoff = Backoff(Extremes(high=True))
    schedule(backoff, 3)
    backoff.link_up(100.0)
    assert backoff.link_down(100.0 + HEALTHY_AFTER - 0.1) is False
    assert backoff.next_delay() == 4.0 and backoff.attempt == 4
    assert backoff.link_down(200.0) is False, "a drop without a link up is no healthy period"


def test_nonsense_delays_are_refused():
    with pytest.raises(ValueError):
        Backoff(random.Random(), first_delay=0)
    with pytest.raises(ValueError):
        Backoff(random.Random(), first_delay=5, max_delay=1)


def test_the_status_line_says_when_which_attempt_and_why():
    assert retry_status(4.2, 3, "connection refused", reconnecting=True) == \
        "reconnecting in 4.2 s (attempt 3): connection refused"
    assert retry_status(17.4, 6, "x", reconnecting=False) == "retrying in 17 s (attempt 6): x"


def agent_for(port: int) -> Agent:
    return Agent(AgentConfig(port=9), f"http://127.0.0.1:{port}", on_url=lambda url: None,
                 on_status=lambda text: None)


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_relay_back_during_a_long_wait_ends_it_within_the_probe_period():
    async def main():
        loop = asyncio.get_running_loop()
        port = unused_port()
        agent = agent_for(port)
        waiting = loop.create_task(agent.wait_before_retry(MAX_DELAY, probe=True))
        await asyncio.sleep(0.3)  # the wait is under way, probing a closed port
        assert not waiting.done()
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", port)
        listening_at = loop.time()
        try:
            await asyncio.wait_for(waiting, MAX_DELAY / 2)
        finally:
            server.close()
        return loop.time() - listening_at

    ended_after = asyncio.run(main())
    assert ended_after <= PROBE_INTERVAL + PROBE_TIMEOUT + 2.0  # slack for a busy machine, far below MAX_DELAY


def test_without_probing_the_wait_is_the_whole_delay():
    async def main():
        loop = asyncio.get_running_loop()
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        agent = agent_for(server.sockets[0].getsockname()[1])
        started = loop.time()
        try:
            await agent.wait_before_retry(0.4, probe=False)
        finally:
            server.close()
        return loop.time() - started

    assert asyncio.run(main()) >= 0.4


A, B, C = (RelayAddress(f"127.0.0.{index}", 8000, "relay.test") for index in (1, 2, 3))


def test_a_round_tries_every_address_once_from_the_current_one_or_the_next():
    rotation = Rotation()
    assert rotation.round([A, B, C], stay=True) == [A, B, C]  # nothing dialled yet: in the order given
    rotation.link_up(B)
    assert rotation.round([A, B, C], stay=True) == [B, C, A]  # its streams may resume there
    assert rotation.round([A, B, C], stay=False) == [C, A, B]
    rotation.link_up(C)
    assert rotation.round([A, B, C], stay=False) == [A, B, C]
    assert rotation.round([A, B], stay=True) == [A, B]  # C no longer listed (a name resolves elsewhere now)
    assert str(RelayAddress("::1", 443, "relay.test")) == "[::1]:443"


def test_the_backoff_comes_once_every_address_dropped_a_young_link():
    rotation = Rotation()
    for address in (A, B):
        rotation.link_up(address)
        assert not rotation.link_down([A, B, C], healthy=False)  # another node may be fine: go on at once
    rotation.link_up(C)
    assert rotation.link_down([A, B, C], healthy=False)  # every node failed soon: wait before the next round
    rotation.link_up(A)
    assert not rotation.link_down([A, B, C], healthy=False)  # counting starts over
    rotation.link_up(B)
    assert not rotation.link_down([A, B, C], healthy=True)  # a healthy link clears it
    rotation.link_up(C)
    assert not rotation.link_down([A, B, C], healthy=False)
    one = Rotation()
    one.link_up(A)
    assert one.link_down([A], healthy=False)  # one address: as before, a young drop waits the backoff
