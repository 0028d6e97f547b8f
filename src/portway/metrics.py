"""Prometheus plumbing shared by the relay's metrics (relay/metrics.py) and the agent's (agent/metrics.py):
plain-integer histograms, the status classes and duration buckets, and the text exposition of a collector.

prometheus-client is imported at the first scrape, not at start: it and what it pulls in (wsgiref, http.server,
email) are 4 MiB of a relay's or agent's resident memory, and most never serve /metrics.
"""

from __future__ import annotations

from typing import Iterable, Protocol

STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Histogram:
    """Bucket counts for one unlabelled histogram, kept as plain integers."""

    __slots__ = ("bounds", "counts", "total", "observations")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.total = 0.0
        self.observations = 0

    def observe(self, value: float) -> None:
        index = 0
        for bound in self.bounds:  # a dozen bounds, most values in the first few: cheaper than calling bisect
            if value <= bound:
                break
            index += 1
        self.counts[index] += 1
        self.total += value
        self.observations += 1

    def cumulative(self) -> list[tuple[str, int]]:
        buckets: list[tuple[str, int]] = []
        running = 0
        for bound, count in zip((*map(repr, self.bounds), "+Inf"), self.counts):
            running += count
            buckets.append((bound, running))
        return buckets


class Collector(Protocol):
    """What prometheus-client's registry takes: an object whose collect() yields metric families."""

    def collect(self) -> Iterable: ...


def exposition(collector: Collector) -> bytes:
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return generate_latest(registry)
