"""How Linux schedules the agent (--scheduling): SCHED_BATCH while it serves many streams at once by default,
always or never when told so; the relay is never touched."""

from __future__ import annotations

import os
import shutil
import signal

import pytest

from .conftest import PORTWAY, ROOT, start_agent, start_origin, start_relay, wait_until

pytestmark = pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="Linux scheduling policies")


def policy(pid: int) -> int:
    return os.sched_getscheduler(pid)  # of the process's main thread: the agent's event loop


def test_told_batch_or_normal_the_agent_keeps_it_and_the_relay_is_never_batched(procs):
    relay = start_relay(procs)
    origin = start_origin(procs)
    batch, _ = start_agent(procs, relay, origin, "--no-inspect", "--scheduling", "batch", name="batch")
    normal, _ = start_agent(procs, relay, origin, "--no-inspect", "--scheduling", "normal", name="normal")
    assert policy(batch.popen.pid) == os.SCHED_BATCH
    assert policy(normal.popen.pid) == os.SCHED_OTHER
    assert policy(relay.proc.popen.pid) == os.SCHED_OTHER


def test_a_policy_that_is_not_one_is_refused_in_one_line(procs):
    proc = procs.start(PORTWAY + ["http", "8080", "--scheduling", "fast"], "agent")
    assert proc.popen.wait(timeout=20) == 2
    wait_until(lambda: "--scheduling: must be auto, batch or normal" in proc.output(), what="the refusal")
    assert "Traceback" not in proc.output()


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (scripts/test.sh installs it)")
def test_by_default_the_agent_is_batched_while_busy_and_ordinary_again_once_the_load_is_gone(procs):
    relay = start_relay(procs)
    origin = start_origin(procs)
    agent, name = start_agent(procs, relay, origin, "--no-inspect", name="auto")
    pid = agent.popen.pid
    assert policy(pid) == os.SCHED_OTHER  # idle
    load = procs.start(["wrk", "-t2", "-c32", "-d20s", "-H", f"Host: {relay.host(name)}",
                        f"http://127.0.0.1:{relay.port}/"], "wrk", cwd=ROOT)
    wait_until(lambda: policy(pid) == os.SCHED_BATCH, timeout=15, what="the busy agent to run as a batch process")
    load.kill(signal.SIGTERM)
    load.popen.wait(timeout=10)
    wait_until(lambda: policy(pid) == os.SCHED_OTHER, timeout=15, what="the idle agent to run as before")
