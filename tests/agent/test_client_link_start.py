"""The agent's link starts with whatever the relay sent right behind its 101: the first frames may arrive in a read
of their own, after the one that completed the handshake, and they are the link's all the same. Lost, the first
was the relay's increase of the link window, and the link stalled once the agent had sent its first 1 MiB (the
suite's rare stall of downloads and WebSocket echoes on a fresh agent)."""

from __future__ import annotations

import asyncio

from portway.agent import client
from portway.config import AgentConfig
from portway.link.connection import Connection
from portway.proto.control import LinkGrant
from portway.proto.frame import INITIAL_LINK_WINDOW, Flag, Frame, FrameType

INCREASE = 31 * 1024 * 1024


class HeadFirstConnection(Connection):
    """A connection whose reads stop at the end of the first HTTP head, as when the bytes after it come in a
    packet of their own: whatever follows stays buffered, unread."""

    async def read(self) -> bytes:
        data = await super().read()
        head, end, rest = data.partition(b"\r\n\r\n")
        if end and rest:
            self.data_received(rest)
            return head + end
        return data


def test_frames_that_follow_the_101_in_another_read_reach_the_link(monkeypatch):
    async def main() -> None:
        hung_up = asyncio.Event()

        async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            grant = LinkGrant("first", "http://first.localhost:9", "key").encode()
            writer.write(grant + Frame(FrameType.WINDOW_UPDATE, Flag(0), 0, INCREASE).encode())
            await writer.drain()
            await reader.read()  # until the agent hangs up
            writer.close()
            await writer.wait_closed()
            hung_up.set()

        server = await asyncio.start_server(relay, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        monkeypatch.setattr(client, "Connection", HeadFirstConnection)
        agent = client.Agent(AgentConfig(port=9, relay=f"http://127.0.0.1:{port}", name="first"),
                             f"http://127.0.0.1:{port}", on_url=lambda url: None, on_status=lambda status: None)
        registered = await agent.register()
        assert registered.session.mux.link_send_window == INITIAL_LINK_WINDOW + INCREASE
        registered.session.close()
        await asyncio.wait_for(hung_up.wait(), 10)
        server.close()
        await server.wait_closed()

    asyncio.run(main())
