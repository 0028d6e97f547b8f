"""`bench/run.py --quick` runs every case end to end through a real relay and agent: the benchmark only
runs by hand, so without this a broken load, origin or table would show up on the day someone needs the
numbers. Nothing here looks at how fast anything was, only that every case ran and checked its bytes."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest

from .conftest import ROOT, Processes, require_node_tools

CASES = {"get_c1", "get_c10", "get_c50", "get_c200", "conn_rate", "download", "upload", "ws_rtt", "ws_1mib",
         "streams"}


def test_quick_benchmark_runs_every_case_on_direct_portway_its_tcp_tunnel_and_a_cluster(procs: Processes, tmp_path):
    require_node_tools()
    if shutil.which("wrk") is None:
        pytest.skip("wrk is not installed (scripts/test.sh installs it)")
    results_file = tmp_path / "bench.json"
    bench = procs.start([sys.executable, str(ROOT / "bench" / "run.py"), "--quick",
                         "--paths", "direct,portway,portway_tcp,portway_cluster",
                         "--json", str(results_file), "--keep-logs"], "bench")
    try:
        assert bench.wait_exit(timeout=240) == 0, bench.output()
        check(json.loads(results_file.read_text()), portway_logs(bench.output()))
    finally:
        for logdir in re.findall(r"logs in (\S+)$", bench.output(), re.MULTILINE):
            shutil.rmtree(logdir, ignore_errors=True)


def portway_logs(bench_output: str) -> str:
    """The end of what the bench's Portway relay and agent printed (it keeps its processes' logs with
    --keep-logs): a case that fails once in a while can then be read from the failing run itself."""
    return "\n".join(f"--- {path.name}\n{path.read_text(errors='replace')[-5000:]}"
                     for logdir in re.findall(r"logs in (\S+)$", bench_output, re.MULTILINE)
                     for path in sorted(Path(logdir).glob("*portway*.log")))


def check(results: dict, logs: str) -> None:
    assert not results["interrupted"]
    for key in ("direct", "portway", "portway_tcp", "portway_cluster"):
        cases = results["paths"][key]["cases"]
        assert set(cases) == CASES, key
        failed = {name: case["error"] for name, case in cases.items() if case.get("error")}
        assert not failed, f"{key}: {failed}\n{logs}"
        for case in ("get_c1", "get_c10", "get_c50", "get_c200", "conn_rate"):
            get = cases[case]
            assert get["requests"] > 0 and get["errors"] == 0, (key, get)
        # bulk loads raise on a SHA-256 mismatch, so getting here with a rate means the bytes were right
        assert cases["download"]["mb_s"] > 0 and cases["upload"]["mb_s"] > 0
        assert cases["ws_rtt"]["messages"] > 0 and cases["ws_1mib"]["mb_s"] > 0
        streams = cases["streams"]
        assert streams["ok"] == streams["streams"] == results["config"]["streams"], streams
        assert all("busy_pct" in case["machine_cpu"] for case in cases.values())
    resources = results["paths"]["portway"]["resources"]
    for role in ("server", "client"):
        assert resources[role]["peak_rss_mib"] > 0 and resources[role]["cpu_s"] > 0, resources[role]
    # CPU per unit of work, per side, for every case the tunnel ran but the many-streams one (no unit there)
    portway_cases = results["paths"]["portway"]["cases"]
    for name in CASES - {"streams"}:
        cost = portway_cases[name]["cpu_us_per_unit"]
        assert cost["server"] is not None and cost["client"] is not None and cost["server"] + cost["client"] > 0, \
            (name, cost)
    assert "cpu_us_per_unit" not in results["paths"]["direct"]["cases"]["get_c50"]  # no tunnel, no tunnel CPU
    # the cluster path: node A (server), node B where the visitors land (entry) and the agent each counted apart
    cluster_cost = results["paths"]["portway_cluster"]["cases"]["get_c10"]["cpu_us_per_unit"]
    assert all(cluster_cost[role] > 0 for role in ("server", "entry", "client")), cluster_cost
    assert "entry" not in results["paths"]["portway"]["cases"]["get_c10"]["cpu_us_per_unit"]
    table = results["table_markdown"]
    assert "| GET req/s, 50 conn" in table and "Portway" in table and "Portway cluster, via node B" in table
    assert "| tunnel CPU µs/request, 10 conn" in table and "| tunnel CPU µs/MB uploaded" in table
