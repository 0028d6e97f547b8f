"""The agent's terminal view (`portway http`), fed by the inspector's capture.

- `Tally`: plain counters and the last requests, kept up to date by the inspector store's listener
  (`Store.listen(tally.on_event)`); no I/O, no clock of its own, so it is unit-tested without a terminal. The
  agent's Prometheus metrics (agent/metrics.py) read the same counters.
- `plain_line` / `json_line`: one line per finished request (or closed WebSocket) when stderr is not a terminal.
- `AgentConsole`: the glue. On a terminal, a rich `Live` display (tunnel, relay, link state and RTT, open
  connections and WebSockets, request rate, bytes, the last requests, status messages); otherwise a line per
  request on stderr, and status messages printed as before.

Without the inspector (`--no-inspect`) there is no capture, hence no per-request events: the display shows the
URL and the link state only. Nothing here parses traffic.
"""

from __future__ import annotations

import json
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from ..metrics import DURATION_BUCKETS, Histogram

if TYPE_CHECKING:
    from ..inspector.capture import Exchange
    from .client import Agent

RECENT = 12  # requests the display lists
RATE_WINDOW = 10.0  # seconds the request rate is averaged over


@dataclass(frozen=True, slots=True)
class Finished:
    """One request as the console shows it, once answered (or its WebSocket closed)."""

    at: float  # seconds since the epoch: its first byte
    method: str
    path: str
    status: int | None  # None: no answer (see error)
    duration: float | None  # seconds: request's first byte to the answer's end (or the WebSocket's close)
    bytes_in: int  # request body bytes from the visitor
    bytes_out: int  # response body bytes to the visitor
    websocket: bool = False
    messages: int = 0  # WebSocket messages, both ways
    error: str | None = None


def finished(exchange: Exchange) -> Finished:
    request, response, log = exchange.request, exchange.response, exchange.websocket
    end = None
    if log is not None:
        end = log.closed
    elif response is not None:
        end = response.ended
    return Finished(
        at=request.started, method=request.method, path=request.target.decode("latin-1"),
        status=response.status if response is not None else None,
        duration=end - request.started if end is not None else None,
        bytes_in=request.body_size, bytes_out=response.body_size if response is not None else 0,
        websocket=log is not None, messages=sum(log.counts.values()) if log is not None else 0,
        error=exchange.error)


class Tally:
    """What the tunnel has carried, as seen by the capture: counters and the last requests."""

    def __init__(self, recent: int = RECENT, clock: Callable[[], float] = time.monotonic) -> None:
        # imported here: a tally exists only with the inspector on, and an agent without it never loads its modules
        from ..inspector.capture import SERVICE, VISITOR

        self.clock = clock
        self.answers = [0, 0, 0, 0, 0]  # by status class, index = status // 100 - 1
        self.unanswered = 0  # exchanges that ended without a response
        self.duration = Histogram(DURATION_BUCKETS)
        self.bytes_in = 0
        self.bytes_out = 0
        self.websockets_total = 0
        self.ws_messages = {VISITOR: 0, SERVICE: 0}  # counted when the WebSocket closes
        self.recent: deque[Finished] = deque(maxlen=recent)
        self.listeners: list[Callable[[Finished], None]] = []
        self._pending: dict[int, Exchange] = {}  # by the store's id
        self._websockets: set[int] = set()
        self._times: deque[float] = deque()  # when the last requests finished (clock), for the rate

    # what the display shows
    @property
    def in_progress(self) -> int:
        """Requests without their answer yet (open WebSockets not included)."""
        return len(self._pending) - len(self._websockets)

    @property
    def websockets_open(self) -> int:
        return len(self._websockets)

    @property
    def requests(self) -> int:
        return sum(self.answers) + self.unanswered

    def rate(self) -> float:
        """Requests finished per second over the last RATE_WINDOW seconds."""
        self._forget(self.clock())
        return len(self._times) / RATE_WINDOW

    # the store's listener
    def on_event(self, event: str, exchange: Exchange) -> None:
        if exchange.replay_of is not None:
            return  # the inspector's own replays never crossed the tunnel
        key = exchange.id
        if event == "added":
            self._pending[key] = exchange
        elif event == "evicted":  # let go by the store: nothing more will be heard of it
            self._pending.pop(key, None)
            self._websockets.discard(key)
            return
        if key not in self._pending:
            return
        log = exchange.websocket
        if log is not None and key not in self._websockets and log.closed is None:
            self._websockets.add(key)
            self.websockets_total += 1
        response = exchange.response
        if log is None and response is not None and response.status == 101 and exchange.error is None:
            return  # switching: its WebSocket log comes next, and the exchange ends when that closes
        if exchange.finished:
            del self._pending[key]
            self._websockets.discard(key)
            self._count(finished(exchange), exchange)

    def _count(self, done: Finished, exchange: Exchange) -> None:
        if done.status is None:
            self.unanswered += 1
        else:
            self.answers[min(max(done.status // 100, 1), 5) - 1] += 1
        if done.duration is not None and not done.websocket:
            self.duration.observe(done.duration)
        self.bytes_in += done.bytes_in
        self.bytes_out += done.bytes_out
        if exchange.websocket is not None:
            for sender, count in exchange.websocket.counts.items():
                self.ws_messages[sender] = self.ws_messages.get(sender, 0) + count
        self.recent.append(done)
        now = self.clock()
        self._times.append(now)
        self._forget(now)
        for listener in self.listeners:
            listener(done)

    def _forget(self, now: float) -> None:
        while self._times and self._times[0] < now - RATE_WINDOW:
            self._times.popleft()


# --------------------------------------------------------------------------------------------- formatting

def clock_time(at: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(at))


def human_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.1f}ms"
    return f"{seconds:.2f}s"


def human_bytes(size: int) -> str:
    if size < 1024:
        return f"{size}B"
    for unit in ("KiB", "MiB", "GiB"):
        size /= 1024
        if size < 1024 or unit == "GiB":
            return f"{size:.1f}{unit}"
    raise AssertionError("unreachable")


def plain_line(done: Finished) -> str:
    """`06:20:01 GET /path 200 12.3ms 1234B`; a WebSocket: `06:20:01 WS /live 101 closed 6 msgs`."""
    status = str(done.status) if done.status is not None else "---"
    if done.websocket:
        return f"{clock_time(done.at)} WS {done.path} {status} closed {done.messages} msgs"
    line = f"{clock_time(done.at)} {done.method} {done.path} {status} {human_duration(done.duration)} " \
           f"{done.bytes_out}B"
    if done.error and done.status is None:
        line += f" ({done.error})"
    return line


def json_line(done: Finished) -> str:
    record = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(done.at)) + f".{int(done.at % 1 * 1000):03d}Z",
        "method": "WS" if done.websocket else done.method,
        "path": done.path,
        "status": done.status,
        "duration_ms": round(done.duration * 1000, 3) if done.duration is not None else None,
        "bytes_in": done.bytes_in,
        "bytes_out": done.bytes_out,
    }
    if done.websocket:
        record["messages"] = done.messages
    if done.error:
        record["error"] = done.error
    return json.dumps(record, ensure_ascii=False)


@dataclass
class LinkView:
    """The link as the display states it."""

    state: str  # "connecting", "connected", "reconnecting"
    rtt: float | None = None
    reconnects: int = 0


def link_view(agent: "Agent | None") -> LinkView:
    if agent is None:
        return LinkView("connecting")
    session = agent.session
    if session is None:
        return LinkView("connecting", reconnects=agent.reconnects)
    if session.ended or session.parked:  # parked: its streams wait for the new link
        return LinkView("reconnecting", reconnects=agent.reconnects)
    return LinkView("connected", session.mux.last_rtt, agent.reconnects)


def summary_lines(urls: list[str], target: str, relay: str, link: LinkView, tally: Tally | None) -> list[str]:
    """The display's head, as plain text lines (the Live glue styles them)."""
    lines = [f"{url} → {target}" for url in urls] or [f"(waiting for the relay) → {target}"]
    lines.append(f"relay     {relay}")
    state = link.state + (f", rtt {link.rtt * 1000:.1f}ms" if link.rtt is not None else "")
    if link.reconnects:
        state += f", {link.reconnects} reconnect(s)"
    lines.append(f"link      {state}")
    if tally is None:
        lines.append("requests  not shown: the inspector is off (--no-inspect, or it could not start)")
        return lines
    lines.append(f"open      {tally.in_progress} request(s), {tally.websockets_open} WebSocket(s)")
    lines.append(f"requests  {tally.requests} total, {tally.rate():.1f}/s")
    lines.append(f"bytes     in {human_bytes(tally.bytes_in)}, out {human_bytes(tally.bytes_out)}")
    return lines


# ---------------------------------------------------------------------------------------------- the glue

class AgentConsole:
    """The agent's stderr: a rich Live display on a terminal (`live=True`), else a line per request."""

    def __init__(self, console, relay: str, target: str, tally: Tally | None, live: bool,
                 log_format: str = "text") -> None:
        self.console = console  # live: a rich Console on stderr; else anything with the `file` to write lines to
        self.relay = relay
        self.target = target
        self.tally = tally
        self.live_mode = live
        self.log_format = log_format
        self.agent: "Agent | None" = None
        self.urls: list[str] = []
        self.statuses: deque[str] = deque(maxlen=3)
        self._live = None
        if tally is not None:
            tally.listeners.append(self.request_done)

    def start(self) -> None:
        if not self.live_mode:
            return
        from rich.live import Live

        self._live = Live(console=self.console, get_renderable=self.render, refresh_per_second=4,
                          redirect_stdout=False, redirect_stderr=False, transient=False)
        self._live.start()

    def stop(self) -> None:
        if self._live is not None:
            live, self._live = self._live, None
            live.stop()

    # what the agent reports
    def url(self, url: str) -> None:
        self.urls.append(url)

    def status(self, text: str) -> None:
        if self._live is not None:
            self.statuses.append(f"{clock_time(time.time())} {text}")
            self._live.refresh()
        else:
            self.console.file.write(text + "\n")
            self.console.file.flush()

    def request_done(self, done: Finished) -> None:
        if self.live_mode:
            return  # the display's next refresh (4 a second) shows it; none after it stopped
        line = json_line(done) if self.log_format == "json" else plain_line(done)
        self.console.file.write(line + "\n")
        self.console.file.flush()

    # the display
    def render(self):
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        view = link_view(self.agent)
        head = summary_lines(self.urls, self.target, self.relay, view, self.tally)
        parts: list = []
        for number, line in enumerate(head):
            style = "bold green" if number < max(len(self.urls), 1) else None
            if line.startswith("link") and view.state != "connected":
                style = "yellow"
            parts.append(Text(line, style=style))
        if self.tally is not None:
            table = Table(box=None, show_header=True, header_style="bold", pad_edge=False, expand=False)
            for column, justify in (("time", "left"), ("method", "left"), ("path", "left"), ("status", "right"),
                                    ("duration", "right"), ("size", "right")):
                table.add_column(column, justify=justify, no_wrap=True, overflow="ellipsis",
                                 max_width=60 if column == "path" else None)
            for done in reversed(self.tally.recent):
                status = str(done.status) if done.status is not None else "---"
                style = "red" if done.status is None or done.status >= 500 else \
                    "yellow" if done.status >= 400 else None
                if done.websocket:
                    table.add_row(clock_time(done.at), "WS", done.path, f"{status} closed",
                                  human_duration(done.duration), f"{done.messages} msgs", style=style)
                else:
                    table.add_row(clock_time(done.at), done.method, done.path, status,
                                  human_duration(done.duration), human_bytes(done.bytes_out), style=style)
            parts.append(Text(""))
            parts.append(table)
        for status in self.statuses:
            parts.append(Text(status, style="dim"))
        return Group(*parts)
