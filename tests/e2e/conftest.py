"""Real processes on 127.0.0.1: relay, agent, Node origin, lt client. Every one is killed at teardown."""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
NODE_MODULES = ROOT / "node_modules"
DEFAULT_TIMEOUT = 20.0



def pytest_itemcollected(item: pytest.Item) -> None:
    """Every test in this folder starts real processes: mark it `e2e`, so `-m e2e` / `-m "not e2e"` select by it.
    (A `pytestmark` in a conftest marks nothing; this hook runs only for items under this folder.)"""
    item.add_marker(pytest.mark.e2e)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_ports(count: int) -> list[int]:
    """`count` distinct ports free right now: held together while chosen, so none comes back twice (one relay's
    own port and its TCP tunnels' ports must differ)."""
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


def wait_until(condition, timeout: float = DEFAULT_TIMEOUT, interval: float = 0.02, what: str = "condition"):
    """Poll `condition` until it returns something truthy; the value is returned."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class Proc:
    """A child process whose output lines are collected by a reader thread."""

    def __init__(self, args: list[str], name: str, env: dict | None = None, cwd: Path | None = None) -> None:
        self.name = name
        self.args = args
        full_env = dict(os.environ)
        # the portway under test is this checkout's, whatever another editable install points at
        full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), full_env.get("PYTHONPATH")]))
        full_env.update(env or {})
        self.popen = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=full_env, cwd=cwd,
            start_new_session=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.readers = [
            threading.Thread(target=self._read, args=(stream, sink), daemon=True)
            for stream, sink in ((self.popen.stdout, self.stdout), (self.popen.stderr, self.stderr))
        ]
        for reader in self.readers:
            reader.start()

    def _read(self, stream, sink: list[str]) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\n")
            sink.append(line)
            self.lines.put(line)

    def wait_for_line(self, pattern: str, timeout: float = DEFAULT_TIMEOUT) -> re.Match:
        regex = re.compile(pattern)

        def found():
            for line in self.stdout + self.stderr:
                match = regex.search(line)
                if match:
                    return match
            if self.popen.poll() is not None:
                self.join_readers()  # everything it printed before exiting, read to the end
                for line in self.stdout + self.stderr:
                    match = regex.search(line)
                    if match:
                        return match
                raise AssertionError(f"{self.name} exited ({self.popen.returncode}) before printing "
                                     f"{pattern!r}; output:\n{self.output()}")
            return None

        return wait_until(found, timeout, what=f"{self.name} to print {pattern!r}")

    def output(self) -> str:
        return "\n".join(self.stdout + self.stderr)

    def wait_exit(self, timeout: float = DEFAULT_TIMEOUT) -> int:
        """Wait for the process to exit and for its output to be read to the end: output() is then complete."""
        code = self.popen.wait(timeout)
        self.join_readers()
        return code

    def join_readers(self, timeout: float = 10.0) -> None:
        """The reader threads end at EOF on the pipes, which comes once the process (and anything it started) exited."""
        for reader in self.readers:
            reader.join(timeout)
            assert not reader.is_alive(), f"{self.name}'s output is still open {timeout}s after it exited"

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, sig)
            except ProcessLookupError:
                pass
        try:
            self.popen.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(10)
        for reader in self.readers:
            reader.join(5)
        self.popen.stdout.close()
        self.popen.stderr.close()


class Processes:
    def __init__(self) -> None:
        self.procs: list[Proc] = []

    def start(self, args: list[str], name: str, **kwargs) -> Proc:
        proc = Proc(args, name, **kwargs)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            proc.kill(signal.SIGTERM)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """A failing test's report carries what each of its processes printed (the end of it): a stall that only
    shows once in a while can then be read from the failing run itself, not only from a rerun that passes."""
    outcome = yield
    report = outcome.get_result()
    funcargs = getattr(item, "funcargs", {})
    processes = funcargs.get("procs") or funcargs.get("lab")  # `lab`: the NAT test-bed's (tests/e2e/test_netlab.py)
    if report.failed and processes is not None:
        for proc in processes.procs:
            report.sections.append((f"output of {proc.name} (pid {proc.popen.pid})", proc.output()[-20_000:]))


@pytest.fixture
def procs():
    processes = Processes()
    yield processes
    processes.stop_all()


PORTWAY = [sys.executable, "-m", "portway"]


def require_node_tools() -> None:
    if shutil.which("node") is None or not (NODE_MODULES / "ws").exists():
        pytest.fail("Node.js and the pinned npm test tools are required: run `bash scripts/test.sh`")


class Relay:
    def __init__(self, proc: Proc, port: int, domain: str) -> None:
        self.proc = proc
        self.port = port
        self.domain = domain

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def host(self, name: str) -> str:
        return f"{name}.{self.domain}:{self.port}"


def start_relay(procs: Processes, *extra: str, domain: str = "localhost", port: int | None = None) -> Relay:
    port = port or free_port()
    proc = procs.start(PORTWAY + ["server", "--port", str(port), "--domain", domain, *extra], "relay")
    proc.wait_for_line(r"listening on")
    return Relay(proc, port, domain)


def start_agent(procs: Processes, relay: Relay, local_port: int, *extra: str, name: str | None = None) -> tuple[Proc, str]:
    args = PORTWAY + ["http", str(local_port), "--relay", relay.url]
    if name:
        args += ["--name", name]
    proc = procs.start(args + list(extra), f"agent {name}")
    match = proc.wait_for_line(r"^(http://([a-z0-9-]+)\.%s:%d)$" % (re.escape(relay.domain), relay.port))
    return proc, match.group(2)


def start_origin(procs: Processes, label: str = "origin") -> int:
    require_node_tools()
    port = free_port()
    proc = procs.start(["node", str(FIXTURES / "ws_echo_server.js"), str(port), label], label,
                       env={"ORIGIN_NAME": label})
    proc.wait_for_line(r"listening")
    return port


@pytest.fixture
def relay(procs) -> Relay:
    return start_relay(procs)


@pytest.fixture
def origin(procs) -> int:
    return start_origin(procs)


def assert_cut_short_when_killed(relay: Relay, name: str, proc: Proc) -> None:
    """Start a slow 1 MB download, kill `proc` mid-body: the visitor must see the answer cut short."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", relay.port, timeout=10)
    try:
        conn.request("GET", "/slow?ms=5000&bytes=1000000", headers={"Host": relay.host(name)})
        response = conn.getresponse()
        assert response.status == 200
        response.read(1)
        proc.kill(signal.SIGKILL)
        with pytest.raises((http.client.IncompleteRead, ConnectionError)):
            response.read()
    finally:
        conn.close()


def ws_open(relay: Relay, name: str):
    """A WebSocket to NAME through the relay (connecting to 127.0.0.1, whatever the URL's host)."""
    import socket as socket_module

    from websockets.sync.client import connect

    sock = socket_module.create_connection(("127.0.0.1", relay.port))
    return connect(f"ws://{relay.host(name)}/", sock=sock, max_size=None, open_timeout=10)


def assert_websocket_echo(relay: Relay, name: str) -> None:
    """The seed's echo server answers text with `Echo: …` and returns a 1 MiB binary message intact."""
    import hashlib

    with ws_open(relay, name) as ws:
        ws.send("hello")
        assert ws.recv(timeout=10) == "Echo: hello"
        blob = os.urandom(1024 * 1024)
        ws.send(blob)
        echoed = ws.recv(timeout=30)
        assert hashlib.sha256(echoed).digest() == hashlib.sha256(blob).digest()


def prometheus_sees(procs: Processes, target_port: int, query: str, expected: str, timeout: float = 60.0) -> None:
    """Start a real Prometheus (Debian's package) scraping 127.0.0.1:target_port every second, and wait until
    `query` answers `expected` through its HTTP API."""
    import json
    import tempfile
    import urllib.parse
    import urllib.request

    prometheus = shutil.which("prometheus")
    assert prometheus, "prometheus (Debian's package) is needed: run `bash scripts/test.sh`"
    with tempfile.TemporaryDirectory() as state:
        config = Path(state) / "prometheus.yml"
        config.write_text("global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: portway\n"
                          f"    static_configs:\n      - targets: ['127.0.0.1:{target_port}']\n")
        web_port = free_port()
        server = procs.start([prometheus, f"--config.file={config}", f"--storage.tsdb.path={state}/data",
                              f"--web.listen-address=127.0.0.1:{web_port}"], "prometheus")
        url = f"http://127.0.0.1:{web_port}/api/v1/query?query={urllib.parse.quote(query)}"

        def answer():
            try:
                with urllib.request.urlopen(url, timeout=5) as reply:
                    result = json.load(reply)["data"]["result"]
            except OSError:
                return None
            return result[0]["value"][1] if result else None

        try:
            assert wait_until(answer, timeout=timeout, interval=0.5, what=f"Prometheus to answer {query}") == expected
        finally:
            server.kill()
