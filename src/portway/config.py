"""Every tunable of the relay and the agent, with its default, in one place."""

from __future__ import annotations

from dataclasses import dataclass, field

from .auth import Grant
from .proto.mux import MuxConfig

DEFAULT_RELAY_PORT = 8000


@dataclass
class RelayConfig:
    bind: str = "127.0.0.1"
    port: int = DEFAULT_RELAY_PORT
    domain: str = "localhost"
    public_port: int | None = None  # the port visitors use, when a proxy or NAT maps it (URLs only)
    idle_timeout: float = 75.0  # a keep-alive visitor connection with no request is closed after this
    head_timeout: float = 15.0  # a request head must arrive completely within this (slowloris)
    response_timeout: float = 120.0  # the origin must start answering within this, else 504
    pool_wait_timeout: float = 10.0  # how long a visitor waits for a free conduit before a 503
    grace_period: float = 10.0  # an agent that drops keeps its name this long to reconnect
    lt_grace_period: float = 5.0  # an lt tunnel whose last pool socket went keeps its name this long
    max_connections_per_ip: int = 256  # concurrent visitor connections from one address
    # Failed logins (agent tokens, tunnels' basic auth) are remembered this long; past the limits below an
    # address (or, for basic auth, a whole tunnel) is refused with 429 until the window has moved on.
    auth_failure_window: float = 60.0
    auth_failures_per_address: int = 10  # per address: agent tokens, and basic auth over all tunnels
    auth_failures_per_tunnel: int = 100  # basic auth, from all addresses together, before the tunnel locks
    grants: tuple[Grant, ...] = ()  # agent tokens; empty means anyone may register (an open relay)
    open_relay: bool = False  # knowingly run without tokens on a non-loopback address
    tls_cert: str | None = None
    tls_key: str | None = None
    mux: MuxConfig = field(default_factory=MuxConfig)


@dataclass
class AgentConfig:
    port: int
    local_host: str = "localhost"
    relay: str | None = None  # None: run an embedded relay in this process
    name: str | None = None
    token: str | None = None
    basic_auth: str | None = None
    allow_ip: list[str] = field(default_factory=list)
    ca_file: str | None = None
    mux: MuxConfig = field(default_factory=MuxConfig)
