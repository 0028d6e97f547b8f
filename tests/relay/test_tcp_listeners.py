"""A TCP tunnel's public port (relay/tcp_listeners.py) with real sockets on loopback: admitted visitors reach the
callback as usable connections (both directions, half-close, checksummed), --allow-ip resets a visitor at once,
the listener honours its bind address, a busy port is one clear line, and closing frees the port."""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import os
import socket

import pytest

from portway.link.connection import Connection
from portway.relay.tcp_listeners import TcpListener, TcpListenerError, peer_allowed

LOOPBACK = ipaddress.ip_network("127.0.0.0/8")
ELSEWHERE = ipaddress.ip_network("10.0.0.0/8")
TIMEOUT = 10


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def digest(data: bytes) -> bytes:
    return hashlib.sha256(data).hexdigest().encode()


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


class DigestService:
    """What on_visitor receives, used the way a bridge would: reads everything the visitor sends until it
    shuts its side, then answers with the SHA-256 of it, then closes."""

    def __init__(self) -> None:
        self.visitors: list[Connection] = []
        self.tasks: set[asyncio.Task] = set()

    def __call__(self, conn: Connection) -> None:
        self.visitors.append(conn)
        task = asyncio.get_running_loop().create_task(self.serve(conn))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def serve(self, conn: Connection) -> None:
        checksum = hashlib.sha256()
        while data := await conn.read():
            checksum.update(data)
        await conn.send(checksum.hexdigest().encode())
        conn.close()


async def send_and_digest(port: int, payload: bytes, host: str = "127.0.0.1") -> bytes:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(payload)
    await writer.drain()
    writer.write_eof()  # half-close: the answer must still arrive
    answer = await asyncio.wait_for(reader.read(), TIMEOUT)
    writer.close()
    return answer


async def refused_at_once(port: int, host: str = "127.0.0.1") -> None:
    """The listener accepts, then resets before any byte: the visitor's read fails with a reset."""
    reader, writer = await asyncio.open_connection(host, port)
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(reader.read(), TIMEOUT)
    writer.close()


def test_an_admitted_visitor_is_a_connection_that_works_both_ways_with_half_close():
    async def main():
        service = DigestService()
        listener = TcpListener("127.0.0.1", free_port(), service)
        port = await listener.open()
        payload = os.urandom(3 * 1024 * 1024 + 7)
        answers = await asyncio.gather(*(send_and_digest(port, payload[i:]) for i in range(3)))
        assert answers == [digest(payload[i:]) for i in range(3)]
        assert len(service.visitors) == 3 and all(v.peer_ip == "127.0.0.1" for v in service.visitors)
        listener.close()

    asyncio.run(main())


def test_allow_ip_refuses_a_visitor_by_its_address_before_the_callback():
    async def main():
        service = DigestService()
        outsider = TcpListener("127.0.0.1", free_port(), service, allow_networks=[ELSEWHERE])
        insider = TcpListener("127.0.0.1", free_port(), service,
                              allow_networks=[ELSEWHERE, ipaddress.ip_network("127.0.0.1/32")])
        await refused_at_once(await outsider.open())
        assert service.visitors == []
        assert await send_and_digest(await insider.open(), b"hello") == digest(b"hello")
        assert len(service.visitors) == 1
        outsider.close()
        insider.close()

    asyncio.run(main())


@pytest.mark.skipif(not has_ipv6_loopback(), reason="this host has no IPv6 loopback")
def test_ipv6_visitors_are_judged_by_their_ipv6_address():
    async def main():
        service = DigestService()
        v6_only = TcpListener("::1", free_port("::1"), service, allow_networks=[ipaddress.ip_network("::1/128")])
        v4_only = TcpListener("::1", free_port("::1"), service, allow_networks=[LOOPBACK])
        assert await send_and_digest(await v6_only.open(), b"v6", host="::1") == digest(b"v6")
        assert service.visitors[0].peer_ip == "::1"
        await refused_at_once(await v4_only.open(), "::1")  # ::1 is not in 127.0.0.0/8
        assert len(service.visitors) == 1
        v6_only.close()
        v4_only.close()

    asyncio.run(main())


def test_the_listener_is_on_its_bind_address_only():
    async def main():
        listener = TcpListener("127.0.0.2", free_port("127.0.0.2"), DigestService())
        port = await listener.open()
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", port)
        assert await send_and_digest(port, b"x", host="127.0.0.2") == digest(b"x")
        listener.close()

    asyncio.run(main())


def test_a_busy_port_is_one_line():
    async def main():
        with socket.socket() as other:
            other.bind(("127.0.0.1", 0))
            other.listen()
            port = other.getsockname()[1]
            with pytest.raises(TcpListenerError) as refused:
                await TcpListener("127.0.0.1", port, DigestService()).open()
        assert str(refused.value) == (f"cannot listen on 127.0.0.1:{port} for a TCP tunnel: the port is in use by "
                                      f"another program")

    asyncio.run(main())


def test_closing_frees_the_port_and_leaves_handed_over_visitors_alone():
    async def main():
        service = DigestService()
        listener = TcpListener("127.0.0.1", free_port(), service)
        port = await listener.open()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"before")
        await writer.drain()
        await asyncio.wait_for(wait_for(lambda: service.visitors), TIMEOUT)
        listener.close()
        assert not listener.listening
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", port)
        writer.write(b" and after")
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), TIMEOUT) == digest(b"before and after")
        writer.close()
        again = TcpListener("127.0.0.1", port, service)  # the port can be listened on again at once
        assert await again.open() == port
        again.close()

    asyncio.run(main())


def test_a_failing_hand_over_resets_that_visitor_and_the_next_one_gets_in():
    async def main():
        calls: list[Connection] = []
        service = DigestService()

        def flaky(conn: Connection) -> None:
            calls.append(conn)
            if len(calls) == 1:
                raise RuntimeError("no stream could be opened")
            service(conn)

        listener = TcpListener("127.0.0.1", free_port(), flaky)
        port = await listener.open()
        await refused_at_once(port)
        assert await send_and_digest(port, b"second") == digest(b"second")
        assert len(calls) == 2
        listener.close()

    asyncio.run(main())


async def wait_for(condition) -> None:
    while not condition():
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("peer, networks, allowed", [
    ("192.0.2.7", [], True),
    ("192.0.2.7", ["192.0.2.0/24"], True),
    ("192.0.2.7", ["198.51.100.0/24"], False),
    ("::ffff:192.0.2.7", ["192.0.2.0/24"], True),
    ("::ffff:192.0.2.7", ["198.51.100.0/24"], False),
    ("2001:db8::7", ["2001:db8::/32"], True),
    ("2001:db8::7", ["192.0.2.0/24"], False),
    ("fe80::7%eth0", ["fe80::/10"], True),
    ("not-an-address", ["0.0.0.0/0"], False),
    ("", ["0.0.0.0/0"], False),
])
def test_peer_allowed(peer, networks, allowed):
    assert peer_allowed(peer, [ipaddress.ip_network(n) for n in networks]) is allowed
