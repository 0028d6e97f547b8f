"""TCP tunnels and several tunnels over one agent link, end to end: real relay and agent processes, services on
127.0.0.1 (a Python origin, OpenSSH, Redis), visitors through the relay's public TCP ports."""

from __future__ import annotations

import getpass
import hashlib
import os
import re
import shutil
import socket
import socketserver
import subprocess
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from portway.proto.proxy_protocol import HeaderReader

from .conftest import PORTWAY, Processes, Relay, free_port, free_ports, start_relay, wait_until
from tests.redis_server import RedisServer

from .linkproxy import LinkProxy

TIMEOUT = 60
SSHD = "/usr/sbin/sshd"


def start_tcp_relay(procs: Processes, count: int = 3, *extra: str) -> tuple[Relay, list[int]]:
    """A relay offering `count` free ports for TCP tunnels (given as a list, A,B,C)."""
    relay_port, *ports = free_ports(count + 1)
    relay = start_relay(procs, "--tcp-ports", ",".join(map(str, ports)), *extra, port=relay_port)
    return relay, ports


def start_tcp_agent(procs: Processes, relay: Relay, target: int | str, *extra: str) -> tuple[object, int]:
    """`portway tcp TARGET`; returns the agent and the public port of its tcp://HOST:PORT stdout line."""
    proc = procs.start(PORTWAY + ["tcp", str(target), "--relay", relay.url, *extra], "tcp agent")
    match = proc.wait_for_line(r"^tcp://%s:(\d+)$" % re.escape(relay.domain))
    return proc, int(match.group(1))


def refused(procs: Processes, relay: Relay, *args: str) -> str:
    """Run an agent that must be refused: its exit status is not 0 and it says why on stderr (no traceback)."""
    proc = procs.start(PORTWAY + [*args, "--relay", relay.url, "--no-wait-for-relay"], "refused agent")
    code = proc.wait_exit(TIMEOUT)
    assert code != 0, proc.output()
    assert proc.stdout == [], proc.output()
    assert "Traceback" not in proc.output()
    return "\n".join(proc.stderr)


class Origin(socketserver.ThreadingTCPServer):
    """A Python service on 127.0.0.1 answering each connection with `handle(sock)`, in a thread."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, handle) -> None:
        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                handle(self.request)

        super().__init__(("127.0.0.1", 0), Handler)
        self.port = self.server_address[1]
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()


def read_to_end(sock: socket.socket) -> bytes:
    parts = []
    while data := sock.recv(1 << 20):
        parts.append(data)
    return b"".join(parts)


def answer_after_eof(sock: socket.socket) -> None:
    """Reads everything the visitor sends until its end, then answers its checksum and 8 MiB (+ their checksum)."""
    received = hashlib.sha256(read_to_end(sock)).hexdigest()
    body = os.urandom(8 * 1024 * 1024)
    sock.sendall(f"{received} {hashlib.sha256(body).hexdigest()}\n".encode() + body)


def test_a_visitor_that_half_closes_still_gets_the_whole_answer(procs):
    with Origin(answer_after_eof) as origin:
        relay, _ = start_tcp_relay(procs)
        _, public = start_tcp_agent(procs, relay, origin.port)
        payload = os.urandom(8 * 1024 * 1024 + 7)
        with socket.create_connection(("127.0.0.1", public), timeout=TIMEOUT) as visitor:
            visitor.sendall(payload)
            visitor.shutdown(socket.SHUT_WR)  # done sending: the answer must still come, whole
            answer = read_to_end(visitor)
        line, body = answer.split(b"\n", 1)
        seen, body_sum = line.decode().split()
        assert seen == hashlib.sha256(payload).hexdigest()
        assert hashlib.sha256(body).hexdigest() == body_sum and len(body) == 8 * 1024 * 1024


def say_proxy_source(sock: socket.socket) -> None:
    reader = HeaderReader()
    header = None
    while header is None:
        header = reader.feed(sock.recv(256))
    assert header.endpoints is not None
    # the visitor's bytes: those that came with the header, then the rest until the visitor's end (they may come
    # in reads of their own)
    sock.sendall(f"{header.version.name} {header.endpoints.source} {header.endpoints.source_port}\n".encode()
                 + reader.rest + read_to_end(sock))


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_the_service_learns_the_visitor_address_from_the_proxy_header(procs, version):
    with Origin(say_proxy_source) as origin:
        relay, _ = start_tcp_relay(procs)
        _, public = start_tcp_agent(procs, relay, f"127.0.0.1:{origin.port}", "--proxy-protocol", version)
        with socket.create_connection(("127.0.0.1", public), timeout=TIMEOUT) as visitor:
            visitor.sendall(b"first bytes")
            visitor.shutdown(socket.SHUT_WR)
            answer = read_to_end(visitor).decode()
            own_port = visitor.getsockname()[1]
        assert answer == f"{version.upper()} 127.0.0.1 {own_port}\nfirst bytes"


def test_without_proxy_protocol_the_service_gets_the_visitor_bytes_first(procs):
    def echo(sock: socket.socket) -> None:
        sock.sendall(read_to_end(sock))

    with Origin(echo) as origin:
        relay, _ = start_tcp_relay(procs)
        _, public = start_tcp_agent(procs, relay, origin.port)
        with socket.create_connection(("127.0.0.1", public), timeout=TIMEOUT) as visitor:
            visitor.sendall(b"PING")
            visitor.shutdown(socket.SHUT_WR)
            assert read_to_end(visitor) == b"PING"


def test_refusals_are_one_line_each_and_a_failing_exit(procs, tmp_path):
    tokens = tmp_path / "tokens.toml"
    own_port, *relay_ports = free_ports(4)
    reserved = relay_ports[2]
    tokens.write_text(f'[[token]]\ntoken = "alice"\n\n[[token]]\ntoken = "bob"\nports = [{reserved}]\n')
    relay = start_relay(procs, "--tcp-ports", ",".join(map(str, relay_ports)), "--tokens", str(tokens),
                        port=own_port)
    outside = next(port for port in range(20000, 65000) if port not in relay_ports)
    message = refused(procs, relay, "tcp", "22", "--remote-port", str(outside), "--token", "alice")
    assert re.fullmatch(rf"error: port {outside} is outside this relay's TCP range .*", message), message

    message = refused(procs, relay, "tcp", "22", "--remote-port", str(reserved), "--token", "alice")
    assert message == f"error: port {reserved} is reserved for another token"

    start_tcp_agent(procs, relay, 22, "--remote-port", str(relay_ports[0]), "--token", "alice")
    message = refused(procs, relay, "tcp", "22", "--remote-port", str(relay_ports[0]), "--token", "bob")
    assert message == f"error: port {relay_ports[0]} is already in use"

    quota = tmp_path / "quota.toml"
    quota.write_text('[[token]]\ntoken = "carol"\nmax_tunnels = 2\n')
    limited = start_relay(procs, "--tcp-ports", ",".join(map(str, relay_ports)), "--tokens", str(quota))
    config = tmp_path / "portway.toml"
    config.write_text('token = "carol"\nno_inspect = true\n[tunnels.web]\nproto = "http"\nport = 8080\n'
                      '[tunnels.shop]\nproto = "http"\nport = 8081\n[tunnels.db]\nproto = "tcp"\nport = 22\n')
    message = refused(procs, limited, "start", "--config", str(config))
    assert message.endswith("error: this token may hold 2 tunnel(s) at once and holds 0; this link asks for 3"), \
        message

    plain = start_relay(procs)
    message = refused(procs, plain, "tcp", "22")
    assert message == "error: no TCP ports configured on this relay: start it with --tcp-ports"


def test_a_config_file_serves_two_http_tunnels_and_a_tcp_one_over_one_link(procs, tmp_path):
    def echo(sock: socket.socket) -> None:
        sock.sendall(read_to_end(sock))

    with Origin(echo) as tcp_origin, _http_origin("web") as web, _http_origin("shop") as shop:
        relay, ports = start_tcp_relay(procs)
        config = tmp_path / "portway.toml"
        config.write_text(
            f'[tunnels.web]\nproto = "http"\nport = {web.port}\n\n'
            f'[tunnels.shop]\nproto = "http"\nport = {shop.port}\n\n'
            f'[tunnels.db]\nproto = "tcp"\nport = {tcp_origin.port}\nremote_port = {ports[1]}\n')
        with LinkProxy(relay.port) as proxy:
            agent = procs.start(PORTWAY + ["start", "--config", str(config), "--relay",
                                           f"http://127.0.0.1:{proxy.port}", "--no-inspect"], "agent")
            agent.wait_for_line(r"^tcp://")
            urls = [line for line in agent.stdout if "://" in line]
            assert urls == [f"http://web.localhost:{relay.port}", f"http://shop.localhost:{relay.port}",
                            f"tcp://localhost:{ports[1]}"]
            for name in ("web", "shop"):
                request = urllib.request.Request(f"http://127.0.0.1:{relay.port}/",
                                                 headers={"Host": f"{name}.localhost"})
                with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
                    assert response.read() == f"I am {name}".encode()
            payload = os.urandom(3 * 1024 * 1024)
            with socket.create_connection(("127.0.0.1", ports[1]), timeout=TIMEOUT) as visitor:
                visitor.sendall(payload)
                visitor.shutdown(socket.SHUT_WR)
                assert hashlib.sha256(read_to_end(visitor)).digest() == hashlib.sha256(payload).digest()
            assert proxy.accepted == 1  # every tunnel over the agent's one link


class _http_origin:
    """A tiny HTTP service answering `I am NAME`."""

    def __init__(self, name: str) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        body = f"I am {name}".encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


# ----------------------------------------------------------------------------------------------- real services

def test_redis_through_a_tcp_tunnel(procs, tmp_path):
    server = RedisServer()
    server.start()
    try:
        relay, _ = start_tcp_relay(procs)
        _, public = start_tcp_agent(procs, relay, server.port)
        cli = ["redis-cli", "-h", "127.0.0.1", "-p", str(public)]
        value = os.urandom(1024 * 1024).hex()[:1024 * 1024]  # 1 MiB, printable so redis-cli returns it as is
        (tmp_path / "value").write_text(value)
        with open(tmp_path / "value", "rb") as stdin:
            stored = subprocess.run(cli + ["-x", "SET", "big"], stdin=stdin, capture_output=True, timeout=TIMEOUT)
        assert stored.stdout.strip() == b"OK", stored
        got = subprocess.run(cli + ["--no-raw", "STRLEN", "big"], capture_output=True, timeout=TIMEOUT)
        assert got.stdout.strip() == b"(integer) %d" % len(value)
        fetched = subprocess.run(cli + ["--raw", "GET", "big"], capture_output=True, timeout=TIMEOUT)
        assert hashlib.sha256(fetched.stdout.rstrip(b"\n")).digest() == hashlib.sha256(value.encode()).digest()

        commands = b"".join(b"*3\r\n$3\r\nSET\r\n$%d\r\nkey:%d\r\n$%d\r\nval:%d\r\n"
                            % (len(b"key:%d" % i), i, len(b"val:%d" % i), i) for i in range(100_000))
        piped = subprocess.run(cli + ["--pipe"], input=commands, capture_output=True, timeout=TIMEOUT)
        assert b"errors: 0, replies: 100000" in piped.stdout, piped
        size = subprocess.run(cli + ["DBSIZE"], capture_output=True, timeout=TIMEOUT)
        assert size.stdout.strip() == b"100001"  # the 100 000 keys and `big`
    finally:
        server.stop()


@pytest.fixture
def sshd(procs, tmp_path):
    """A private sshd on a free 127.0.0.1 port with throwaway host and user keys; yields (port, user key)."""
    if not os.path.exists(SSHD) or shutil.which("ssh") is None:
        pytest.fail("OpenSSH is missing (scripts/test.sh installs openssh-server and openssh-client)")
    for name in ("host_key", "user_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / name)], check=True,
                       stdin=subprocess.DEVNULL, timeout=30)
    shutil.copy(tmp_path / "user_key.pub", tmp_path / "authorized_keys")
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation wants it
    port = free_port()
    config = tmp_path / "sshd_config"
    config.write_text("\n".join([
        "ListenAddress 127.0.0.1", f"Port {port}", f"HostKey {tmp_path / 'host_key'}", "PidFile none",
        f"AuthorizedKeysFile {tmp_path / 'authorized_keys'}", "StrictModes no", "UsePAM no",
        "PasswordAuthentication no", "KbdInteractiveAuthentication no", "PermitRootLogin prohibit-password",
        "UseDNS no", "LogLevel ERROR", "Subsystem sftp internal-sftp", ""]))  # scp speaks SFTP
    proc = procs.start([SSHD, "-D", "-e", "-f", str(config)], "sshd")

    def listening():
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            assert proc.popen.poll() is None, proc.output()
            return False

    wait_until(listening, 15, what="sshd to listen")
    return port, tmp_path / "user_key"


def ssh_options(key: Path) -> list[str]:
    return ["-F", "/dev/null", "-i", str(key), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR"]


def test_openssh_through_a_tcp_tunnel(procs, sshd, tmp_path):
    sshd_port, key = sshd
    relay, _ = start_tcp_relay(procs)
    _, public = start_tcp_agent(procs, relay, sshd_port)
    user = getpass.getuser()
    done = subprocess.run(["ssh", *ssh_options(key), "-p", str(public), f"{user}@127.0.0.1",
                           "echo ok; id -u"], capture_output=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().split() == ["ok", str(os.getuid())]

    original = tmp_path / "upload"
    original.write_bytes(os.urandom(20 * 1024 * 1024))
    remote = tmp_path / "remote-copy"
    back = tmp_path / "downloaded"
    scp = ["scp", *ssh_options(key), "-P", str(public)]
    up = subprocess.run(scp + [str(original), f"{user}@127.0.0.1:{remote}"], capture_output=True, timeout=TIMEOUT,
                        stdin=subprocess.DEVNULL)
    assert up.returncode == 0, up.stderr
    down = subprocess.run(scp + [f"{user}@127.0.0.1:{remote}", str(back)], capture_output=True, timeout=TIMEOUT,
                          stdin=subprocess.DEVNULL)
    assert down.returncode == 0, down.stderr
    digest = hashlib.sha256(original.read_bytes()).digest()
    assert hashlib.sha256(remote.read_bytes()).digest() == digest
    assert hashlib.sha256(back.read_bytes()).digest() == digest


def test_a_tcp_tunnel_keeps_its_port_through_a_lost_link(procs):
    def echo(sock: socket.socket) -> None:
        sock.sendall(read_to_end(sock))

    def round_trip(port: int, payload: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as visitor:
            visitor.sendall(payload)
            visitor.shutdown(socket.SHUT_WR)
            return read_to_end(visitor)

    with Origin(echo) as origin:
        relay, _ = start_tcp_relay(procs)
        with LinkProxy(relay.port) as proxy:
            agent = procs.start(PORTWAY + ["tcp", str(origin.port), "--relay", f"http://127.0.0.1:{proxy.port}"],
                                "tcp agent")
            public = int(agent.wait_for_line(r"^tcp://localhost:(\d+)$").group(1))
            assert round_trip(public, b"before") == b"before"
            proxy.refusing = True  # the way back to the relay stays down for now
            proxy.reset()
            agent.wait_for_line(r"link to relay lost")

            def visitor_reset() -> bool:  # the relay noticed: the port stays bound, its visitors are reset
                try:
                    return round_trip(public, b"x") == b""
                except ConnectionResetError:
                    return True

            wait_until(visitor_reset, what="a visitor of the offline tunnel to be reset")
            message = refused(procs, relay, "tcp", "22", "--remote-port", str(public))
            assert re.fullmatch(rf"error: port {public} is held for the agent that had it \(its link dropped\); "
                                r"it is free in \d+ s unless that agent comes back", message), message
            proxy.refusing = False
            agent.wait_for_line(rf"reconnected: tcp://localhost:{public}$")
            payload = os.urandom(1024 * 1024)
            assert round_trip(public, payload) == payload
            assert [line for line in agent.stdout if line.startswith("tcp://")] == [f"tcp://localhost:{public}"]


def test_portway_http_with_several_ports_serves_them_all_over_one_link_or_none(procs):
    with _http_origin("first") as first, _http_origin("second") as second:
        relay = start_relay(procs)
        with LinkProxy(relay.port) as proxy:
            agent = procs.start(PORTWAY + ["http", str(first.port), str(second.port), "--name", "one", "--name",
                                           "two", "--relay", f"http://127.0.0.1:{proxy.port}", "--no-inspect"],
                                "agent")
            agent.wait_for_line(r"^http://two\.")
            assert agent.stdout[:2] == [f"http://one.localhost:{relay.port}", f"http://two.localhost:{relay.port}"]
            for name, body in (("one", b"I am first"), ("two", b"I am second")):
                request = urllib.request.Request(f"http://127.0.0.1:{relay.port}/",
                                                 headers={"Host": f"{name}.localhost"})
                with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
                    assert response.read() == body
            assert proxy.accepted == 1
        # all or nothing: with `two` held (for the agent whose link just went), the link is refused with the
        # reason, and `three` is not registered either
        message = refused(procs, relay, "http", str(first.port), str(second.port), "--name", "three", "--name", "two",
                          "--no-inspect")
        assert message.startswith("error: tunnel name 'two' is held for the agent that had it"), message
        request = urllib.request.Request(f"http://127.0.0.1:{relay.port}/", headers={"Host": "three.localhost"})
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(request, timeout=TIMEOUT)
        missing.value.close()
        assert missing.value.code == 404


def connection_reset(port: int) -> bool:
    """Whether a visitor's connection to `port` ends without a byte of answer (reset, or closed at once)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as visitor:
            visitor.sendall(b"hello")
            return visitor.recv(100) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True


def test_a_local_service_that_refuses_resets_the_visitor_and_says_so(procs):
    closed = free_port()  # nothing listens there
    relay, _ = start_tcp_relay(procs)
    agent, public = start_tcp_agent(procs, relay, closed)
    assert connection_reset(public)
    agent.wait_for_line(rf"connection to localhost:{closed} failed")


@pytest.mark.parametrize("network, admitted", [("10.0.0.0/8", False), ("127.0.0.1/32", True)])
def test_allow_ip_admits_or_resets_tcp_visitors_at_accept(procs, network, admitted):
    def echo(sock: socket.socket) -> None:
        sock.sendall(read_to_end(sock))

    with Origin(echo) as origin:
        relay, _ = start_tcp_relay(procs)
        _, public = start_tcp_agent(procs, relay, origin.port, "--allow-ip", network)
        if admitted:
            with socket.create_connection(("127.0.0.1", public), timeout=TIMEOUT) as visitor:
                visitor.sendall(b"let me in")
                visitor.shutdown(socket.SHUT_WR)
                assert read_to_end(visitor) == b"let me in"
        else:
            assert connection_reset(public)
