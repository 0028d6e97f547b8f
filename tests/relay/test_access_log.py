"""Access log lines (relay/access_log.py): their two formats, and one write per loop pass."""

from __future__ import annotations

import asyncio
import io
import json

import pytest

from portway.relay.access_log import AccessLog


class CountingStream(io.StringIO):
    writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def log_three(log_format: str) -> CountingStream:
    stream = CountingStream()

    async def main() -> None:
        log = AccessLog(stream, log_format)
        for status in (200, 404, 0):
            log.record(client="203.0.113.9", method="GET", host="a.example.com", target=b"/p?q=1", status=status,
                       duration=0.0123, sent=1234, websocket=status == 0)
        await asyncio.sleep(0)  # the loop pass after the records: the batch goes out

    asyncio.run(main())
    return stream


def test_text_lines_are_batched_into_one_write():
    stream = log_three("text")
    lines = stream.getvalue().splitlines()
    assert stream.writes == 1 and len(lines) == 3
    assert lines[0].endswith(" 203.0.113.9 GET a.example.com /p?q=1 200 12.3ms 1234B")
    assert lines[2].endswith(" - 12.3ms 1234B websocket")


def test_json_lines():
    entries = [json.loads(line) for line in log_three("json").getvalue().splitlines()]
    assert entries[1] == {"time": entries[1]["time"], "client": "203.0.113.9", "method": "GET",
                          "host": "a.example.com", "path": "/p?q=1", "status": 404, "duration_ms": 12.3,
                          "bytes": 1234, "websocket": False}


def test_unknown_format_is_refused():
    with pytest.raises(ValueError):
        AccessLog(io.StringIO(), "xml")
