"""The PROXY protocol header (HAProxy's proxy-protocol.txt, versions 1 and 2), sans-I/O.

A TCP tunnel's agent may put one of these in front of each visitor connection it opens to the local service, so
the service sees the visitor's address instead of the agent's. :func:`encode` builds the header; the
:class:`HeaderReader` decodes one from bytes fed in any pieces (it serves the tests and a test origin, and is
as strict as the spec asks a receiver to be: anything that doesn't match exactly is refused).

What is supported: TCP over IPv4 and IPv6 (v1 ``TCP4``/``TCP6``, v2 ``PROXY`` + ``AF_INET``/``AF_INET6`` +
``STREAM``), and the forms for a connection without usable addresses (v1 ``UNKNOWN``, v2 ``LOCAL``). A v2
header's TLVs are skipped (kept as raw bytes); v2 families a TCP tunnel never sends (UNIX, DGRAM, UNSPEC with
the ``PROXY`` command) decode without addresses, the spec's "fall back to UNSPEC".
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from dataclasses import dataclass

from ..errors import ProtocolError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "
V1_MAX_LINE = 107  # the longest v1 line, CRLF included (the spec's worst case, an UNKNOWN with IPv6 addresses)
V2_FIXED = 16  # signature, version/command, family/transport, length
V2_VERSION = 0x20
_V2_FIXED_STRUCT = struct.Struct("!12sBBH")
_V2_IPV4 = struct.Struct("!4s4sHH")
_V2_IPV6 = struct.Struct("!16s16sHH")


class Version(enum.IntEnum):
    V1 = 1
    V2 = 2


class Command(enum.IntEnum):
    """v2's command nibble; v1's UNKNOWN decodes as PROXY without addresses."""

    LOCAL = 0x0  # the proxy's own connection (a health check): use the real endpoints
    PROXY = 0x1  # relayed on behalf of the addresses in the header


class Family(enum.IntEnum):
    """v2's address family nibble."""

    UNSPEC = 0x0
    INET = 0x1
    INET6 = 0x2
    UNIX = 0x3


class Transport(enum.IntEnum):
    """v2's transport nibble."""

    UNSPEC = 0x0
    STREAM = 0x1
    DGRAM = 0x2


_V2_ADDRESS_SIZE = {Family.UNSPEC: 0, Family.INET: _V2_IPV4.size, Family.INET6: _V2_IPV6.size, Family.UNIX: 216}


class ProxyHeaderError(ProtocolError):
    """Bytes that are not a valid PROXY header: the receiver must drop the connection."""


@dataclass(frozen=True, slots=True)
class Endpoints:
    """A TCP connection's two ends, both of the same family (IPv4 or IPv6)."""

    source: IPAddress
    source_port: int
    destination: IPAddress
    destination_port: int

    def __post_init__(self) -> None:
        if self.source.version != self.destination.version:
            raise ValueError(f"{self.source} and {self.destination} are not of the same family")
        for port in (self.source_port, self.destination_port):
            if not 0 <= port <= 65535:
                raise ValueError(f"{port} is not a port (0-65535)")

    @classmethod
    def of(cls, source: tuple[str, int], destination: tuple[str, int]) -> Endpoints:
        """From two socket addresses as asyncio gives them (`peername`, `sockname`; extra tuple items such as
        IPv6 flow info are ignored). IPv4-mapped IPv6 addresses (a dual-stack listener's view of an IPv4 peer)
        become IPv4 when both ends are; when only one end is IPv4, it is mapped into IPv6 so both are."""
        source_ip = _unmapped(ipaddress.ip_address(source[0].split("%")[0]))
        destination_ip = _unmapped(ipaddress.ip_address(destination[0].split("%")[0]))
        if source_ip.version != destination_ip.version:
            source_ip, destination_ip = _as_ipv6(source_ip), _as_ipv6(destination_ip)
        return cls(source_ip, source[1], destination_ip, destination[1])


@dataclass(frozen=True, slots=True)
class Header:
    """A decoded header. `endpoints` None: no addresses to use (v1 UNKNOWN, v2 LOCAL or an unsupported family)
    and the receiver keeps the connection's own."""

    version: Version
    command: Command
    endpoints: Endpoints | None
    size: int  # bytes the header took on the wire
    tlvs: bytes = b""  # v2 only: the bytes after the addresses, undecoded


def _unmapped(address: IPAddress) -> IPAddress:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _as_ipv6(address: IPAddress) -> ipaddress.IPv6Address:
    if isinstance(address, ipaddress.IPv4Address):
        return ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + address.packed)
    return address


# ----------------------------------------------------------------------------------------------- encoding

def encode(version: Version, endpoints: Endpoints | None) -> bytes:
    """The header to send first on a connection relayed for `endpoints` (None: addresses unknown, sent as v1
    ``UNKNOWN`` or v2 ``LOCAL``, which tell the receiver to use the connection's own)."""
    if version is Version.V1:
        return encode_v1(endpoints)
    return encode_v2(endpoints)


def encode_v1(endpoints: Endpoints | None) -> bytes:
    if endpoints is None:
        return b"PROXY UNKNOWN\r\n"
    protocol = "TCP4" if endpoints.source.version == 4 else "TCP6"
    # str() of an ipaddress object is the canonical form the spec asks for: IPv4 without leading zeros, IPv6
    # as hex groups with the longest run of zero groups compressed
    return (f"PROXY {protocol} {endpoints.source} {endpoints.destination} "
            f"{endpoints.source_port} {endpoints.destination_port}\r\n").encode("ascii")


def encode_v2(endpoints: Endpoints | None, tlvs: bytes = b"") -> bytes:
    """`tlvs`: TLV records (see :func:`tlv`) appended after the addresses; the length field counts them."""
    if endpoints is None:
        return _V2_FIXED_STRUCT.pack(V2_SIGNATURE, V2_VERSION | Command.LOCAL, 0, len(tlvs)) + tlvs
    if endpoints.source.version == 4:
        family, layout = Family.INET, _V2_IPV4
    else:
        family, layout = Family.INET6, _V2_IPV6
    addresses = layout.pack(endpoints.source.packed, endpoints.destination.packed, endpoints.source_port,
                            endpoints.destination_port)
    return _V2_FIXED_STRUCT.pack(V2_SIGNATURE, V2_VERSION | Command.PROXY, family << 4 | Transport.STREAM,
                                 len(addresses) + len(tlvs)) + addresses + tlvs


def tlv(kind: int, value: bytes) -> bytes:
    """One v2 TLV record: type (u8), length (u16, big-endian), value."""
    return struct.pack("!BH", kind, len(value)) + value


def tlv_value(tlvs: bytes, kind: int) -> bytes | None:
    """The value of the first TLV of type `kind` in a v2 header's TLV block, or None; ProxyHeaderError when a
    record runs past the block."""
    offset = 0
    while offset < len(tlvs):
        if offset + 3 > len(tlvs):
            raise ProxyHeaderError("a PROXY v2 TLV record is cut short")
        found, length = struct.unpack_from("!BH", tlvs, offset)
        start, offset = offset + 3, offset + 3 + length
        if offset > len(tlvs):
            raise ProxyHeaderError("a PROXY v2 TLV record runs past the header")
        if found == kind:
            return tlvs[start:offset]
    return None


# ----------------------------------------------------------------------------------------------- decoding

class HeaderReader:
    """Decodes the PROXY header at the start of a connection, from bytes fed in pieces of any size.

    :meth:`feed` returns None while more bytes are needed, then the :class:`Header`; :attr:`rest` holds what
    came after it (the connection's own first bytes). Invalid input raises :class:`ProxyHeaderError` as soon as
    it is known to be invalid: first bytes that start neither version, a lone CR or LF, no CRLF within a v1
    line's 107 bytes, a v2 version, command or family that is not assigned. At most one header's bytes are
    buffered: 107 for v1, 16 + 65535 for v2.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self.header: Header | None = None
        self.rest = b""

    def feed(self, data: bytes) -> Header | None:
        if self.header is not None:
            raise RuntimeError("the header was already decoded; read the connection's bytes from .rest")
        self._buffer += data
        buffer = self._buffer
        seen = bytes(buffer[:len(V2_SIGNATURE)])
        if V2_SIGNATURE.startswith(seen):
            header = self._v2()
        elif V1_PREFIX.startswith(seen[:len(V1_PREFIX)]):
            header = self._v1()
        else:
            raise ProxyHeaderError("the connection does not start with a PROXY protocol header")
        if header is not None:
            self.header, self.rest = header, bytes(buffer[header.size:])
            buffer.clear()
        return header

    def _v1(self) -> Header | None:
        window = bytes(self._buffer[:V1_MAX_LINE])
        end = window.find(b"\r\n")
        if end < 0:
            # a CR last in a window that can still grow may be the first half of the CRLF
            pending = window[:-1] if window.endswith(b"\r") and len(window) < V1_MAX_LINE else window
            if len(window) >= V1_MAX_LINE:
                raise ProxyHeaderError(f"no CRLF within the first {V1_MAX_LINE} bytes of a v1 PROXY line")
            if b"\r" in pending or b"\n" in pending:
                raise ProxyHeaderError("a v1 PROXY line must end with CRLF, not a lone CR or LF")
            return None
        line, size = window[:end], end + 2
        if b"\r" in line or b"\n" in line:
            raise ProxyHeaderError("a v1 PROXY line must end with CRLF, not a lone CR or LF")
        if line == b"PROXY UNKNOWN" or line.startswith(b"PROXY UNKNOWN "):
            return Header(Version.V1, Command.PROXY, None, size)  # whatever follows UNKNOWN is ignored
        parts = line.split(b" ")
        if len(parts) != 6 or parts[1] not in (b"TCP4", b"TCP6"):
            raise ProxyHeaderError(f"not a v1 PROXY line: {line[:V1_MAX_LINE]!r}")
        try:
            text = [part.decode("ascii") for part in parts[2:]]
        except UnicodeDecodeError:
            raise ProxyHeaderError(f"not a v1 PROXY line: {line!r}") from None
        version = 4 if parts[1] == b"TCP4" else 6
        source, destination = (_v1_address(item, version) for item in text[:2])
        source_port, destination_port = (_v1_port(item) for item in text[2:])
        return Header(Version.V1, Command.PROXY, Endpoints(source, source_port, destination, destination_port), size)

    def _v2(self) -> Header | None:
        buffer = self._buffer
        if len(buffer) < V2_FIXED:
            return None
        _, version_command, family_transport, length = _V2_FIXED_STRUCT.unpack_from(buffer)
        if version_command >> 4 != V2_VERSION >> 4:
            raise ProxyHeaderError(f"PROXY v2 header with version {version_command >> 4}, not 2")
        try:
            command = Command(version_command & 0xF)
            family = Family(family_transport >> 4)
            transport = Transport(family_transport & 0xF)
        except ValueError:
            raise ProxyHeaderError(f"PROXY v2 header with an unassigned command or family "
                                   f"(0x{version_command:02x} 0x{family_transport:02x})") from None
        size = V2_FIXED + length
        if len(buffer) < size:
            return None
        block = bytes(buffer[V2_FIXED:size])
        if command is Command.LOCAL:
            return Header(Version.V2, command, None, size, tlvs=block)
        needed = _V2_ADDRESS_SIZE[family]
        if len(block) < needed:
            raise ProxyHeaderError(f"PROXY v2 address block of {len(block)} bytes; {family.name} needs {needed}")
        endpoints = None
        if transport is Transport.STREAM and family in (Family.INET, Family.INET6):
            layout, make = (_V2_IPV4, ipaddress.IPv4Address) if family is Family.INET else \
                (_V2_IPV6, ipaddress.IPv6Address)
            source, destination, source_port, destination_port = layout.unpack_from(block)
            endpoints = Endpoints(make(source), source_port, make(destination), destination_port)
        return Header(Version.V2, command, endpoints, size, tlvs=block[needed:])


def _v1_address(text: str, version: int) -> IPAddress:
    try:
        if "%" in text:  # an IPv6 zone: meaningless to the receiver
            raise ValueError(text)
        address = ipaddress.ip_address(text)  # refuses IPv4 with leading zeros (Python 3.9.5+)
    except ValueError:
        raise ProxyHeaderError(f"{text!r} is not an IP address") from None
    if address.version != version:
        raise ProxyHeaderError(f"{text!r} is not an IPv{version} address")
    if version == 6 and "." in text:
        raise ProxyHeaderError(f"{text!r}: a v1 IPv6 address is written as hex groups only")
    return address


def _v1_port(text: str) -> int:
    if not text.isascii() or not text.isdigit() or (len(text) > 1 and text[0] == "0") or int(text) > 65535:
        raise ProxyHeaderError(f"{text!r} is not a port (0-65535, without leading zeros)")
    return int(text)
