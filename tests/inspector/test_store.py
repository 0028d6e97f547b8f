"""The inspector's store: the newest N exchanges within a byte budget, listeners, filters."""

from __future__ import annotations

import pytest

from portway.inspector.capture import StreamCapture
from portway.inspector.store import Store, matches

from .test_capture import SWITCHED, UPGRADE, request, response


def exchange_through(store: Store, method="GET", path="/", status=200, body=b"") -> StreamCapture:
    capture = StreamCapture(store, store.new_connection())
    capture.to_service([request(method, path, body)], 1.0)
    if status is not None:
        capture.to_visitor(response(status, body), 2.0)
    return capture


def test_only_the_newest_exchanges_are_kept():
    store = Store(max_exchanges=5)
    for i in range(12):
        exchange_through(store, path=f"/{i}")
    assert [e.request.target for e in store.newest_first()] == [f"/{i}".encode() for i in range(11, 6, -1)]
    assert [e.id for e in store.newest_first()] == [12, 11, 10, 9, 8]
    assert store.get(1) is None and store.get(12) is not None


def test_the_byte_budget_lets_the_oldest_go_and_memory_stays_flat():
    store = Store(max_exchanges=500, max_bytes=10_000)
    for i in range(200):
        exchange_through(store, "POST", f"/{i}", body=bytes(1500))  # 3,000 bytes kept each
        assert store.kept <= 10_000
    assert len(store) == 3 and store.kept == 9000
    assert store.kept == sum(e.kept for e in store.newest_first())


def test_listeners_hear_added_changed_and_evicted():
    store = Store(max_exchanges=1)
    heard = []
    store.listen(lambda event, exchange: heard.append((event, exchange.id)))
    exchange_through(store, path="/a")
    exchange_through(store, path="/b")
    assert heard[0] == ("added", 1) and ("evicted", 1) in heard and ("added", 2) in heard
    assert ("changed", 2) in heard


def test_clearing_forgets_everything():
    store = Store()
    for _ in range(3):
        exchange_through(store, "POST", body=b"abc")
    store.clear()
    assert len(store) == 0 and store.kept == 0


@pytest.mark.parametrize("query, expected", [
    ({}, ["/ws", "/gone", "/missing", "/post", "/api/a"]),
    ({"method": "post"}, ["/post"]),
    ({"method": "WS"}, ["/ws"]),
    ({"status": "4xx"}, ["/missing"]),
    ({"status": "2xx"}, ["/post", "/api/a"]),
    ({"status": "404"}, ["/missing"]),
    ({"status": "pending"}, ["/gone"]),
    ({"path": "API"}, ["/api/a"]),
    ({"method": "GET", "status": "4xx", "path": "miss"}, ["/missing"]),
])
def test_filters(query, expected):
    store = Store()
    exchange_through(store, path="/api/a")
    exchange_through(store, "POST", "/post", body=b"x")
    exchange_through(store, path="/missing", status=404)
    exchange_through(store, path="/gone", status=None)
    ws = StreamCapture(store, store.new_connection())
    ws.to_service([UPGRADE.replace(b"/chat", b"/ws")], 1.0)
    ws.to_visitor(SWITCHED, 2.0)
    assert [e.request.target.decode() for e in store.select(**query)] == expected
    assert all(matches(e, **query) for e in store.select(**query))


def test_limits_must_make_sense():
    with pytest.raises(ValueError):
        Store(max_exchanges=0)
