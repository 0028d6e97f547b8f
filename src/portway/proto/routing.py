"""Which part of the relay a request's Host names: the relay itself, a tunnel, or nothing it serves."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Final

from ..errors import HttpError


@dataclass(frozen=True, slots=True)
class ToRelay:
    """The bare domain, an IP literal or `localhost`: the relay's own pages, API and agent link."""


@dataclass(frozen=True, slots=True)
class ToTunnel:
    name: str


@dataclass(frozen=True, slots=True)
class NotServed:
    hostname: str


Route = ToRelay | ToTunnel | NotServed
TO_RELAY: Final = ToRelay()


def hostname_of(host_header: str) -> str:
    """`Quiet-River.Example.COM.:8080` → `quiet-river.example.com`; IPv6 brackets kept off.

    Only the spellings RFC 3986 allows for a host and port are routed: an IPv6 literal in brackets followed by
    nothing but a port, a port of at most five ASCII digits (≤ 65535), at most one trailing dot. Anything else is
    a 400, so no two parts of the relay (router, 404 page, origin) can read one Host differently.
    """
    host = host_header.strip()
    if host.startswith("["):
        end = host.find("]")
        if end < 0:
            raise HttpError(400, "the Host header has an unclosed IPv6 bracket")
        literal, rest = host[1:end], host[end + 1 :]
        if rest and not rest.startswith(":"):
            raise HttpError(400, "the Host header has bytes after its IPv6 address")
        try:
            if "%" in literal:  # a zone id names an interface of the client's machine, meaningless here
                raise ValueError(literal)
            ipaddress.IPv6Address(literal)
        except ValueError:
            raise HttpError(400, "the Host header's brackets hold no IPv6 address") from None
        _check_port(rest[1:])
        return literal.lower()
    name, _, port = host.partition(":")
    _check_port(port)
    if name.endswith(".."):
        raise HttpError(400, "the Host header ends with more than one dot")
    name = name.removesuffix(".").lower()
    if not name:
        raise HttpError(400, "the Host header is empty")
    return name


_DIGITS: Final = frozenset("0123456789")


def _check_port(port: str) -> None:
    """An empty port is allowed (`host:`, RFC 3986); otherwise 1–5 ASCII digits, at most 65535."""
    if port and (len(port) > 5 or not _DIGITS.issuperset(port) or int(port) > 65535):
        raise HttpError(400, "the Host header has an invalid port")


class OneTunnel:
    """Every valid Host goes to one tunnel: the embedded relay's direct address, for clients that can't resolve
    `NAME.localhost` (Node's `ws`, Python, `wscat`). The Host is still checked, like any other route's."""

    def __init__(self, name: str, domain: str) -> None:
        self.domain = domain
        self._route = ToTunnel(name)

    def route(self, host_header: str) -> Route:
        hostname_of(host_header)
        return self._route


def _is_ip(hostname: str) -> bool:
    try:
        ipaddress.ip_address(hostname)
    except ValueError:
        return False
    return True


class Router:
    """Maps a hostname to a route; `domain` is the relay's base domain (`NAME.DOMAIN` are tunnels)."""

    CACHE_SIZE = 4096

    def __init__(self, domain: str, system_names: frozenset[str]) -> None:
        self.domain = domain.rstrip(".").lower()
        self._suffix = "." + self.domain
        self.system_names = system_names
        self._cache: dict[str, Route] = {}

    def route(self, host_header: str) -> Route:
        """Routes are pure functions of the header, so each distinct value is worked out once."""
        route = self._cache.get(host_header)
        if route is None:
            route = self._route(host_header)
            if len(self._cache) >= self.CACHE_SIZE:
                self._cache.clear()
            self._cache[host_header] = route
        return route

    def _route(self, host_header: str) -> Route:
        hostname = hostname_of(host_header)
        if hostname == self.domain or _is_ip(hostname) or hostname == "localhost":
            return TO_RELAY
        if hostname.endswith(self._suffix):
            label = hostname[: -len(self._suffix)]
            if label in self.system_names:
                return TO_RELAY
            if "." not in label:
                return ToTunnel(label)
        return NotServed(hostname)
