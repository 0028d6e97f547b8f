"""The relay's own pages: the status line and headers of each error page, what its HTML says (escaped), and the
landing page of the bare domain."""

from __future__ import annotations

import httptools
import pytest

from portway.proto.pages import REASONS, error_response, landing_page, page, reason


def parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    seen: dict = {"headers": {}, "body": b""}

    class Sink:
        def on_header(self, name, value):
            seen["headers"][name.decode().lower()] = value.decode()

        def on_body(self, body):
            seen["body"] += body

        def on_message_complete(self):
            seen["complete"] = True

    parser = httptools.HttpResponseParser(Sink())
    parser.feed_data(raw)
    assert seen.get("complete"), "not one complete response"
    return parser.get_status_code(), seen["headers"], seen["body"]


@pytest.mark.parametrize("status", sorted(REASONS))
def test_error_page_status_line_and_title(status):
    raw = error_response(status, "why")
    assert raw.startswith(f"HTTP/1.1 {status} {REASONS[status]}\r\n".encode())
    code, headers, body = parse(raw)
    assert code == status and int(headers["content-length"]) == len(body)
    assert headers["content-type"] == "text/html; charset=utf-8" and headers["cache-control"] == "no-store"
    assert f"<title>{status} {REASONS[status]}</title>".encode() in body
    assert f"<h1>{status} {REASONS[status]}</h1>".encode() in body and b"<p>why</p>" in body


def test_unknown_status_is_called_error():
    assert reason(599) == "Error" and error_response(599, "x").startswith(b"HTTP/1.1 599 Error\r\n")


def test_error_page_keeps_or_closes_the_connection_and_adds_headers():
    assert parse(error_response(404, "x"))[1]["connection"] == "keep-alive"
    _, headers, _ = parse(error_response(401, "x", close=True, extra_headers=[("WWW-Authenticate", 'Basic realm="t"')]))
    assert headers["connection"] == "close" and headers["www-authenticate"] == 'Basic realm="t"'


def test_everything_shown_is_escaped():
    body = page('<img src=x onerror=alert(1)>', 'host "<script>alert(1)</script>" & more')
    assert b"<script>" not in body and b"<img" not in body
    assert b"&lt;img src=x onerror=alert(1)&gt;" in body
    assert b"host &quot;&lt;script&gt;alert(1)&lt;/script&gt;&quot; &amp; more" in body
    assert body.startswith(b"<!doctype html>") and body.endswith(b"</html>")


def test_landing_page_names_the_domain_and_how_to_start_a_tunnel():
    raw = landing_page("relay.example.com", ":8000", 3)
    assert raw.startswith(b"HTTP/1.1 200 OK\r\n")
    code, headers, body = parse(raw)
    assert code == 200 and headers["connection"] == "keep-alive"
    assert b"<title>Portway relay</title>" in body
    assert b"This relay serves 3 tunnel(s) at NAME.relay.example.com:8000." in body
    assert b"Start one with: portway http 8080 --relay http://relay.example.com:8000" in body
