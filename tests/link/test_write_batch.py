"""Connection writes held while a link read is dispatched (connection.WriteBatch): they leave back to back after
the last delivery, each connection's bytes in order, and before anything else is done with a held connection."""

from __future__ import annotations

import asyncio

import pytest

from portway.link.connection import BATCH_HOLDS_UP_TO, Connection, write_batch
from portway.proto.mux import MuxConfig

from .test_session_delivery import linked


class Transport:
    """Records what is done to it, in one log shared by every transport of a test."""

    def __init__(self, name: str, log: list[tuple[str, str, bytes]]) -> None:
        self.name = name
        self.log = log
        self.closing = False

    def write(self, data) -> None:
        self.log.append((self.name, "write", bytes(data)))

    def writelines(self, buffers) -> None:
        self.log.append((self.name, "write", b"".join(bytes(buffer) for buffer in buffers)))

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True
        self.log.append((self.name, "close", b""))

    def abort(self) -> None:
        self.closing = True
        self.log.append((self.name, "abort", b""))

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.log.append((self.name, "eof", b""))

    def set_protocol(self, protocol) -> None:
        self.log.append((self.name, "handed over", b""))

    def get_extra_info(self, name, default=None):
        return default


@pytest.fixture(autouse=True)
def no_batch_left_open():
    """Each test ends with the batch closed; one that fails midway must not leave it open for the next."""
    yield
    open_depth, held = write_batch.depth, write_batch.held_bytes
    write_batch.depth = 0
    write_batch.flush()
    assert (open_depth, held) == (0, 0)


def connections(*names: str) -> tuple[list[Connection], list[tuple[str, str, bytes]]]:
    log: list[tuple[str, str, bytes]] = []
    conns = []
    for name in names:
        conn = Connection()
        conn.connection_made(Transport(name, log))
        conns.append(conn)
    return conns, log


def in_loop(test):
    """Runs `test` inside an event loop (a Connection needs one)."""

    async def main():
        test()

    asyncio.run(main())


def test_outside_a_batch_writes_go_straight_out():
    def test():
        (a,), log = connections("a")
        a.write(b"one")
        a.writelines([b"two", memoryview(b"three")])
        assert log == [("a", "write", b"one"), ("a", "write", b"twothree")]

    in_loop(test)


def test_a_batch_holds_writes_until_its_end_and_keeps_their_order():
    def test():
        (a, b), log = connections("a", "b")
        write_batch.begin()
        a.writelines([b"HTTP/1.1 200 OK\r\n\r\n", b"a1"])
        b.write(b"b1")
        a.write(b"a2")
        assert log == []
        write_batch.end()
        assert log == [("a", "write", b"HTTP/1.1 200 OK\r\n\r\na1"), ("b", "write", b"b1"), ("a", "write", b"a2")]

    in_loop(test)


def test_nested_batches_write_at_the_outermost_end():
    def test():
        (a,), log = connections("a")
        write_batch.begin()
        write_batch.begin()
        a.write(b"x")
        write_batch.end()
        assert log == []
        write_batch.end()
        assert log == [("a", "write", b"x")]

    in_loop(test)


@pytest.mark.parametrize(
    "operation, logged",
    [
        (Connection.close, "close"),
        (Connection.abort, "abort"),
        (Connection.write_eof, "eof"),
        (lambda conn: conn.hand_over(asyncio.Protocol()), "handed over"),
    ],
    ids=["close", "abort", "write_eof", "hand_over"],
)
def test_what_is_held_leaves_before_a_connection_is_closed_ended_or_handed_over(operation, logged):
    def test():
        (a, b), log = connections("a", "b")
        write_batch.begin()
        b.write(b"for b")
        a.write(b"last words")
        operation(a)
        assert log == [("b", "write", b"for b"), ("a", "write", b"last words"), ("a", logged, b"")]
        write_batch.end()
        assert len(log) == 3

    in_loop(test)


def test_a_write_past_the_bound_sends_what_is_held_then_goes_straight_out():
    def test():
        (a, b), log = connections("a", "b")
        write_batch.begin()
        a.write(b"small")
        big = b"x" * BATCH_HOLDS_UP_TO
        b.writelines([big])
        assert log == [("a", "write", b"small"), ("b", "write", big)]
        a.write(b"after")
        assert write_batch.held_bytes == 5
        write_batch.end()
        assert log[-1] == ("a", "write", b"after")

    in_loop(test)


def test_a_transport_closed_while_held_is_not_written():
    def test():
        (a, b), log = connections("a", "b")
        write_batch.begin()
        a.write(b"gone")
        b.write(b"kept")
        a.transport.closing = True  # lost under the batch, as a transport closed by the loop would be
        write_batch.end()
        assert log == [("b", "write", b"kept")]

    in_loop(test)


class WritingSink:
    """A stream's sink that writes what it is handed to a connection, as the relay's callbacks answer visitors."""

    def __init__(self, conn: Connection, log: list[tuple[str, str, bytes]], fail: bool = False) -> None:
        self.conn = conn
        self.log = log
        self.fail = fail

    def stream_data(self, chunks) -> None:
        self.log.append((self.conn.transport.name, "delivered", b""))
        self.conn.writelines(list(chunks))
        if self.fail:
            raise RuntimeError("sink failed")

    def stream_ended(self) -> None:
        pass

    def stream_reset(self) -> None:
        pass

    def window_opened(self) -> None:
        pass


def run_deliveries(fail_first: bool):
    """Two streams, each with a sink writing to its own connection; the peer's answers for both arrive in one
    link read. Returns the log, and the exception the read raised (if any)."""

    async def main():
        session, _, peer, streams = linked(MuxConfig(), 2)
        (a, b), log = connections("a", "b")
        streams[0].attach(WritingSink(a, log, fail=fail_first))
        streams[1].attach(WritingSink(b, log))
        peer.send_data(streams[0].stream_id, b"answer a")
        peer.send_data(streams[1].stream_id, b"answer b")
        raised = None
        try:
            session.data_received(peer.data_to_send())
        except RuntimeError as error:
            raised = error
        session.close()
        return log, raised

    return asyncio.run(main())


def test_a_link_read_answers_every_stream_before_writing_any():
    log, raised = run_deliveries(fail_first=False)
    assert raised is None
    assert log == [
        ("a", "delivered", b""),
        ("b", "delivered", b""),
        ("a", "write", b"answer a"),
        ("b", "write", b"answer b"),
    ]


def test_a_sink_that_raises_still_ends_the_batch_and_sends_what_was_held():
    log, raised = run_deliveries(fail_first=True)
    assert isinstance(raised, RuntimeError)
    assert ("a", "write", b"answer a") in log
