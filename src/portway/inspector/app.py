"""The inspector in the agent: its settings, the taps the agent's bridges carry, replays, and its web server.

A tap is handed to each stream's bridge (link/bridge.py calls `to_service`, `to_visitor`, `closed`); it adds
the time and feeds the stream's `StreamCapture`, which never raises. Replays go straight to the local
service over a fresh connection and are captured the same way, as new exchanges with `replay_of` set.
"""

from __future__ import annotations

import asyncio
import errno
import time
from dataclasses import dataclass
from typing import Callable

from ..config import DEFAULT_INSPECT
from .capture import Limits, StreamCapture
from .replay import ReplayError, build_request
from .store import Store
from .web import WebServer

DEFAULT_HOST, DEFAULT_PORT = DEFAULT_INSPECT


@dataclass(frozen=True)
class InspectorConfig:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT  # 0: any free port
    next_free: bool = True  # when the port is taken, try the following ones (the default address does)
    port_attempts: int = 50
    max_exchanges: int = 500  # the newest kept
    max_body: int = 1024 * 1024  # bytes kept of each body (and of a WebSocket connection's messages)
    max_bytes: int = 128 * 1024 * 1024  # bodies and messages kept by all exchanges together
    replay_timeout: float = 30.0  # a replay's response must be complete within this

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"the inspector's port must be 0-65535, not {self.port}")
        if self.port_attempts < 1 or self.max_exchanges < 1:
            raise ValueError("the inspector needs at least one port to try and one exchange to keep")
        if self.max_body < 0 or self.max_bytes < 0 or self.replay_timeout <= 0:
            raise ValueError("the inspector's limits must be positive")

    @property
    def loopback(self) -> bool:
        return self.host in ("127.0.0.1", "localhost", "::1") or self.host.startswith("127.")


class Tap:
    """What a bridge calls as bytes cross it; `now` is added here, errors never leave."""

    __slots__ = ("capture", "clock")

    def __init__(self, capture: StreamCapture, clock) -> None:
        self.capture = capture
        self.clock = clock

    def to_service(self, chunks: list[bytes]) -> None:
        try:
            self.capture.to_service(chunks, self.clock())
        except Exception:
            pass

    def to_visitor(self, data: bytes) -> None:
        try:
            self.capture.to_visitor(data, self.clock())
        except Exception:
            pass

    def closed(self) -> None:
        try:
            self.capture.closed(self.clock())
        except Exception:
            pass


class Inspector:
    def __init__(self, config: InspectorConfig, local_host: str, local_port: int) -> None:
        self.config = config
        self.local_host = local_host
        self.local_port = local_port
        self.local_target = f"{local_host}:{local_port}"
        self.store = Store(config.max_exchanges, config.max_bytes)
        self.limits = Limits(max_body=config.max_body)
        self.web = WebServer(self)
        self.port = 0
        self.metrics: Callable[[], bytes] | None = None  # the agent's Prometheus exposition, at /metrics
        self._epoch = time.time() - time.monotonic()

    def now(self) -> float:
        """Seconds since the epoch, from a clock that never goes back."""
        return time.monotonic() + self._epoch

    @property
    def url(self) -> str:
        host = self.config.host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        return f"http://{'[' + host + ']' if ':' in host else host}:{self.port}"

    async def start(self) -> None:
        config = self.config
        attempts = config.port_attempts if config.next_free and config.port else 1
        for offset in range(attempts):
            try:
                self.port = await self.web.listen(config.host, config.port + offset if config.port else 0)
                return
            except OSError as error:
                if error.errno != errno.EADDRINUSE or offset == attempts - 1:
                    raise

    async def close(self) -> None:
        await self.web.close()

    def tap(self) -> Tap:
        """A tap for a new stream."""
        capture = StreamCapture(self.store, self.store.new_connection(), self.limits)
        return Tap(capture, self.now)

    async def replay(self, exchange_id: int, edits: dict | None = None) -> int:
        """Send a captured request again to the local service; returns the new exchange's id."""
        original = self.store.get(exchange_id)
        if original is None:
            raise ReplayError(404, "no such exchange (the inspector keeps only the newest ones)")
        data = build_request(original, edits)
        capture = StreamCapture(self.store, self.store.new_connection(), self.limits, replay_of=original.id)
        capture.to_service([data], self.now())
        replayed = capture.last
        if replayed is None:
            raise ReplayError(400, "the edited request could not be parsed")
        writer = None
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self.local_host, self.local_port), self.config.replay_timeout)
            writer.write(data)
            deadline = asyncio.get_running_loop().time() + self.config.replay_timeout
            while not replayed.finished:
                left = deadline - asyncio.get_running_loop().time()
                chunk = await asyncio.wait_for(reader.read(256 * 1024), max(left, 0))
                if not chunk:
                    break
                capture.to_visitor(chunk, self.now())
        except asyncio.TimeoutError:
            replayed.error = f"no complete response within {self.config.replay_timeout:g} s"
        except OSError as error:
            replayed.error = f"{self.local_target} could not be reached: {error.strerror or error}"
        finally:
            if writer is not None:
                writer.close()
            capture.closed(self.now())
            self.store.changed(replayed)
        return replayed.id
