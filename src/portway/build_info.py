"""Which build of the hot path this install runs. setup.py compiles HOT_PATH with mypyc when it can; a module
without its extension imports from source, so a machine without a C compiler still gets a working install."""

from __future__ import annotations

import importlib

HOT_PATH = (
    "portway.proto.events",
    "portway.proto.exchange",
    "portway.proto.frame",
    "portway.proto.http1",
    "portway.proto.mux",
    "portway.proto.resume",
    "portway.metrics",
    "portway.link.bridge",
    "portway.link.connection",
    "portway.link.deadlines",
    "portway.link.pipe",
    "portway.link.session",
    "portway.proto.routing",
    "portway.relay.front",
    "portway.relay.metrics",
    "portway.relay.tunnels",
)


def compiled_hot_path() -> bool:
    """Whether every hot-path module was loaded from its compiled extension rather than from source."""
    return all(not str(importlib.import_module(name).__file__).endswith(".py") for name in HOT_PATH)


def describe() -> str:
    return "hot path compiled with mypyc" if compiled_hot_path() else "pure Python"
