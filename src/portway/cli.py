"""The `portway` command: `portway server …` runs a relay, `portway http PORT …` exposes a local port,
`portway start` runs the tunnels of a config file, `portway config check FILE` validates one."""

from __future__ import annotations

import argparse
import asyncio
import errno
import functools
import logging
import os
import signal
import sys
from dataclasses import replace
from pathlib import Path
from typing import Awaitable, Callable, Mapping, TextIO

from . import __version__
from .auth import hash_token
from .config import (
    AGENT_SETTINGS,
    DEFAULT_RELAY_PORT,
    RELAY_SETTINGS,
    TCP_SETTINGS,
    AgentConfig,
    RelayConfig,
    Setting,
    agent_config,
    load,
    local_target,
    relay_config,
)
from .configfile import (
    AGENT_WIDE,
    FILE_NAME,
    HttpTunnel,
    check,
    default_agent_file,
    read_agent_file,
    relay_file_values,
)
from .errors import ConfigurationError, RegistrationError
from .proto.mux import MuxConfig
from .runtime import HeapTrimmer, SchedulingGovernor, schedule, tune_for_serving

class Stderr:
    """The commands' standard error. A plain line is written as it is; rich (its console is 40-odd modules and
    about 2 MiB of a relay or an agent that idles at ~30) is loaded only for what needs it: the coloured prefix
    of an error or a warning, and the agent's live display on a terminal."""

    @property
    def file(self) -> TextIO:
        return sys.stderr  # looked up at each write, as rich's Console(stderr=True) does

    def say(self, line: str) -> None:
        self.file.write(line + "\n")
        self.file.flush()

    @functools.cached_property
    def rich(self):
        from rich.console import Console

        return Console(stderr=True, highlight=False, soft_wrap=True)  # a message stays one line, whatever the width

    def marked(self, prefix: str, text: str) -> None:
        """`text` (never read as markup) after `prefix`, rich markup such as "[red]error:[/]"."""
        from rich.markup import escape

        self.rich.print(f"{prefix} {escape(text)}")

    def is_terminal(self) -> bool:
        return self.file.isatty() and self.rich.is_terminal


stderr = Stderr()


def fail(message: str, status: int) -> int:
    """Print an error for the user (never read as rich markup) and return the exit status. A message of several
    lines (a relay refusing several tunnels, one reason each) is one error line each."""
    for line in message.splitlines() or [""]:
        stderr.marked("[red]error:[/]", line)
    return status

EMBEDDED_PORT_ATTEMPTS = 50


def add_settings(command: argparse.ArgumentParser, settings: tuple[Setting, ...],
                 several: frozenset[str] = frozenset()) -> None:
    """One flag per setting. Flags not given stay out of the namespace, so the environment and the defaults
    can fill them in (config.load). A setting in `several` may be given once per tunnel of the command (a list)."""
    for setting in settings:
        default = setting.default
        shown = ("on" if default else "off") if setting.is_switch else \
            "none" if default in (None, ()) else f"{default:g}" if isinstance(default, float) else default
        if setting.help.endswith(")") and "(default" in setting.help:
            help_text = f"{setting.help[:-1]}; ${setting.env})"
        else:
            help_text = f"{setting.help} (default {shown}; ${setting.env})"
        if setting.is_switch:
            command.add_argument(setting.flag, dest=setting.key, action=argparse.BooleanOptionalAction,
                                 default=argparse.SUPPRESS, help=help_text)
            continue
        if setting.is_flag:
            command.add_argument(setting.flag, dest=setting.key, action="store_true", default=argparse.SUPPRESS,
                                 help=f"{setting.help} (${setting.env})")
            continue
        command.add_argument(setting.flag, dest=setting.key, metavar=setting.metavar, default=argparse.SUPPRESS,
                             type=flag_type(setting),
                             action="append" if setting.repeatable or setting.key in several else "store",
                             help=help_text)


def flag_type(setting: Setting) -> Callable[[str], object]:
    def parse(text: str) -> object:
        try:
            return setting.parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error) or f"invalid value {text!r}") from None

    return parse


class _VersionAction(argparse.Action):
    """--version: the release, and whether this install runs the compiled hot path or pure Python."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="show the version and the build, and exit")

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        from .build_info import describe

        print(f"portway {__version__} ({describe()})")  # on stdout, as argparse's own version action
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="portway", description="Self-hosted HTTP and WebSocket tunnels.")
    parser.add_argument("--version", action=_VersionAction)
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the relay/agent does")
    commands = parser.add_subparsers(dest="command", required=True)

    server = commands.add_parser("server", help="run a relay on a public host")
    server.add_argument("--config", dest="config_file", metavar="FILE", type=Path,
                        help="TOML file of relay settings (keys: the settings' names); flags and variables win")
    add_settings(server, RELAY_SETTINGS)

    hash_token = commands.add_parser("hash-token", help="print the sha256 line for a token, for a --tokens file")
    hash_token.add_argument("secret", nargs="?",
                            help="the token (default: read from standard input, so it stays out of shell history)")

    http = commands.add_parser("http", help="expose a local HTTP/WebSocket port through a relay")
    http.add_argument("target", type=flag_type(Setting("target", "PORT", local_target, None, "")), nargs="+",
                      metavar="PORT", help="local port to expose, or HOST:PORT (the host overrides --local-host); "
                                           "several: one tunnel each over one link, named by the --name flags "
                                           "in order")
    add_settings(http, AGENT_SETTINGS, several=frozenset({"name"}))

    tcp = commands.add_parser("tcp", help="expose a local TCP port (SSH, a database...) through a relay")
    tcp.add_argument("target", type=flag_type(Setting("target", "PORT", local_target, None, "")),
                     metavar="PORT", help="local port to expose, or HOST:PORT (the host overrides --local-host)")
    add_settings(tcp, TCP_SETTINGS)

    start = commands.add_parser("start", help="run the tunnels of a config file")
    start.add_argument("--config", dest="config_file", metavar="FILE", type=Path,
                       help=f"the agent's TOML file (default ./{FILE_NAME}, else "
                            f"$XDG_CONFIG_HOME/portway/{FILE_NAME}, ~/.config/portway/{FILE_NAME} without it)")
    start.add_argument("names", nargs="*", metavar="NAME", help="run only these tunnels (default: all)")
    add_settings(start, AGENT_WIDE)

    config = commands.add_parser("config", help="work with config files")
    config_commands = config.add_subparsers(dest="config_command", required=True, metavar="check")
    config_check = config_commands.add_parser("check", help="validate a config file without starting anything")
    config_check.add_argument("file", type=Path, metavar="FILE")
    kind = config_check.add_mutually_exclusive_group()
    kind.add_argument("--relay", dest="relay_file", action="store_const", const=True,
                      help="check FILE as a relay's (default: decided by its keys, see the README)")
    kind.add_argument("--agent", dest="relay_file", action="store_const", const=False,
                      help="check FILE as an agent's")
    for command in (server, http, tcp, hash_token, start, config_check):
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                             help="log what the relay/agent does")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(message)s")
    if args.command == "hash-token":
        secret = args.secret if args.secret is not None else read_secret()
        if not secret:
            sys.exit(fail("no token given (as an argument or on standard input)", 2))
        print(f'sha256 = "{hash_token(secret)}"')
        return
    if args.command == "config":
        try:
            print(check(args.file, os.environ, args.relay_file))
        except ConfigurationError as error:
            sys.exit(fail(str(error), 2))
        return
    tunnels: tuple = ()
    try:
        if args.command == "start":
            path, config, tunnels = start_config(args, os.environ)
            names = ", ".join(tunnel.label for tunnel in tunnels) if tunnels else str(config.name)
            stderr.say(f"tunnel{'s' if len(tunnels) > 1 else ''} {names} of {path}")
        else:
            config = config_from(args, os.environ)
            if args.command == "tcp":
                tunnels = (tcp_tunnel(config),)
            elif args.command == "http" and len(args.target) > 1:
                tunnels = http_tunnels(args.target, list(getattr(args, "name", ())), config)
    except ConfigurationError as error:
        sys.exit(fail(str(error), 2))
    if isinstance(config, RelayConfig):
        sys.exit(_run(lambda stop: run_server(config, stop)))
    if config.scheduling != "auto":
        schedule(config.scheduling)
    any_http = not tunnels or any(tunnel.proto == "http" for tunnel in tunnels)
    inspect = inspector_config(config) if any_http else None
    sys.exit(_run(lambda stop: run_http(config, inspect, stop, tunnels),
                  govern_scheduling=config.scheduling == "auto"))


def http_tunnels(targets: list[tuple[str | None, int]], names: list[str], config: AgentConfig) -> tuple:
    """`portway http 8080 3000 --name a --name b`: one http tunnel per port, the names paired in order (a port
    without one gets a random name), the other settings shared."""
    from .agent.client import LocalTunnel

    names = names or ([config.name] if config.name else [])
    return tuple(LocalTunnel("http", host or config.local_host, port, name=names[index] if index < len(names) else None,
                             allow_ip=tuple(config.allow_ip), basic_auth=config.basic_auth)
                 for index, (host, port) in enumerate(targets))


def tcp_tunnel(config: AgentConfig, label: str = ""):
    """`portway tcp`'s one tunnel (or a config file's tcp tunnel) as the agent serves it."""
    from .agent.client import LocalTunnel
    from .proto.proxy_protocol import Version

    version = {"v1": Version.V1, "v2": Version.V2}.get(config.proxy_protocol or "")
    return LocalTunnel("tcp", config.local_host, config.port, remote_port=config.remote_port,
                       proxy_protocol=version, allow_ip=tuple(config.allow_ip), label=label)


def verbose_logging() -> bool:
    """-v: log lines go straight to stderr, which a live view would overwrite; the console stays line by line."""
    return logging.getLogger().isEnabledFor(logging.INFO)


def inspector_config(config: AgentConfig):
    """The inspector's settings from `--inspect ADDR` / `--no-inspect`; None when it is off."""
    if config.no_inspect:
        return None  # and the inspector's modules (its capture, wsproto, h11, email) are never imported
    from .inspector.app import InspectorConfig

    if config.inspect is None:
        return InspectorConfig()
    host, port = config.inspect
    return InspectorConfig(host=host, port=port, next_free=False)


def given_flags(args: argparse.Namespace) -> dict[str, object]:
    return {key: tuple(value) if isinstance(value, list) else value for key, value in vars(args).items()}


def config_from(args: argparse.Namespace, environ: Mapping[str, str]) -> RelayConfig | AgentConfig:
    """The config of `portway server` or `portway http`: the flags given, over `environ`, over the config file
    (`server --config`), over the defaults."""
    given = given_flags(args)
    if args.command == "server":
        from_file = relay_file_values(args.config_file) if args.config_file is not None else None
        return relay_config(load(RELAY_SETTINGS, given, environ, from_file))
    targets = args.target if isinstance(args.target, list) else [args.target]
    names = given.pop("name", None)
    if names:
        if len(names) > len(targets):
            raise ConfigurationError(f"--name was given {len(names)} times for {len(targets)} port(s): one name "
                                     "per port, in the same order")
        given["name"] = names[0]
    host, port = targets[0]
    if host is not None:
        given["local_host"] = host
    return agent_config(port, load(TCP_SETTINGS if args.command == "tcp" else AGENT_SETTINGS, given, environ))


def start_config(args: argparse.Namespace, environ: Mapping[str, str]) -> tuple[Path, AgentConfig, tuple]:
    """The agent's file `portway start` reads, the config its link runs with and its selected tunnels. One http
    tunnel runs as `portway http` does (the tuple is empty); tcp tunnels, or several, run over one link."""
    from .agent.client import LocalTunnel

    path = args.config_file if args.config_file is not None else default_agent_file(environ, Path.cwd())
    agent_file = read_agent_file(path)
    selected = agent_file.select(args.names)
    given = given_flags(args)
    configs = [agent_file.agent_config(tunnel, given, environ) for tunnel in selected]
    if len(selected) == 1 and isinstance(selected[0], HttpTunnel):
        return path, configs[0], ()
    tunnels = []
    for tunnel, config in zip(selected, configs):
        if isinstance(tunnel, HttpTunnel):
            tunnels.append(LocalTunnel("http", config.local_host, config.port, name=tunnel.name,
                                       allow_ip=tuple(config.allow_ip), basic_auth=config.basic_auth,
                                       label=tunnel.name))
        else:
            own = dict(tunnel.settings)
            tunnels.append(tcp_tunnel(replace(config, remote_port=tunnel.remote_port,
                                              proxy_protocol=own.get("proxy_protocol")), label=tunnel.name))
    return path, configs[0], tuple(tunnels)


def read_secret() -> str:
    """A token typed at a prompt (not echoed) or piped in."""
    if sys.stdin.isatty():
        import getpass

        return getpass.getpass("token: ")
    return sys.stdin.readline().strip()


def _run(make: Callable[[asyncio.Event], Awaitable[int]], govern_scheduling: bool = False) -> int:
    """Run a role until it returns. The first SIGINT or SIGTERM sets the event it is given (stop gracefully);
    a second one cancels it (stop at once). `govern_scheduling`: the scheduling policy follows the load
    (--scheduling auto)."""
    tune_for_serving()

    async def guarded() -> int:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        assert task is not None
        stop = asyncio.Event()

        def on_signal() -> None:
            if stop.is_set():
                task.cancel()
            else:
                stop.set()

        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, on_signal)
        trimmer = HeapTrimmer.for_this_process()
        if trimmer is not None:
            trimmer.start()
        governor = None
        if govern_scheduling and hasattr(os, "SCHED_BATCH"):
            from .link.session import LINK_WRITES

            governor = SchedulingGovernor(lambda: LINK_WRITES.joined, schedule)
            governor.start()
        try:
            return await make(stop)
        except asyncio.CancelledError:
            return 0
        finally:
            if trimmer is not None:
                trimmer.stop()
            if governor is not None:
                governor.stop()

    try:
        import uvloop
    except ImportError:
        return asyncio.run(guarded())
    return uvloop.run(guarded())


async def run_server(config: RelayConfig, stop: asyncio.Event | None = None) -> int:
    from .relay.server import Relay

    relay = Relay(config)
    try:
        await relay.start()
    except ConfigurationError as error:
        return fail(str(error), 2)
    except OSError as error:
        return fail(f"cannot listen on {config.bind}:{config.port}: {error.strerror or error}", 1)
    stderr.say(f"Portway relay on {config.bind}:{relay.port}; tunnels at {relay.public_url('NAME')}")
    tokens = f"{len(config.grants)} agent token(s)" if config.grants else "no tokens (open relay)"
    tls = "TLS on" if config.tls_cert else "no TLS"
    if config.acme_email:
        tls = f"TLS by ACME ({'a wildcard certificate through DNS-01' if config.acme_dns else 'per-name TLS-ALPN-01'})"
    stderr.say(f"{tokens}, {tls}, access log {config.log_format if config.access_log else 'off'}")
    if config.cluster is not None:
        links = (f"over TLS, each node checked as NODE-ID.{config.domain}" if relay.nodes.tls is not None
                 else "in plain TCP (keep them on a private network)")
        stderr.say(f"cluster node {config.node_id} (reached at {config.advertise}), registry {config.cluster}, "
                   f"node links {links}")
    if relay.metrics_address is not None:
        host, port = relay.metrics_address
        stderr.say(f"metrics: http://{host}:{port}/metrics" if ":" not in host
                   else f"metrics: http://[{host}]:{port}/metrics")
    if relay.certificates is not None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, relay.certificates.reload)
    elif relay.acme is not None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, relay.acme.reload)
    print(f"listening on {config.bind}:{relay.port}", flush=True)
    try:
        await (stop or asyncio.Event()).wait()
        busy = relay.exchanges_in_flight()
        agents = "agents are handed over to the other nodes" if config.cluster else "agents were told to reconnect"
        stderr.say(f"stopping: no new visitors; {busy} exchange(s) in flight get up to {config.drain_timeout:g} s to "
                   f"finish, {agents} (a second signal stops at once)")
        cut = await relay.drain(config.drain_timeout)
        stderr.say(f"stopped: {cut} exchange(s) cut at the drain timeout" if cut else "stopped: all exchanges done")
    finally:
        await relay.close()
    return 0


async def start_embedded_relay(mux: MuxConfig | None = None):
    """A relay in this process on 127.0.0.1:8000, or the next free port, with *.localhost names."""
    from .relay.server import Relay

    for offset in range(EMBEDDED_PORT_ATTEMPTS):
        relay = Relay(RelayConfig(port=DEFAULT_RELAY_PORT + offset, mux=mux or MuxConfig()))
        try:
            await relay.start()
        except OSError as error:
            if error.errno != errno.EADDRINUSE:
                raise
            continue
        return relay
    raise OSError(errno.EADDRINUSE, "no free port for the embedded relay")


async def start_inspector(config: AgentConfig, inspect):
    """The inspector on its address, its URL on a stderr line of its own; None when it could not start on
    the default address (the tunnel runs without it). An address given with --inspect must be free."""
    from .inspector.app import Inspector

    inspector = Inspector(inspect, config.local_host, config.port)
    try:
        await inspector.start()
    except OSError as error:
        if not inspect.next_free:
            raise
        stderr.say(f"inspector: off ({error.strerror or error} on ports {inspect.port}-"
                   f"{inspect.port + inspect.port_attempts - 1}; use --inspect ADDR)")
        return None
    stderr.say(f"inspector: {inspector.url}")
    if not inspect.loopback:
        stderr.marked("[yellow]warning:[/]", "the inspector shows every request, cookies and credentials included, "
                      f"to whoever reaches {inspect.host}:{inspector.port}")
    return inspector


async def serve_direct(relay, url: str, say: Callable[[str], None]) -> None:
    """The embedded relay's tunnel also at 127.0.0.1:PORT, for clients that can't resolve NAME.localhost."""
    name = url.split("//", 1)[1].split(".", 1)[0]
    try:
        port = await relay.serve_one_tunnel(name, first_port=relay.port + 1, attempts=EMBEDDED_PORT_ATTEMPTS)
    except OSError as error:
        say(f"no direct address for clients that can't resolve *.localhost: {error.strerror or error}")
        return
    say(f"also at http://127.0.0.1:{port} for clients that can't resolve *.localhost (Node's ws, Python, wscat): "
        "every request there goes to this tunnel")


async def serve_until_stopped(agent, config: AgentConfig, stop: asyncio.Event, say: Callable[[str], None]) -> None:
    """Run the agent until it fails or `stop` is set; then it takes no new streams and gives those in flight up
    to --drain-timeout before it leaves (the relay frees its name at once)."""
    running = asyncio.get_running_loop().create_task(agent.run())
    stopping = asyncio.get_running_loop().create_task(stop.wait())
    try:
        await asyncio.wait((running, stopping), return_when=asyncio.FIRST_COMPLETED)
        if running.done():
            running.result()  # a refusal for good (RegistrationError) is raised here
            return
        busy = agent.open_streams()
        # a stream is a visitor connection, busy or pooled idle by the relay (which lets the idle ones go at once)
        say(f"stopping: no new requests; {busy} open stream(s) get up to {config.drain_timeout:g} s to finish "
            "(a second signal stops at once)")
        await agent.drain(config.drain_timeout)
    finally:
        for task in (running, stopping):
            task.cancel()
        await asyncio.gather(running, stopping, return_exceptions=True)


async def run_http(config: AgentConfig, inspect=None, stop: asyncio.Event | None = None, tunnels: tuple = ()) -> int:
    from .agent.client import Agent
    from .agent.console import AgentConsole

    relay = None
    relay_urls = config.relay
    if not relay_urls:
        relay = await start_embedded_relay(config.mux)
        relay_urls = (f"http://127.0.0.1:{relay.port}",)
        stderr.say(f"No --relay given: running an embedded relay on 127.0.0.1:{relay.port}. Its URL works on this "
                   "machine only; to share beyond it, run `portway server` on a public host and pass --relay URL.")
    relay_url = ", ".join(relay_urls)
    if config.basic_auth:
        stderr.say("visitors must log in (--basic-auth)")
    if config.allow_ip:
        stderr.say(f"visitors only from {', '.join(config.allow_ip)} (--allow-ip)")

    inspector = None
    console = None
    try:
        if inspect is not None:
            try:
                inspector = await start_inspector(config, inspect)
            except OSError as error:
                return fail(f"cannot serve the inspector on {inspect.host}:{inspect.port}: "
                            f"{error.strerror or error}", 1)
        tally = None
        if inspector is not None:
            from .agent.console import Tally

            tally = Tally()
            inspector.store.listen(tally.on_event)
        target = ", ".join(tunnel.target for tunnel in tunnels) if tunnels else f"{config.local_host}:{config.port}"
        live = stderr.is_terminal() and not verbose_logging()
        console = AgentConsole(stderr.rich if live else stderr, relay_url, target, tally, live=live,
                               log_format=config.log_format)

        def show_url(url: str) -> None:
            console.url(url)
            if not (console.live_mode and sys.stdout.isatty()):  # on the display's terminal, the display shows it
                print(url, flush=True)
            if relay is not None and url.startswith("http"):
                asyncio.get_running_loop().create_task(serve_direct(relay, url, console.status))

        agent = Agent(config, relay_urls, on_url=show_url, on_status=console.status, tunnels=tunnels)
        console.agent = agent
        if inspector is not None:
            from .agent.metrics import AgentCollector, exposition

            agent.new_tap = inspector.tap
            collector = AgentCollector(tally, agent)
            inspector.metrics = lambda: exposition(collector)
        console.start()
        await serve_until_stopped(agent, config, stop or asyncio.Event(), console.status)
    except ValueError as error:
        return fail(str(error), 2)
    except RegistrationError as error:
        return fail(error.message, 1)
    finally:
        if console is not None:
            console.stop()
        if inspector is not None:
            await inspector.close()
        if relay is not None:
            await relay.close()
    return 0
