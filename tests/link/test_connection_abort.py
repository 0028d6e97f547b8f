"""Aborting a connection whose socket is already gone (the visitor left first) is quiet, on uvloop as on asyncio."""

from __future__ import annotations

import asyncio

import pytest
import uvloop

from portway.link.connection import Connection, abort_with_reset


@pytest.mark.parametrize("run", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])
def test_abort_with_reset_after_the_socket_closed(run):
    async def main():
        loop = asyncio.get_running_loop()
        accepted: list[Connection] = []
        server = await loop.create_server(lambda: accepted.append(Connection()) or accepted[-1], "127.0.0.1", 0)
        transport, conn = await loop.create_connection(Connection, "127.0.0.1", server.sockets[0].getsockname()[1])
        transport.close()
        await asyncio.wait_for(conn.closed, 5)
        abort_with_reset(transport)  # uvloop's socket stand-in raised ValueError here
        conn.abort()
        for other in accepted:
            other.close()
            await asyncio.wait_for(other.closed, 5)
        server.close()
        await server.wait_closed()

    run(main())
