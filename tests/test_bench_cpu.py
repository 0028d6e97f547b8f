"""The benchmark's CPU-per-unit figures divide the right CPU by the right work: the tunnel side's CPU during the
very run the table reports (its phase, the median one with --repeat), per request, MB or round trip."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import run  # noqa: E402


def resources(**phases: tuple[float, float]) -> dict:
    return {role: {"phases": {name: {"cpu_s": cpu[i]} for name, cpu in phases.items()}}
            for i, role in enumerate(("server", "client"))}


def test_get_cost_is_per_request_of_the_reported_run():
    case = {"requests": 20_000, "phase": "get_c50#2"}
    cost = run.cpu_per_unit("get_c50", case, resources(get_c50=(9.0, 9.0), **{"get_c50#2": (1.0, 0.5)}))
    assert cost == {"unit": "request", "server": 50.0, "client": 25.0}


@pytest.mark.parametrize(("name", "case", "units"), [
    ("download", {"bytes": 20_000_000}, 20.0),
    ("upload", {"bytes": 5_000_000}, 5.0),
    ("ws_rtt", {"messages": 400}, 400),
    ("ws_1mib", {"messages": 10, "message_bytes": 1 << 20}, 10 * (1 << 20) / 1e6),
])
def test_bulk_and_websocket_costs_are_per_mb_and_per_round_trip(name, case, units):
    cost = run.cpu_per_unit(name, case, resources(**{name: (2.0, 1.0)}))
    assert cost["server"] == round(2.0 / units * 1e6, 1) and cost["client"] == round(1.0 / units * 1e6, 1)
    assert cost["unit"] == run.CASE_UNITS[name]


def test_no_cost_without_a_tunnel_without_work_or_after_an_error():
    origin_only = {"origin": {"phases": {"get_c10": {"cpu_s": 1.0}}}}
    assert run.cpu_per_unit("get_c10", {"requests": 10}, origin_only) is None
    assert run.cpu_per_unit("get_c10", {"requests": 0}, resources(get_c10=(1.0, 1.0))) is None
    assert run.cpu_per_unit("download", {"error": "timed out"}, resources(download=(1.0, 1.0))) is None
    assert run.cpu_per_unit("streams", {"ok": 100}, resources(streams=(1.0, 1.0))) is None


def test_the_monitor_samples_only_the_path_under_load_and_the_origin_between_phase_edges():
    import os

    from procs import Monitor

    monitor = Monitor(interval=3600)  # its thread stays asleep: the test asks the question the loop asks
    try:
        for name in ("origin", "portway:server", "portway:client", "ssh:server", "ssh:client"):
            monitor.watch(name, os.getpid())
        monitor.set_phase("ssh/get_c10#2")
        assert [role.name for role in monitor.roles_under_load()] == ["origin", "ssh:server", "ssh:client"]
        monitor.set_phase("portway/warmup")
        assert [role.name for role in monitor.roles_under_load()] == ["origin", "portway:server", "portway:client"]
        ended = monitor.unwatch_all()
        assert all("ssh/get_c10#2" in role.phases for role in ended.values())  # every role still gets each phase
    finally:
        monitor.stop()
