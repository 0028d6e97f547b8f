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


def test_system_calls_and_runs_are_per_unit_of_the_reported_run_for_every_role():
    resources = {
        "server": {"phases": {"get_c10": {"cpu_s": 1.0, "syscalls": 999, "runs": 999},
                              "get_c10#3": {"cpu_s": 1.0, "syscalls": 2_100, "runs": 350}}},
        "client": {"phases": {"get_c10#3": {"cpu_s": 1.0, "syscalls": 2_000, "runs": 1_000}}},
        "origin": {"phases": {"get_c10#3": {"cpu_s": 1.0, "syscalls": 2_000, "runs": 125}}},
    }
    activity = run.activity_per_unit("get_c10", {"requests": 1_000, "phase": "get_c10#3"}, resources)
    assert activity == {"unit": "request", "syscalls": {"server": 2.1, "client": 2.0, "origin": 2.0},
                        "runs": {"server": 0.35, "client": 1.0, "origin": 0.12}}
    assert run.activity_per_unit("get_c10", {"error": "timed out"}, resources) is None


def test_the_monitor_counts_a_phase_s_system_calls_and_runs():
    import os
    import time

    from procs import Monitor

    monitor = Monitor(interval=3600)
    try:
        monitor.watch("bench:client", os.getpid())
        monitor.set_phase("bench/get_c10")
        fd = os.open("/proc/self/stat", os.O_RDONLY)
        try:
            for _ in range(50):
                os.pread(fd, 100, 0)  # 50 read system calls
        finally:
            os.close(fd)
        time.sleep(0.001)  # not a wait for anything: a thread that sleeps is put back on a CPU when it wakes
        stats = monitor.unwatch_all()["bench:client"].phases["bench/get_c10"]
        assert stats.syscalls >= 50
        assert stats.runs >= 1 and stats.cpu_ns > 0
    finally:
        monitor.stop()


def test_repeats_alternate_the_order_of_the_paths_so_none_always_runs_last():
    paths = ["direct", "portway", "portway_tcp", "ssh"]
    orders = [run.repeat_order(paths, repeat) for repeat in (1, 2, 3, 4)]
    assert orders == [paths, paths[::-1], paths, paths[::-1]]
    assert paths == ["direct", "portway", "portway_tcp", "ssh"]  # the caller's list is left as it was
