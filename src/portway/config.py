"""Every setting of both roles in one place: its flag, its environment variable, its default and its check.

Each role has a table of :class:`Setting`; the CLI builds its flags from the table, and :func:`load` turns what
was given — flags over `PORTWAY_*` environment variables over a config file (read by :mod:`portway.configfile`)
over the defaults — into a frozen, validated :class:`RelayConfig` or :class:`AgentConfig`. A bad value is a
:class:`~portway.errors.ConfigurationError` naming the flag, variable or file key and what it allows.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.parse import parse_qs, unquote, urlsplit

from .auth import Grant, hash_token, load_tokens_file
from .errors import ConfigurationError, InvalidName
from .proto.mux import MuxConfig

_MUX_DEFAULTS = MuxConfig()  # read by instance: a compiled MuxConfig keeps its defaults out of class attributes
from .proto.names import validate_name
from .proto.port_sets import describe_port_set, parse_port_set

DEFAULT_RELAY_PORT = 8000
DEFAULT_INSPECT = ("127.0.0.1", 4040)  # the inspector's address, or the next free port after it
LETS_ENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"
TSIG_ALGORITHMS = ("hmac-sha256", "hmac-sha384", "hmac-sha512", "hmac-sha224", "hmac-sha1", "hmac-md5")


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


def tcp_ports(text: str) -> frozenset[int]:
    """`--tcp-ports`: a range `20000-20100`, a list `20001,20005`, or both mixed."""
    return parse_port_set(text)


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


def proxy_protocol_version(text: str) -> str:
    if text not in ("v1", "v2"):
        raise ValueError("must be v1 or v2")
    return text


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


SCHEDULING = ("auto", "batch", "normal")
"""The agent's CPU scheduling (--scheduling): SCHED_BATCH while busy (runtime.SchedulingGovernor), always, never."""


def scheduling(text: str) -> str:
    if text not in SCHEDULING:
        raise ValueError("must be auto, batch or normal")
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


@dataclass(frozen=True)
class DnsUpdateTarget:
    """Where and how TXT records are set by RFC 2136 dynamic update: from
    `rfc2136://KEYNAME:SECRET@HOST:PORT/ZONE?algorithm=hmac-sha256` (SECRET base64, percent-encoded where it has
    `/` or `+`; PORT default 53; ZONE default: the relay's domain)."""

    key_name: str
    secret: str = field(repr=False)  # never in a log line or a traceback
    host: str
    port: int
    zone: str | None
    algorithm: str = "hmac-sha256"

    @classmethod
    def parse(cls, url: str) -> DnsUpdateTarget:
        parts = urlsplit(url)
        if parts.scheme != "rfc2136":
            raise ValueError("must be rfc2136://KEYNAME:SECRET@HOST:PORT/ZONE")
        if not parts.username or parts.password is None:
            raise ValueError("rfc2136:// needs the TSIG key as KEYNAME:SECRET@ before the host")
        if not parts.hostname:
            raise ValueError("rfc2136:// needs the DNS server's HOST")
        try:
            port = parts.port or 53
        except ValueError:
            raise ValueError("rfc2136:// has a bad port") from None
        secret = unquote(parts.password)
        try:
            base64.b64decode(secret, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("the TSIG secret must be base64 (percent-encode '/' as %2F and '+' as %2B)") from None
        query = parse_qs(parts.query)
        algorithm = query.pop("algorithm", ["hmac-sha256"])[-1].lower()
        if query:
            raise ValueError(f"rfc2136:// knows only ?algorithm=, not {', '.join(sorted(query))}")
        if algorithm not in TSIG_ALGORITHMS:
            raise ValueError(f"TSIG algorithm must be one of {', '.join(TSIG_ALGORITHMS)}")
        zone = parts.path.strip("/") or None
        return cls(unquote(parts.username), secret, parts.hostname, port, zone, algorithm)

    def __str__(self) -> str:  # never the secret
        return f"rfc2136://{self.key_name}@{self.host}:{self.port}/{self.zone or ''}"


def rfc2136_url(text: str) -> DnsUpdateTarget:
    return DnsUpdateTarget.parse(text)


def email(text: str) -> str:
    if "@" not in text.strip("@"):
        raise ValueError("must be an e-mail address")
    return text


@dataclass(frozen=True)
class ClusterTarget:
    """Where the registry is: a plain Redis URL (`redis://`, `rediss://`, `unix://`, as redis-py reads them), or
    Sentinels and the service they watch, from `redis+sentinel://[:PASSWORD@]HOST:PORT[,HOST:PORT...]/SERVICE[/DB]`
    (PASSWORD is the master's)."""

    url: str = field(repr=False)  # may carry a password
    sentinels: tuple[tuple[str, int], ...] = ()
    service: str = ""
    db: int = 0
    password: str | None = field(default=None, repr=False)

    @classmethod
    def parse(cls, url: str) -> ClusterTarget:
        parts = urlsplit(url)
        if parts.scheme in ("redis", "rediss", "unix"):
            if parts.scheme != "unix" and not parts.hostname:
                raise ValueError(f"{parts.scheme}:// needs a HOST")
            return cls(url)
        if parts.scheme != "redis+sentinel":
            raise ValueError("must be redis://HOST:PORT/DB, rediss://…, unix://PATH or "
                             "redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE[/DB]")
        credentials, _, hosts = parts.netloc.rpartition("@")
        sentinels = []
        for item in hosts.split(","):
            host, sep, port = item.rpartition(":")
            if not sep or not port.isdigit() or not host:
                raise ValueError(f"redis+sentinel:// needs HOST:PORT for every sentinel, not {item!r}")
            sentinels.append((host.strip("[]"), int(port)))
        path = [part for part in parts.path.split("/") if part]
        if not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
            raise ValueError("redis+sentinel:// needs the service name after the sentinels: …/SERVICE[/DB]")
        password = unquote(credentials.partition(":")[2]) if credentials else None
        return cls(url, tuple(sentinels), path[0], int(path[1]) if len(path) == 2 else 0, password or None)

    def __str__(self) -> str:  # never the password
        if self.sentinels:
            hosts = ",".join(f"{host}:{port}" for host, port in self.sentinels)
            return f"redis+sentinel://{hosts}/{self.service}/{self.db}"
        parts = urlsplit(self.url)
        return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()



def cluster_target(text: str) -> ClusterTarget:
    return ClusterTarget.parse(text)


def node_id(text: str) -> str:
    if not 1 <= len(text) <= 64 or not all(ch.isascii() and (ch.isalnum() or ch in "._-") for ch in text):
        raise ValueError("must be 1-64 letters, digits, '.', '_' or '-'")
    return text


def host_port(text: str) -> str:
    host, _, port = text.rpartition(":")
    if not host.strip("[]") or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError("must be HOST:PORT")
    return text


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
    is_path: bool = False  # a file: a relative path in a config file is relative to that file's folder
    one_or_more: bool = False  # repeatable, and a config file may give one value as it is, not in an array

    @property
    def env(self) -> str:
        return "PORTWAY_" + self.key.upper()


DRAIN = Setting("drain_timeout", "--drain-timeout", seconds, 30.0,
                "on SIGTERM or Ctrl-C, seconds the exchanges in flight may take to finish before they are cut (a "
                "second signal stops at once)", "SECONDS")

KEEPALIVE = (
    Setting("keepalive_interval", "--keepalive-interval", seconds, _MUX_DEFAULTS.keepalive_interval,
            "seconds without hearing from the other end of the agent link before pinging it; below "
            "--keepalive-timeout (default: a third of it)", "SECONDS"),
    Setting("keepalive_timeout", "--keepalive-timeout", seconds, _MUX_DEFAULTS.keepalive_timeout,
            "seconds the other end of the agent link may stay silent before the link is declared dead (it is "
            "pinged well before): the bound for noticing a dead link or a frozen peer (default 10)", "SECONDS"),
)

RESUME = (
    Setting("resume_window", "--resume-window", seconds_or_zero, _MUX_DEFAULTS.resume_window,
            "seconds the streams of a lost agent link (downloads, uploads, WebSockets) wait for the agent to be back "
            "and carry on; both ends keep them (0: they end with the link)", "SECONDS"),
)

RELAY_SETTINGS = (
    Setting("bind", "--bind", text, "127.0.0.1", "address to listen on", "ADDR"),
    Setting("port", "--port", port_number, DEFAULT_RELAY_PORT, "port for visitors and agents alike", "PORT"),
    Setting("domain", "--domain", text, "localhost", "base domain: tunnels are NAME.DOMAIN"),
    Setting("public_port", "--public-port", port_number, None,
            "port shown in tunnel URLs when a proxy or NAT maps it (default: --port)", "PORT"),
    Setting("grace_period", "--grace-period", seconds, 300.0,
            "seconds an agent whose link dropped keeps its name while it reconnects; nobody else can take it "
            "meanwhile (an agent stopped on purpose frees it at once)", "SECONDS"),
    Setting("tcp_ports", "--tcp-ports", tcp_ports, frozenset(),
            "public ports TCP tunnels may be given: a range 20000-20100, a list 20001,20005, or both "
            "(default: none)", "PORTS"),
    Setting("tokens", "--token", text, (), "accept agents presenting this token (repeatable)", "SECRET",
            repeatable=True),
    Setting("tokens_file", "--tokens", text, None,
            "TOML file of [[token]] entries: sha256, label, names and ports (reserved), max_tunnels", "FILE",
            is_path=True),
    Setting("open_relay", "--open", switch, False,
            "allow running without tokens on a non-loopback address (anyone may open tunnels)", is_switch=True),
    Setting("tls_cert", "--tls-cert", text, None, "certificate chain (PEM): serve HTTPS/WSS and TLS to agents",
            "FILE", is_path=True),
    Setting("tls_key", "--tls-key", text, None, "private key (PEM) for --tls-cert", "FILE", is_path=True),
    Setting("tls_reload_interval", "--tls-reload-interval", seconds, 10.0,
            "seconds between checks of --tls-cert/--tls-key for a new certificate (SIGHUP reloads at once)",
            "SECONDS"),
    Setting("acme_email", "--acme-email", email, None,
            "get certificates for DOMAIN and its tunnels by ACME (Let's Encrypt by default), with this contact "
            "address: a wildcard one through --acme-dns, else one per tunnel name on its first visit (TLS-ALPN-01)",
            "ADDRESS"),
    Setting("acme_directory", "--acme-directory", text, LETS_ENCRYPT,
            "the ACME server's directory URL (default: Let's Encrypt's production)", "URL"),
    Setting("acme_ca", "--acme-ca", text, None,
            "CA certificate(s) to verify the ACME server's own HTTPS with (a private or test CA)", "FILE",
            is_path=True),
    Setting("acme_dns", "--acme-dns", rfc2136_url, None,
            "get one wildcard certificate through DNS-01, setting the TXT record by RFC 2136 dynamic update: "
            "rfc2136://KEYNAME:SECRET@HOST:PORT/ZONE[?algorithm=hmac-sha256]", "URL"),
    Setting("state_dir", "--state-dir", text, None,
            "directory for the ACME account key and certificates (default: $STATE_DIRECTORY under systemd, else "
            "$XDG_STATE_HOME/portway or ~/.local/state/portway)", "DIR", is_path=True),
    Setting("head_timeout", "--head-timeout", seconds, 15.0,
            "seconds a request head may take to arrive once started", "SECONDS"),
    Setting("idle_timeout", "--idle-timeout", seconds, 75.0,
            "seconds an idle keep-alive visitor connection is kept", "SECONDS"),
    Setting("max_connections_per_ip", "--max-connections-per-ip", count, 256,
            "HTTP connections open at once from one address (heads being read, exchanges, idle keep-alive ones: "
            "an idle one is closed to make room), then 429; WebSockets and agent links count apart", "N"),
    Setting("max_upgraded_per_ip", "--max-upgraded-per-ip", count, 4096,
            "WebSockets and agent links open at once from one address (an office behind one NAT address holds "
            "many), then 429", "N"),
    Setting("max_connection_rate_per_ip", "--max-connection-rate-per-ip", count, 1000,
            "new connections per second from one address, in bursts of up to twice that, then 429", "N"),
    Setting("auth_failure_window", "--auth-failure-window", seconds, 60.0,
            "seconds failed logins (agent tokens, tunnels' basic auth) count: past 10 from one address, or 100 on "
            "one basic-auth tunnel, logins are refused with 429", "SECONDS"),
    Setting("link_window", "--link-window", mebibytes, _MUX_DEFAULTS.link_window,
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
    Setting("cluster", "--cluster", cluster_target, None,
            "run as one node of a cluster whose names are leases in this Redis: redis://HOST:PORT/DB (rediss://, "
            "unix://PATH) or redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE[/DB] (default: alone, in memory)",
            "URL"),
    Setting("node_id", "--node-id", node_id, None,
            "this node's id in the --cluster, unique among its nodes (letters, digits, '.', '_', '-')", "ID"),
    Setting("advertise", "--advertise", host_port, None,
            "where the other --cluster nodes reach this one: HOST:PORT", "HOST:PORT"),
    Setting("cluster_secret", "--cluster-secret", text, None,
            "a secret every --cluster node must share: a node started with another one refuses to join",
            "SECRET"),
    Setting("cluster_ca", "--cluster-ca", text, None,
            "CA certificate(s) trusted, besides the system's, for the other --cluster nodes' certificates (node "
            "links of a TLS node dial TLS and check each node as NODE-ID.DOMAIN)", "FILE", is_path=True),
    DRAIN,
    *KEEPALIVE,
    *RESUME,
)

AGENT_SETTINGS = (
    Setting("relay", "--relay", text, (),
            "relay URL, e.g. https://relay.example.com (default: an embedded relay on 127.0.0.1 with *.localhost "
            "names); repeatable, for the nodes of a cluster: the agent moves to the next when its node is lost (a "
            "name resolving to several addresses counts as several)", "URL", repeatable=True, one_or_more=True),
    Setting("name", "--name", tunnel_name, None, "tunnel name (default: a random readable one)"),
    Setting("local_host", "--local-host", text, "localhost", "host of the local service"),
    Setting("token", "--token", text, None, "token the relay asks for"),
    Setting("basic_auth", "--basic-auth", user_password, None,
            "visitors must log in with this user name and password", "USER:PASS"),
    Setting("allow_ip", "--allow-ip", network, (), "only visitors from these networks may connect (repeatable)",
            "CIDR", repeatable=True),
    Setting("ca_file", "--ca", text, None, "CA certificate(s) to verify an https:// relay with", "FILE",
            is_path=True),
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
    Setting("scheduling", "--scheduling", scheduling, "auto",
            "how Linux schedules the agent: batch (SCHED_BATCH: woken, it waits for its turn and forwards what "
            "arrived meanwhile together: fewer context switches per request), normal, or auto: batch while it "
            "serves many streams at once, normal otherwise", "POLICY"),
    DRAIN,
    *KEEPALIVE,
    *RESUME,
)

# `portway tcp`: the agent settings that apply to a TCP tunnel, and its own
TCP_SETTINGS = (
    *(setting for setting in AGENT_SETTINGS if setting.key not in
      ("name", "basic_auth", "inspect", "no_inspect", "log_format")),
    Setting("remote_port", "--remote-port", port_number, None,
            "public port to ask the relay for, one of its --tcp-ports (default: any free one)", "PORT"),
    Setting("proxy_protocol", "--proxy-protocol", proxy_protocol_version, None,
            "send the visitor's address to the local service first, in a PROXY protocol header (v1, v2)",
            "VERSION"),
)


def load(settings: tuple[Setting, ...], given: Mapping[str, Any], environ: Mapping[str, str],
         from_file: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The value of every setting: what was `given` (flags, already parsed), else its `PORTWAY_*` variable, else
    its value `from_file` (a config file's, already parsed), else its default. A variable that doesn't parse is a
    ConfigurationError naming it."""
    from_file = from_file or {}
    values: dict[str, Any] = {}
    for setting in settings:
        if setting.key in given:
            values[setting.key] = given[setting.key]
            continue
        raw = environ.get(setting.env)
        if raw is None or raw == "":
            values[setting.key] = from_file.get(setting.key, setting.default)
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
    grace_period: float = 300.0  # an agent that drops keeps its name this long to reconnect (its lease)
    drain_timeout: float = 30.0  # on SIGTERM, exchanges in flight may take this long to finish
    tcp_ports: frozenset[int] = frozenset()  # the public ports TCP tunnels may be given; empty: none
    lt_grace_period: float = 5.0  # an lt tunnel whose last pool socket went keeps its name this long
    max_connections_per_ip: int = 256  # HTTP connections (heads, exchanges, idle keep-alive) from one address
    max_upgraded_per_ip: int = 4096  # established WebSockets and agent links from one address
    max_connection_rate_per_ip: int = 1000  # new connections per second from one address (bursts of twice that)
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
    acme_email: str | None = None  # ACME on: the account's contact address
    acme_directory: str = LETS_ENCRYPT
    acme_ca: str | None = None  # trust this CA for the ACME server's HTTPS (else the system store)
    acme_dns: DnsUpdateTarget | None = None  # wildcard through DNS-01; None: per-name through TLS-ALPN-01
    state_dir: str | None = None  # None: see default_state_dir()
    metrics: tuple[str, int] | None = None  # (host, port) of a Prometheus listener of its own; None: off
    access_log: bool = False  # a line per request on stderr (the CLI turns it on)
    log_format: str = "text"  # or "json": one object per line
    cluster: ClusterTarget | None = None  # the cluster's Redis; None: this relay runs alone (MemoryRegistry)
    node_id: str | None = None  # this node's id in the cluster
    advertise: str | None = None  # HOST:PORT where the other nodes reach this one
    cluster_secret: str | None = field(default=None, repr=False)
    cluster_ca: str | None = None  # trust this CA too for other nodes' certificates (node links of a TLS node)
    mux: MuxConfig = field(default_factory=MuxConfig)

    def __post_init__(self) -> None:
        if self.cluster is not None and not (self.node_id and self.advertise):
            raise ConfigurationError("--cluster needs --node-id ID and --advertise HOST:PORT too")
        if self.cluster is None and (self.node_id or self.advertise or self.cluster_secret):
            raise ConfigurationError("--node-id, --advertise and --cluster-secret go with --cluster")
        if self.cluster_ca and not (self.cluster and (self.tls_cert or self.acme_email)):
            raise ConfigurationError("--cluster-ca checks the certificates of other nodes on node links, which are "
                                     "TLS when the node serves TLS: it goes with --cluster and --tls-cert or "
                                     "--acme-email")
        for name in ("idle_timeout", "head_timeout", "response_timeout", "linger_timeout", "pool_wait_timeout",
                     "grace_period", "drain_timeout", "lt_grace_period", "auth_failure_window", "tls_reload_interval"):
            if not 0 < getattr(self, name) < math.inf:
                raise ConfigurationError(f"{name} must be a positive number of seconds, got {getattr(self, name)}")
        for name in ("max_connections_per_ip", "max_upgraded_per_ip", "max_connection_rate_per_ip"):
            if getattr(self, name) < 1:
                raise ConfigurationError(f"{name} must be at least 1")
        own = {self.port: "--port"} | ({self.metrics[1]: "--metrics"} if self.metrics else {})
        for port, flag in own.items():
            if port in self.tcp_ports:
                raise ConfigurationError(f"--tcp-ports {describe_port_set(self.tcp_ports)} includes the relay's own "
                                         f"{flag} {port}")
        for grant in self.grants:
            outside = sorted(grant.reserved_ports - self.tcp_ports)
            if outside:
                where = f"--tcp-ports {describe_port_set(self.tcp_ports)}" if self.tcp_ports else \
                    "no --tcp-ports given"
                raise ConfigurationError(f"the tokens file reserves port {outside[0]} for {grant.label!r}, but it is "
                                         f"not a TCP port of this relay ({where})")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigurationError("--tls-cert and --tls-key go together")
        if self.acme_email and self.tls_cert:
            raise ConfigurationError("--acme-email gets the certificates itself: drop --tls-cert/--tls-key, or it")
        if (self.acme_dns or self.acme_ca) and not self.acme_email:
            raise ConfigurationError("--acme-dns and --acme-ca need --acme-email (which turns ACME on)")
        if self.acme_email and (self.domain == "localhost" or "." not in self.domain.strip(".")):
            raise ConfigurationError(f"ACME needs a public --domain (a DNS name like tunnels.example.com), "
                                     f"not {self.domain!r}")
        log_format(self.log_format)


@dataclass(frozen=True)
class AgentConfig:
    """Everything an agent runs with."""

    port: int
    local_host: str = "localhost"
    relay: tuple[str, ...] = ()  # the relay's URL, or one per cluster node; (): an embedded relay in this process
    name: str | None = None
    token: str | None = None
    basic_auth: str | None = None
    allow_ip: tuple[str, ...] = ()
    ca_file: str | None = None
    wait_for_relay: bool = True  # an unreachable relay at start is retried, not a reason to exit
    inspect: tuple[str, int] | None = None  # the inspector's address; None: the default one, or the next free
    no_inspect: bool = False
    log_format: str = "text"  # stderr not a terminal: a line per request, text or "json" (one object per line)
    scheduling: str = "auto"  # the process's CPU scheduling policy, one of SCHEDULING
    drain_timeout: float = 30.0  # on SIGTERM, streams in flight may take this long to finish
    remote_port: int | None = None  # `portway tcp`: the public port asked for; None: any the relay offers
    proxy_protocol: str | None = None  # `portway tcp`: "v1" | "v2", the PROXY header the local service gets first
    mux: MuxConfig = field(default_factory=MuxConfig)

    def __post_init__(self) -> None:
        log_format(self.log_format)
        scheduling(self.scheduling)
        if not 1 <= self.port <= 65535:
            raise ConfigurationError(f"the local port must be 1-65535, got {self.port}")


def default_state_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """Where the relay keeps its state without --state-dir: systemd's StateDirectory= (it sets $STATE_DIRECTORY),
    else the XDG state directory."""
    if environ.get("STATE_DIRECTORY"):
        return Path(environ["STATE_DIRECTORY"].split(":")[0])
    base = environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "portway"


def _mux_config(values: Mapping[str, Any]) -> MuxConfig:
    extra = {"link_window": values["link_window"]} if "link_window" in values else {}
    interval, timeout = values["keepalive_interval"], values["keepalive_timeout"]
    if interval is not None and interval >= timeout:
        raise ConfigurationError(f"--keepalive-interval ({interval:g}) must be below --keepalive-timeout "
                                 f"({timeout:g}): a pinged peer needs time to answer before the link is declared dead")
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
