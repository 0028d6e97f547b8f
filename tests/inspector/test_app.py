"""The inspector's settings and who its web server answers, without sockets."""

from __future__ import annotations

import pytest

from portway.config import inspect_address as parse_address
from portway.inspector.app import Inspector, InspectorConfig


@pytest.mark.parametrize("text, address", [
    ("4041", ("127.0.0.1", 4041)),
    ("127.0.0.1:0", ("127.0.0.1", 0)),
    ("localhost:5000", ("localhost", 5000)),
    ("[::1]:4040", ("::1", 4040)),
    ("[::1]", ("::1", 4040)),
    ("0.0.0.0:4040", ("0.0.0.0", 4040)),
    ("somehost", ("somehost", 4040)),
])
def test_addresses(text, address):
    assert parse_address(text) == address


@pytest.mark.parametrize("text", ["::1:4040", ":4040", "host:port", "host:70000", "[::1]x", "[]:1"])
def test_bad_addresses(text):
    with pytest.raises(ValueError):
        parse_address(text)


@pytest.mark.parametrize("fields", [{"port": 70000}, {"max_exchanges": 0}, {"max_body": -1}, {"replay_timeout": 0}])
def test_bad_settings(fields):
    with pytest.raises(ValueError):
        InspectorConfig(**fields)


def server(host: str, port: int = 4040):
    inspector = Inspector(InspectorConfig(host=host, port=port), "localhost", 8080)
    inspector.web.port = port
    inspector.web.bind_host = host
    return inspector.web


@pytest.mark.parametrize("host, allowed", [
    ("127.0.0.1:4040", True), ("localhost:4040", True), ("LocalHost:4040", True), ("[::1]:4040", True),
    ("127.0.0.1:4041", False), ("127.0.0.1", False), ("evil.example:4040", False), ("localhost.evil.example:4040", False),
    ("10.0.0.5:4040", False), ("", False), (None, False), ("127.0.0.1:4040\x00", False),
])
def test_a_loopback_inspector_answers_only_to_its_own_address(host, allowed):
    assert server("127.0.0.1").host_allowed(host) is allowed


@pytest.mark.parametrize("host, allowed", [
    ("10.0.0.5:4040", True), ("[fe80::1]:4040", True), ("127.0.0.1:4040", True),
    ("rebound.example:4040", False), ("10.0.0.5:4041", False),
])
def test_an_inspector_on_every_address_answers_to_ip_literals_only(host, allowed):
    assert server("0.0.0.0").host_allowed(host) is allowed


def test_origin_must_be_the_inspector_itself():
    web = server("127.0.0.1")
    assert web.origin_allowed("http://127.0.0.1:4040", "127.0.0.1:4040")
    assert web.origin_allowed("http://LOCALHOST:4040", "localhost:4040")
    assert not web.origin_allowed("http://localhost:4040", "127.0.0.1:4040")
    assert not web.origin_allowed("https://127.0.0.1:4040", "127.0.0.1:4040")
    assert not web.origin_allowed("null", "127.0.0.1:4040")
