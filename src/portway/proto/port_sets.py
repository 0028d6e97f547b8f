"""Sets of TCP ports as people write them: `20000-20100`, `20001,20005`, or both mixed (`20000-20010,20050`).

The relay's `--tcp-ports` and the messages that name it use this one notation, in both directions.
"""

from __future__ import annotations

from typing import Iterable


def parse_port_set(text: str) -> frozenset[int]:
    """The ports `text` names: comma-separated items, each a port or an inclusive range `LOW-HIGH`, 1-65535."""
    ports: set[int] = set()
    for item in text.split(","):
        item = item.strip()
        if not item:
            raise ValueError(f"{text!r} has an empty item: write ports and ranges separated by commas, "
                             f"e.g. 20000-20100 or 20001,20005")
        low_text, dash, high_text = item.partition("-")
        low, high = _port(low_text.strip(), item), _port(high_text.strip(), item) if dash else None
        if high is None:
            ports.add(low)
        elif low > high:
            raise ValueError(f"{item!r} is not a range: its first port is above its last")
        else:
            ports.update(range(low, high + 1))
    return frozenset(ports)


def _port(text: str, item: str) -> int:
    if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError(f"{item!r} is not a port (1-65535) or a range of ports like 20000-20100")
    return int(text)


def describe_port_set(ports: Iterable[int]) -> str:
    """`ports` in the notation :func:`parse_port_set` reads: runs of consecutive ports as ranges, in ascending
    order (empty for no ports)."""
    runs: list[list[int]] = []  # [first, last] of each run of consecutive ports
    for port in sorted(ports):
        if runs and port == runs[-1][1] + 1:
            runs[-1][1] = port
        else:
            runs.append([port, port])
    return ",".join(str(first) if first == last else f"{first}-{last}" for first, last in runs)
