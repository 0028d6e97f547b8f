"""Portway's exception tree, split by who is at fault.

    PortwayError
    ├── PeerError                  the other end misbehaved or went away
    │   ├── ProtocolError          an agent link's peer broke the frame protocol; carries a GO_AWAY code
    │   │   └── FrameError         bytes that are not a valid frame
    │   ├── ConduitReset           a connection or stream was aborted by its other end (also a ConnectionError)
    │   └── VisitorGone            the visitor closed or reset its connection: nothing more can be sent to it
    ├── HttpError                  a request answered with an error page: 4xx the visitor's fault, 5xx the
    │                              origin's or the agent's; carries the status and the message
    ├── RegistrationError          the relay refused a tunnel (bad token, name taken…); carries status and message
    │   └── LtRefused              the same for a localtunnel client, which only reads a message
    ├── MuxClosedError             this side asked the multiplexer for something after the link closed
    └── ConfigurationError         the operator's or the user's configuration is wrong (also a ValueError)
        ├── InsecureConfiguration  a relay reachable from the network without tokens, not said to be open
        ├── TokenFileError         the tokens file can't be read or is malformed
        └── InvalidName            a tunnel name that is not a DNS label, or belongs to the relay
"""

from __future__ import annotations


class PortwayError(Exception):
    """Base of every error Portway raises on purpose."""


class PeerError(PortwayError):
    """The other end of a connection did something this side can only react to."""


class ProtocolError(PeerError):
    """The remote side violated the multiplexing protocol; the link must be closed."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


class FrameError(ProtocolError):
    """Bytes on the agent link could not be decoded as a frame."""


class ConduitReset(PeerError, ConnectionError):
    """The other end aborted: whatever was in flight is lost and must be shown as lost."""


class VisitorGone(PeerError):
    """The visitor closed or reset its connection; nothing more can be sent to it."""


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


class LtRefused(RegistrationError):
    """A registration the relay turns down for a localtunnel client; `message` is what the `lt` user reads."""

    def __init__(self, message: str) -> None:
        super().__init__(0, message)


class ConfigurationError(PortwayError, ValueError):
    """A setting that can't work; the message says which and what is allowed."""


class InsecureConfiguration(ConfigurationError):
    """The relay configuration would expose an unauthenticated relay."""


class TokenFileError(ConfigurationError):
    """The tokens file can't be read or is malformed."""


class InvalidName(ConfigurationError):
    """A tunnel name that is not a DNS label or is reserved for the relay itself."""
