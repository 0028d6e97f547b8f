"""The relay's counters become a valid exposition (relay/metrics.py), without sockets."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from portway.relay.metrics import DURATION_BUCKETS, Histogram, RelayCollector, RelayCounters, exposition
from portway.relay.registry import MemoryRegistry
from portway.relay.tunnels import Tunnel


def test_histogram_buckets_are_cumulative_and_bounded_by_le():
    histogram = Histogram((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 3.0):
        histogram.observe(value)
    assert histogram.cumulative() == [("0.1", 2), ("1.0", 3), ("+Inf", 4)]
    assert histogram.total == 3.65 and histogram.observations == 4


def test_status_classes():
    assert [RelayCounters.status_index(s) for s in (101, 200, 304, 404, 503, 0, 999)] == [0, 1, 2, 3, 4, 0, 4]


class OfflineTunnel(Tunnel):
    kind = "portway"
    online = False


def test_exposition_names_registered_tunnels_only():
    registry = MemoryRegistry()
    registry.add(OfflineTunnel("alpha"))
    alpha = registry.get("alpha")
    alpha.counters.answers[1] += 3
    alpha.counters.bytes_to_visitors += 42
    counters = RelayCounters()
    counters.request_duration.observe(0.02)
    counters.refused_connections["rate"] += 2
    text = exposition(RelayCollector(counters, registry, lambda: 7)).decode()
    values = {(s.name, tuple(sorted(s.labels.items()))): s.value
              for family in text_string_to_metric_families(text) for s in family.samples}
    assert values[("portway_requests_total", (("status_class", "2xx"), ("tunnel", "alpha")))] == 3
    assert values[("portway_sent_bytes_total", (("tunnel", "alpha"),))] == 42
    assert values[("portway_visitor_connections", ())] == 7
    assert values[("portway_agent_links", ())] == 0
    assert values[("portway_refused_connections_total", (("limit", "rate"),))] == 2
    assert values[("portway_refused_connections_total", (("limit", "upgraded"),))] == 0
    assert values[("portway_request_duration_seconds_count", ())] == 1
    assert len([key for key in values if key[0] == "portway_request_duration_seconds_bucket"]) == \
        len(DURATION_BUCKETS) + 1
    assert {dict(labels).get("tunnel") for _, labels in values} <= {None, "alpha"}
