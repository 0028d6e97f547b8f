"""localtunnel compatibility: serves the stock `lt` client (placeholder until implemented)."""

from __future__ import annotations


class LocalTunnelService:
    def __init__(self, relay) -> None:
        self.relay = relay

    def wants(self, head, path: str, query: str) -> bool:
        return False

    async def serve(self, visitor, head, path: str, query: str) -> bool:
        raise NotImplementedError
