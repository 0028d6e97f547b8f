"""Test helpers for the sans-I/O core: raw frame builders and two muxes wired back to back."""

from __future__ import annotations

from collections.abc import Iterable

from portway.proto.events import DataReceived, Event
from portway.proto.frame import (
    DEFAULT_MAX_FRAME_SIZE,
    HEADER,
    PROTOCOL_VERSION,
    Flag,
    Frame,
    FrameDecoder,
    FrameType,
)
from portway.proto.mux import Mux, MuxConfig, Role

MAX_TRANSFER_ROUNDS = 100


class FrameFactory:
    """Builds wire bytes for frames, valid or not, so tests can play a peer that says anything."""

    @staticmethod
    def header(frame_type: int, flags: int, stream_id: int, length: int, version: int = PROTOCOL_VERSION) -> bytes:
        return HEADER.pack(version, frame_type, flags, stream_id, length)

    def data(self, stream_id: int, payload: bytes = b"", flags: int = 0) -> bytes:
        return self.header(FrameType.DATA, flags, stream_id, len(payload)) + payload

    def window_update(self, stream_id: int, delta: int = 0, flags: int = 0) -> bytes:
        return self.header(FrameType.WINDOW_UPDATE, flags, stream_id, delta)

    def syn(self, stream_id: int, delta: int = 0) -> bytes:
        return self.window_update(stream_id, delta, Flag.SYN)

    def ack(self, stream_id: int, delta: int = 0) -> bytes:
        return self.window_update(stream_id, delta, Flag.ACK)

    def fin(self, stream_id: int) -> bytes:
        return self.window_update(stream_id, 0, Flag.FIN)

    def rst(self, stream_id: int) -> bytes:
        return self.window_update(stream_id, 0, Flag.RST)

    def ping(self, token: int, flags: int = Flag.SYN) -> bytes:
        return self.header(FrameType.PING, flags, 0, token)

    def go_away(self, code: int = 0) -> bytes:
        return self.header(FrameType.GO_AWAY, 0, 0, code)


def decode_all(data: bytes, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> list[Frame]:
    """Decode bytes that must hold whole frames only."""
    decoder = FrameDecoder(max_frame_size)
    decoder.feed(data)
    frames = list(decoder)
    assert not list(decoder), "trailing partial frame"
    return frames


def window_credit(frames: Iterable[Frame], stream_id: int) -> int:
    """Total window delta the frames grant on one stream."""
    return sum(f.length for f in frames if f.type is FrameType.WINDOW_UPDATE and f.stream_id == stream_id)


class MuxPair:
    """A client (agent) and a server (relay) Mux joined by a lossless in-memory link.

    ``transfer`` shuttles bytes both ways until neither side has anything to send and returns the events each
    side saw, like aioquic's ``roundtrip_until_done``; it fails if that takes too many rounds.
    """

    def __init__(
        self,
        client_config: MuxConfig | None = None,
        server_config: MuxConfig | None = None,
        now: float = 0.0,
    ) -> None:
        """``server_config`` defaults to ``client_config``, which defaults to ``MuxConfig()``. Each side's
        link-window announcement is delivered at once, like a link that has just started."""
        client_config = client_config or MuxConfig()
        self.client = Mux(Role.CLIENT, client_config, now=now)
        self.server = Mux(Role.SERVER, server_config or client_config, now=now)
        self.transfer(now)

    def side(self, role: Role) -> Mux:
        return self.client if role is Role.CLIENT else self.server

    def peer(self, mux: Mux) -> Mux:
        return self.server if mux is self.client else self.client

    def transfer(self, now: float = 0.0, *, acknowledge: bool = False) -> tuple[list[Event], list[Event]]:
        """Deliver until quiescent; with ``acknowledge``, every DataReceived is consumed on arrival."""
        client_events: list[Event] = []
        server_events: list[Event] = []
        for _ in range(MAX_TRANSFER_ROUNDS):
            to_server = self.client.data_to_send()
            to_client = self.server.data_to_send()
            if not to_server and not to_client:
                return client_events, server_events
            deliveries = ((self.server, to_server, server_events), (self.client, to_client, client_events))
            for receiver, data, seen in deliveries:
                events = receiver.receive_data(data, now)
                seen.extend(events)
                if acknowledge:
                    for event in events:
                        if isinstance(event, DataReceived):
                            receiver.acknowledge_received(event.stream_id, len(event.data), now)
        raise AssertionError(f"link still busy after {MAX_TRANSFER_ROUNDS} rounds")

    def open_stream(self, opener: Role = Role.CLIENT, now: float = 0.0) -> int:
        """Open a stream from ``opener``, have the other side accept it, and settle."""
        mux = self.side(opener)
        stream_id = mux.open_stream()
        self.transfer(now)
        self.peer(mux).accept_stream(stream_id)
        self.transfer(now)
        return stream_id
