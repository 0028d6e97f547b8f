"""PROXY protocol headers (proto/proxy_protocol.py): the spec's own examples and limits, byte layouts written out
by hand from HAProxy's proxy-protocol.txt, round trips through our decoder and through an independent one (the
`proxy-protocol` package), any fragmentation, and every malformed form the spec tells a receiver to refuse."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from proxyprotocol.result import ProxyResultIPv4, ProxyResultIPv6, ProxyResultLocal, ProxyResultUnknown
from proxyprotocol.v1 import ProxyProtocolV1
from proxyprotocol.v2 import ProxyProtocolV2

from portway.proto.proxy_protocol import (V1_MAX_LINE, V2_SIGNATURE, Command, Endpoints, Header, HeaderReader,
                                          ProxyHeaderError, Version, encode)

IPV4 = Endpoints(ipaddress.ip_address("192.168.0.1"), 56324, ipaddress.ip_address("192.168.0.11"), 443)
IPV6 = Endpoints(ipaddress.ip_address("2001:db8::1"), 40000, ipaddress.ip_address("2001:db8:0:1::2"), 22)


def decode(data: bytes, piece: int | None = None) -> tuple[Header, bytes]:
    """Feed `data` whole, or `piece` bytes at a time; the header and the bytes after it."""
    reader = HeaderReader()
    pieces = [data] if piece is None else [data[i:i + piece] for i in range(0, len(data), piece)]
    header = None
    for index, chunk in enumerate(pieces):
        header = reader.feed(chunk)
        if header is not None:
            return header, reader.rest + b"".join(pieces[index + 1:])
    raise AssertionError(f"no header decoded from {data!r}")


def refusal(data: bytes) -> str:
    with pytest.raises(ProxyHeaderError) as refused:
        HeaderReader().feed(data)
    return str(refused.value)


# ------------------------------------------------------------------------------------------- the spec's examples

def test_the_specs_v1_example_before_an_http_request():
    request = b"GET / HTTP/1.1\r\nHost: 192.168.0.11\r\n\r\n"
    line = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
    assert encode(Version.V1, IPV4) == line
    header, rest = decode(line + request)
    assert header == Header(Version.V1, Command.PROXY, IPV4, len(line))
    assert rest == request


def test_the_specs_longest_v1_lines():
    """56 bytes for TCP4 and 104 for TCP6 with every field at its widest; 107 for the worst-case UNKNOWN."""
    widest4 = Endpoints(ipaddress.ip_address("255.255.255.255"), 65535, ipaddress.ip_address("255.255.255.255"),
                        65535)
    assert encode(Version.V1, widest4) == b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n"
    assert len(encode(Version.V1, widest4)) == 56
    all_f = ipaddress.ip_address("ffff:" * 7 + "ffff")
    widest6 = Endpoints(all_f, 65535, all_f, 65535)
    assert len(encode(Version.V1, widest6)) == 104
    assert decode(encode(Version.V1, widest6))[0].endpoints == widest6
    worst = b"PROXY UNKNOWN " + (b"ffff:" * 7 + b"ffff ") * 2 + b"65535 65535\r\n"
    assert len(worst) == V1_MAX_LINE == 107
    assert decode(worst + b"x") == (Header(Version.V1, Command.PROXY, None, 107), b"x")


def test_unknown_short_form_and_local():
    assert encode(Version.V1, None) == b"PROXY UNKNOWN\r\n"
    assert decode(b"PROXY UNKNOWN\r\nSSH-2.0") == (Header(Version.V1, Command.PROXY, None, 15), b"SSH-2.0")
    # v2 without addresses: LOCAL, family and transport UNSPEC, no address block: exactly the 16 fixed bytes
    assert encode(Version.V2, None) == V2_SIGNATURE + b"\x20\x00\x00\x00"
    assert decode(encode(Version.V2, None)) == (Header(Version.V2, Command.LOCAL, None, 16), b"")


def test_v2_ipv4_layout_written_out_by_hand():
    expected = (b"\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0a"  # the signature
                b"\x21"  # version 2, PROXY
                b"\x11"  # AF_INET, STREAM
                b"\x00\x0c"  # 2*4 + 2*2 address bytes
                b"\xc0\xa8\x00\x01" b"\xc0\xa8\x00\x0b"  # 192.168.0.1, 192.168.0.11
                b"\xdc\x04" b"\x01\xbb")  # 56324, 443
    assert encode(Version.V2, IPV4) == expected
    assert decode(expected + b"tail") == (Header(Version.V2, Command.PROXY, IPV4, 28), b"tail")


def test_v2_ipv6_layout_written_out_by_hand():
    expected = (V2_SIGNATURE + b"\x21\x21\x00\x24"  # PROXY, AF_INET6 + STREAM, 2*16 + 2*2 = 36
                + bytes.fromhex("20010db8000000000000000000000001") + bytes.fromhex("20010db8000000010000000000000002")
                + struct.pack("!HH", 40000, 22))
    assert encode(Version.V2, IPV6) == expected
    assert decode(expected)[0] == Header(Version.V2, Command.PROXY, IPV6, 52)


def test_v2_tlvs_and_a_local_address_block_are_skipped_by_the_length():
    """The receiver must always skip the length the header announces, whatever follows the addresses, and must
    not assume LOCAL carries none."""
    tlv = b"\x01\x00\x02h2"  # PP2_TYPE_ALPN "h2"
    header = encode(Version.V2, IPV4)
    with_tlv = header[:14] + struct.pack("!H", 12 + len(tlv)) + header[16:] + tlv
    assert decode(with_tlv + b"data") == (Header(Version.V2, Command.PROXY, IPV4, 28 + len(tlv), tlv), b"data")
    local = V2_SIGNATURE + b"\x20\x11\x00\x0c" + bytes(12)
    assert decode(local + b"data") == (Header(Version.V2, Command.LOCAL, None, 28, bytes(12)), b"data")


@pytest.mark.parametrize("family_transport, block", [
    (0x12, bytes(12)),  # UDP over IPv4
    (0x22, bytes(36)),  # UDP over IPv6
    (0x31, bytes(216)),  # UNIX stream
    (0x00, b""),  # UNSPEC with the PROXY command
])
def test_v2_families_a_tcp_tunnel_never_sends_fall_back_to_no_addresses(family_transport, block):
    data = V2_SIGNATURE + bytes([0x21, family_transport]) + struct.pack("!H", len(block)) + block
    assert decode(data) == (Header(Version.V2, Command.PROXY, None, len(data)), b"")


# ------------------------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("line, reason", [
    (b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\n", "lone CR or LF"),
    (b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\rX", "lone CR or LF"),
    (b"PROXY UNKNOWN\nanything\r\n", "lone CR or LF"),  # a complete line with a lone LF before its CRLF
    (b"PROXY TCP4 192.168.0.1\r 192.168.0.11 56324 443\r\n", "lone CR or LF"),
    (b"PROXY UNKNOWN\nanything\r", "lone CR or LF"),  # known bad before the CRLF could complete
    (b"PROXY TCP4 192.168.0.1  192.168.0.11 56324 443\r\n", "not a v1 PROXY line"),  # two spaces
    (b"PROXY TCP4 192.168.0.1 192.168.0.11 56324\r\n", "not a v1 PROXY line"),
    (b"PROXY TCP5 192.168.0.1 192.168.0.11 56324 443\r\n", "not a v1 PROXY line"),
    (b"PROXY tcp4 192.168.0.1 192.168.0.11 56324 443\r\n", "not a v1 PROXY line"),
    (b"PROXY UNKNOWNX\r\n", "not a v1 PROXY line"),
    (b"PROXY TCP4 192.168.000.1 192.168.0.11 56324 443\r\n", "not an IP address"),  # leading zeros: octal?
    (b"PROXY TCP4 2001:db8::1 192.168.0.11 56324 443\r\n", "not an IPv4 address"),
    (b"PROXY TCP6 192.168.0.1 2001:db8::1 56324 443\r\n", "not an IPv6 address"),
    (b"PROXY TCP6 ::ffff:192.168.0.1 2001:db8::1 56324 443\r\n", "hex groups only"),
    (b"PROXY TCP6 fe80::1%eth0 2001:db8::1 56324 443\r\n", "not an IP address"),
    (b"PROXY TCP4 192.168.0.1 192.168.0.11 056324 443\r\n", "without leading zeros"),
    (b"PROXY TCP4 192.168.0.1 192.168.0.11 05 443\r\n", "without leading zeros"),
    (b"PROXY TCP4 192.168.0.1 192.168.0.11 65536 443\r\n", "not a port"),
    (b"PROXY TCP4 192.168.0.1 192.168.0.11 -1 443\r\n", "not a port"),
    (b"PROXY TCP4 192.168.0.1 192.168.0.11 \xd9\xa1 443\r\n", "not a v1 PROXY line"),  # a non-ASCII digit
    (b"PROXY UNKNOWN " + b"x" * 100, "no CRLF within the first 107 bytes"),
    (b"GET / HTTP/1.1\r\n", "does not start with a PROXY protocol header"),
    (b"SSH-2.0-OpenSSH_9.2\r\n", "does not start with a PROXY protocol header"),
    (b"PROXY\r\n", "does not start with a PROXY protocol header"),
])
def test_v1_lines_a_receiver_must_refuse(line, reason):
    assert reason in refusal(line)


def test_port_zero_is_a_port():
    header = HeaderReader().feed(b"PROXY TCP4 192.168.0.1 192.168.0.11 0 443\r\n")
    assert (header.endpoints.source_port, header.endpoints.destination_port) == (0, 443)


@pytest.mark.parametrize("fixed, reason", [
    (b"\x11\x11\x00\x0c", "version 1, not 2"),
    (b"\x22\x11\x00\x0c", "unassigned command or family"),
    (b"\x21\x41\x00\x0c", "unassigned command or family"),
    (b"\x21\x13\x00\x0c", "unassigned command or family"),
    (b"\x21\x11\x00\x08", "address block of 8 bytes; INET needs 12"),
    (b"\x21\x21\x00\x0c", "address block of 12 bytes; INET6 needs 36"),
])
def test_v2_headers_a_receiver_must_refuse(fixed, reason):
    assert reason in refusal(V2_SIGNATURE + fixed + bytes(64))


def test_a_wrong_start_is_refused_at_the_first_byte_that_shows_it():
    for prefix in (b"P", b"PROXY", b"\r", b"\r\n\r\n\x00\r\nQUIT"):
        assert HeaderReader().feed(prefix) is None  # still a possible header
    for wrong in (b"X", b"PROXI", b"\r\n\r\n\x01", b"\r\n\r\n\x00\r\nQUIT\r"):
        with pytest.raises(ProxyHeaderError, match="does not start with a PROXY protocol header"):
            HeaderReader().feed(wrong)


def test_v1_waits_for_its_crlf_and_no_longer_than_107_bytes():
    reader = HeaderReader()
    assert reader.feed(b"PROXY UNKNOWN " + b"f" * 91 + b"\r") is None  # 106 bytes: the CR may be the CRLF's half
    assert reader.rest == b""  # nothing after a header until there is one
    assert reader.feed(b"\n") == Header(Version.V1, Command.PROXY, None, 107)
    reader = HeaderReader()
    assert reader.feed(b"PROXY UNKNOWN " + b"f" * 92) is None  # 106 bytes, no CR yet
    with pytest.raises(ProxyHeaderError, match="no CRLF within"):
        reader.feed(b"\r")  # the 107th byte is a CR: its LF would be the 108th


def test_a_reader_decodes_one_header_only():
    reader = HeaderReader()
    reader.feed(encode(Version.V1, None))
    with pytest.raises(RuntimeError):
        reader.feed(b"more")


# ------------------------------------------------------------------------------------------- properties

ipv4 = st.builds(ipaddress.IPv4Address, st.integers(0, 2**32 - 1))
ipv6 = st.builds(ipaddress.IPv6Address, st.integers(0, 2**128 - 1))
ports = st.integers(0, 65535)
endpoints = st.one_of(st.builds(Endpoints, ipv4, ports, ipv4, ports), st.builds(Endpoints, ipv6, ports, ipv6, ports))


@given(st.sampled_from(Version), st.one_of(st.none(), endpoints), st.binary(max_size=64), st.integers(1, 40))
def test_round_trip_in_any_pieces(version, sent, after, piece):
    wire = encode(version, sent)
    header, rest = decode(wire + after, piece)
    assert header.endpoints == sent and header.size == len(wire) and rest == after
    assert header.command is (Command.LOCAL if version is Version.V2 and sent is None else Command.PROXY)
    if version is Version.V1:
        assert len(wire) <= V1_MAX_LINE


@given(st.one_of(st.none(), endpoints), st.sampled_from(Version))
def test_an_independent_decoder_reads_what_we_encode(sent, version):
    """The `proxy-protocol` package's decoder, written apart from ours, reads every header we send the same."""
    wire = encode(version, sent)
    result = (ProxyProtocolV1() if version is Version.V1 else ProxyProtocolV2()).unpack(wire)
    if sent is None:
        assert isinstance(result, ProxyResultUnknown if version is Version.V1 else ProxyResultLocal)
        return
    assert isinstance(result, ProxyResultIPv4 if sent.source.version == 4 else ProxyResultIPv6)
    assert result.source == (sent.source, sent.source_port)
    assert result.dest == (sent.destination, sent.destination_port)


@given(st.binary(max_size=200), st.integers(1, 50))
def test_any_bytes_decode_or_are_refused_cleanly(data, piece):
    """Arbitrary input either yields a header whose encoding starts the input, is refused with ProxyHeaderError,
    or waits for more: and it only waits while the input is shorter than the longest header it could start."""
    reader = HeaderReader()
    try:
        for start in range(0, len(data), piece):
            if reader.feed(data[start:start + piece]) is not None:
                break
    except ProxyHeaderError:
        return
    if reader.header is None:
        assert len(data) < (V1_MAX_LINE if data.startswith(b"P") else 16 + 65535)
    elif reader.header.endpoints is not None and reader.header.version is Version.V1:
        assert data.startswith(encode(Version.V1, reader.header.endpoints))


@given(endpoints)
def test_v1_text_is_canonical(sent):
    """What we write is what HAProxy asks for: IPv4 without leading zeros, IPv6 as compressed hex groups."""
    fields = encode(Version.V1, sent)[:-2].decode("ascii").split(" ")
    assert fields[2:4] == [sent.source.compressed, sent.destination.compressed]
    assert "." not in fields[2] or sent.source.version == 4


# ------------------------------------------------------------------------------------------- socket addresses

@pytest.mark.parametrize("peer, local, expected", [
    (("203.0.113.9", 51000), ("192.0.2.1", 20001), "PROXY TCP4 203.0.113.9 192.0.2.1 51000 20001\r\n"),
    (("::ffff:203.0.113.9", 51000, 0, 0), ("::ffff:192.0.2.1", 20001, 0, 0),
     "PROXY TCP4 203.0.113.9 192.0.2.1 51000 20001\r\n"),  # a dual-stack listener's view of IPv4
    (("2001:db8::9", 51000, 0, 0), ("2001:db8::1", 20001, 0, 0), "PROXY TCP6 2001:db8::9 2001:db8::1 51000 20001\r\n"),
    (("203.0.113.9", 51000), ("2001:db8::1", 20001, 0, 0),
     "PROXY TCP6 ::ffff:cb00:7109 2001:db8::1 51000 20001\r\n"),  # mixed: the IPv4 end is mapped into IPv6
    (("fe80::9%eth0", 51000, 0, 2), ("fe80::1%eth0", 20001, 0, 2), "PROXY TCP6 fe80::9 fe80::1 51000 20001\r\n"),
])
def test_endpoints_from_socket_addresses(peer, local, expected):
    assert encode(Version.V1, Endpoints.of(peer, local)) == expected.encode()


def test_endpoints_refuse_mixed_families_and_bad_ports():
    with pytest.raises(ValueError, match="same family"):
        Endpoints(ipaddress.ip_address("192.0.2.1"), 1, ipaddress.ip_address("::1"), 2)
    with pytest.raises(ValueError, match="not a port"):
        Endpoints(ipaddress.ip_address("192.0.2.1"), 65536, ipaddress.ip_address("192.0.2.2"), 2)
