"""Tunnel names: the DNS-label rules every name obeys, and readable random names."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from ..errors import InvalidName

if TYPE_CHECKING:
    import random

MAX_NAME_LENGTH = 63
_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")

# Labels the relay answers for itself under its domain; no tunnel may take them.
SYSTEM_NAMES = frozenset({"www", "api", "relay", "portway", "admin", "status", "metrics", "inspect", "_portway"})

_ADJECTIVES = (
    "quiet calm bold brave bright brisk clever cosmic crisp dapper eager fancy gentle golden happy hidden "
    "humble jolly keen lively lucky mellow merry mighty misty noble polite proud quick rapid silent silver "
    "sleepy smooth snowy solid sunny swift tidy tiny vivid warm wild wise witty young zesty amber azure coral"
).split()
_NOUNS = (
    "river forest meadow canyon harbor island lagoon valley summit glacier prairie desert breeze comet "
    "falcon otter badger heron lynx panda tiger walrus zebra maple cedar willow birch aspen lotus orchid "
    "pebble quartz ember spark thunder rain cloud moon star planet ocean delta fjord reef dune grove brook"
).split()


def validate_name(raw: str) -> str:
    """Case-fold and check a requested name; returns the canonical form or raises InvalidName."""
    name = raw.strip().lower()
    if not name:
        raise InvalidName("a tunnel name can't be empty")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidName(f"tunnel name is {len(name)} characters long; the limit is {MAX_NAME_LENGTH}")
    if not _LABEL.match(name):
        raise InvalidName(
            f"tunnel name {raw!r} is not a DNS label: use a-z, 0-9 and '-', not starting or ending with '-'"
        )
    if name in SYSTEM_NAMES:
        raise InvalidName(f"tunnel name {name!r} is reserved for the relay itself")
    return name


def random_name(taken: "set[str] | frozenset[str] | dict[str, object]", rng: random.Random,
                attempts: int = 64) -> str:
    """A readable name like `quiet-river`, with a numeric suffix once the plain pairs run short. `rng` is the
    source of randomness (the relay passes `secrets.SystemRandom()`: names must not be predictable)."""
    for attempt in range(attempts):
        name = f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"
        if attempt >= 8:
            name += f"-{rng.randrange(10_000)}"
        if name not in taken:
            return name
    raise RuntimeError("could not find a free random tunnel name")
