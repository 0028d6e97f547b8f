"""Tunnel names: the DNS-label rules with the message each refusal gives, and readable random names that are
plain adjective-noun pairs until those run short, then get a numeric suffix."""

from __future__ import annotations

import pytest

from portway.proto import names
import random

from portway.errors import InvalidName
from portway.proto.names import SYSTEM_NAMES, validate_name
from portway.proto.names import random_name as draw_name


def random_name(taken, attempts: int = 64) -> str:
    return draw_name(taken, random.Random(), attempts)

# every plain name random_name can draw (the word lists are private: a test may reserve all of them)
PLAIN = frozenset(f"{adjective}-{noun}" for adjective in names._ADJECTIVES for noun in names._NOUNS)


class Refusing:
    """A `taken` collection that says the first `count` names it is asked about are taken, and records them."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.asked: list[str] = []

    def __contains__(self, name: object) -> bool:
        self.asked.append(str(name))
        return len(self.asked) <= self.count


def suffixed(name: str) -> tuple[str, int]:
    pair, _, number = name.rpartition("-")
    assert pair in PLAIN and number.isdigit() and str(int(number)) == number, name
    return pair, int(number)


def test_plain_names_are_valid_and_none_is_a_system_name():
    assert len(PLAIN) > 2000
    assert all(validate_name(name) == name for name in PLAIN) and not PLAIN & SYSTEM_NAMES


def test_random_names_are_plain_pairs_while_those_are_free():
    assert all(random_name(set()) in PLAIN for _ in range(100))


def test_random_names_get_a_numeric_suffix_after_eight_plain_draws():
    taken = Refusing(8)
    name = random_name(taken)
    assert all(asked in PLAIN for asked in taken.asked[:8])
    assert taken.asked[8:] == [name]
    assert 0 <= suffixed(name)[1] < 10_000 and validate_name(name) == name


def test_random_names_skip_every_taken_plain_pair():
    for _ in range(20):
        name = random_name(PLAIN)
        assert name not in PLAIN and validate_name(name) == name
        suffixed(name)


def test_random_name_gives_up_after_its_attempts():
    taken = Refusing(10**9)
    with pytest.raises(RuntimeError, match="could not find a free random tunnel name"):
        random_name(taken)
    assert len(taken.asked) == 64
    short = Refusing(10**9)
    with pytest.raises(RuntimeError):
        random_name(short, attempts=3)
    assert len(short.asked) == 3


@pytest.mark.parametrize("raw, message", [
    ("", "a tunnel name can't be empty"),
    ("   ", "a tunnel name can't be empty"),
    ("a" * 64, "tunnel name is 64 characters long; the limit is 63"),
    ("a_b", "tunnel name 'a_b' is not a DNS label: use a-z, 0-9 and '-', not starting or ending with '-'"),
    ("-a", "tunnel name '-a' is not a DNS label"),
    ("WWW", "tunnel name 'www' is reserved for the relay itself"),
])
def test_each_refusal_says_what_is_wrong(raw, message):
    with pytest.raises(InvalidName) as refused:
        validate_name(raw)
    assert str(refused.value).startswith(message)
