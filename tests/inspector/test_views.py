"""What the inspector's API shows of an exchange (bodies, how they render), diffs, HAR, and replay requests."""

from __future__ import annotations

import base64
import gzip
import json
import zlib

import pytest

from portway.inspector import views
from portway.inspector.capture import Limits, StreamCapture
from portway.inspector.diff import diff
from portway.inspector.har import har
from portway.inspector.replay import ReplayError, build_request
from portway.inspector.store import Store

from .test_capture import SWITCHED, UPGRADE, request, response, service_frames, visitor_frames


def captured(req: bytes, resp: bytes | None, limits: Limits | None = None, store: Store | None = None):
    store = store if store is not None else Store()
    capture = StreamCapture(store, 1, limits)
    capture.to_service([req], 10.0)
    if resp is not None:
        capture.to_visitor(resp, 10.25)
    return capture.last


@pytest.mark.parametrize("content_type, body, kind", [
    ("application/json", b'{"a": [1, 2]}', "json"),
    ("application/problem+json", b"[]", "json"),
    ("", b'{"untyped": true}', "json"),
    ("application/x-www-form-urlencoded", b"a=1&b=two+words&c=", "form"),
    ("text/plain", "héllo".encode(), "text"),
    ("image/png", b"\x89PNG\r\n\x1a\n", "image"),
    ("application/octet-stream", bytes(range(256)), "binary"),
    ("text/plain", b"", "empty"),
])
def test_body_views(content_type, body, kind):
    headers = [(b"Content-Type", content_type.encode())] if content_type else []
    assert views.body_view(headers, body, False)["kind"] == kind


def test_json_is_pretty_printed():
    view = views.body_view([(b"Content-Type", b"application/json")], b'{"a":[1,2],"b":{"c":null}}', False)
    assert view["pretty"] == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": {\n    "c": null\n  }\n}'


def test_a_json_syntax_error_says_where_it_is():
    view = views.body_view([(b"Content-Type", b"application/json")], b'{\n  "a": 1,\n  "b": tru\n}', False)
    assert view["kind"] == "json" and "pretty" not in view
    assert view["error"]["line"] == 3 and view["error"]["column"] == 8 and view["error"]["offset"] == 19


def test_forms_are_decoded():
    urlencoded = views.body_view([(b"Content-Type", b"application/x-www-form-urlencoded")], b"q=a+b&x=%2F", False)
    assert urlencoded["fields"] == [["q", "a b"], ["x", "/"]]
    multipart = (b"--XyZ\r\nContent-Disposition: form-data; name=\"title\"\r\n\r\nHello\r\n"
                 b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.bin\"\r\n"
                 b"Content-Type: application/octet-stream\r\n\r\n\x00\x01\x02\r\n--XyZ--\r\n")
    view = views.body_view([(b"Content-Type", b"multipart/form-data; boundary=XyZ")], multipart, False)
    assert view["fields"] == [["title", "Hello"], ["file", "[file a.bin, 3 bytes, application/octet-stream]"]]


@pytest.mark.parametrize("coding, compress", [
    ("gzip", lambda data: gzip.compress(data)),
    ("deflate", lambda data: zlib.compress(data)),
])
def test_gzip_and_deflate_bodies_are_shown_decoded(coding, compress):
    headers = [(b"Content-Type", b"application/json"), (b"Content-Encoding", coding.encode())]
    view = views.body_view(headers, compress(b'{"zipped": true}'), False)
    assert view == {"kind": "json", "pretty": '{\n  "zipped": true\n}', "text": '{"zipped": true}', "decoded": coding}
    # a body that isn't what its Content-Encoding says is shown as it is
    assert views.body_view(headers, b"not gzip at all", False)["kind"] == "json"


def test_binary_is_a_hex_dump():
    dump = views.hex_dump(b"Hello, world!\x00\x01\x02\xff" + b"A")
    assert dump.splitlines() == [
        "00000000  48 65 6c 6c 6f 2c 20 77  6f 72 6c 64 21 00 01 02  |Hello, world!...|",
        "00000010  ff 41                                             |.A|",
    ]


def test_bodies_travel_as_text_or_base64():
    assert views.encode_body("ünïcode".encode(), False) == ("ünïcode", False)
    assert views.encode_body(b"\xff\xfe", False) == (base64.b64encode(b"\xff\xfe").decode(), True)
    # a prefix cut inside a character is still text
    assert views.encode_body("ab€".encode()[:-1], True) == ("ab", False)


def test_detail_has_what_the_api_promises():
    exchange = captured(request("POST", "/orders?id=7&debug", b'{"n": 1}', ("Content-Type: application/json",
                                                                           "Cookie: s=secret")),
                        response(201, b"created", ("Content-Type: text/plain",)))
    shown = views.detail(exchange)
    assert {"id", "method", "path", "status", "duration_ms", "websocket"} <= set(shown)
    assert (shown["method"], shown["path"], shown["status"], shown["websocket"]) == ("POST", "/orders?id=7&debug", 201, False)
    assert shown["duration_ms"] == 250.0 and shown["remote_addr"] == "203.0.113.9"
    assert shown["request"]["query"] == [["id", "7"], ["debug", ""]]
    assert ["Cookie", "s=secret"] in shown["request"]["headers"]
    assert shown["request"]["body"] == '{"n": 1}' and shown["request"]["body_base64"] is False
    assert shown["response"]["body"] == "created" and shown["response"]["headers"][0] == ["Content-Type", "text/plain"]
    assert shown["request"]["raw_head"].startswith("POST /orders?id=7&debug HTTP/1.1\r\nHost: demo.localhost:8000\r\n")
    assert shown["timing"]["total_ms"] == 250.0
    json.dumps(shown)


def test_websocket_detail_lists_messages():
    store = Store()
    capture = StreamCapture(store, 1)
    capture.to_service([UPGRADE], 1.0)
    capture.to_visitor(SWITCHED, 1.1)
    capture.to_service([bytes(visitor_frames().send_data("hello"))], 1.2)
    capture.to_visitor(bytes(service_frames().send_data(b"\x01\x02")), 1.3)
    capture.to_visitor(bytes(service_frames().close(4000, "done")), 1.4)
    shown = views.detail(capture.last)
    assert shown["websocket"] is True
    assert [(m["from"], m["kind"], m.get("text"), m.get("data")) for m in shown["messages"]] == [
        ("visitor", "text", "hello", None), ("service", "binary", None, "AQI="), ("service", "close", None, None)]
    assert shown["messages"][2]["close_code"] == 4000 and shown["messages"][2]["close_reason"] == "done"
    json.dumps(shown)


def test_diff_marks_changed_added_and_removed_headers_and_body_lines():
    store = Store()
    a = captured(request(), response(200, b'{"x": 1, "y": 2}', ("Content-Type: application/json", "ETag: 1", "Old: o")), store=store)
    b = captured(request(), response(404, b'{"y": 2, "x": 3}', ("Content-Type: application/json", "ETag: 2", "New: n")), store=store)
    shown = diff(a, b)
    assert shown["status"] == {"a": 200, "b": 404, "changed": True}
    changes = {row["name"]: row["change"] for row in shown["headers"]}
    assert changes == {"Content-Type": "same", "ETag": "changed", "Old": "removed", "Content-Length": "same", "New": "added"}
    lines = [(line["op"], line["text"]) for line in shown["body"]]
    assert ("-", '  "x": 1,') in lines and ("+", '  "x": 3,') in lines and (" ", '  "y": 2') in lines
    assert diff(a, a)["body_same"] is True


def test_diff_compares_json_bodies_whatever_their_layout_or_content_type():
    store = Store()
    a = captured(request(), response(200, b'{"b": 1, "a": [1, 2]}', ("Content-Type: application/json",)), store=store)
    b = captured(request(), response(200, b'{"a":[1,2],"b":1}', ("Content-Type: text/plain",)), store=store)
    shown = diff(a, b)
    assert shown["body_same"] is True
    assert {row["name"]: row["change"] for row in shown["headers"]}["Content-Type"] == "changed"


def test_har_has_the_fields_devtools_import():
    store = Store()
    captured(request("POST", "/form?q=1", b"a=1&b=2", ("Content-Type: application/x-www-form-urlencoded", "Cookie: s=1; t=2")),
             response(302, b"", ("Location: /next", "Set-Cookie: s=3; Path=/")), store=store)
    captured(request("GET", "/blob"), response(200, b"\xff\x00", ("Content-Type: application/octet-stream",)), store=store)
    log = json.loads(json.dumps(har(store.select())))["log"]
    assert log["version"] == "1.2" and log["creator"]["name"]
    first, second = log["entries"]
    for entry in log["entries"]:
        assert {"startedDateTime", "time", "request", "response", "cache", "timings"} <= set(entry)
        assert {"method", "url", "httpVersion", "cookies", "headers", "queryString", "headersSize", "bodySize"} <= set(entry["request"])
        assert {"status", "statusText", "httpVersion", "cookies", "headers", "content", "redirectURL", "headersSize",
                "bodySize"} <= set(entry["response"])
        assert all(entry["timings"][key] >= 0 for key in ("send", "wait", "receive"))
        assert entry["startedDateTime"].endswith("Z")
    assert first["request"]["url"] == "http://demo.localhost:8000/form?q=1"
    assert first["request"]["queryString"] == [{"name": "q", "value": "1"}]
    assert first["request"]["postData"]["params"] == [{"name": "a", "value": "1"}, {"name": "b", "value": "2"}]
    assert first["request"]["cookies"] == [{"name": "s", "value": "1"}, {"name": "t", "value": "2"}]
    assert first["response"]["redirectURL"] == "/next"
    assert first["response"]["cookies"] == [{"name": "s", "value": "3"}]
    assert second["response"]["content"] == {"size": 2, "mimeType": "application/octet-stream", "text": "/wA=",
                                             "encoding": "base64"}


def test_replay_rebuilds_the_request_as_it_was():
    original = request("POST", "/api?x=1", b"payload", ("Content-Type: text/plain",))
    exchange = captured(original, None)
    rebuilt = build_request(exchange)
    assert rebuilt.startswith(b"POST /api?x=1 HTTP/1.1\r\nHost: demo.localhost:8000\r\n")
    assert b"Content-Type: text/plain\r\n" in rebuilt and rebuilt.endswith(b"Content-Length: 7\r\n\r\npayload")


def test_replay_applies_edits_and_reframes_the_body():
    exchange = captured(request("POST", "/api", b"old", chunked=True), None)
    rebuilt = build_request(exchange, {"method": "put", "path": "/other?y=2",
                                       "headers": [["Host", "h"], ["X-Edit", "yes"], ["Transfer-Encoding", "chunked"]],
                                       "body": base64.b64encode(b"\x00new").decode(), "body_base64": True})
    assert rebuilt == b"PUT /other?y=2 HTTP/1.1\r\nHost: h\r\nX-Edit: yes\r\nContent-Length: 4\r\n\r\n\x00new"


@pytest.mark.parametrize("edits, status", [
    ({"method": "GE T"}, 400),
    ({"path": "no-slash"}, 400),
    ({"path": "/a b"}, 400),
    ({"headers": [["X", "a\r\nInjected: 1"]]}, 400),
    ({"headers": [["Bad Name", "v"]]}, 400),
    ({"headers": [["X", "no host"]]}, 400),
    ({"body": 5}, 400),
    ({"body": "***", "body_base64": True}, 400),
    ({"colour": "blue"}, 400),
])
def test_bad_edits_are_refused(edits, status):
    exchange = captured(request("GET", "/"), None)
    with pytest.raises(ReplayError) as refused:
        build_request(exchange, edits)
    assert refused.value.status == status


def test_a_truncated_body_is_not_replayed_unless_replaced():
    exchange = captured(request("POST", "/", b"x" * 100), None, Limits(max_body=10))
    with pytest.raises(ReplayError) as refused:
        build_request(exchange)
    assert refused.value.status == 409
    assert build_request(exchange, {"body": "short"}).endswith(b"\r\n\r\nshort")


def test_a_websocket_is_not_replayed():
    store = Store()
    capture = StreamCapture(store, 1)
    capture.to_service([UPGRADE], 1.0)
    capture.to_visitor(SWITCHED, 1.1)
    with pytest.raises(ReplayError):
        build_request(capture.last)
