"""The ways a visitor reaches the origin. Each `setup_*` starts what its path needs and
returns a `Path`; the caller kills `path.procs` when done (and `Registry.kill_all()` in any case)."""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path as FsPath

from loads import Target, wait_ready
from procs import Proc, Registry, StartError

ROOT = FsPath(__file__).resolve().parents[1]
LT_BIN = ROOT / "node_modules" / ".bin" / "lt"
PORTWAY = [sys.executable, "-m", "portway"]
SSHD = "/usr/sbin/sshd"
SSH_CIPHER = "aes128-gcm@openssh.com"


class Skip(Exception):
    """The path can't run on this machine (missing tool); the message says why."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_ports(count: int) -> list[int]:
    """`count` distinct ports free right now (held together while chosen, so none comes back twice)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sockets.append(sock)
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@dataclass
class Path:
    key: str
    target: Target
    # role -> process: "server" (relay, lt server, sshd) and "client" (agent, lt, ssh); the cluster path adds
    # "entry", the relay node its visitors land on (it forwards every request to the server node)
    roles: dict[str, Proc] = field(default_factory=dict)
    role_labels: dict[str, str] = field(default_factory=dict)
    procs: list[Proc] = field(default_factory=list)
    cleanup: list = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _lt_env() -> dict:
    # lt reads every option from the environment too (yargs .env(true)): neutralise the usual suspects.
    env = {k: "" for k in ("HOST", "PORT", "SUBDOMAIN", "LOCAL_HOST", "LOCAL_HTTPS", "PRINT_REQUESTS", "OPEN",
                           "DEBUG", "http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")}
    env["no_proxy"] = env["NO_PROXY"] = "*"
    return env


def start_origin(reg: Registry) -> tuple[Proc, int]:
    proc = reg.start(["node", str(ROOT / "bench" / "origin.js"), "0"], "origin")
    match = proc.wait_for(r"^listening (\d+)", 15)
    return proc, int(match.group(1))


def setup_direct(reg: Registry, origin_port: int) -> Path:
    path = Path("direct", Target("127.0.0.1", origin_port, f"127.0.0.1:{origin_port}"))
    wait_ready(path.target)
    return path


# Every visitor of the benchmark comes from 127.0.0.1, so the relay's per-address cap on concurrent
# visitor connections (a defence, default 256) would turn most of the 1,000 streams into 429s.
VISITOR_CAP = 4096
VISITOR_RATE = 1_000_000  # new connections per second: the connection-rate case opens one per request
_help_texts: dict[str, str] = {}


def _help(command: str) -> str:
    """`portway COMMAND --help`, once: the flags this checkout's portway has (older ones lack newer flags)."""
    if command not in _help_texts:
        try:
            _help_texts[command] = subprocess.run(PORTWAY + [command, "--help"], capture_output=True, text=True,
                                                  timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            _help_texts[command] = ""
    return _help_texts[command]


def _relay_extra_args() -> list[str]:
    extra = []
    if "--max-connections-per-ip" in _help("server"):
        extra += ["--max-connections-per-ip", str(VISITOR_CAP)]
    if "--max-connection-rate-per-ip" in _help("server"):
        extra += ["--max-connection-rate-per-ip", str(VISITOR_RATE)]
    if "--no-access-log" in _help("server"):
        extra.append("--no-access-log")  # the data path is measured, like the peers' (none logs per request)
    return extra


def _start_relay(reg: Registry, label: str) -> tuple[Proc, int]:
    port = free_port()
    relay = reg.start(PORTWAY + ["server", "--port", str(port), "--domain", "localhost",
                                 *_relay_extra_args()], label)
    relay.wait_for(r"listening on", 20)
    return relay, port


def _agent_inspect_args(inspect: bool) -> list[str]:
    """The inspector on a free port, or off; nothing for an agent that predates it."""
    if "--no-inspect" not in _help("http"):
        if inspect:
            raise Skip("this portway has no inspector")
        return []
    return ["--inspect", "127.0.0.1:0"] if inspect else ["--no-inspect"]


def setup_portway(reg: Registry, origin_port: int, inspect: bool = False) -> Path:
    """Relay + agent. The plain path runs the agent with --no-inspect (the tunnel alone, as every earlier
    run measured it); `portway_inspect` with the inspector capturing every exchange (the default)."""
    suffix = "-inspect" if inspect else ""
    relay, port = _start_relay(reg, f"portway-relay{suffix}")
    procs = [relay]
    try:
        agent = reg.start(PORTWAY + ["http", str(origin_port), "--relay", f"http://127.0.0.1:{port}",
                                     "--name", "bench", *_agent_inspect_args(inspect)], f"portway-agent{suffix}")
        procs.append(agent)
        agent.wait_for(rf"^http://bench\.localhost:{port}$", 20)
        path = Path("portway_inspect" if inspect else "portway", Target("127.0.0.1", port, f"bench.localhost:{port}"),
                    roles={"server": relay, "client": agent},
                    role_labels={"server": "portway relay", "client": "portway agent" + (" + inspector" if inspect else "")},
                    procs=procs)
        wait_ready(path.target)
        return path
    except BaseException:
        reg.kill(procs)
        raise


def setup_portway_tcp(reg: Registry, origin_port: int) -> Path:
    """Relay with one TCP port + `portway tcp` (the agent's TCP tunnel: bytes only, no HTTP work on either side);
    visitors connect to that public port, as they do to ssh -R's forwarded one."""
    if "--tcp-ports" not in _help("server"):
        raise Skip("this portway has no TCP tunnels")
    port, public = free_ports(2)
    relay = reg.start(PORTWAY + ["server", "--port", str(port), "--domain", "localhost", "--tcp-ports", str(public),
                                 *_relay_extra_args()], "portway-relay-tcp")
    procs = [relay]
    try:
        relay.wait_for(r"listening on", 20)
        agent = reg.start(PORTWAY + ["tcp", str(origin_port), "--relay", f"http://127.0.0.1:{port}",
                                     "--remote-port", str(public)], "portway-agent-tcp")
        procs.append(agent)
        agent.wait_for(rf"^tcp://localhost:{public}$", 20)
        path = Path("portway_tcp", Target("127.0.0.1", public, f"127.0.0.1:{public}"),
                    roles={"server": relay, "client": agent},
                    role_labels={"server": "portway relay", "client": "portway agent (tcp tunnel)"}, procs=procs)
        wait_ready(path.target)
        return path
    except BaseException:
        reg.kill(procs)
        raise


REDIS_SERVER = "redis-server"
CLUSTER_SECRET = "bench-cluster-secret"


def _start_redis(reg: Registry, port: int) -> Proc:
    """A throwaway redis-server on a free 127.0.0.1 port (no persistence) for the cluster path's two nodes."""
    binary = shutil.which(REDIS_SERVER)
    if binary is None:
        raise Skip("redis-server not installed (Debian: apt-get install redis-server)")
    redis = reg.start([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                       "--protected-mode", "no"], "redis-server")
    wait_port(redis, port, 15)
    return redis


def _start_cluster_node(reg: Registry, redis_port: int, node_id: str, port: int) -> Proc:
    node = reg.start(PORTWAY + ["server", "--port", str(port), "--domain", "localhost",
                                "--cluster", f"redis://127.0.0.1:{redis_port}/0", "--node-id", node_id,
                                "--advertise", f"127.0.0.1:{port}", "--cluster-secret", CLUSTER_SECRET,
                                *_relay_extra_args()], f"portway-relay-{node_id}")
    node.wait_for(r"listening on", 20)
    return node


def setup_portway_cluster(reg: Registry, origin_port: int) -> Path:
    """Two relay nodes sharing a redis-server, the agent on node A and every visitor sent to node B: each request
    takes the extra hop B -> A over their node link. Roles: server = node A (holds the tunnel), entry = node B
    (the visitors' node), client = the agent."""
    if "--cluster" not in _help("server"):
        raise Skip("this portway has no --cluster")
    redis_port, port_a, port_b = free_ports(3)
    procs = [_start_redis(reg, redis_port)]
    try:
        node_a = _start_cluster_node(reg, redis_port, "bench-a", port_a)
        procs.append(node_a)
        node_b = _start_cluster_node(reg, redis_port, "bench-b", port_b)
        procs.append(node_b)
        agent = reg.start(PORTWAY + ["http", str(origin_port), "--relay", f"http://127.0.0.1:{port_a}",
                                     "--name", "bench", *_agent_inspect_args(False)], "portway-agent-cluster")
        procs.append(agent)
        agent.wait_for(rf"^http://bench\.localhost:{port_a}$", 20)
        path = Path("portway_cluster", Target("127.0.0.1", port_b, f"bench.localhost:{port_b}"),
                    roles={"server": node_a, "entry": node_b, "client": agent},
                    role_labels={"server": "portway relay node A (holds the tunnel)",
                                 "entry": "portway relay node B (visitors land here, forwards to A)",
                                 "client": "portway agent (on node A)"},
                    procs=procs)
        wait_ready(path.target)
        return path
    except BaseException:
        reg.kill(procs)
        raise


def setup_portway_lt(reg: Registry, origin_port: int) -> Path:
    if not LT_BIN.exists():
        raise Skip("node_modules/.bin/lt missing (run `npm ci`)")
    relay, port = _start_relay(reg, "portway-relay-for-lt")
    procs = [relay]
    try:
        lt = reg.start([str(LT_BIN), "--port", str(origin_port), "--host", f"http://127.0.0.1:{port}",
                        "--subdomain", "benchlt"], "lt-client-portway",
                       env=_lt_env())
        procs.append(lt)
        try:
            lt.wait_for(r"your url is: \S+", 15)
        except StartError as exc:
            raise StartError(f"lt did not register with the Portway relay: {exc}") from None
        path = Path("portway_lt", Target("127.0.0.1", port, f"benchlt.localhost:{port}"),
                    roles={"server": relay, "client": lt},
                    role_labels={"server": "portway relay", "client": "lt client"}, procs=procs)
        wait_ready(path.target)
        return path
    except BaseException:
        reg.kill(procs)
        raise


def setup_localtunnel(reg: Registry, origin_port: int, server_dir: str | None) -> Path:
    if not server_dir:
        raise Skip("no --localtunnel-server DIR given")
    sdir = FsPath(server_dir).resolve()
    if not (sdir / "bin" / "server").exists() or not (sdir / "node_modules").is_dir():
        raise Skip(f"{sdir} is not a localtunnel/server checkout with node_modules installed")
    if not LT_BIN.exists():
        raise Skip("node_modules/.bin/lt missing (run `npm ci`)")
    port = free_port()
    # NODE_ENV=production as in the project's Dockerfile: no .env, so no DEBUG logging per request.
    server = reg.start(["node", "-r", "esm", "bin/server", "--port", str(port), "--address", "127.0.0.1",
                        "--domain", "localhost"], "lt-server", cwd=sdir,
                       env={"NODE_ENV": "production", "DEBUG": ""})
    procs = [server]
    try:
        wait_port(server, port, 20)
        lt = reg.start([str(LT_BIN), "--port", str(origin_port), "--host", f"http://127.0.0.1:{port}",
                        "--subdomain", "benchlts"], "lt-client-ltserver",
                       env=_lt_env())
        procs.append(lt)
        lt.wait_for(r"your url is: \S+", 15)
        path = Path("localtunnel", Target("127.0.0.1", port, f"benchlts.localhost:{port}"),
                    roles={"server": server, "client": lt},
                    role_labels={"server": "lt server", "client": "lt client"}, procs=procs)
        wait_ready(path.target)
        return path
    except BaseException:
        reg.kill(procs)
        raise


def wait_port(proc: Proc, port: int, timeout: float) -> None:
    import time

    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            pass
        if not proc.alive():
            raise StartError(f"{proc.name} exited with status {proc.popen.returncode}:\n{proc.tail()}")
        if time.monotonic() > deadline:
            raise StartError(f"{proc.name} is not listening on {port} after {timeout:.0f} s:\n{proc.tail()}")
        time.sleep(0.1)


def setup_ssh(reg: Registry, origin_port: int) -> Path:
    if not os.path.exists(SSHD) or shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
        raise Skip("OpenSSH server/client not installed (Debian: openssh-server)")
    tmp = FsPath(tempfile.mkdtemp(prefix="portway-bench-ssh-"))
    cleanup = [lambda: shutil.rmtree(tmp, ignore_errors=True)]
    procs: list[Proc] = []
    try:
        for name in ("host_ed25519", "user_ed25519"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "portway-bench", "-f",
                            str(tmp / name)], check=True, stdin=subprocess.DEVNULL, timeout=30)
        shutil.copy(tmp / "user_ed25519.pub", tmp / "authorized_keys")
        user = getpass.getuser()
        # sshd running as root wants its privilege separation directory.
        if os.geteuid() == 0 and not os.path.isdir("/run/sshd"):
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
            cleanup.append(lambda: _rmdir_quiet("/run/sshd"))
        sshd_port = free_port()
        fwd_port = free_port()
        config = tmp / "sshd_config"
        config.write_text("\n".join([
            "ListenAddress 127.0.0.1",
            f"HostKey {tmp / 'host_ed25519'}",
            f"PidFile {tmp / 'sshd.pid'}",
            f"AuthorizedKeysFile {tmp / 'authorized_keys'}",
            "StrictModes no",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PermitRootLogin prohibit-password",
            "UsePAM no",
            "AllowTcpForwarding yes",
            "GatewayPorts no",
            f"Ciphers {SSH_CIPHER}",
            "X11Forwarding no",
            "PermitTTY no",
            "UseDNS no",
            "LogLevel ERROR",
            "",
        ]))
        sshd = reg.start([SSHD, "-D", "-e", "-f", str(config), "-p", str(sshd_port)], "sshd")
        procs.append(sshd)
        wait_port(sshd, sshd_port, 15)
        ssh = reg.start(["ssh", "-N", "-F", "/dev/null", "-R", f"127.0.0.1:{fwd_port}:127.0.0.1:{origin_port}",
                         "-i", str(tmp / "user_ed25519"), "-o", "StrictHostKeyChecking=no",
                         "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
                         "-o", "ExitOnForwardFailure=yes", "-o", "LogLevel=ERROR", "-c", SSH_CIPHER,
                         "-p", str(sshd_port), f"{user}@127.0.0.1"], "ssh-client")
        procs.append(ssh)
        wait_port(ssh, fwd_port, 15)
        path = Path("ssh", Target("127.0.0.1", fwd_port, f"127.0.0.1:{fwd_port}"),
                    roles={"server": sshd, "client": ssh},
                    role_labels={"server": "sshd (all processes)", "client": "ssh"}, procs=procs,
                    cleanup=cleanup)
        wait_ready(path.target)
        return path
    except BaseException:
        reg.kill(procs)
        for fn in cleanup:
            fn()
        raise


def _rmdir_quiet(p: str) -> None:
    try:
        os.rmdir(p)
    except OSError:
        pass
