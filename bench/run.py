#!/usr/bin/env python3
"""Portway benchmark: direct vs Portway vs localtunnel vs ssh -R, on loopback, in one run.

    python3 bench/run.py [--quick] [--localtunnel-server DIR] [--json PATH]

See bench/README.md for what is measured and what each column means.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path as FsPath

sys.path.insert(0, str(FsPath(__file__).resolve().parent))

import loads  # noqa: E402
import paths  # noqa: E402
import wan  # noqa: E402
from procs import Monitor, Registry, StartError, machine_cpu_share, read_machine_ticks, summarize  # noqa: E402

ROOT = FsPath(__file__).resolve().parents[1]
DEFAULT_JSON = ROOT / "bench" / "results" / "latest.json"

PATH_ORDER = ["direct", "portway", "portway_inspect", "portway_cluster", "portway_tcp", "portway_lt", "localtunnel", "ssh"]
PATH_TITLES = {
    "direct": "direct",
    "portway": "Portway",
    "portway_inspect": "Portway + inspector",
    "portway_cluster": "Portway cluster, via node B",
    "portway_tcp": "Portway TCP tunnel",
    "portway_lt": "Portway relay + lt",
    "localtunnel": "lt server + lt",
    "ssh": "ssh -R",
}
# Paths that run the many-streams case (one multiplexed link; lt has a pool of 10 sockets).
STREAM_PATHS = {"direct", "portway", "portway_inspect", "portway_cluster", "portway_tcp", "ssh"}
CONCURRENCY = [1, 10, 50, 200]
CONN_RATE_CONNECTIONS = 10  # wrk connections of the new-connection case, each request on a connection of its own


def config_for(quick: bool) -> dict:
    if quick:
        return {"wrk_seconds": 2, "wrk_warmup_seconds": 1, "bulk_bytes": 20_000_000, "ws_rtt_seconds": 1.0,
                "ws_bulk_messages": 20, "ws_bulk_window": 4, "streams": 100, "stream_ms": 2000,
                "stream_bytes": 20_000, "bulk_deadline_s": 60}
    return {"wrk_seconds": 8, "wrk_warmup_seconds": 1, "bulk_bytes": 200_000_000, "ws_rtt_seconds": 3.0,
            "ws_bulk_messages": 100, "ws_bulk_window": 4, "streams": 1000, "stream_ms": 2000,
            "stream_bytes": 20_000, "bulk_deadline_s": 120}


# ---------------------------------------------------------------------------------------------
# machine and versions


def _cmd_version(args: list[str]) -> str | None:
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (out.stdout + out.stderr).strip().splitlines()
    return text[0].strip() if text else None


def _loadavg() -> list[float] | None:
    try:
        return [float(x) for x in open("/proc/loadavg").read().split()[:3]]
    except (OSError, ValueError):
        return None


def machine_info() -> dict:
    model = None
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kib = None
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    except OSError:
        pass
    return {"cpu_model": model, "cores": os.cpu_count(), "loadavg_start": _loadavg(), "mem_total_mib": mem_kib // 1024 if mem_kib else None,
            "kernel": platform.release(), "platform": platform.platform()}


def _portway_build() -> str | None:
    try:
        line = subprocess.run(paths.PORTWAY + ["--version"], capture_output=True, text=True, timeout=30).stdout
    except OSError:
        return None
    return line[line.find("(") + 1 : line.rfind(")")] if "(" in line else None


def versions(lt_server_dir: str | None) -> dict:
    from importlib import metadata

    def pkg(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    def git(args, cwd):
        try:
            return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True,
                                  timeout=10).stdout.strip() or None
        except OSError:
            return None

    def node_pkg(p: FsPath):
        try:
            return json.loads(p.read_text())["version"]
        except (OSError, ValueError, KeyError):
            return None

    info = {
        "python": platform.python_version(),
        "node": _cmd_version(["node", "--version"]),
        "wrk": _cmd_version(["wrk", "-v"]),
        "openssh": _cmd_version(["ssh", "-V"]),
        "portway": pkg("portway"),
        "portway_git": git(["describe", "--always", "--dirty"], ROOT),
        # "hot path compiled with mypyc" or "pure Python": the build the relay and the agent run
        "portway_build": _portway_build(),
        "uvloop": pkg("uvloop"),
        "websockets": pkg("websockets"),
        "localtunnel_client": node_pkg(ROOT / "node_modules" / "localtunnel" / "package.json"),
    }
    if lt_server_dir:
        d = FsPath(lt_server_dir)
        info["localtunnel_server"] = node_pkg(d / "package.json")
        info["localtunnel_server_git"] = git(["rev-parse", "--short", "HEAD"], d)
        info["localtunnel_server_esm"] = node_pkg(d / "node_modules" / "esm" / "package.json")
    return info


# ---------------------------------------------------------------------------------------------
# running one path


def _short_error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}" if not isinstance(exc, (loads.LoadError, StartError)) else str(exc)
    return text.strip()[:600]


def setup_path(key: str, reg: Registry, mon: Monitor, origin_port: int, args, out: dict):
    """Start what one path needs and watch its processes; returns the Path, or None when it can't run
    (the reason is in `out`)."""
    out.update({"title": PATH_TITLES[key], "cases": {}, "resources": {}, "notes": []})
    t_start = time.monotonic()
    mon.set_phase(f"{key}/setup")
    try:
        if key == "direct":
            path = paths.setup_direct(reg, origin_port)
        elif key == "portway":
            path = paths.setup_portway(reg, origin_port)
        elif key == "portway_inspect":
            path = paths.setup_portway(reg, origin_port, inspect=True)
        elif key == "portway_cluster":
            path = paths.setup_portway_cluster(reg, origin_port)
        elif key == "portway_tcp":
            path = paths.setup_portway_tcp(reg, origin_port)
        elif key == "portway_lt":
            path = paths.setup_portway_lt(reg, origin_port)
        elif key == "localtunnel":
            path = paths.setup_localtunnel(reg, origin_port, args.localtunnel_server)
        elif key == "ssh":
            path = paths.setup_ssh(reg, origin_port)
        else:
            raise ValueError(key)
    except paths.Skip as exc:
        out["skipped"] = str(exc)
        print(f"  {PATH_TITLES[key]}: skipped: {exc}", flush=True)
        return None
    except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
        out["error"] = _short_error(exc)
        print(f"  {PATH_TITLES[key]}: setup failed: {out['error']}", flush=True)
        return None
    out["setup_s"] = round(time.monotonic() - t_start, 2)
    out["target"] = {"connect": f"{path.target.ip}:{path.target.port}", "host": path.target.host}
    out["roles"] = {role: path.role_labels[role] for role in path.roles}
    for role, proc in path.roles.items():
        mon.watch(f"{key}:{role}", proc.pid)
    if key not in STREAM_PATHS:
        out["notes"].append("many-streams case not run: lt multiplexes nothing (a pool of 10 sockets)")
    print(f"  {PATH_TITLES[key]}: ready in {out['setup_s']} s", flush=True)
    return path


def case_plan(cfg: dict, expected: dict) -> list[tuple[str, object, set[str] | None]]:
    """(case name, load(target), paths it runs on or None for all), in the order they run."""
    plan: list[tuple[str, object, set[str] | None]] = []
    for c in CONCURRENCY:
        plan.append((f"get_c{c}", lambda target, reg, c=c: loads.run_wrk(target, c, cfg["wrk_seconds"], reg), None))
    plan.append(("conn_rate", lambda target, reg: loads.run_wrk(target, CONN_RATE_CONNECTIONS, cfg["wrk_seconds"], reg,
                                                              new_connections=True), None))
    plan += [
        ("download", lambda target, reg: loads.bulk_download(target, cfg["bulk_bytes"], "bench-down",
                                                             expected["download"], cfg["bulk_deadline_s"]), None),
        ("upload", lambda target, reg: loads.bulk_upload(target, cfg["bulk_bytes"], "bench-up",
                                                         expected["upload"], cfg["bulk_deadline_s"]), None),
        ("ws_rtt", lambda target, reg: loads.ws_round_trips(target, cfg["ws_rtt_seconds"]), None),
        ("ws_1mib", lambda target, reg: loads.ws_bulk(target, cfg["ws_bulk_messages"], 1 << 20,
                                                      cfg["ws_bulk_window"], cfg["bulk_deadline_s"]), None),
        ("streams", lambda target, reg: loads.many_streams(target, cfg["streams"], cfg["stream_ms"],
                                                           cfg["stream_bytes"], expected["streams"]), STREAM_PATHS),
    ]
    return plan


# The number each case is ranked by when it runs more than once (--repeat): the median run is reported.
CASE_METRIC = {"download": "mb_s", "upload": "mb_s", "ws_rtt": "rtt_per_s", "ws_1mib": "mb_s", "streams": "ok"}


def median_run(name: str, runs: list[dict]) -> dict:
    """The run with the median score (errors rank lowest); the others are kept under "repeats"."""
    metric = CASE_METRIC.get(name, "rps")
    ranked = sorted(runs, key=lambda r: (not r.get("error"), r.get(metric) or 0))
    chosen = dict(ranked[len(ranked) // 2])
    if len(runs) > 1:
        chosen["repeats"] = [{k: v for k, v in r.items() if k != "repeats"} for r in runs]
    return chosen


def run_case(key: str, path, name: str, load, reg: Registry, mon: Monitor, args, repeat: int) -> dict:
    phase = f"{key}/{name}" if repeat == 1 else f"{key}/{name}#{repeat}"
    mon.set_phase(phase)
    t0 = time.monotonic()
    ticks_before = read_machine_ticks()
    try:
        result = load(path.target, reg)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - one failing case must not stop the run
        result = {"error": _short_error(exc)}
        if args.verbose:
            traceback.print_exc()
    dead = [p.name for p in path.procs if not p.alive()]
    if dead:
        result.setdefault("error", "")
        result["error"] = (result["error"] + f" (process exited: {', '.join(dead)})").strip()
        for p in path.procs:
            if not p.alive():
                result.setdefault("process_output", {})[p.name] = p.tail(20)
    result["wall_s"] = round(time.monotonic() - t0, 2)
    result["machine_cpu"] = machine_cpu_share(ticks_before, read_machine_ticks())
    result["phase"] = phase.split("/", 1)[1]
    print(f"  {name:<9} {PATH_TITLES[key]:<19} {_brief(result)}", flush=True)
    return result


def repeat_order(keys: list[str], repeat: int) -> list[str]:
    """The order the paths run a case in on its `repeat`-th run (from 1): reversed on every second one, so that a
    VM whose speed drifts within a case favours no path for its place in the order (in a fixed order ssh -R always
    ran last, Portway second, right after direct)."""
    return keys if repeat % 2 else keys[::-1]


def run_paths(selected: list[str], reg: Registry, mon: Monitor, origin, origin_port: int, cfg: dict,
              expected: dict, args, results: dict) -> None:
    """Set every path up, then run each case over all of them in turn, so that the ratios of one case
    compare measurements minutes apart at most, not a whole run apart (this shared VM drifts)."""
    mon.watch("origin", origin.pid)
    ready: dict[str, object] = {}
    t_start = time.monotonic()
    try:
        print("\n== setting up", flush=True)
        for key in PATH_ORDER:
            if key in selected:
                results["paths"][key] = {}
                path = setup_path(key, reg, mon, origin_port, args, results["paths"][key])
                if path is not None:
                    ready[key] = path
        for key, path in ready.items():
            mon.set_phase(f"{key}/warmup")
            try:
                loads.run_wrk(path.target, 10, cfg["wrk_warmup_seconds"], reg)
            except loads.LoadError:
                pass
        for name, load, only in case_plan(cfg, expected):
            print(f"\n== {name}", flush=True)
            runs: dict[str, list[dict]] = {key: [] for key in ready if only is None or key in only}
            for repeat in range(1, args.repeat + 1):
                for key in repeat_order(list(runs), repeat):
                    runs[key].append(run_case(key, ready[key], name, load, reg, mon, args, repeat))
            for key, key_runs in runs.items():
                results["paths"][key]["cases"][name] = median_run(name, key_runs)
    finally:
        roles = mon.unwatch_all()
        for key in ready:
            out = results["paths"][key]
            for role_key, info in roles.items():
                if role_key.startswith(f"{key}:") or role_key == "origin":
                    out["resources"][role_key.split(":", 1)[-1]] = summarize(info, f"{key}/")
            for name, case in out["cases"].items():
                cost = cpu_per_unit(name, case, out["resources"])
                if cost is not None:
                    case["cpu_us_per_unit"] = cost
                activity = activity_per_unit(name, case, out["resources"])
                if activity is not None:
                    case["activity_per_unit"] = activity
            out["wall_s"] = round(time.monotonic() - t_start, 2)
        for path in ready.values():
            reg.kill(path.procs)
            for fn in path.cleanup:
                fn()


# What a case's work is counted in, for the CPU each tunnel side spends per unit of it.
CASE_UNITS = {"conn_rate": "connection", "download": "MB", "upload": "MB", "ws_rtt": "round trip", "ws_1mib": "MB"}
# The relay side and the agent side of every path (none for direct); the cluster path has a second relay node,
# "entry", where its visitors land (server is then the node that holds the tunnel).
TUNNEL_ROLES = ("server", "entry", "client")


def work_units(name: str, case: dict) -> float | None:
    """How many units of work the (median) run of a case did: requests, MB moved or round trips."""
    if name.startswith("get_c") or name == "conn_rate":
        return case.get("requests")
    if name in ("download", "upload"):
        return case["bytes"] / 1e6 if case.get("bytes") else None
    if name == "ws_rtt":
        return case.get("messages")
    if name == "ws_1mib":
        return case["messages"] * case["message_bytes"] / 1e6 if case.get("messages") else None
    return None


def cpu_per_unit(name: str, case: dict, resources: dict) -> dict | None:
    """CPU µs the relay side (server, and entry for the cluster path) and the agent side (client) spent per unit
    of a case's work, measured over the very run the table reports (its phase); None when the case failed or the
    path has no tunnel."""
    units = work_units(name, case)
    if case.get("error") or not units or not any(role in resources for role in TUNNEL_ROLES):
        return None
    phase = case.get("phase", name)
    cost: dict = {"unit": CASE_UNITS.get(name, "request")}
    for role in TUNNEL_ROLES:
        if role == "entry" and role not in resources:
            continue  # a path with one relay
        cpu_s = resources.get(role, {}).get("phases", {}).get(phase, {}).get("cpu_s")
        cost[role] = round(cpu_s / units * 1e6, 1) if cpu_s is not None else None
    return cost


def activity_per_unit(name: str, case: dict, resources: dict) -> dict | None:
    """System calls (reads and writes) and runs on a CPU (wake-ups and returns after preemption) per unit of a
    case's work for every process role of the path, the origin included, over the run the table reports: where
    CPU per request differs between runs or paths, these say whether the processes did more system calls or woke
    up more often per request, or spent more per call. None when the case failed."""
    units = work_units(name, case)
    if case.get("error") or not units:
        return None
    phase = case.get("phase", name)
    activity: dict = {"unit": CASE_UNITS.get(name, "request"), "syscalls": {}, "runs": {}}
    for role, info in resources.items():
        counts = info.get("phases", {}).get(phase, {})
        for key in ("syscalls", "runs"):
            if key in counts:
                activity[key][role] = round(counts[key] / units, 2)
    return activity


def _brief(result: dict) -> str:
    if "error" in result and len(result) <= 3:
        return "ERROR " + result["error"][:200]
    parts = []
    for k in ("rps", "p50_ms", "p99_ms", "errors", "mb_s", "rtt_per_s", "ok", "failed", "peak_concurrent",
              "seconds"):
        if k in result:
            parts.append(f"{k}={result[k]}")
    if result.get("error"):
        parts.append("ERROR " + result["error"][:200])
    return " ".join(parts)


# ---------------------------------------------------------------------------------------------
# the table


def _num(v: float) -> str:
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def _ratio(v: float | None, base: float | None) -> str:
    if v is None or not base:
        return ""
    return f" ({v / base:.2f}×)"


def build_table(results: dict, cfg: dict) -> tuple[str, list[str]]:
    keys = [k for k in PATH_ORDER if k in results["paths"]]
    prs = results["paths"]
    footnotes: list[str] = []

    def cell_error(key: str, case: str) -> str | None:
        p = prs[key]
        if "skipped" in p:
            return "skipped"
        if "error" in p:
            return "setup failed"
        r = p["cases"].get(case)
        if r is None:
            return "n/a"
        if r.get("error"):
            footnotes.append(f"{PATH_TITLES[key]}, {case}: {r['error']}")
            return f"error [{len(footnotes)}]"
        return None

    def metric_row(label: str, case: str, field: str, ratio: bool = True) -> list[str]:
        base = prs.get("direct", {}).get("cases", {}).get(case, {}).get(field)
        row = [label]
        for k in keys:
            err = cell_error(k, case)
            if err:
                row.append(err)
                continue
            v = prs[k]["cases"][case].get(field)
            row.append(_num(v) + (_ratio(v, base) if ratio and k != "direct" else "") if v is not None else "")
        return row

    rows = []
    for c in CONCURRENCY:
        case = f"get_c{c}"
        row = metric_row(f"GET req/s, {c} conn", case, "rps")
        for i, k in enumerate(keys, 1):
            r = prs[k].get("cases", {}).get(case) or {}
            if r.get("errors"):
                row[i] += f", {r['errors']:,} errors"
        rows.append(row)
        row = [f"GET p50 / p99 ms, {c} conn"]
        for k in keys:
            err = cell_error(k, case)
            r = prs[k].get("cases", {}).get(case) or {}
            row.append(err or f"{_num(r['p50_ms'])} / {_num(r['p99_ms'])}")
        rows.append(row)
    row = metric_row(f"new connections/s (a request each), {CONN_RATE_CONNECTIONS} conn", "conn_rate", "rps")
    for i, k in enumerate(keys, 1):
        r = prs[k].get("cases", {}).get("conn_rate") or {}
        if r.get("errors"):
            row[i] += f", {r['errors']:,} errors"
    rows.append(row)
    mb = cfg["bulk_bytes"] / 1e6
    rows.append(metric_row(f"download {mb:g} MB, MB/s", "download", "mb_s"))
    rows.append(metric_row(f"upload {mb:g} MB, MB/s", "upload", "mb_s"))
    rows.append(metric_row("WebSocket round trips/s", "ws_rtt", "rtt_per_s"))
    rows.append(metric_row("WebSocket 1 MiB messages, MB/s", "ws_1mib", "mb_s"))
    row = [f"{cfg['streams']:,} slow streams: intact, s"]
    for k in keys:
        err = cell_error(k, "streams")
        r = prs[k].get("cases", {}).get("streams") or {}
        row.append(err or f"{r['ok']}/{r['streams']}, {_num(r['seconds'])} s")
    rows.append(row)

    def res_row(label: str, role: str, fmt) -> list[str]:
        row = [label]
        for k in keys:
            res = prs[k].get("resources", {}).get(role)
            row.append(fmt(res) if res else "–")
        return row

    def rss(res):
        s = f"{res['peak_rss_mib_rest']:.0f}"
        if res.get("peak_rss_mib_streams") is not None:
            s += f" / {res['peak_rss_mib_streams']:.0f}"
        return s

    def cpu_row(label: str, case: str) -> list[str]:
        row = [label]
        for k in keys:
            err = cell_error(k, case)
            cost = prs[k]["cases"][case].get("cpu_us_per_unit") if not err else None
            sides = [cost.get(role) for role in TUNNEL_ROLES if role in cost] if cost and not err else []
            if err or not sides or None in sides:
                row.append(err or "–")
            else:
                row.append(f"{_num(sum(sides))} ({' + '.join(_num(side) for side in sides)})")
        return row

    for c in CONCURRENCY:
        rows.append(cpu_row(f"tunnel CPU µs/request, {c} conn", f"get_c{c}"))
    rows.append(cpu_row("tunnel CPU µs/new connection", "conn_rate"))
    rows.append(cpu_row("tunnel CPU µs/MB downloaded", "download"))
    rows.append(cpu_row("tunnel CPU µs/MB uploaded", "upload"))
    rows.append(cpu_row("tunnel CPU µs/WebSocket round trip", "ws_rtt"))
    rows.append(cpu_row("tunnel CPU µs/MB, WebSocket 1 MiB messages", "ws_1mib"))
    with_entry = any("entry" in prs[k].get("resources", {}) for k in keys)
    rows.append(res_row("server peak RSS MiB (rest / streams)", "server", rss))
    if with_entry:
        rows.append(res_row("entry node peak RSS MiB (rest / streams)", "entry", rss))
    rows.append(res_row("client peak RSS MiB (rest / streams)", "client", rss))
    rows.append(res_row("server CPU s", "server", lambda r: f"{r['cpu_s']:.1f}"))
    if with_entry:
        rows.append(res_row("entry node CPU s", "entry", lambda r: f"{r['cpu_s']:.1f}"))
    rows.append(res_row("client CPU s", "client", lambda r: f"{r['cpu_s']:.1f}"))
    rows.append(res_row("origin CPU s", "origin", lambda r: f"{r['cpu_s']:.1f}"))

    header = ["case"] + [PATH_TITLES[k] for k in keys]
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]

    def line(cells):
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"

    out = [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in rows]
    notes = []
    for k in keys:
        p = prs[k]
        if "skipped" in p:
            notes.append(f"{PATH_TITLES[k]}: skipped ({p['skipped']})")
        elif "error" in p:
            notes.append(f"{PATH_TITLES[k]}: setup failed: {p['error']}")
        elif p.get("roles"):
            notes.append(f"{PATH_TITLES[k]}: " + ", ".join(f"{role} = {p['roles'][role]}" for role in TUNNEL_ROLES
                                                           if role in p["roles"]))
        for n in p.get("notes", []):
            notes.append(f"{PATH_TITLES[k]}: {n}")
    notes += [f"[{i}] {f}" for i, f in enumerate(footnotes, 1)]
    return "\n".join(out), notes


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Benchmark Portway against a direct connection, localtunnel "
                                             "and ssh -R on loopback.")
    ap.add_argument("--quick", action="store_true", help="short smoke run (2 s wrk, 20 MB, 100 streams)")
    ap.add_argument("--localtunnel-server", metavar="DIR",
                    help="checkout of localtunnel/server with node_modules installed (esm >= 3.2.25 on Node 20)")
    ap.add_argument("--json", metavar="PATH", default=str(DEFAULT_JSON), help=f"results file (default {DEFAULT_JSON.relative_to(ROOT)})")
    ap.add_argument("--paths", default=",".join(PATH_ORDER),
                    help=f"comma-separated subset of {','.join(PATH_ORDER)} (default: all)")
    ap.add_argument("--repeat", type=int, default=None, metavar="N",
                    help="run every case N times over every path (interleaved) and report the median run (odd N; "
                         "default 1, with --wan 3)")
    ap.add_argument("--keep-logs", action="store_true", help="keep the child processes' logs (path printed)")
    ap.add_argument("-v", "--verbose", action="store_true", help="print tracebacks of failing cases")
    ap.add_argument("--wan", action="store_true",
                    help="instead of the loopback cases: the tunnel against plain TCP over an impaired link on the "
                         "NAT test-bed (root only; see bench/README.md)")
    args = ap.parse_args(argv)
    if args.repeat is None:
        args.repeat = 3 if args.wan else 1
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    if args.wan:
        return wan_main(args, argv)

    selected = [p.strip() for p in args.paths.split(",") if p.strip()]
    unknown = [p for p in selected if p not in PATH_ORDER]
    if unknown:
        ap.error(f"unknown path(s): {', '.join(unknown)}")
    if "direct" not in selected:
        selected.insert(0, "direct")  # ratios need it
    for tool in ("wrk", "node"):
        if shutil.which(tool) is None:
            print(f"error: {tool} is not installed (bash scripts/test.sh installs everything)", file=sys.stderr)
            return 2
    for module, what in (("portway", "portway itself"), ("websockets", "the `websockets` package")):
        if importlib.util.find_spec(module) is None:
            print(f"error: {what} is not installed for {sys.executable}: run `pip install -e '.[test]'` here first "
                  f"(or bash scripts/test.sh)", file=sys.stderr)
            return 2
    if not (ROOT / "node_modules" / "ws").is_dir():
        print("error: the benchmark's Node packages are missing: run `npm ci` here first (or bash scripts/test.sh)",
              file=sys.stderr)
        return 2

    cfg = config_for(args.quick)
    cfg["repeat"] = args.repeat
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 65536) if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))  # children inherit it

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)

    t_run = time.monotonic()
    started = dt.datetime.now(dt.timezone.utc)
    logdir = FsPath(tempfile.mkdtemp(prefix="portway-bench-"))
    reg = Registry(logdir)
    mon = Monitor()
    results: dict = {
        "date": started.isoformat(timespec="seconds"),
        "argv": sys.argv[1:] if argv is None else argv,
        "quick": args.quick,
        "machine": machine_info(),
        "versions": versions(args.localtunnel_server),
        "config": cfg,
        "paths": {},
    }
    m = results["machine"]
    print(f"Portway benchmark {'(quick) ' if args.quick else ''}on {m['cpu_model']}, {m['cores']} cores; "
          f"logs in {logdir}", flush=True)
    if m["loadavg_start"] and m["loadavg_start"][0] > 0.5:
        print(f"note: load average is {m['loadavg_start'][0]:.2f} before the run: other work on this machine "
              f"makes the numbers noisy", flush=True)
    interrupted = False
    try:
        t0 = time.monotonic()
        expected = {
            "download": loads.payload.expected_sha256(cfg["bulk_bytes"], "bench-down"),
            "upload": loads.payload.expected_sha256(cfg["bulk_bytes"], "bench-up"),
            "streams": loads.expected_stream_hashes(cfg["streams"], cfg["stream_bytes"]),
        }
        print(f"expected hashes computed in {time.monotonic() - t0:.1f} s", flush=True)
        origin, origin_port = paths.start_origin(reg)
        origin_target = loads.Target("127.0.0.1", origin_port, f"127.0.0.1:{origin_port}")
        status, _ = loads.http_get(origin_target, f"/warm?prefix=s&count={cfg['streams']}"
                                                  f"&bytes={cfg['stream_bytes']}", timeout=60)
        if status != 200:
            raise RuntimeError(f"origin /warm answered {status}")
        run_paths(selected, reg, mon, origin, origin_port, cfg, expected, args, results)
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: stopping every process", file=sys.stderr, flush=True)
    except Exception as exc:  # noqa: BLE001 - still write what was measured
        results["fatal_error"] = _short_error(exc)
        traceback.print_exc()
    finally:
        mon.stop()
        reg.kill_all()
        if not args.keep_logs:
            shutil.rmtree(logdir, ignore_errors=True)
    results["runtime_s"] = round(time.monotonic() - t_run, 1)
    results["machine"]["loadavg_end"] = _loadavg()
    results["interrupted"] = interrupted

    table, notes = build_table(results, cfg)
    results["table_markdown"] = table
    results["table_notes"] = notes
    out_path = FsPath(args.json)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(results, indent=2) + "\n")

    print()
    print(f"Machine: {m['cpu_model']}, {m['cores']} cores, Linux {m['kernel']}; "
          f"Python {results['versions']['python']}, Node {results['versions']['node']}, "
          f"Portway {results['versions']['portway']} ({results['versions']['portway_git']}, "
          f"{results['versions'].get('portway_build')})")
    print(table)
    print()
    for n in notes:
        print(f"- {n}")
    print(f"\nJSON: {out_path}   total runtime: {results['runtime_s']:.0f} s"
          + ("   (INTERRUPTED)" if interrupted else ""))
    if args.keep_logs:
        print(f"logs: {logdir}")
    if results.get("fatal_error"):
        print(f"FATAL: {results['fatal_error']}", file=sys.stderr)
        return 1
    return 130 if interrupted else 0


def wan_main(args, argv: list[str] | None) -> int:
    """The WAN case alone (see bench/wan.py): its own table and JSON."""
    reason = wan.unavailable()
    if reason:
        print(f"error: {reason}", file=sys.stderr)
        return 2
    if not (ROOT / "node_modules" / "ws").is_dir():  # portway itself runs from src/ (bench/wan.py)
        print("error: the benchmark's Node packages are missing: run `npm ci` here first (or bash scripts/test.sh)",
              file=sys.stderr)
        return 2

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)
    t_run = time.monotonic()
    logdir = FsPath(tempfile.mkdtemp(prefix="portway-bench-wan-"))
    reg = Registry(logdir)
    results: dict = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv[1:] if argv is None else argv,
        "quick": args.quick,
        "machine": machine_info(),
        "versions": versions(None),
    }
    m = results["machine"]
    print(f"Portway benchmark, WAN case {'(quick) ' if args.quick else ''}on {m['cpu_model']}, {m['cores']} cores; "
          f"logs in {logdir}", flush=True)
    print(wan.wan_table({}), flush=True)
    interrupted = False
    try:
        wan.run_wan(args, reg, results)
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: stopping every process and removing the test-bed", file=sys.stderr, flush=True)
    except Exception as exc:  # noqa: BLE001 - still write what was measured
        results["fatal_error"] = _short_error(exc)
        if args.verbose:
            traceback.print_exc()
    finally:
        reg.kill_all()
        if not args.keep_logs:
            shutil.rmtree(logdir, ignore_errors=True)
    results["runtime_s"] = round(time.monotonic() - t_run, 1)
    results["machine"]["loadavg_end"] = _loadavg()
    results["interrupted"] = interrupted
    results["table_markdown"] = wan.wan_table(results)
    out_path = FsPath(args.json) if args.json != str(DEFAULT_JSON) else DEFAULT_JSON.with_name("wan.json")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(results["table_markdown"])
    for cell in (results.get("wan") or {}).get("cells", []):
        for error in cell["errors"]:
            print(f"- {cell['rtt_ms']} ms, {cell['loss_pct']} %, {cell['direction']}, {cell['streams']}: {error}")
    for error in (results.get("wan") or {}).get("errors", []):
        print(f"- {error}")
    print(f"\nJSON: {out_path}   total runtime: {results['runtime_s']:.0f} s"
          + ("   (INTERRUPTED)" if interrupted else ""))
    if results.get("fatal_error"):
        print(f"FATAL: {results['fatal_error']}", file=sys.stderr)
        return 1
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
