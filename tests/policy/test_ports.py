"""Which TCP port a TCP tunnel gets (policy/ports.py), without a relay: the order of checks, each refusal's
status and message, reserved ports, the shared quota, grace periods, and random picks among free ports."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from portway.auth import OPEN_GRANT, Grant, TokenBook, hash_token
from portway.errors import HttpError
from portway.policy.ports import claim_port

DIGEST_A = hash_token("alpha-secret")
DIGEST_B = hash_token("beta-secret")
GRANT_A = Grant("a", DIGEST_A, max_tunnels=2, reserved_ports=frozenset({20001}))
GRANT_B = Grant("b", DIGEST_B)
RANGE = frozenset(range(20000, 20101))


class Holder:
    def __init__(self, owner: str, resume_key: str = "") -> None:
        self.owner = owner
        self.resume_key = resume_key


class Holders:
    """The relay's view claim_port() reads: TCP tunnels by port, and how many tunnels (of every kind, HTTP
    names counted in `names_held`) each token holds."""

    def __init__(self) -> None:
        self.by_port: dict[int, Holder] = {}
        self.grace_ends: dict[int, float] = {}
        self.names_held: Counter[str] = Counter()

    def get(self, port: int) -> Holder | None:
        return self.by_port.get(port)

    def ports(self) -> frozenset[int]:
        return frozenset(self.by_port)

    def held_by(self, owner: str) -> int:
        return self.names_held[owner] + sum(1 for holder in self.by_port.values() if holder.owner == owner)

    def frees_at(self, port: int) -> float | None:
        return self.grace_ends.get(port)


class World:
    def __init__(self, *grants: Grant, offered: frozenset[int] = RANGE) -> None:
        self.tokens = TokenBook(list(grants))
        self.holders = Holders()
        self.offered = offered
        self.now = 100.0

    def claim(self, grant: Grant, requested: int | None, may_replace=lambda holder: False,
              rng: random.Random | None = None) -> int:
        return claim_port(grant=grant, tokens=self.tokens, offered=self.offered, holders=self.holders,
                          requested=requested, may_replace=may_replace, now=self.now, rng=rng or random.Random(7))

    def refusal(self, grant: Grant, requested: int | None) -> tuple[int, str]:
        with pytest.raises(HttpError) as refused:
            self.claim(grant, requested)
        return refused.value.status, refused.value.message


def test_a_relay_without_tcp_ports_refuses_every_tcp_tunnel():
    world = World(GRANT_A, GRANT_B, offered=frozenset())
    for requested in (None, 20001, 22):
        assert world.refusal(GRANT_B, requested) == (
            403, "no TCP ports configured on this relay: start it with --tcp-ports")


@pytest.mark.parametrize("offered, requested, message", [
    (RANGE, 30000, "port 30000 is outside this relay's TCP range 20000-20100"),
    (RANGE, 19999, "port 19999 is outside this relay's TCP range 20000-20100"),
    (frozenset({20001, 20005}), 20003, "port 20003 is outside this relay's TCP range 20001,20005"),
    (frozenset({*range(20000, 20011), 20050}), 20049, "port 20049 is outside this relay's TCP range 20000-20010,20050"),
])
def test_a_port_outside_the_range(offered, requested, message):
    assert World(GRANT_B, offered=offered).refusal(GRANT_B, requested) == (400, message)


def test_the_ends_of_the_range_are_in_it():
    world = World(GRANT_B)
    assert (world.claim(GRANT_B, 20000), world.claim(GRANT_B, 20100)) == (20000, 20100)


def test_a_reserved_port_is_its_tokens_only():
    world = World(GRANT_A, GRANT_B)
    assert world.refusal(GRANT_B, 20001) == (403, "port 20001 is reserved for another token")
    assert world.claim(GRANT_A, 20001) == 20001


def test_a_port_in_use():
    world = World(GRANT_A, GRANT_B)
    world.holders.by_port[20002] = Holder(DIGEST_A)
    assert world.refusal(GRANT_B, 20002) == (409, "port 20002 is already in use")
    assert world.refusal(GRANT_A, 20002) == (409, "port 20002 is already in use")  # even by the same token


def test_a_port_in_its_grace_period_is_kept_for_its_agent():
    """Another agent is told when the port frees; the agent that had it (its resume key, judged by may_replace)
    takes it back, and taking back one's own port is not a new tunnel for the quota."""
    world = World(GRANT_A, GRANT_B)
    world.holders.by_port[20002] = Holder(DIGEST_A, resume_key="k1")
    world.holders.by_port[20003] = Holder(DIGEST_A, resume_key="k2")  # the token's quota of 2 is used
    world.holders.grace_ends[20002] = world.now + 7.2
    status, message = world.refusal(GRANT_B, 20002)
    assert status == 409
    assert message == ("port 20002 is held for the agent that had it (its link dropped); it is free in 8 s unless "
                       "that agent comes back")
    assert world.claim(GRANT_A, 20002, may_replace=lambda holder: holder.resume_key == "k1") == 20002
    world.now += 7.1  # under a second left: still says 1 s, never 0
    assert "it is free in 1 s" in world.refusal(GRANT_B, 20002)[1]


def test_the_quota_counts_http_and_tcp_tunnels_together():
    world = World(GRANT_A, GRANT_B)
    world.holders.names_held[DIGEST_A] = 1
    world.holders.by_port[20010] = Holder(DIGEST_A)
    assert world.refusal(GRANT_A, None) == (403, "this token may hold 2 tunnel(s) at once and holds 2")
    assert world.refusal(GRANT_A, 20011) == (403, "this token may hold 2 tunnel(s) at once and holds 2")
    assert world.claim(GRANT_B, 20011) == 20011  # quotas are per token; B has none
    world.holders.names_held[DIGEST_A] = 0
    assert world.claim(GRANT_A, 20012) == 20012


def test_the_quota_comes_before_the_range_and_the_holder():
    """A token over its quota learns nothing about ports: the same refusal whatever it asks for."""
    world = World(GRANT_A, GRANT_B)
    world.holders.names_held[DIGEST_A] = 2
    world.holders.by_port[20050] = Holder(DIGEST_B)
    for requested in (30000, 20050, 20001, None):
        assert world.refusal(GRANT_A, requested)[0] == 403
        assert "may hold 2 tunnel(s)" in world.refusal(GRANT_A, requested)[1]


def test_every_port_in_use():
    world = World(GRANT_A, GRANT_B, offered=frozenset({20001, 20002, 20003}))
    world.holders.by_port[20002] = Holder(DIGEST_B)
    world.holders.by_port[20003] = Holder(DIGEST_B)
    world.holders.grace_ends[20003] = world.now + 5  # a port in its grace period is not free either
    # 20001 is reserved for A: a random pick avoids reserved ports, like random names avoid reserved names
    assert world.refusal(GRANT_B, None) == (503, "every TCP port of this relay is in use")
    assert world.claim(GRANT_A, 20001) == 20001


def test_random_picks_avoid_held_and_reserved_ports():
    world = World(GRANT_A, GRANT_B, offered=frozenset(range(20000, 20010)))
    for port in (20000, 20002, 20004, 20006, 20008):
        world.holders.by_port[port] = Holder(DIGEST_B)
    picks = {world.claim(GRANT_B, None, rng=random.Random(seed)) for seed in range(200)}
    assert picks == {20003, 20005, 20007, 20009}  # 20001 is reserved for A


def test_random_picks_are_spread_over_the_free_ports_not_sequential():
    """Ports are drawn at random: over many picks every free port comes up and consecutive picks are not
    neighbours, so one tunnel's port says nothing about the next one's."""
    world = World(GRANT_B)
    rng = random.Random(2026)
    picks = [world.claim(GRANT_B, None, rng=rng) for _ in range(2000)]
    assert set(picks) == RANGE
    steps = Counter(abs(b - a) for a, b in zip(picks, picks[1:]))
    assert steps[1] < 100  # ~2 % of steps by chance; a sequential allocator would make almost every step 1


def test_random_picks_are_deterministic_given_the_rng():
    world = World(GRANT_B)
    assert world.claim(GRANT_B, None, rng=random.Random(5)) == world.claim(GRANT_B, None, rng=random.Random(5))


def test_an_open_relay_grant_may_take_any_unreserved_port():
    world = World(offered=RANGE)
    assert world.claim(OPEN_GRANT, 20042) == 20042


@given(st.sets(st.integers(20000, 20100)), st.sets(st.integers(20000, 20100), max_size=5),
       st.one_of(st.none(), st.integers(19990, 20110)), st.integers(0, 2**32))
def test_a_claimed_port_is_always_offered_free_and_not_someone_elses(held, reserved_for_a, requested, seed):
    world = World(Grant("a", DIGEST_A, reserved_ports=frozenset(reserved_for_a)), GRANT_B)
    for port in held:
        world.holders.by_port[port] = Holder(DIGEST_A)
    try:
        port = world.claim(GRANT_B, requested, rng=random.Random(seed))
    except HttpError as refused:
        assert refused.status in (400, 403, 409, 503)
        if requested is None:
            assert not RANGE - held - reserved_for_a
        return
    assert port in RANGE and port not in held and port not in reserved_for_a
    assert requested in (None, port)
