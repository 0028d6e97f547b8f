"""Who may take which name (policy/claims.py), without a relay: order of checks, reserved names, quotas, taken
names, and random names that avoid everything held or reserved."""

from __future__ import annotations

import random

import pytest

from portway.auth import FailureThrottle, Grant, TokenBook, hash_token
from portway.errors import HttpError
from portway.policy.claims import Claim, claim
from portway.proto.names import random_name

DIGEST_A = hash_token("alpha-secret")
DIGEST_B = hash_token("beta-secret")
GRANT_A = Grant("a", DIGEST_A, frozenset({"reserved-a"}), 2)
GRANT_B = Grant("b", DIGEST_B)


class Holder:
    def __init__(self, owner: str) -> None:
        self.owner = owner


class Holders(dict):
    """The registry view claim() reads: name → holder."""

    def names(self) -> frozenset[str]:
        return frozenset(self)

    def held_by(self, owner: str) -> int:
        return sum(1 for holder in self.values() if holder.owner == owner)

    grace_ends: dict[str, float] = {}

    def frees_at(self, name: str) -> float | None:
        return self.grace_ends.get(name)


class World:
    def __init__(self, *grants: Grant) -> None:
        self.tokens = TokenBook(list(grants))
        self.throttle = FailureThrottle()
        self.holders = Holders()
        self.now = 0.0

    def claim(self, token, requested, peer="198.51.100.7", may_replace=lambda holder: False,
              rng: random.Random | None = None) -> Claim:
        return claim(tokens=self.tokens, throttle=self.throttle, holders=self.holders, token=token, peer_ip=peer,
                     requested=requested, may_replace=may_replace, now=self.now, rng=rng or random.Random(7))

    def refusal(self, token, requested, peer="198.51.100.7") -> tuple[int, str]:
        with pytest.raises(HttpError) as refused:
            self.claim(token, requested, peer)
        return refused.value.status, refused.value.message


def test_token_is_checked_before_the_name():
    world = World(GRANT_A, GRANT_B)
    for name in ("reserved-a", "../etc", "www", "free"):
        assert world.refusal("wrong", name, peer=f"203.0.113.{len(name)}") == (
            401, "the token was not accepted by this relay")
    assert world.refusal(None, "free", peer="203.0.113.99")[0] == 401


def test_guessing_address_is_throttled_even_with_the_right_token():
    world = World(GRANT_A)
    for _ in range(10):
        assert world.refusal("guess", "x", peer="192.0.2.1")[0] == 401
    assert world.refusal("alpha-secret", "x", peer="192.0.2.1")[0] == 429
    assert world.claim("alpha-secret", "x", peer="192.0.2.2").name == "x"
    world.now += 61  # the throttle's window has passed
    assert world.claim("alpha-secret", "x", peer="192.0.2.1").name == "x"


@pytest.mark.parametrize("requested, status, message", [
    ("reserved-a", 403, "reserved for another token"),
    ("admin", 400, "reserved for the relay itself"),
    ("_portway", 400, "not a DNS label"),
    ("../etc", 400, "not a DNS label"),
    ("a" * 64, 400, "the limit is 63"),
])
def test_names_a_token_may_not_take(requested, status, message):
    code, text = World(GRANT_A, GRANT_B).refusal("beta-secret", requested)
    assert code == status and message in text


def test_reserved_name_for_its_owner_and_case_folding():
    assert World(GRANT_A, GRANT_B).claim("alpha-secret", "Reserved-A") == Claim("reserved-a", GRANT_A)


def test_random_names_skip_reserved_and_taken_ones():
    """A random pick that would land on a reserved or a held name draws again: the rng is seeded so that the
    first names it would give are exactly the ones reserved and held."""
    first, second = random_name(set(), random.Random(11)), None
    rng = random.Random(11)
    random_name(set(), rng)
    second = random_name(set(), rng)
    world = World(Grant("r", DIGEST_A, frozenset({first})), GRANT_B)
    world.holders[second] = Holder(DIGEST_B)
    name = world.claim("beta-secret", None, rng=random.Random(11)).name
    assert name not in (first, second)
    assert world.claim("beta-secret", None, rng=random.Random(11)).name == name  # deterministic given the rng


def test_max_tunnels_per_token():
    world = World(GRANT_A, GRANT_B)
    for name in ("one", "two"):
        world.holders[name] = Holder(DIGEST_A)
    code, text = world.refusal("alpha-secret", "three")
    assert code == 403 and "may hold 2 tunnel(s)" in text
    assert world.claim("beta-secret", "three").name == "three"  # quotas are per token
    # taking back one's own name is not a new tunnel
    assert world.claim("alpha-secret", "two", may_replace=lambda holder: True).name == "two"


def test_live_name_is_not_replaced_without_proof():
    world = World(GRANT_B)
    world.holders["taken"] = Holder(DIGEST_B)
    assert world.refusal("beta-secret", "taken")[0] == 409
    assert world.claim("beta-secret", "taken", may_replace=lambda holder: holder.owner == DIGEST_B).name == "taken"


def test_random_names_skip_reserved_ones():
    """A token reserved every name random_name draws plainly: another token's random names all come from past
    them (a numeric suffix), never from the reserved ones, and they are still that token's."""
    from tests.proto.test_names import PLAIN, suffixed

    world = World(Grant("hoarder", DIGEST_A, PLAIN), GRANT_B)
    for seed in range(10):
        claimed = world.claim("beta-secret", None, rng=random.Random(seed))
        assert claimed.grant is GRANT_B and claimed.name not in PLAIN
        suffixed(claimed.name)


def test_random_names_skip_names_in_use():
    from tests.proto.test_names import PLAIN, suffixed

    world = World(GRANT_B)
    for name in PLAIN:
        world.holders[name] = Holder(DIGEST_B)
    name = world.claim("beta-secret", None).name
    assert name not in world.holders
    suffixed(name)


def test_a_name_in_its_grace_period_says_when_it_frees():
    world = World(GRANT_A, GRANT_B)
    world.holders["dropped"] = Holder(DIGEST_B)
    world.holders.grace_ends = {"dropped": 107.2}
    world.now = 100.0
    status, message = world.refusal("alpha-secret", "dropped")
    assert status == 409 and "its link dropped" in message and "free in 8 s" in message


def test_an_agent_of_the_same_token_takes_back_a_name_whose_link_is_down():
    """A crashed agent's restart has no resume key; its token proves the name is its own."""
    world = World(GRANT_A, GRANT_B)
    world.holders["mine"] = Holder(DIGEST_A)
    assert world.refusal("alpha-secret", "mine")[0] == 409, "online: only the resume key replaces it"
    world.holders["other"] = Holder(DIGEST_A)
    world.holders.grace_ends = {"mine": 300.0}
    assert world.refusal("alpha-secret", "third")[0] == 403, "the quota of 2 is full"
    assert world.claim("alpha-secret", "mine").name == "mine", "taking one's own name back is no new tunnel"
    assert world.refusal("beta-secret", "mine")[0] == 409, "another token waits for the lease to end"


def test_on_an_open_relay_only_the_resume_key_takes_back_a_name():
    world = World()
    world.holders["dropped"] = Holder("")
    world.holders.grace_ends = {"dropped": 300.0}
    assert world.refusal(None, "dropped")[0] == 409
