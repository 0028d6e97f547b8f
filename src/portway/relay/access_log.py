"""One line per request a relay answers for a tunnel (or refuses for an unknown host), to stderr.

    2026-11-30T06:20:01Z 203.0.113.9 GET alpha.example.com /path 200 12.3ms 1234B
    {"time": "2026-11-30T06:20:01Z", "client": "203.0.113.9", "method": "GET", "host": ..., "status": 200, ...}

Lines are gathered and written once per event-loop pass, so a busy relay pays a format per request and one
write per pass, not a write per request.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import TextIO


class AccessLog:
    def __init__(self, stream: TextIO, log_format: str = "text") -> None:
        if log_format not in ("text", "json"):
            raise ValueError(f"log format must be text or json, not {log_format!r}")
        self.stream = stream
        self.json = log_format == "json"
        self._pending: list[str] = []
        self._second = -1
        self._stamp = ""

    def record(self, *, client: str, method: str, host: str, target: bytes, status: int, duration: float,
               sent: int, websocket: bool = False) -> None:
        now = int(time.time())
        if now != self._second:  # one strftime per second, not per request
            self._second = now
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
        path = target.decode("latin-1")
        if self.json:
            line = json.dumps({"time": self._stamp, "client": client, "method": method, "host": host,
                               "path": path, "status": status, "duration_ms": round(duration * 1000, 1),
                               "bytes": sent, "websocket": websocket})
        else:
            line = (f"{self._stamp} {client} {method} {host} {path} {status or '-'} {duration * 1000:.1f}ms "
                    f"{sent}B{' websocket' if websocket else ''}")
        if not self._pending:
            asyncio.get_running_loop().call_soon(self.flush)
        self._pending.append(line)

    def flush(self) -> None:
        lines, self._pending = self._pending, []
        if lines:
            try:
                self.stream.write("\n".join(lines) + "\n")
                self.stream.flush()
            except (OSError, ValueError):
                pass  # stderr closed or gone: the relay goes on serving
