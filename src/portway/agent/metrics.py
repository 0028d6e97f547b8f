"""The agent's Prometheus metrics, served at `/metrics` on the inspector's port.

As in the relay (relay/metrics.py): the capture's store listener only adds to plain integers (the console's
`Tally`); they become metric families when Prometheus scrapes, through a prometheus-client custom collector
(imported then).
No per-path or per-visitor labels. Without the inspector there is no capture, and no `/metrics`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

from ..inspector.capture import SERVICE, VISITOR
from ..metrics import STATUS_CLASSES, exposition

if TYPE_CHECKING:
    from .client import Agent
    from .console import Tally

__all__ = ["AgentCollector", "exposition"]


class AgentCollector:
    """An agent's tally and link, as metric families at scrape time."""

    def __init__(self, tally: "Tally", agent: "Agent") -> None:
        self.tally = tally
        self.agent = agent

    def collect(self) -> Iterable:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        tally, agent = self.tally, self.agent
        requests = CounterMetricFamily("portway_agent_requests", "Requests answered through the tunnel, by status "
                                       "class (none: ended without an answer)", labels=["status_class"])
        for status_class, count in zip(STATUS_CLASSES, tally.answers):
            requests.add_metric([status_class], count)
        requests.add_metric(["none"], tally.unanswered)
        yield requests
        duration = tally.duration
        yield HistogramMetricFamily("portway_agent_request_duration_seconds",
                                    "Time from a request's first byte to the end of its answer, at the agent",
                                    buckets=duration.cumulative(), sum_value=duration.total)
        yield CounterMetricFamily("portway_agent_received_bytes", "Request body bytes from visitors",
                                  value=tally.bytes_in)
        yield CounterMetricFamily("portway_agent_sent_bytes", "Response body bytes to visitors",
                                  value=tally.bytes_out)
        yield GaugeMetricFamily("portway_agent_requests_in_progress", "Requests not answered yet",
                                value=tally.in_progress)
        yield CounterMetricFamily("portway_agent_websocket_connections", "Connections switched to WebSocket",
                                  value=tally.websockets_total)
        yield GaugeMetricFamily("portway_agent_websocket_connections_open", "WebSocket connections open",
                                value=tally.websockets_open)
        messages = CounterMetricFamily("portway_agent_websocket_messages",
                                       "WebSocket messages of closed connections, by sender", labels=["sender"])
        for sender in (VISITOR, SERVICE):
            messages.add_metric([sender], tally.ws_messages.get(sender, 0))
        yield messages
        session = agent.session
        connected = session is not None and not session.ended
        yield GaugeMetricFamily("portway_agent_link_up", "1 while the link to the relay is connected, else 0",
                                value=1 if connected else 0)
        rtt = GaugeMetricFamily("portway_agent_link_rtt_seconds", "Last measured round trip of the link")
        if connected and session.mux.last_rtt is not None:
            rtt.add_metric([], session.mux.last_rtt)
        yield rtt
        yield CounterMetricFamily("portway_agent_reconnects", "Links to the relay re-established after a drop",
                                  value=agent.reconnects)
