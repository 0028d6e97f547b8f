"""The public side of a TCP tunnel: a listener on the tunnel's port that admits visitors and hands them on.

A :class:`TcpListener` listens on the relay's `--bind` address and the port the tunnel was given
(:mod:`portway.policy.ports`), refuses a visitor whose address is outside the tunnel's `--allow-ip` networks by
resetting its connection at once (before a byte is read or written), and gives every admitted visitor, as a
:class:`~portway.link.connection.Connection`, to the tunnel's `on_visitor` callback, which carries it on
(a stream on the agent's link, through :class:`~portway.link.bridge.StreamBridge`). Closing the listener stops
new visitors; the ones already handed on belong to their streams, which the tunnel resets when it goes.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
from typing import Callable, Iterable

from ..errors import PortwayError
from ..link.connection import Connection, abort_with_reset

log = logging.getLogger(__name__)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class TcpListenerError(PortwayError):
    """The port could not be listened on; the message is one line naming the address and why."""


def peer_allowed(peer_ip: str, networks: Iterable[Network]) -> bool:
    """Whether a visitor's address is in one of `networks` (no networks: everyone). An IPv4 visitor seen through
    an IPv6 socket (`::ffff:a.b.c.d`: asyncio's own listeners are IPv6-only, a socket handed in by a service
    manager may not be) is judged by its IPv4 address; an address that doesn't parse is refused."""
    networks = tuple(networks)
    if not networks:
        return True
    try:
        address = ipaddress.ip_address(peer_ip.split("%")[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


class _Visitor(Connection):
    """A visitor's connection, judged the moment it is accepted."""

    def __init__(self, listener: TcpListener) -> None:
        super().__init__()
        self.listener = listener

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.listener._admit(self, transport)


class TcpListener:
    """One TCP tunnel's public port. `on_visitor` is called once per admitted visitor, from the accept itself
    (the connection has its transport and peer address; nothing was read yet)."""

    def __init__(self, bind: str, port: int, on_visitor: Callable[[Connection], None],
                 allow_networks: Iterable[Network] = ()) -> None:
        self.bind = bind
        self.port = port
        self.on_visitor = on_visitor
        self.allow_networks = tuple(allow_networks)
        self._server: asyncio.base_events.Server | None = None

    async def open(self) -> int:
        """Start listening; returns the port (the one asked for, or the system's pick for port 0)."""
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(lambda: _Visitor(self), self.bind, self.port,
                                                    reuse_address=True, backlog=1024)
        except OSError as error:
            why = {errno.EADDRINUSE: "the port is in use by another program",
                   errno.EACCES: "not allowed (a port under 1024 needs privileges)",
                   errno.EADDRNOTAVAIL: "the address is not one of this host's"}.get(error.errno, error.strerror)
            raise TcpListenerError(f"cannot listen on {self.bind}:{self.port} for a TCP tunnel: {why}") from None
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    def close(self) -> None:
        """Stop accepting: the port is free again at once (a visitor connecting now is refused by the system)."""
        if self._server is not None:
            self._server.close()
            self._server = None

    @property
    def listening(self) -> bool:
        return self._server is not None

    def _admit(self, visitor: _Visitor, transport: asyncio.BaseTransport) -> None:
        if self._server is None or not peer_allowed(visitor.peer_ip, self.allow_networks):
            if self._server is not None:
                log.info("TCP port %d: refused %s (not in --allow-ip)", self.port, visitor.peer_ip)
            abort_with_reset(transport)
            return
        try:
            self.on_visitor(visitor)
        except Exception:  # a fault in the hand-over must not leave the visitor hanging: it sees a reset
            log.exception("TCP port %d: could not hand over the visitor %s", self.port, visitor.peer_ip)
            abort_with_reset(transport)
