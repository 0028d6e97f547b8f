"""The relay's Prometheus metrics (`portway server --metrics ADDR`).

The data path only adds to plain integers (a `TunnelCounters` per tunnel, one `RelayCounters` per relay); they
become metric families when Prometheus scrapes, through a prometheus-client custom collector (the library is
imported then, see portway/metrics.py). So a request costs
a few integer additions, not a labelled-metric lookup and a lock. Labels stay bounded: per-tunnel series exist
only for tunnels registered at scrape time, never per visitor or per path.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable, Final, Iterable, Mapping, TYPE_CHECKING

from ..metrics import DURATION_BUCKETS, STATUS_CLASSES, Collector, Histogram, exposition  # noqa: F401 (re-exported)

if TYPE_CHECKING:
    from .registry import Registry

log = logging.getLogger(__name__)

MAX_SCRAPE_REQUEST: Final = 8192  # bytes of request head the metrics listener reads before giving up


class TunnelCounters:
    """What one tunnel has served: answers by status class, bytes each way, upgraded connections."""

    __slots__ = ("answers", "bytes_from_visitors", "bytes_to_visitors", "websockets_open", "websockets_total",
                 "pool_waits")

    def __init__(self) -> None:
        self.answers = [0, 0, 0, 0, 0]  # index = status // 100 - 1
        self.bytes_from_visitors = 0
        self.bytes_to_visitors = 0
        self.websockets_open = 0
        self.websockets_total = 0
        self.pool_waits = 0  # visitors that waited for a free pool socket (localtunnel tunnels)


class RelayCounters:
    """Relay-wide counts that belong to no single tunnel."""

    def __init__(self) -> None:
        self.request_duration = Histogram(DURATION_BUCKETS)
        self.unrouted_requests = 0  # answered by the relay itself: its own pages, unknown hosts, bad requests
        self.auth_failures = {"token": 0, "basic": 0}
        self.protocol_errors = {"visitor": 0, "origin": 0, "link": 0}
        # 429s of the per-address limits (policy/admission.py): connections, new connections per second, upgrades
        self.refused_connections = {"connections": 0, "rate": 0, "upgraded": 0}
        # a cluster node's node links (relay/nodes.py): streams it opened to other nodes for its visitors ("out")
        # and accepted from them for its own tunnels ("in"); links that did not open, by why: this node could not
        # reach the other one or got no answer ("unreachable"), the other one refused it ("refused"), or this node
        # refused one ("rejected": a bad proof of the cluster secret, or its bound on links)
        self.forwarded_streams = {"out": 0, "in": 0}
        self.node_link_failures = {"unreachable": 0, "refused": 0, "rejected": 0, "untrusted": 0}

    @staticmethod
    def status_index(status: int) -> int:
        return min(max(status // 100, 1), 5) - 1


class RelayCollector:
    """Turns a relay's counters and registry into metric families at scrape time."""

    def __init__(self, counters: RelayCounters, registry: "Registry", visitor_connections: Callable[[], int],
                 node_links: Callable[[], dict[str, int]] | None = None) -> None:
        self.counters = counters
        self.registry = registry
        self.visitor_connections = visitor_connections
        self.node_links = node_links  # a cluster node's open node links by direction; None on a relay of its own

    def collect(self) -> Iterable:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        from .tunnels import AgentTunnel

        counters = self.counters
        tunnels = list(self.registry)
        by_kind = GaugeMetricFamily("portway_tunnels", "Tunnels registered, by kind", labels=["kind"])
        kinds: dict[str, int] = {}
        for tunnel in tunnels:
            kinds[tunnel.kind] = kinds.get(tunnel.kind, 0) + 1
        for kind in ("portway", "localtunnel"):
            by_kind.add_metric([kind], kinds.get(kind, 0))
        yield by_kind
        links = [tunnel for tunnel in tunnels if isinstance(tunnel, AgentTunnel) and tunnel.online]
        yield GaugeMetricFamily("portway_agent_links", "Agent links connected", value=len(links))
        yield GaugeMetricFamily("portway_visitor_connections", "Visitor connections open",
                                value=self.visitor_connections())
        requests = CounterMetricFamily("portway_requests", "Requests answered for a tunnel, by status class",
                                       labels=["tunnel", "status_class"])
        received = CounterMetricFamily("portway_received_bytes", "Request body bytes received from visitors",
                                       labels=["tunnel"])
        sent = CounterMetricFamily("portway_sent_bytes", "Answer bytes (heads and bodies) sent to visitors",
                                   labels=["tunnel"])
        pool_waits = CounterMetricFamily("portway_lt_pool_waits", "Visitors that waited for a free lt pool socket",
                                         labels=["tunnel"])
        upgrades = CounterMetricFamily("portway_websocket_connections", "Connections switched to WebSocket",
                                       labels=["tunnel"])
        open_upgrades = GaugeMetricFamily("portway_websocket_connections_open", "WebSocket connections open",
                                          labels=["tunnel"])
        rtt = GaugeMetricFamily("portway_link_rtt_seconds", "Last measured round trip of an agent link",
                                labels=["tunnel"])
        growth = CounterMetricFamily("portway_link_window_growth_bytes", "Bytes window auto-tuning added to the "
                                     "receive windows of an agent link's streams", labels=["tunnel"])
        for tunnel in tunnels:
            name, own = tunnel.name, tunnel.counters
            for status_class, count in zip(STATUS_CLASSES, own.answers):
                requests.add_metric([name, status_class], count)
            received.add_metric([name], own.bytes_from_visitors)
            sent.add_metric([name], own.bytes_to_visitors)
            upgrades.add_metric([name], own.websockets_total)
            open_upgrades.add_metric([name], own.websockets_open)
            if tunnel.kind == "localtunnel":
                pool_waits.add_metric([name], own.pool_waits)
            if isinstance(tunnel, AgentTunnel) and tunnel.online and tunnel.session is not None:
                mux = tunnel.session.mux
                if mux.last_rtt is not None:
                    rtt.add_metric([name], mux.last_rtt)
                growth.add_metric([name], mux.window_growth_total)
        yield from (requests, received, sent, upgrades, open_upgrades, rtt, growth, pool_waits)
        yield CounterMetricFamily("portway_unrouted_requests", "Requests the relay answered itself",
                                  value=counters.unrouted_requests)
        duration = counters.request_duration
        yield HistogramMetricFamily("portway_request_duration_seconds",
                                    "Time from a request's head to the end of its answer",
                                    buckets=duration.cumulative(), sum_value=duration.total)
        yield _by_label(CounterMetricFamily("portway_auth_failures", "Failed authentications", labels=["kind"]),
                        counters.auth_failures)
        yield _by_label(CounterMetricFamily("portway_protocol_errors", "Protocol errors, by who made them",
                                            labels=["peer"]), counters.protocol_errors)
        yield _by_label(CounterMetricFamily("portway_refused_connections", "Connections and upgrades refused by "
                                            "the per-address limits, by limit", labels=["limit"]),
                        counters.refused_connections)
        if self.node_links is not None:
            yield from self._node_link_families()

    def _node_link_families(self) -> Iterable:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        assert self.node_links is not None
        counters = self.counters
        yield _by_label(GaugeMetricFamily("portway_node_links", "Node links open: opened by this node to other nodes "
                                          "(out), accepted from them (in)", labels=["direction"]), self.node_links())
        yield _by_label(CounterMetricFamily("portway_forwarded_streams", "Streams over node links: opened to other "
                                            "nodes for this node's visitors (out), accepted for this node's tunnels "
                                            "(in)", labels=["direction"]), counters.forwarded_streams)
        yield _by_label(CounterMetricFamily("portway_node_link_failures", "Node links that did not open, by why",
                                            labels=["reason"]), counters.node_link_failures)


def _by_label(family, counts: Mapping[str, float]):
    """`family` with one sample per label value of `counts`."""
    for label, count in counts.items():
        family.add_metric([label], count)
    return family


async def serve_metrics(host: str, port: int, collector: Collector) -> asyncio.base_events.Server:
    """A listener of its own for Prometheus: GET /metrics, nothing else. Scraped in the relay's loop, so the
    counters are read between two callbacks, never mid-update."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            request_line = head.split(b"\r\n", 1)[0].split(b" ")
            if len(request_line) == 3 and request_line[0] in (b"GET", b"HEAD") and \
                    request_line[1].split(b"?")[0] == b"/metrics":
                body = exposition(collector)
                status, content_type = b"200 OK", b"text/plain; version=0.0.4; charset=utf-8"
            else:
                body, status, content_type = b"only /metrics is served here\n", b"404 Not Found", b"text/plain"
            writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Type: " + content_type + b"\r\nContent-Length: "
                         + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n")
            if request_line[0] != b"HEAD":
                writer.write(body)
            await writer.drain()
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(answer, host, port, limit=MAX_SCRAPE_REQUEST)
