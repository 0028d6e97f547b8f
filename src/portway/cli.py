"""The `portway` command: `portway server …` runs a relay, `portway http PORT …` exposes a local port."""

from __future__ import annotations

import argparse
import asyncio
import errno
import ipaddress
import logging
import os
import signal
import sys
from typing import Awaitable, Callable

from rich.console import Console
from rich.markup import escape

from . import __version__
from .auth import Grant, TokenFileError, hash_token, load_tokens_file
from .config import DEFAULT_RELAY_PORT, AgentConfig, RelayConfig
from .errors import RegistrationError
from .proto.mux import MuxConfig
from .proto.names import InvalidName, validate_name
from .runtime import tune_for_serving

stderr = Console(stderr=True, highlight=False)


def fail(message: str, status: int) -> int:
    """Print an error for the user (never read as rich markup) and return the exit status."""
    stderr.print(f"[red]error:[/] {escape(message)}")
    return status

EMBEDDED_PORT_ATTEMPTS = 50
MIB = 1024 * 1024


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="portway", description="Self-hosted HTTP and WebSocket tunnels.")
    parser.add_argument("--version", action="version", version=f"portway {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the relay/agent does")
    commands = parser.add_subparsers(dest="command", required=True)

    server = commands.add_parser("server", help="run a relay on a public host")
    server.add_argument("--bind", default=os.environ.get("PORTWAY_BIND", RelayConfig.bind),
                        help="address to listen on (default 127.0.0.1)")
    server.add_argument("--port", type=int, default=int(os.environ.get("PORTWAY_PORT", DEFAULT_RELAY_PORT)),
                        help=f"port for visitors and agents alike (default {DEFAULT_RELAY_PORT})")
    server.add_argument("--domain", default=os.environ.get("PORTWAY_DOMAIN", RelayConfig.domain),
                        help="base domain: tunnels are NAME.DOMAIN (default localhost)")
    server.add_argument("--public-port", type=int, default=None,
                        help="port shown in tunnel URLs when a proxy or NAT maps it (default: --port)")
    server.add_argument("--grace-period", type=float, default=RelayConfig.grace_period,
                        help="seconds a disconnected agent keeps its name (default %(default)g)")
    server.add_argument("--token", action="append", default=[], metavar="SECRET",
                        help="accept agents presenting this token (repeatable; also $PORTWAY_TOKENS, comma-separated)")
    server.add_argument("--tokens", metavar="FILE",
                        help="TOML file of [[token]] entries: sha256, label, names (reserved), max_tunnels")
    server.add_argument("--open", action="store_true",
                        help="allow running without tokens on a non-loopback address (anyone may open tunnels)")
    server.add_argument("--tls-cert", metavar="FILE", help="certificate chain (PEM): serve HTTPS/WSS and TLS to agents")
    server.add_argument("--tls-key", metavar="FILE", help="private key (PEM) for --tls-cert")

    server.add_argument("--head-timeout", type=float, default=RelayConfig.head_timeout,
                        help="seconds a request head may take to arrive once started (default %(default)g)")
    server.add_argument("--idle-timeout", type=float, default=RelayConfig.idle_timeout,
                        help="seconds an idle keep-alive visitor connection is kept (default %(default)g)")
    server.add_argument("--max-connections-per-ip", type=int, default=RelayConfig.max_connections_per_ip,
                        help="concurrent visitor connections allowed from one address (default %(default)d)")
    server.add_argument("--auth-failure-window", type=float, default=RelayConfig.auth_failure_window,
                        metavar="SECONDS",
                        help="failed logins (agent tokens, tunnels' basic auth) count this long: past "
                             f"{RelayConfig.auth_failures_per_address} from one address, or "
                             f"{RelayConfig.auth_failures_per_tunnel} on one basic-auth tunnel, logins are "
                             "refused with 429 (default %(default)g)")
    server.add_argument("--link-window", type=float, default=MuxConfig.link_window / MIB, metavar="MIB",
                        help="MiB of visitor data one agent link may have on its way to the relay or buffered there, "
                             "over all its streams: what a hostile agent can make the relay hold; many stalled "
                             "visitors of one tunnel can fill it and make its other visitors wait (default %(default)g)")
    server.add_argument("--response-timeout", type=float, default=RelayConfig.response_timeout,
                        help="seconds the origin may take to start its answer before a 504 (default %(default)g)")
    server.add_argument("--pool-wait-timeout", type=float, default=RelayConfig.pool_wait_timeout,
                        help="seconds a visitor waits for a free lt pool socket before a 503 (default %(default)g)")
    server.add_argument("--lt-grace-period", type=float, default=RelayConfig.lt_grace_period,
                        help="seconds an lt tunnel whose sockets all closed keeps its name (default %(default)g)")

    hash_token = commands.add_parser("hash-token", help="print the sha256 line for a token, for a --tokens file")
    hash_token.add_argument("secret")

    http = commands.add_parser("http", help="expose a local HTTP/WebSocket port through a relay")
    http.add_argument("port", type=int, help="local port to expose")
    http.add_argument("--relay", default=os.environ.get("PORTWAY_RELAY") or None,
                      help="relay URL, e.g. https://relay.example.com (default: $PORTWAY_RELAY, "
                           "else an embedded relay on 127.0.0.1 with *.localhost names)")
    http.add_argument("--name", default=None, help="tunnel name (default: a random readable one)")
    http.add_argument("--local-host", default="localhost", help="host of the local service (default localhost)")
    http.add_argument("--token", default=os.environ.get("PORTWAY_TOKEN"),
                      help="token the relay asked for (default $PORTWAY_TOKEN)")
    http.add_argument("--basic-auth", metavar="USER:PASS",
                      help="visitors must log in with this user name and password")
    http.add_argument("--allow-ip", action="append", default=[], metavar="CIDR",
                      help="only visitors from these networks may connect (repeatable)")
    http.add_argument("--ca", metavar="FILE", help="CA certificate(s) to verify an https:// relay with")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(message)s")
    if args.command == "hash-token":
        print(f'sha256 = "{hash_token(args.secret)}"')
        return
    if args.command == "server":
        try:
            config = relay_config(args)
        except (TokenFileError, ValueError) as error:
            sys.exit(fail(str(error), 2))
        sys.exit(_run(lambda: run_server(config)))
    try:
        config = agent_config(args)
    except ValueError as error:
        sys.exit(fail(str(error), 2))
    sys.exit(_run(lambda: run_http(config)))


def relay_config(args: argparse.Namespace) -> RelayConfig:
    tokens = list(args.token) + [t for t in os.environ.get("PORTWAY_TOKENS", "").split(",") if t]
    grants = [Grant(label=f"--token #{i + 1}", digest=hash_token(token)) for i, token in enumerate(tokens)]
    if args.tokens:
        grants += load_tokens_file(args.tokens)
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    if not args.auth_failure_window > 0:
        raise ValueError("--auth-failure-window must be positive")
    if not 1 <= args.link_window < 2048:
        raise ValueError("--link-window must be at least 1 and under 2048 (MiB)")
    mux = MuxConfig(link_window=round(args.link_window * MIB))
    return RelayConfig(bind=args.bind, port=args.port, domain=args.domain, public_port=args.public_port,
                       grace_period=args.grace_period, grants=tuple(grants), open_relay=args.open,
                       tls_cert=args.tls_cert, tls_key=args.tls_key, head_timeout=args.head_timeout,
                       idle_timeout=args.idle_timeout, max_connections_per_ip=args.max_connections_per_ip,
                       pool_wait_timeout=args.pool_wait_timeout, response_timeout=args.response_timeout,
                       lt_grace_period=args.lt_grace_period, auth_failure_window=args.auth_failure_window, mux=mux)


def agent_config(args: argparse.Namespace) -> AgentConfig:
    if args.basic_auth is not None and ":" not in args.basic_auth:
        raise ValueError("--basic-auth must be USER:PASS")
    for network in args.allow_ip:
        ipaddress.ip_network(network, strict=False)  # ValueError names the bad network
    if args.name is not None:
        try:
            args.name = validate_name(args.name)
        except InvalidName as error:
            raise ValueError(str(error)) from None
    return AgentConfig(port=args.port, local_host=args.local_host, relay=args.relay, name=args.name,
                       token=args.token, basic_auth=args.basic_auth, allow_ip=list(args.allow_ip),
                       ca_file=args.ca)


def _run(make: Callable[[], Awaitable[int]]) -> int:
    tune_for_serving()

    async def guarded() -> int:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        assert task is not None
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, task.cancel)
        try:
            return await make()
        except asyncio.CancelledError:
            return 0

    try:
        import uvloop
    except ImportError:
        return asyncio.run(guarded())
    return uvloop.run(guarded())


async def run_server(config: RelayConfig) -> int:
    from .aio.relay import Relay

    from .aio.relay import InsecureConfiguration

    relay = Relay(config)
    try:
        await relay.start()
    except InsecureConfiguration as error:
        return fail(str(error), 2)
    except OSError as error:
        return fail(f"cannot listen on {config.bind}:{config.port}: {error.strerror or error}", 1)
    stderr.print(f"Portway relay on {config.bind}:{relay.port}; tunnels at {relay.public_url('NAME')}")
    print(f"listening on {config.bind}:{relay.port}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await relay.close()
    return 0


async def start_embedded_relay():
    """A relay in this process on 127.0.0.1:8000, or the next free port, with *.localhost names."""
    from .aio.relay import Relay

    for offset in range(EMBEDDED_PORT_ATTEMPTS):
        relay = Relay(RelayConfig(port=DEFAULT_RELAY_PORT + offset))
        try:
            await relay.start()
        except OSError as error:
            if error.errno != errno.EADDRINUSE:
                raise
            continue
        return relay
    raise OSError(errno.EADDRINUSE, "no free port for the embedded relay")


async def run_http(config: AgentConfig) -> int:
    from .aio.agent import Agent

    relay = None
    relay_url = config.relay
    if relay_url is None:
        relay = await start_embedded_relay()
        relay_url = f"http://127.0.0.1:{relay.port}"
        stderr.print(f"No --relay given: running an embedded relay on 127.0.0.1:{relay.port}")

    def show_url(url: str) -> None:
        print(url, flush=True)

    try:
        agent = Agent(config, relay_url, on_url=show_url, on_status=lambda text: stderr.print(escape(text)))
        await agent.run()
    except ValueError as error:
        return fail(str(error), 2)
    except RegistrationError as error:
        return fail(error.message, 1)
    finally:
        if relay is not None:
            await relay.close()
    return 0
