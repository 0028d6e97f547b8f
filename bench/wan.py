"""The benchmark's WAN case: the tunnel against plain TCP over the same impaired link, on the NAT test-bed.

    python3 bench/run.py --wan [--quick] [--repeat N] [--json PATH]

The test-bed (tests/e2e/netlab.sh, network namespaces; root only) puts the relay on the public side, the agent
and bench/origin.js in the home network behind the NAT router, and the visitor on the public side. The home
link (the one the agent's link crosses) is impaired with `delay RTT/2` each way and, for the lossy cells,
`loss 1%` each way. For every cell (RTT x loss x direction x streams) a plain TCP transfer between the home
host and the relay host and a transfer through the tunnel (visitor -> relay -> link -> agent -> origin) move
the same bytes; each cell runs the two in turn, `--repeat` times, and reports the median of each.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path as FsPath

from procs import Registry

ROOT = FsPath(__file__).resolve().parents[1]
NETLAB = ROOT / "tests" / "e2e" / "netlab.sh"
PEER = ROOT / "bench" / "wan_peer.py"
PREFIX = "pwbench"  # the netlab tests use pw<pid>; this bed never collides with theirs
RELAY_IP = "203.0.113.10"
RELAY_PORT, PLAIN_PORT = 8080, 9000
TOKEN = "wan-bench"
NAME, DOMAIN = "wan", "wan.test"
RTTS_MS = (50, 100, 200)
LOSSES = (0, 1)
DIRECTIONS = ("download", "upload")
STREAMS = (1, 8)
TRANSFER_DEADLINE = 180.0  # seconds for one transfer; past it the cell records an error
TARGET_RATIO = 0.8


def wan_config(quick: bool) -> dict:
    # 16 MB per cell (all streams together): the slowest cells (200 ms RTT) take 3-6 s per transfer, so the
    # whole grid takes ~2 minutes per repeat (--repeat 3, the default: ~6 minutes), --quick (4 MB) a third.
    return {"bytes": 4_000_000 if quick else 16_000_000}


def unavailable() -> str | None:
    if os.geteuid() != 0:
        return "the WAN case needs root (it builds network namespaces); run it as root or leave out --wan"
    for tool in ("ip", "nft", "iptables", "node"):
        if shutil.which(tool) is None:
            return f"the WAN case needs {tool!r} (bash scripts/test.sh installs it)"
    return None


def _loadavg() -> float | None:
    try:
        return float(open("/proc/loadavg").read().split()[0])
    except (OSError, ValueError):
        return None


class Bed:
    def __init__(self, reg: Registry) -> None:
        self.reg = reg
        self.env = {"NETLAB_PREFIX": PREFIX, "PYTHONPATH": str(ROOT / "src")}

    def ctl(self, *args: str) -> None:
        done = subprocess.run([str(NETLAB), *args], env={**os.environ, **self.env}, capture_output=True,
                              text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"netlab.sh {' '.join(args)}: {done.stderr.strip()}")

    def start(self, host: str, args: list[str], name: str):
        return self.reg.start([str(NETLAB), "exec", host, *args], name, env=self.env, cwd=ROOT)

    def run(self, host: str, args: list[str]) -> dict:
        """Run one transfer to completion in `host` and return its result line."""
        try:
            done = subprocess.run([str(NETLAB), "exec", host, *args], env={**os.environ, **self.env},
                                  capture_output=True, text=True, timeout=TRANSFER_DEADLINE)
        except subprocess.TimeoutExpired:
            return {"error": f"no result within {TRANSFER_DEADLINE:.0f} s"}
        for line in done.stdout.splitlines():
            if line.startswith("result "):
                return json.loads(line[len("result "):])
        return {"error": f"no result line (exit {done.returncode}): {done.stderr.strip()[-300:]}"}


def _rate(result: dict) -> float | None:
    if "error" in result or not result.get("seconds"):
        return None
    return result["bytes"] / result["seconds"] / 1e6


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 2) if values else None


def run_wan(args, reg: Registry, results: dict) -> None:
    """Build the bed, measure every cell into results["wan"], tear the bed down (also on errors)."""
    cfg = wan_config(args.quick)
    cfg["repeat"] = args.repeat
    results["config"] = cfg
    wan: dict = {"cells": [], "ceiling": None}
    results["wan"] = wan
    bed = Bed(reg)
    bed.ctl("up")
    try:
        python = [sys.executable]
        plain = bed.start("relay", python + [str(PEER), "serve", RELAY_IP, str(PLAIN_PORT)], "plain-tcp server")
        plain.wait_for(r"^listening", timeout=30)
        origin = bed.start("home", ["node", str(ROOT / "bench" / "origin.js"), "0"], "origin")
        origin_port = origin.wait_for(r"listening (\d+)", timeout=30).group(1)

        def start_tunnel() -> list:
            """A relay and an agent whose link is made over the link as it is now impaired, as it would be
            in use: a link made before its path slowed down keeps, for a while, the congestion state of the
            fast one (BBR's minimum RTT lasts 10 s), which no real agent link sees."""
            relay = bed.start("relay", python + ["-m", "portway", "server", "--bind", RELAY_IP, "--port",
                                                 str(RELAY_PORT), "--domain", DOMAIN, "--token", TOKEN], "relay")
            relay.wait_for(r"listening on", timeout=30)
            agent = bed.start("home", python + ["-m", "portway", "http", origin_port, "--relay",
                                                f"http://{RELAY_IP}:{RELAY_PORT}", "--name", NAME, "--token",
                                                TOKEN, "--no-inspect"], "agent")
            agent.wait_for(rf"^http://{NAME}\.{DOMAIN}:{RELAY_PORT}$", timeout=60)
            return [relay, agent]

        def plain_transfer(direction: str, streams: int) -> dict:
            return bed.run("home", python + [str(PEER), "plain", RELAY_IP, str(PLAIN_PORT), direction,
                                             str(cfg["bytes"]), str(streams)])

        def tunnel_transfer(direction: str, streams: int) -> dict:
            return bed.run("visitor", python + [str(PEER), "visit", RELAY_IP, str(RELAY_PORT),
                                                f"{NAME}.{DOMAIN}", direction, str(cfg["bytes"]), str(streams)])

        # What the impairment process itself can carry: plain TCP over a 1 ms delay (no loss) goes through
        # the same nfqueue hold as every impaired cell, at a round trip too short for TCP to be the limit.
        bed.ctl("impair", "home", "delay", "1ms")
        ceiling = {f"{streams}": _rate(plain_transfer("download", streams)) for streams in STREAMS}
        wan["ceiling"] = ceiling
        print(f"impairment ceiling (plain TCP over delay 1ms): "
              + ", ".join(f"{n} stream(s) {v if v is None else round(v, 1)} MB/s" for n, v in ceiling.items()),
              flush=True)
        for rtt in RTTS_MS:
            for loss in LOSSES:
                spec = ["delay", f"{rtt // 2}ms"] + (["loss", f"{loss}%"] if loss else [])
                bed.ctl("impair", "home", *spec)
                tunnel = start_tunnel()
                for direction in DIRECTIONS:
                    for streams in STREAMS:
                        cell = {"rtt_ms": rtt, "loss_pct": loss, "direction": direction, "streams": streams,
                                "plain": [], "tunnel": [], "loadavg": []}
                        for _ in range(args.repeat):
                            cell["loadavg"].append(_loadavg())
                            cell["plain"].append(plain_transfer(direction, streams))
                            cell["tunnel"].append(tunnel_transfer(direction, streams))
                        plain_rates = [r for r in map(_rate, cell["plain"]) if r is not None]
                        tunnel_rates = [r for r in map(_rate, cell["tunnel"]) if r is not None]
                        cell["plain_mbps"] = _median(plain_rates)
                        cell["tunnel_mbps"] = _median(tunnel_rates)
                        cell["ratio"] = (round(cell["tunnel_mbps"] / cell["plain_mbps"], 2)
                                         if cell["plain_mbps"] and cell["tunnel_mbps"] else None)
                        cell["errors"] = [r["error"] for r in cell["plain"] + cell["tunnel"] if "error" in r]
                        wan["cells"].append(cell)
                        print(_row(cell), flush=True)
                for proc in tunnel:
                    if "Traceback" in proc.output():
                        wan.setdefault("errors", []).append(f"the {proc.name} printed a traceback:\n{proc.tail()}")
                reg.kill(tunnel)
    finally:
        reg.kill_all()
        subprocess.run([str(NETLAB), "down"], env={**os.environ, **bed.env}, capture_output=True, timeout=60)


def _fmt(value: float | None) -> str:
    return "error" if value is None else f"{value:.2f}"


def _row(cell: dict) -> str:
    ratio = cell["ratio"]
    mark = "" if ratio is None or ratio >= TARGET_RATIO else " (below 0.8)"
    loads = ", ".join("?" if x is None else f"{x:.1f}" for x in cell["loadavg"])
    return (f"| {cell['rtt_ms']} ms | {cell['loss_pct']} % | {cell['direction']} | {cell['streams']} | "
            f"{_fmt(cell['plain_mbps'])} | {_fmt(cell['tunnel_mbps'])} | "
            f"{'—' if ratio is None else f'{ratio:.2f}'}{mark} | {loads} |")


def wan_table(results: dict) -> str:
    wan = results.get("wan") or {}
    lines = ["| RTT | loss | direction | streams | plain TCP MB/s | tunnel MB/s | tunnel / plain | load avg |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [_row(cell) for cell in wan.get("cells", [])]
    return "\n".join(lines)
