"""The several-tunnel form of the link handshake (proto/control.py): Portway-Tunnel headers each way, the
per-stream preamble, and the refusals of malformed tunnel lists."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from portway.errors import HttpError, RegistrationError
from portway.proto.control import (MAX_TUNNELS, PREAMBLE_LIMIT, AgentHandshake, GrantedTunnel, LinkGrant,
                                   LinkRequest, TunnelRequest, preamble_index, refusal, stream_preamble)
from portway.proto.http1 import RequestParser
from portway.proto.proxy_protocol import Endpoints, HeaderReader, ProxyHeaderError, tlv, tlv_value

NAMES = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True)
NETWORKS = st.lists(st.sampled_from(["10.0.0.0/8", "127.0.0.2/32", "::1/128"]), max_size=3).map(tuple)
HTTP_TUNNELS = st.builds(lambda name, allow, auth: TunnelRequest("http", name=name, allow_ip=allow, basic_auth=auth),
                         st.none() | NAMES, NETWORKS,
                         st.none() | st.tuples(st.text(min_size=1, max_size=8).filter(lambda u: ":" not in u),
                                               st.text(max_size=8)).map(":".join))
TCP_TUNNELS = st.builds(lambda port, allow: TunnelRequest("tcp", port=port, allow_ip=allow),
                        st.none() | st.integers(1, 65535), NETWORKS)


def parsed(request: LinkRequest) -> LinkRequest:
    head = RequestParser().feed(request.encode("relay.example:8000"))[0]
    path, _, query = head.target.decode().partition("?")
    assert path == "/_portway/agent"
    return LinkRequest.parse(head, query)


def unique(tunnels: list[TunnelRequest]) -> bool:
    names = [tunnel.name for tunnel in tunnels if tunnel.name]
    ports = [tunnel.port for tunnel in tunnels if tunnel.port]
    return len(set(names)) == len(names) and len(set(ports)) == len(ports)


@settings(max_examples=200, deadline=None)
@given(tunnels=st.lists(HTTP_TUNNELS | TCP_TUNNELS, min_size=1, max_size=6).filter(unique).map(tuple),
       token=st.none() | st.text(alphabet="abcXYZ019-_", min_size=1, max_size=20))
def test_every_tunnel_the_agent_asks_for_is_what_the_relay_reads_in_order(tunnels, token):
    request = LinkRequest(token=token, tunnels=tunnels)
    assert parsed(request) == request


def test_the_old_single_tunnel_request_is_unchanged():
    raw = LinkRequest(name="web", token="t").encode("r")
    assert raw.startswith(b"GET /_portway/agent?name=web HTTP/1.1\r\n") and b"Portway-Tunnel" not in raw
    assert parsed(LinkRequest(name="web")).tunnels == ()


def test_a_several_tunnel_request_does_not_use_the_query_name():
    raw = LinkRequest(name="web", tunnels=(TunnelRequest("http", name="web"),)).encode("r")
    assert raw.startswith(b"GET /_portway/agent HTTP/1.1\r\n")


def head_with(*tunnel_values: str):
    lines = "".join(f"Portway-Tunnel: {value}\r\n" for value in tunnel_values)
    raw = f"GET /_portway/agent HTTP/1.1\r\nHost: r\r\nUpgrade: portway-mux\r\nConnection: Upgrade\r\n{lines}\r\n"
    return RequestParser().feed(raw.encode())[0]


@pytest.mark.parametrize("values, fragment", [
    (["proto=ftp"], "proto=http or proto=tcp"),
    (["name=web"], "proto=http or proto=tcp"),
    (["proto=tcp&port=0"], "port must be 1-65535"),
    (["proto=tcp&port=65536"], "port must be 1-65535"),
    (["proto=tcp&port=x"], "port must be 1-65535"),
    (["proto=http&basic_auth=nocolon"], "USER:PASS"),
    (["proto=http&name=web", "proto=http&name=web"], "the same name was asked for twice on one link: web"),
    (["proto=tcp&port=20001", "proto=tcp&port=20001"], "the same port was asked for twice on one link: 20001"),
    (["proto=http"] * (MAX_TUNNELS + 1), f"at most {MAX_TUNNELS} tunnels"),
])
def test_malformed_tunnel_lists_are_refused(values, fragment):
    with pytest.raises(HttpError) as refused:
        LinkRequest.parse(head_with(*values), "")
    assert refused.value.status == 400 and fragment in refused.value.message


def test_the_grant_lists_every_tunnel_in_order():
    tunnels = (GrantedTunnel(0, "http", "http://web.example.com", name="web"),
               GrantedTunnel(1, "tcp", "tcp://example.com:20001", port=20001))
    grant = LinkGrant("web", "http://web.example.com", "key", tunnels=tunnels)
    granted = AgentHandshake().receive_data(grant.encode() + b"frames")
    assert granted is not None and granted.grant == grant and granted.link_bytes == b"frames"


def test_a_grant_with_a_broken_tunnel_field_says_so():
    raw = LinkGrant("web", "u", "k").encode().replace(b"\r\n\r\n", b"\r\nPortway-Tunnel: index=x&url=u\r\n\r\n")
    with pytest.raises(RegistrationError) as refused:
        AgentHandshake().receive_data(raw)
    assert refused.value.status == 502 and "invalid Portway-Tunnel field" in refused.value.message


def test_a_refusal_of_several_tunnels_is_one_line_each():
    body = refusal(403, "port 20001 is reserved for another token\ntunnel name 'web' is already in use",
                   [{"index": 1, "status": 403, "message": "port 20001 is reserved for another token"},
                    {"index": 0, "status": 409, "message": "tunnel name 'web' is already in use"}])
    with pytest.raises(RegistrationError) as refused:
        AgentHandshake().receive_data(body)
    assert refused.value.status == 403
    assert refused.value.message.splitlines() == ["port 20001 is reserved for another token",
                                                  "tunnel name 'web' is already in use"]
    assert len(json.loads(body.split(b"\r\n\r\n", 1)[1])["tunnels"]) == 2


@settings(max_examples=200, deadline=None)
@given(index=st.integers(0, MAX_TUNNELS - 1), v6=st.booleans(), ports=st.tuples(st.integers(0, 65535),
                                                                                st.integers(0, 65535)),
       known=st.booleans(), after=st.binary(max_size=40))
def test_a_stream_preamble_names_its_tunnel_and_visitor_and_keeps_the_bytes_after_it(index, v6, ports, known, after):
    if known:
        endpoints = Endpoints.of(("2001:db8::1" if v6 else "203.0.113.7", ports[0]),
                                 ("2001:db8::2" if v6 else "192.0.2.1", ports[1]))
    else:
        endpoints = None
    preamble = stream_preamble(index, endpoints)
    assert len(preamble) <= PREAMBLE_LIMIT
    reader = HeaderReader()
    header = None
    for byte in range(len(preamble + after)):  # fed a byte at a time: the reader finds the end itself
        header = reader.feed((preamble + after)[byte:byte + 1])
        if header is not None:
            break
    assert header is not None and header.endpoints == endpoints and preamble_index(header) == index
    assert reader.rest == b"" and header.size == len(preamble)


def test_tlvs_are_read_strictly():
    block = tlv(0x01, b"h2") + tlv(0xE0, b"\x00\x05")
    assert tlv_value(block, 0xE0) == b"\x00\x05" and tlv_value(block, 0x02) is None
    for broken in (block[:-1], b"\xe0\x00"):
        with pytest.raises(ProxyHeaderError):
            tlv_value(broken, 0xE0)
