"""An agent moving off a stopping cluster node (MOVE): the old node may open a stream for a visitor just as the
agent, registered on the new node, says GO_AWAY on the old link. That stream crossed the GO_AWAY: the node counts
on it (it may already have told another node's visitor "200, here is the tunnel"), so the agent serves it, and it
closes the old link only once the node has answered GO_AWAY (nothing can be on its way any more) and its streams
are done. The node is played by a sans-I/O Mux over a real socket, which lets it send the stream's SYN after the
agent's GO_AWAY reached its socket and before it reads it; the relay's own answer is checked against a real Relay."""

from __future__ import annotations

import asyncio
import contextlib

from portway.agent.client import Agent
from portway.config import AgentConfig, RelayConfig
from portway.proto.control import LinkGrant
from portway.proto.events import DataReceived, StreamEnded, StreamReset
from portway.proto.frame import Flag, Frame, FrameType, GoAwayCode
from portway.proto.mux import Mux, MuxConfig, Role
from portway.relay.server import Relay

AGENTS_GO_AWAY = Frame(FrameType.GO_AWAY, Flag(0), 0, GoAwayCode.NORMAL).encode()
REQUEST = b"GET / HTTP/1.1\r\nHost: web.localhost\r\nConnection: close\r\n\r\n"
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"


async def origin(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(ANSWER)
    await writer.drain()


def test_a_stream_the_old_node_opened_as_the_agent_said_go_away_is_served_before_the_link_closes():
    async def main():
        loop = asyncio.get_running_loop()
        answered = bytearray()
        outcome: list[str] = []
        old_link_over = asyncio.Event()

        async def old_node(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            mux = Mux(Role.SERVER, MuxConfig())
            await reader.readuntil(b"\r\n\r\n")
            mux.move(f"127.0.0.1:{new_port}")
            writer.write(LinkGrant("web", "http://web.localhost", "key").encode() + mux.data_to_send())
            unread = b""
            while AGENTS_GO_AWAY not in unread:  # the agent registered on the new node and said GO_AWAY...
                data = await reader.read(65536)
                assert data, "the agent closed the old link without saying GO_AWAY"
                unread += data
            stream_id = mux.open_stream()  # ...which this node has not read yet: a visitor's stream crosses it
            mux.send_data(stream_id, REQUEST, end_stream=True)
            writer.write(mux.data_to_send())
            events = mux.receive_data(unread, loop.time())
            mux.go_away()  # the relay's answer to the agent's GO_AWAY (relay/agents.py)
            writer.write(mux.data_to_send())
            try:
                await follow(mux, stream_id, events, reader, writer)
            finally:
                old_link_over.set()

        async def follow(mux: Mux, stream_id: int, events: list, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
            """The old node's side of the stream until the agent closes the link."""
            while True:
                for event in events:
                    if isinstance(event, DataReceived) and event.stream_id == stream_id:
                        answered.extend(event.data)
                        mux.acknowledge_received(stream_id, len(event.data), loop.time())
                    elif isinstance(event, StreamEnded) and event.stream_id == stream_id:
                        outcome.append("ended")
                    elif isinstance(event, StreamReset) and event.stream_id == stream_id:
                        outcome.append("reset")
                writer.write(mux.data_to_send())
                try:
                    data = await reader.read(65536)
                except ConnectionError:  # closed under the stream this node just opened
                    data = b""
                if not data:
                    outcome.append("link closed")
                    return
                events = mux.receive_data(data, loop.time())

        async def new_node(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(LinkGrant("web", "http://web.localhost", "key2").encode() + Mux(Role.SERVER).data_to_send())
            await reader.read()  # held until the agent lets go

        connections: set[asyncio.Task] = set()

        def served(handler):
            async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                connections.add(asyncio.current_task())
                try:
                    await handler(reader, writer)
                finally:
                    writer.close()
                    with contextlib.suppress(ConnectionError):
                        await writer.wait_closed()
            return serve

        servers = [await asyncio.start_server(served(handler), "127.0.0.1", 0)
                   for handler in (origin, old_node, new_node)]
        origin_port, old_port, new_port = (server.sockets[0].getsockname()[1] for server in servers)
        statuses: list[str] = []
        agent = Agent(AgentConfig(port=origin_port, name="web", drain_timeout=10.0),
                      [f"http://127.0.0.1:{old_port}", f"http://127.0.0.1:{new_port}"],
                      on_url=lambda url: None, on_status=statuses.append)
        running = asyncio.ensure_future(agent.run())
        try:
            await asyncio.wait_for(old_link_over.wait(), 10)  # the agent moved, and let go of the old link
            assert f"moved to relay node at 127.0.0.1:{new_port}: http://web.localhost" in statuses
            assert outcome == ["ended", "link closed"]  # served whole, and only then let go
            assert bytes(answered) == ANSWER
        finally:
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running
            await asyncio.wait_for(asyncio.gather(*connections), 10)  # nothing is left open
            for server in servers:
                server.close()

    asyncio.run(main())


def test_the_relay_answers_an_agents_go_away_with_its_own():
    """The answer the moving agent waits for before it closes its old link."""

    async def main():
        relay = Relay(RelayConfig(port=0))
        await relay.start()
        agent = Agent(AgentConfig(port=9), f"http://127.0.0.1:{relay.port}", on_url=lambda url: None,
                      on_status=lambda text: None)
        try:
            registered = await agent.register()
            answered = asyncio.Event()
            registered.session.on_go_away = answered.set
            registered.session.go_away()
            await asyncio.wait_for(answered.wait(), 5)
            registered.session.close()
        finally:
            await relay.close()

    asyncio.run(main())
