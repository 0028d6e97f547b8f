"""Every setting of both roles in one place: its flag, its environment variable, its default and its check.

Each role has a table of :class:`Setting`; the CLI builds its flags from the table, and :func:`load` turns what
was given — flags over `PORTWAY_*` environment variables over the defaults (a config file will sit between the
environment and the defaults) — into a frozen, validated :class:`RelayConfig` or :class:`AgentConfig`. A bad value
is a :class:`~portway.errors.ConfigurationError` naming the flag and what it allows.
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping

from .auth import Grant, hash_token, load_tokens_file
from .errors import ConfigurationError, InvalidName
from .proto.mux import MuxConfig
from .proto.names import validate_name

DEFAULT_RELAY_PORT = 8000
DEFAULT_INSPECT = ("127.0.0.1", 4040)  # the inspector's address, or the next free port after it


# ----------------------------------------------------------------------------------------------- value checks

def seconds(text: str) -> float:
    value = float(text)
    if not 0 < value < math.inf:
        raise ValueError("must be a positive number of seconds")
    return value


def seconds_or_zero(text: str) -> float:
    value = float(text)
    if not 0 <= value < math.inf:
        raise ValueError("must be 0 or a positive number of seconds")
    return value


def port_number(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError("must be a port number (0-65535)")
    return value


MIB = 1024 * 1024


def mebibytes(text: str) -> int:
    value = float(text)
    if not 1 <= value < 2048:
        raise ValueError("must be at least 1 and under 2048 (MiB)")
    return round(value * MIB)


def count(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError("must be at least 1")
    return value


def listen_address(text: str) -> tuple[str, int]:
    """`HOST:PORT`, `[V6]:PORT` or `:PORT` (loopback) as (host, port)."""
    host, _, port = text.rpartition(":")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("must be HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


def inspect_address(text: str) -> tuple[str, int]:
    """`PORT`, `HOST`, `HOST:PORT` or `[IPv6]:PORT` → (host, port); a bare host keeps the default port."""
    text = text.strip()
    if text.isdigit():
        return DEFAULT_INSPECT[0], _port(text)
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if not host or (rest and not rest.startswith(":")):
            raise ValueError(f"not an address: {text!r}")
        return host, _port(rest[1:]) if rest else DEFAULT_INSPECT[1]
    host, sep, port = text.rpartition(":")
    if not sep:
        return text, DEFAULT_INSPECT[1]
    if not host or ":" in host:
        raise ValueError(f"not an address: {text!r} (write IPv6 as [::1]:4040)")
    return host, _port(port)


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise ValueError(f"not a port: {text!r}")
    return int(text)


def local_target(text: str) -> tuple[str | None, int]:
    """What `portway http` exposes: `PORT`, `HOST:PORT` or `[V6]:PORT` (host None: --local-host's)."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = None, text
    elif host.startswith("["):
        host = host[1:-1] if host.endswith("]") else ""
    if host == "" or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{text!r} is not a port (1-65535) or HOST:PORT")
    return host, int(port)


def user_password(text: str) -> str:
    if ":" not in text:
        raise ValueError("must be USER:PASS")
    return text


def network(text: str) -> str:
    ipaddress.ip_network(text, strict=False)
    return text


def tunnel_name(text: str) -> str:
    try:
        return validate_name(text)
    except InvalidName as error:
        raise ValueError(str(error)) from None


def log_format(text: str) -> str:
    if text not in ("text", "json"):
        raise ValueError("must be text or json")
    return text


def text(value: str) -> str:
    return value


def switch(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


# ----------------------------------------------------------------------------------------------- settings

@dataclass(frozen=True)
class Setting:
    """One setting: `key` is its field in the config (and its key in a config file)."""

    key: str
    flag: str
    parse: Callable[[str], Any]
    default: Any
    help: str
    metavar: str | None = None
    repeatable: bool = False  # a list: the flag may be given many times, the variable holds a comma-separated list
    is_switch: bool = False  # --flag / --no-flag
    is_flag: bool = False  # a flag without a value that turns something on (or, named --no-…, off)

    @property
    def env(self) -> str:
        return "PORTWAY_" + self.key.upper()


KEEPALIVE = (
    Setting("keepalive_interval", "--keepalive-interval", seconds, MuxConfig.keepalive_interval,
            "seconds without hearing from the other end of the agent link before pinging it", "SECONDS"),
    Setting("keepalive_timeout", "--keepalive-timeout", seconds, MuxConfig.keepalive_timeout,
            "seconds a ping may go unanswered before the agent link is declared dead", "SECONDS"),
)

RESUME = (
    Setting("resume_window", "--resume-window", seconds_or_zero, MuxConfig.resume_window,
            "seconds the streams of a lost agent link (downloads, uploads, WebSockets) wait for the agent to be back "
            "and carry on; both ends keep them (0: they end with the link)", "SECONDS"),
)

RELAY_SETTINGS = (
    Setting("bind", "--bind", text, "127.0.0.1", "address to listen on", "ADDR"),
    Setting("port", "--port", port_number, DEFAULT_RELAY_PORT, "port for visitors and agents alike", "PORT"),
    Setting("domain", "--domain", text, "localhost", "base domain: tunnels are NAME.DOMAIN"),
    Setting("public_port", "--public-port", port_number, None,
            "port shown in tunnel URLs when a proxy or NAT maps it (default: --port)", "PORT"),
    Setting("grace_period", "--grace-period", seconds, 10.0, "seconds a disconnected agent keeps its name",
            "SECONDS"),
    Setting("tokens", "--token", text, (), "accept agents presenting this token (repeatable)", "SECRET",
            repeatable=True),
    Setting("tokens_file", "--tokens", text, None,
            "TOML file of [[token]] entries: sha256, label, names (reserved), max_tunnels", "FILE"),
    Setting("open_relay", "--open", switch, False,
            "allow running without tokens on a non-loopback address (anyone may open tunnels)", is_switch=True),
    Setting("tls_cert", "--tls-cert", text, None, "certificate chain (PEM): serve HTTPS/WSS and TLS to agents",
            "FILE"),
    Setting("tls_key", "--tls-key", text, None, "private key (PEM) for --tls-cert", "FILE"),
    Setting("tls_reload_interval", "--tls-reload-interval", seconds, 10.0,
            "seconds between checks of --tls-cert/--tls-key for a new certificate (SIGHUP reloads at once)",
            "SECONDS"),
    Setting("head_timeout", "--head-timeout", seconds, 15.0,
            "seconds a request head may take to arrive once started", "SECONDS"),
    Setting("idle_timeout", "--idle-timeout", seconds, 75.0,
            "seconds an idle keep-alive visitor connection is kept", "SECONDS"),
    Setting("max_connections_per_ip", "--max-connections-per-ip", count, 256,
            "concurrent visitor connections allowed from one address", "N"),
    Setting("auth_failure_window", "--auth-failure-window", seconds, 60.0,
            "seconds failed logins (agent tokens, tunnels' basic auth) count: past 10 from one address, or 100 on "
            "one basic-auth tunnel, logins are refused with 429", "SECONDS"),
    Setting("link_window", "--link-window", mebibytes, MuxConfig.link_window,
            "MiB of visitor data one agent link may have on its way to the relay or buffered there, over all its "
            "streams: what a hostile agent can make the relay hold; many stalled visitors of one tunnel can fill it "
            "and make its other visitors wait (default 32)", "MIB"),
    Setting("response_timeout", "--response-timeout", seconds, 120.0,
            "seconds the origin may take to start its answer (else 504), or pause in it", "SECONDS"),
    Setting("pool_wait_timeout", "--pool-wait-timeout", seconds, 10.0,
            "seconds a visitor waits for a free lt pool socket before a 503", "SECONDS"),
    Setting("lt_grace_period", "--lt-grace-period", seconds, 5.0,
            "seconds an lt tunnel whose sockets all closed keeps its name", "SECONDS"),
    Setting("metrics", "--metrics", listen_address, None,
            "serve Prometheus metrics at http://ADDR/metrics, e.g. 127.0.0.1:9100 (default: off)", "ADDR"),
    Setting("access_log", "--access-log", switch, True, "a line per visitor request on stderr", is_switch=True),
    Setting("log_format", "--log-format", log_format, "text",
            "access log lines as text or one JSON object per line (text, json)", "FORMAT"),
    *KEEPALIVE,
    *RESUME,
)

AGENT_SETTINGS = (
    Setting("relay", "--relay", text, None,
            "relay URL, e.g. https://relay.example.com (default: an embedded relay on 127.0.0.1 with *.localhost "
            "names)", "URL"),
    Setting("name", "--name", tunnel_name, None, "tunnel name (default: a random readable one)"),
    Setting("local_host", "--local-host", text, "localhost", "host of the local service"),
    Setting("token", "--token", text, None, "token the relay asks for"),
    Setting("basic_auth", "--basic-auth", user_password, None,
            "visitors must log in with this user name and password", "USER:PASS"),
    Setting("allow_ip", "--allow-ip", network, (), "only visitors from these networks may connect (repeatable)",
            "CIDR", repeatable=True),
    Setting("ca_file", "--ca", text, None, "CA certificate(s) to verify an https:// relay with", "FILE"),
    Setting("wait_for_relay", "--wait-for-relay", switch, True,
            "when the relay can't be reached at start, keep trying (as after a dropped link) instead of exiting",
            is_switch=True),
    Setting("inspect", "--inspect", inspect_address, None,
            "serve the inspector on ADDR: PORT, HOST:PORT or [V6]:PORT, which must be free "
            "(default 127.0.0.1:4040, or the next free port)", "ADDR"),
    Setting("no_inspect", "--no-inspect", switch, False, "run without the inspector", is_flag=True),
    Setting("log_format", "--log-format", log_format, "text",
            "when stderr is not a terminal, a line per request as text or one JSON object per line (text, json)",
            "FORMAT"),
    *KEEPALIVE,
    *RESUME,
)


def load(settings: tuple[Setting, ...], given: Mapping[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """The value of every setting: what was `given` (flags, already parsed), else its `PORTWAY_*` variable, else
    its default. A variable that doesn't parse is a ConfigurationError naming it."""
    values: dict[str, Any] = {}
    for setting in settings:
        if setting.key in given:
            values[setting.key] = given[setting.key]
            continue
        raw = environ.get(setting.env)
        if raw is None or raw == "":
            values[setting.key] = setting.default
            continue
        try:
            if setting.repeatable:
                values[setting.key] = tuple(setting.parse(part.strip()) for part in raw.split(",") if part.strip())
            else:
                values[setting.key] = setting.parse(raw)
        except ValueError as error:
            raise ConfigurationError(f"${setting.env}={raw!r}: {error}") from None
    return values


# ----------------------------------------------------------------------------------------------- the configs

@dataclass(frozen=True)
class RelayConfig:
    """Everything a relay runs with. `grants` and `mux` are derived from the settings by :func:`relay_config`."""

    bind: str = "127.0.0.1"
    port: int = DEFAULT_RELAY_PORT
    domain: str = "localhost"
    public_port: int | None = None  # the port visitors use, when a proxy or NAT maps it (URLs only)
    idle_timeout: float = 75.0  # a keep-alive visitor connection with no request is closed after this
    head_timeout: float = 15.0  # a request head must arrive completely within this (slowloris)
    response_timeout: float = 120.0  # the origin must start answering within this, else 504; nor fall silent
    linger_timeout: float = 2.0  # after answering a request not yet fully received, discard its rest this long
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
    tls_reload_interval: float = 10.0  # how often the certificate files are checked for a renewal
    metrics: tuple[str, int] | None = None  # (host, port) of a Prometheus listener of its own; None: off
    access_log: bool = False  # a line per request on stderr (the CLI turns it on)
    log_format: str = "text"  # or "json": one object per line
    mux: MuxConfig = field(default_factory=MuxConfig)

    def __post_init__(self) -> None:
        for name in ("idle_timeout", "head_timeout", "response_timeout", "linger_timeout", "pool_wait_timeout",
                     "grace_period", "lt_grace_period", "auth_failure_window", "tls_reload_interval"):
            if not 0 < getattr(self, name) < math.inf:
                raise ConfigurationError(f"{name} must be a positive number of seconds, got {getattr(self, name)}")
        if self.max_connections_per_ip < 1:
            raise ConfigurationError("max_connections_per_ip must be at least 1")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigurationError("--tls-cert and --tls-key go together")
        log_format(self.log_format)


@dataclass(frozen=True)
class AgentConfig:
    """Everything an agent runs with."""

    port: int
    local_host: str = "localhost"
    relay: str | None = None  # None: run an embedded relay in this process
    name: str | None = None
    token: str | None = None
    basic_auth: str | None = None
    allow_ip: tuple[str, ...] = ()
    ca_file: str | None = None
    wait_for_relay: bool = True  # an unreachable relay at start is retried, not a reason to exit
    inspect: tuple[str, int] | None = None  # the inspector's address; None: the default one, or the next free
    no_inspect: bool = False
    log_format: str = "text"  # stderr not a terminal: a line per request, text or "json" (one object per line)
    mux: MuxConfig = field(default_factory=MuxConfig)

    def __post_init__(self) -> None:
        log_format(self.log_format)
        if not 1 <= self.port <= 65535:
            raise ConfigurationError(f"the local port must be 1-65535, got {self.port}")


def _mux_config(values: Mapping[str, Any]) -> MuxConfig:
    extra = {"link_window": values["link_window"]} if "link_window" in values else {}
    try:
        return MuxConfig(keepalive_interval=values["keepalive_interval"],
                         keepalive_timeout=values["keepalive_timeout"], resume_window=values["resume_window"],
                         **extra)
    except ValueError as error:
        raise ConfigurationError(str(error)) from None


def relay_config(values: Mapping[str, Any]) -> RelayConfig:
    """A relay's config from the values of RELAY_SETTINGS (see :func:`load`); reads the tokens file."""
    grants = [Grant(label=f"--token #{i + 1}", digest=hash_token(token)) for i, token in enumerate(values["tokens"])]
    if values["tokens_file"]:
        grants += load_tokens_file(values["tokens_file"])
    own = {item.name for item in fields(RelayConfig)}
    return RelayConfig(grants=tuple(grants), mux=_mux_config(values),
                       **{key: value for key, value in values.items() if key in own})


def agent_config(port: int, values: Mapping[str, Any]) -> AgentConfig:
    own = {item.name for item in fields(AgentConfig)}
    return AgentConfig(port=port, mux=_mux_config(values),
                       **{key: value for key, value in values.items() if key in own})
