#!/usr/bin/env python3
"""The inspector's memory bound, measured: the agent's RSS while exchanges with big bodies go through it.

    python3 bench/inspector_memory.py [--exchanges 1200] [--body-kib 512]

Starts the test suite's Node origin and `portway http` (embedded relay, inspector on a free port) on 127.0.0.1,
POSTs `--exchanges` bodies of `--body-kib` KiB to the origin's /echo (so each exchange keeps twice that, up to the
1 MiB cap per body and the 128 MiB budget of the store), checks every echo, and prints the agent's RSS every
200 exchanges: it should stop growing once the budget is reached. Every process it starts is stopped at the end.
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
    return -1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exchanges", type=int, default=1200)
    parser.add_argument("--body-kib", type=int, default=512)
    args = parser.parse_args()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])))
    origin_port = free_port()
    children = []
    try:
        origin = subprocess.Popen(["node", str(ROOT / "tests/e2e/fixtures/ws_echo_server.js"), str(origin_port)],
                                  stdout=subprocess.PIPE, start_new_session=True)
        children.append(origin)
        origin.stdout.readline()  # "listening PORT"
        agent = subprocess.Popen([sys.executable, "-m", "portway", "http", str(origin_port), "--name", "memory",
                                  "--inspect", "127.0.0.1:0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                 env=env, start_new_session=True)
        children.append(agent)
        match = re.match(r"http://(memory\.localhost):(\d+)$", agent.stdout.readline().decode().strip())
        if match is None:
            raise SystemExit("the agent printed no tunnel URL")
        host, port = f"{match.group(1)}:{match.group(2)}", int(match.group(2))
        body = os.urandom(args.body_kib * 1024)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            for i in range(1, args.exchanges + 1):
                conn.request("POST", f"/echo?i={i}", body=body,
                             headers={"Host": host, "Content-Type": "application/octet-stream"})
                response = conn.getresponse()
                if response.read() != body:
                    raise SystemExit(f"exchange {i}: the echo differs")
                if i % 200 == 0 or (i <= 200 and i % 40 == 0):
                    through = i * len(body) * 2 // (1024 * 1024)
                    print(f"after {i:5} exchanges ({through:5} MiB of bodies through): agent RSS {rss_mib(agent.pid)} MiB",
                          flush=True)
        finally:
            conn.close()
    finally:
        for child in reversed(children):
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGTERM)
                child.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
