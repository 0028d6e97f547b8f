"""Portway's exception tree.

    PortwayError
    ├── ProtocolError          the peer broke the agent-link protocol; carries a GO_AWAY code
    │   └── FrameError         bytes that are not a valid frame
    ├── MuxClosedError         asked the multiplexer for something after it shut down or went away
    ├── HttpError              a visitor's request can't be served; carries the status and page to send
    └── RegistrationError      the relay refused an agent or lt client; carries the HTTP status and message
"""

from __future__ import annotations


class PortwayError(Exception):
    """Base of every error Portway raises on purpose."""


class ProtocolError(PortwayError):
    """The remote side violated the multiplexing protocol; the link must be closed."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


class FrameError(ProtocolError):
    """Bytes on the agent link could not be decoded as a frame."""


class MuxClosedError(PortwayError):
    """The multiplexer is closed or going away; no new streams can be opened."""


class HttpError(PortwayError):
    """A visitor request that must be answered with an error status and then, maybe, closed."""

    def __init__(self, status: int, message: str, *, close: bool = True,
                 headers: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.close = close
        self.headers = headers  # extra response headers, such as Retry-After


class RegistrationError(PortwayError):
    """The relay refused to register a tunnel (bad token, name taken, invalid name)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
