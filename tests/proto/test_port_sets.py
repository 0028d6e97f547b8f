"""The port-set notation of --tcp-ports (proto/port_sets.py): ranges, lists, both mixed, and what is refused."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from portway.proto.port_sets import describe_port_set, parse_port_set


@pytest.mark.parametrize("text, ports", [
    ("20000-20100", set(range(20000, 20101))),
    ("20001,20005", {20001, 20005}),
    ("20000-20002, 20050 ,30000-30001", {20000, 20001, 20002, 20050, 30000, 30001}),
    ("22", {22}),
    ("1-1", {1}),
    ("65535", {65535}),
    ("20005,20001,20001-20002", {20001, 20002, 20005}),  # overlaps and any order: the union
])
def test_ranges_lists_and_both(text, ports):
    assert parse_port_set(text) == ports


@pytest.mark.parametrize("text, message", [
    ("", "has an empty item"),
    ("20001,,20002", "has an empty item"),
    ("20001,", "has an empty item"),
    ("0", "'0' is not a port (1-65535)"),
    ("65536", "is not a port"),
    ("20100-20000", "its first port is above its last"),
    ("20000-", "'20000-' is not a port"),
    ("20000-x", "'20000-x' is not a port (1-65535) or a range of ports like 20000-20100"),
    ("-20000", "is not a port"),
    ("20000-20010-20020", "is not a port"),
    ("http", "is not a port"),
    ("+22", "is not a port"),
    ("٢٢", "is not a port"),  # Arabic-Indic digits are digits to str.isdigit, not to us
])
def test_what_is_refused(text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_port_set(text)


@pytest.mark.parametrize("ports, text", [
    (range(20000, 20101), "20000-20100"),
    ({20001, 20005}, "20001,20005"),
    ({*range(20000, 20011), 20050}, "20000-20010,20050"),
    ((), ""),
])
def test_described_as_people_write_them(ports, text):
    assert describe_port_set(ports) == text


@given(st.sets(st.integers(1, 65535), min_size=1, max_size=300))
def test_description_reads_back(ports):
    assert parse_port_set(describe_port_set(ports)) == ports
