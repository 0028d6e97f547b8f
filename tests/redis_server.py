"""A throwaway `redis-server` on a free 127.0.0.1 port, for the cluster registry's tests: no persistence, killed at
teardown, restartable on the same port (what a node sees when its Redis comes back)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time

import pytest
import redis


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    def __init__(self) -> None:
        self.binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2, socket_connect_timeout=2)

    def start(self, timeout: float = 10.0) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--protected-mode", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            try:
                with self.client() as client:
                    if client.ping():
                        return
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"redis-server did not start on port {self.port}") from None
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None


@pytest.fixture(scope="module")
def redis_server():
    if not shutil.which("redis-server") and not shutil.which("/usr/bin/redis-server"):
        pytest.fail("redis-server is missing (scripts/test.sh installs it)")
    server = RedisServer()
    server.start()
    yield server
    server.stop()


class SentinelServer:
    """A Redis Sentinel (`redis-server --sentinel`) watching `master` as service `service`."""

    def __init__(self, master: RedisServer, folder, service: str = "portway-master") -> None:
        self.master = master
        self.service = service
        self.port = free_port()
        self.config = folder / "sentinel.conf"  # the sentinel rewrites its config file: one of its own
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.port}/{self.service}/0"

    def start(self, timeout: float = 10.0) -> None:
        self.config.write_text(f"port {self.port}\nbind 127.0.0.1\n"
                               f"sentinel monitor {self.service} 127.0.0.1 {self.master.port} 1\n")
        self.proc = subprocess.Popen([self.master.binary, str(self.config), "--sentinel"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            try:
                with redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2) as client:
                    if client.sentinel_get_master_addr_by_name(self.service):
                        return
            except redis.ConnectionError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"redis sentinel did not start on port {self.port}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None
