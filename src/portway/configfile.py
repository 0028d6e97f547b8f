"""Config files in TOML: a relay's (`portway server --config FILE`) and an agent's (`portway start`).

A file is one layer of :func:`portway.config.load`'s order: flags over `PORTWAY_*` variables over the file over
the defaults. Its keys are the settings' keys; each value is checked against its setting's parser, so a file
accepts what the flag accepts, typed the TOML way (seconds as numbers, switches as booleans, repeatable flags as
arrays). An agent's file adds `[tunnels.NAME]` tables, parsed into :class:`HttpTunnel` / :class:`TcpTunnel`.
Every mistake is a one-line ConfigurationError naming the file and the key, and what is allowed there.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from .config import (
    AGENT_SETTINGS,
    RELAY_SETTINGS,
    AgentConfig,
    RelayConfig,
    Setting,
    agent_config,
    count,
    describe_port_set,
    inspect_address,
    load,
    local_target,
    mebibytes,
    port_number,
    relay_config,
    seconds,
    seconds_or_zero,
    switch,
    tcp_ports,
    tunnel_name,
    TCP_SETTINGS,
)
from .errors import ConfigurationError

FILE_NAME = "portway.toml"
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")  # TOML's bare keys; any other is written quoted

# A setting's value in TOML, by its parser: the types it may have and how to name them. Anything else is a string.
NUMBER = ((int, float), "a number")
INTEGER = ((int,), "an integer")
BOOLEAN = ((bool,), "true or false")
STRING = ((str,), "a string")
TOML_TYPES: dict[Callable[[str], Any], tuple[tuple[type, ...], str]] = {
    seconds: NUMBER,
    seconds_or_zero: NUMBER,
    mebibytes: NUMBER,
    port_number: INTEGER,
    count: INTEGER,
    switch: BOOLEAN,
    inspect_address: ((str, int), "a port number or a string"),
    tcp_ports: ((str, int), 'a port number or a string of ports and ranges, e.g. "20000-20100"'),
}

# `name` is a tunnel's own: an agent file names its tunnels by their tables
AGENT_WIDE = tuple(setting for setting in AGENT_SETTINGS if setting.key != "name")
_AGENT_SETTING = {setting.key: setting for setting in AGENT_SETTINGS}
# what a tunnel's table may set besides proto, port and name: agent settings that differ from tunnel to tunnel
HTTP_TUNNEL_SETTINGS = tuple(_AGENT_SETTING[key] for key in
                             ("local_host", "basic_auth", "allow_ip", "inspect", "no_inspect"))
TCP_TUNNEL_SETTINGS = (*(_AGENT_SETTING[key] for key in ("local_host", "allow_ip")),
                       *(setting for setting in TCP_SETTINGS if setting.key == "proxy_protocol"))
TUNNEL_KEYS = {
    "http": ("proto", "port", "name", *(setting.key for setting in HTTP_TUNNEL_SETTINGS)),
    "tcp": ("proto", "port", "name", "remote_port", *(setting.key for setting in TCP_TUNNEL_SETTINGS)),
}
PROTOCOLS = tuple(TUNNEL_KEYS)


# ----------------------------------------------------------------------------------------------- reading

def read_toml(path: Path) -> dict[str, Any]:
    """The document in `path`; unreadable or not TOML is a ConfigurationError (tomllib's says line and column)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigurationError(f"cannot read {path}: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise ConfigurationError(f"{path}: not UTF-8 text, so not TOML") from None
    import tomllib  # here: a relay or an agent run without a file never needs it (nor datetime, which it loads)

    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigurationError(f"{path}: invalid TOML: {error}") from None


def toml_value(value: Any) -> str:
    """`value` as it would be written in the file, for error messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, float)):
        return json.dumps(value) if isinstance(value, str) else str(value)
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return str(value)


def toml_key(key: str) -> str:
    """`key` as it would be written in the file: bare when TOML allows, else quoted (so a key holding a line break
    or a quote still makes a one-line message)."""
    return key if _BARE_KEY.fullmatch(key) else json.dumps(key)


def check_keys(table: Mapping[str, Any], allowed: Iterable[str], path: Path, prefix: str, what: str) -> None:
    """Every key of `table` is one of `allowed`; else an error with the nearest allowed key, if one is close."""
    allowed = list(allowed)
    for key in table:
        if key not in allowed:
            import difflib  # only to say what a mistyped key was meant to be

            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigurationError(f"unknown key '{prefix}{toml_key(key)}' in {path}{hint}; allowed {what}: "
                                     f"{', '.join(allowed)}")


def setting_value(setting: Setting, raw: Any, path: Path, key: str) -> Any:
    """A file's value for `setting`, type-checked and parsed like its flag's."""
    types, described = TOML_TYPES.get(setting.parse, STRING)
    if setting.one_or_more and type(raw) in types:
        raw = [raw]
    if setting.repeatable:
        if not isinstance(raw, list) or any(type(item) not in types for item in raw):
            raise ConfigurationError(f"{path}: '{key}' must be an array, each item {described}, "
                                     f"e.g. {setting.key} = [{toml_value(setting.metavar or 'value')}], "
                                     f"not {toml_value(raw)}")
        return tuple(_parsed(setting, item, path, key) for item in raw)
    if type(raw) not in types:  # type(), not isinstance(): a boolean is not an integer here
        raise ConfigurationError(f"{path}: '{key}' must be {described}, not {toml_value(raw)}")
    return _parsed(setting, raw, path, key)


def _parsed(setting: Setting, raw: Any, path: Path, key: str) -> Any:
    if isinstance(raw, bool):
        return raw
    try:
        value = setting.parse(str(raw))
    except ValueError as error:
        raise ConfigurationError(f"{path}: {key} = {toml_value(raw)}: {error}") from None
    if setting.is_path:
        return str(_beside(path, value))
    return value


def _beside(config_file: Path, value: str) -> Path:
    """A path written in a config file: `~` expanded, relative ones taken from the file's folder."""
    written = Path(value).expanduser()
    return written if written.is_absolute() else config_file.parent / written


def settings_values(settings: tuple[Setting, ...], table: Mapping[str, Any], path: Path, prefix: str = "",
                    ) -> dict[str, Any]:
    """The parsed values of the `settings` keys present in `table` (its other keys are the caller's to check)."""
    by_key = {setting.key: setting for setting in settings}
    return {key: setting_value(by_key[key], raw, path, prefix + key) for key, raw in table.items() if key in by_key}


# ----------------------------------------------------------------------------------------------- relay files

def relay_file_values(path: Path) -> dict[str, Any]:
    """The relay settings a relay's config file gives, parsed; to be passed to config.load as `from_file`."""
    return relay_values(read_toml(path), path)


def relay_values(document: Mapping[str, Any], path: Path) -> dict[str, Any]:
    check_keys(document, (setting.key for setting in RELAY_SETTINGS), path, "", "in a relay's file")
    return settings_values(RELAY_SETTINGS, document, path)


# ----------------------------------------------------------------------------------------------- agent files

@dataclass(frozen=True)
class HttpTunnel:
    """An `[tunnels.KEY]` table with `proto = "http"`."""

    key: str  # the table's key, for messages
    name: str  # the name asked of the relay: `name`, else the table's key
    port: int
    host: str | None = None  # from `port = "HOST:PORT"`: overrides local_host, like `portway http HOST:PORT`
    settings: tuple[tuple[str, Any], ...] = ()  # the agent settings the table sets (HTTP_TUNNEL_SETTINGS), parsed

    proto = "http"


@dataclass(frozen=True)
class TcpTunnel:
    """An `[tunnels.KEY]` table with `proto = "tcp"`."""

    key: str
    name: str
    port: int
    host: str | None = None
    remote_port: int | None = None  # the public port asked for; None: the relay picks one
    settings: tuple[tuple[str, Any], ...] = ()  # TCP_TUNNEL_SETTINGS the table sets, parsed

    proto = "tcp"


Tunnel = HttpTunnel | TcpTunnel


@dataclass(frozen=True)
class AgentFile:
    """An agent's config file: agent-wide settings (parsed) and its tunnels, in the file's order."""

    path: Path
    settings: tuple[tuple[str, Any], ...]
    tunnels: tuple[Tunnel, ...]

    def select(self, names: Iterable[str]) -> tuple[Tunnel, ...]:
        """The tunnels named (all of them when no name is given), in the file's order."""
        wanted = set()
        known = {tunnel.name for tunnel in self.tunnels}
        for name in names:
            folded = name.lower()
            if folded not in known:
                import difflib  # only to say what a mistyped name was meant to be

                close = difflib.get_close_matches(folded, known, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise ConfigurationError(f"no tunnel named '{name}' in {self.path}{hint}; its tunnels: "
                                         f"{', '.join(sorted(known))}")
            wanted.add(folded)
        return tuple(tunnel for tunnel in self.tunnels if not wanted or tunnel.name in wanted)

    def agent_config(self, tunnel: Tunnel, given: Mapping[str, Any], environ: Mapping[str, str]) -> AgentConfig:
        """What `tunnel` runs with: flags (`given`), over variables, over its table, over the file's top level,
        over the defaults. Its name and a host in its port are its own, as `portway http` takes them."""
        given = {**given, "name": tunnel.name}
        if tunnel.host is not None:
            given["local_host"] = tunnel.host
        from_file = {**dict(self.settings), **dict(tunnel.settings)}
        return agent_config(tunnel.port, load(AGENT_SETTINGS, given, environ, from_file))

    def summary(self) -> str:
        """e.g. `2 http tunnels, 1 tcp tunnel`."""
        counts = [(proto, sum(tunnel.proto == proto for tunnel in self.tunnels)) for proto in PROTOCOLS]
        return ", ".join(f"{number} {proto} tunnel{'s' if number != 1 else ''}" for proto, number in counts
                         if number)


def read_agent_file(path: Path) -> AgentFile:
    return agent_file(read_toml(path), path)


def agent_file(document: Mapping[str, Any], path: Path) -> AgentFile:
    check_keys(document, [*(setting.key for setting in AGENT_WIDE), "tunnels"], path, "", "at the top level")
    settings = settings_values(AGENT_WIDE, document, path)
    tables = document.get("tunnels", {})
    if not isinstance(tables, dict):
        raise ConfigurationError(f"{path}: 'tunnels' must hold tables, [tunnels.NAME], not {toml_value(tables)}")
    tunnels: list[Tunnel] = []
    for key, table in tables.items():
        tunnel = _tunnel(key, table, path)
        for other in tunnels:
            if other.name == tunnel.name:
                raise ConfigurationError(f"{path}: tunnels.{toml_key(other.key)} and tunnels.{toml_key(key)} have "
                                         f"the same name, '{tunnel.name}'; a name can be used once "
                                         "(set name = \"…\" to rename one)")
        tunnels.append(tunnel)
    if not tunnels:
        raise ConfigurationError(f"{path} defines no tunnels: add a [tunnels.NAME] table with proto and port")
    return AgentFile(path, tuple(settings.items()), tuple(tunnels))


def _tunnel(key: str, table: Any, path: Path) -> Tunnel:
    prefix = f"tunnels.{toml_key(key)}."
    if not isinstance(table, dict):
        raise ConfigurationError(f"{path}: '{prefix[:-1]}' must be a table, [{prefix[:-1]}], "
                                 f"not {toml_value(table)}")
    proto = table.get("proto")
    if proto not in PROTOCOLS:
        given = "is missing" if proto is None else f"is {toml_value(proto)}"
        raise ConfigurationError(f"{path}: '{prefix}proto' {given}; allowed: \"http\" or \"tcp\"")
    check_keys(table, TUNNEL_KEYS[proto], path, prefix, f"in a {proto} tunnel")
    if "port" not in table:
        raise ConfigurationError(f"{path}: '{prefix}port' is missing: the local port, or \"HOST:PORT\"")
    raw_port = table["port"]
    if type(raw_port) not in (int, str):
        raise ConfigurationError(f"{path}: '{prefix}port' must be a port number or \"HOST:PORT\", "
                                 f"not {toml_value(raw_port)}")
    try:
        host, port = local_target(str(raw_port))
    except ValueError as error:
        raise ConfigurationError(f"{path}: {prefix}port = {toml_value(raw_port)}: {error}") from None
    name = _name(key, table.get("name"), path, prefix)
    if proto == "http":
        settings = settings_values(HTTP_TUNNEL_SETTINGS, table, path, prefix)
        return HttpTunnel(key, name, port, host, tuple(settings.items()))
    settings = settings_values(TCP_TUNNEL_SETTINGS, table, path, prefix)
    remote_port = None
    if "remote_port" in table:
        raw = table["remote_port"]
        if type(raw) is not int or not 1 <= raw <= 65535:
            raise ConfigurationError(f"{path}: '{prefix}remote_port' must be a port number (1-65535), "
                                     f"not {toml_value(raw)}")
        remote_port = raw
    return TcpTunnel(key, name, port, host, remote_port, tuple(settings.items()))


def _name(key: str, raw: Any, path: Path, prefix: str) -> str:
    if raw is None:
        try:
            return tunnel_name(key)
        except ValueError as error:
            raise ConfigurationError(f"{path}: [tunnels.{toml_key(key)}]: the table's key is the tunnel's name unless "
                                     f"name = \"…\" says otherwise, and {error}") from None
    if not isinstance(raw, str):
        raise ConfigurationError(f"{path}: '{prefix}name' must be a string, not {toml_value(raw)}")
    try:
        return tunnel_name(raw)
    except ValueError as error:
        raise ConfigurationError(f"{path}: {prefix}name = {toml_value(raw)}: {error}") from None


# ----------------------------------------------------------------------------------------------- finding, checking

def default_agent_file(environ: Mapping[str, str], cwd: Path) -> Path:
    """`./portway.toml`, else the one in the user's config folder; neither there is a ConfigurationError."""
    config_home = environ.get("XDG_CONFIG_HOME") or os.path.join(environ.get("HOME") or Path.home(), ".config")
    candidates = [cwd / FILE_NAME, Path(config_home) / "portway" / FILE_NAME]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConfigurationError(f"no config file: looked for {candidates[0]} and {candidates[1]} "
                             "(or pass --config FILE)")


def is_relay_file(document: Mapping[str, Any]) -> bool:
    """How `portway config check` tells the two apart: a relay's file sets at least one key only a relay has
    (`port`, `domain`, `tokens`…) and none only an agent has (`tunnels`, `relay`, `token`…); anything else is
    checked as an agent's."""
    relay_keys = {setting.key for setting in RELAY_SETTINGS}
    agent_keys = {setting.key for setting in AGENT_SETTINGS} | {"tunnels"}
    return any(key in relay_keys - agent_keys for key in document) and \
        not any(key in agent_keys - relay_keys for key in document)


def check(path: Path, environ: Mapping[str, str], relay: bool | None = None) -> str:
    """Validate a config file as it would be run with `environ`, starting nothing; the one-line summary.
    `relay` None: decided by the content (:func:`is_relay_file`)."""
    document = read_toml(path)
    if relay is None:
        relay = is_relay_file(document)
    if relay:
        config = relay_config(load(RELAY_SETTINGS, {}, environ, relay_values(document, path)))
        return f"{path}: ok — a relay's file: {_relay_summary(config)}"
    parsed = agent_file(document, path)
    for tunnel in parsed.tunnels:
        parsed.agent_config(tunnel, {}, environ)
    return f"{path}: ok — an agent's file: {parsed.summary()}"


def _relay_summary(config: RelayConfig) -> str:
    tokens = f"{len(config.grants)} token{'s' if len(config.grants) != 1 else ''}" if config.grants else "no tokens"
    tcp = f", TCP ports {describe_port_set(config.tcp_ports)}" if config.tcp_ports else ""
    return f"listens on {config.bind}:{config.port}, tunnels at NAME.{config.domain}{tcp}, {tokens}"
