"""The exchanges the inspector keeps: the newest `max_exchanges`, within `max_bytes` of kept bodies and messages.

Pure bookkeeping (no I/O, no clock): captures add exchanges and report what changed, listeners (the web
push) hear about it, oldest exchanges are let go first. An exchange let go while its stream is still being
captured is marked `evicted`, and its capture keeps nothing more, so memory stays bounded however long the
agent runs: at most `max_bytes` of bodies and messages here (plus, for exchanges still in flight, each
one's own `Limits`), and heads bounded by `Limits.max_head`.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Iterable

from .capture import Exchange

Listener = Callable[[str, Exchange], None]  # ("added" | "changed" | "evicted", exchange)

STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")


class Store:
    def __init__(self, max_exchanges: int = 500, max_bytes: int = 128 * 1024 * 1024) -> None:
        if max_exchanges < 1 or max_bytes < 0:
            raise ValueError("the inspector keeps at least one exchange and a non-negative number of bytes")
        self.max_exchanges = max_exchanges
        self.max_bytes = max_bytes
        self.kept = 0  # bytes of bodies and messages held by the exchanges kept
        self._exchanges: OrderedDict[int, Exchange] = OrderedDict()
        self._next_id = 1
        self._next_connection = 1
        self._listeners: list[Listener] = []

    def listen(self, listener: Listener) -> Callable[[], None]:
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def new_connection(self) -> int:
        number = self._next_connection
        self._next_connection += 1
        return number

    # the capture's sink
    def add(self, exchange: Exchange) -> None:
        exchange.id = self._next_id
        self._next_id += 1
        self._exchanges[exchange.id] = exchange
        self.kept += exchange.kept
        self._tell("added", exchange)
        self._evict()

    def changed(self, exchange: Exchange) -> None:
        if not exchange.evicted:
            self._tell("changed", exchange)

    def grew(self, exchange: Exchange, size: int) -> None:
        if exchange.evicted:
            return
        self.kept += size
        if self.kept > self.max_bytes:
            self._evict()

    # reading
    def get(self, exchange_id: int) -> Exchange | None:
        return self._exchanges.get(exchange_id)

    def __len__(self) -> int:
        return len(self._exchanges)

    def newest_first(self) -> Iterable[Exchange]:
        return reversed(self._exchanges.values())

    def select(self, method: str | None = None, status: str | None = None, path: str | None = None,
               limit: int | None = None) -> list[Exchange]:
        """Newest first, filtered as `matches` says."""
        found = []
        for exchange in self.newest_first():
            if matches(exchange, method, status, path):
                found.append(exchange)
                if limit is not None and len(found) >= limit:
                    break
        return found

    def clear(self) -> None:
        for exchange in list(self._exchanges.values()):
            self._drop(exchange)

    # internals
    def _evict(self) -> None:
        exchanges = self._exchanges
        while len(exchanges) > self.max_exchanges or (self.kept > self.max_bytes and len(exchanges) > 1):
            self._drop(next(iter(exchanges.values())))

    def _drop(self, exchange: Exchange) -> None:
        del self._exchanges[exchange.id]
        exchange.evicted = True
        self.kept -= exchange.kept
        self._tell("evicted", exchange)

    def _tell(self, event: str, exchange: Exchange) -> None:
        for listener in self._listeners:
            listener(event, exchange)


def matches(exchange: Exchange, method: str | None = None, status: str | None = None, path: str | None = None) -> bool:
    """`method`: a method name, or `WS` for WebSocket connections; `status`: a class (`2xx`), an exact code or
    `pending` (no response yet); `path`: text the request target contains (case-insensitive)."""
    if method:
        wanted = method.upper()
        if wanted == "WS":
            if exchange.websocket is None:
                return False
        elif exchange.request.method.upper() != wanted:
            return False
    if status:
        response = exchange.response
        wanted = status.lower()
        if wanted == "pending":
            if response is not None:
                return False
        elif response is None:
            return False
        elif wanted in STATUS_CLASSES:
            if response.status // 100 != int(wanted[0]):
                return False
        elif str(response.status) != wanted:
            return False
    if path and path.lower() not in exchange.request.target.decode("latin-1").lower():
        return False
    return True
