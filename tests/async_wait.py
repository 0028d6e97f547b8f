"""Waiting on a condition inside an event loop, for the in-process tests (the end-to-end ones have their own,
outside any loop)."""

from __future__ import annotations

import asyncio


async def until(condition, what: str, timeout: float = 10.0) -> None:
    """Poll `condition` until it holds; fail naming `what` after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not condition():
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)
