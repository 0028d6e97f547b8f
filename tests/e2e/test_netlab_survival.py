"""What a tunnel survives on the NAT test-bed (`tests/e2e/netlab.sh`): a slow lossy home link, the home link cut
for a few seconds and for longer than the resume window, a relay stopped or killed and restarted, a frozen agent.

The real programs run in the bed's namespaces: `portway server` in `relay`, the Node origin and `portway http` in
`home` behind the NAT router, visitors (tests/e2e/netlab_visitor.py) in `visitor`. A cut link here is a real
outage: the agent's reconnects time out instead of being refused. Needs root and `ip netns`; skipped elsewhere with
the reason. Each test builds its own bed and removes it, with every process it started, even when it fails.

Sizes are bounded for the time the set may take on a 2-core machine: the impairment backend of this kernel (no
sch_netem: a Python process holds each packet) moves 5-6 MB/s over `delay 50ms loss 1%`, so the lossy link carries
20 MB each way; the cut link, unimpaired, carries 50 MB each way. Bounds are what the programs promise
(--keepalive-timeout, --resume-window, "back within 5 s") plus slack for a busy machine, never performance
figures; the measured figures are printed (run with -s to see them).
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

import pytest

from .conftest import FIXTURES, Proc, require_node_tools
from .payload import expected_sha256
from .test_netlab import RELAY_IP, Lab, lab  # noqa: F401  (`lab` is the bed fixture)

pytestmark = pytest.mark.netlab

PORTWAY = [sys.executable, "-m", "portway"]
VISITOR = Path(__file__).with_name("netlab_visitor.py")
PORT = "8080"
TOKEN = "netlab-secret"
KEEPALIVE_TIMEOUT = 2.0
KEEPALIVE = ["--keepalive-timeout", str(KEEPALIVE_TIMEOUT)]
SLACK = 8.0  # namespaces, NAT, the impairment process and a busy 2-core machine
BACK_WITHIN = 5.0  # the agent is back this soon after the relay listens again or the link returns
WAIT = 120.0  # bound on a transfer that is meant to finish


def start_relay(lab: Lab, *flags: str, label: str = "relay") -> Proc:
    relay = lab.start("relay", PORTWAY + ["-v", "server", "--bind", RELAY_IP, "--port", PORT, "--domain", "nat.test",
                                          "--token", TOKEN, *flags], label)
    relay.wait_for_line(r"listening on")
    return relay


def tunnel(lab: Lab, name: str, relay_flags: tuple = (), agent_flags: tuple = ()) -> tuple[Proc, Proc]:
    """A relay, the origin and an agent serving it as NAME; returns (relay, agent)."""
    require_node_tools()
    relay = start_relay(lab, *relay_flags)
    origin = lab.start("home", ["node", str(FIXTURES / "ws_echo_server.js"), "3000", "home"], "origin")
    origin.wait_for_line(r"listening")
    agent = lab.start("home", PORTWAY + ["http", "3000", "--relay", f"http://{RELAY_IP}:{PORT}", "--name", name,
                                         "--token", TOKEN, "--no-inspect", *agent_flags], "agent")
    agent.wait_for_line(r"^http://%s\.nat\.test:%s$" % (name, PORT), timeout=30)
    return relay, agent


def visitor(lab: Lab, mode: str, name: str, *options: object) -> Proc:
    return lab.start("visitor", [sys.executable, str(VISITOR), mode, RELAY_IP, PORT, name, *map(str, options)],
                     f"visitor {mode}")


def outcome(proc: Proc, timeout: float) -> dict:
    return json.loads(proc.wait_for_line(r"^result (.*)$", timeout=timeout).group(1))


def visit(lab: Lab, name: str, timeout: float = 10.0) -> dict:
    return outcome(visitor(lab, "get", name, "--path", "/", "--timeout", timeout), timeout + 20)


def serves(lab: Lab, name: str) -> bool:
    return visit(lab, name).get("status") == 200


def wait_serving(lab: Lab, name: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not serves(lab, name):
        assert time.monotonic() < deadline, f"{name} does not serve again within {timeout}s"


def report(what: str, value: float, unit: str = "s") -> None:
    print(f"[netlab] {what}: {value:.2f} {unit}")


def no_tracebacks(*procs: Proc) -> None:
    for proc in procs:
        assert "Traceback" not in proc.output(), proc.output()


# ------------------------------------------------------------------------------------------- a slow lossy link

LOSSY_SIZE = 20 * 1000 * 1000


def test_20_mb_each_way_cross_a_100_ms_rtt_link_with_1_percent_loss_intact(lab):
    relay, agent = tunnel(lab, "lossy")
    lab.ctl("impair", "home", "delay", "50ms", "loss", "1%")
    down = outcome(visitor(lab, "download", "lossy", "--size", LOSSY_SIZE, "--seed", "down"), WAIT)
    assert down == {**down, "status": 200, "bytes": LOSSY_SIZE, "sha256": expected_sha256(LOSSY_SIZE, "down")}
    up = outcome(visitor(lab, "upload", "lossy", "--size", LOSSY_SIZE, "--seed", "up"), WAIT)
    assert up.get("status") == 200, up
    assert json.loads(up["body"]) == {"bytes": LOSSY_SIZE, "sha256": expected_sha256(LOSSY_SIZE, "up")}
    report("download through the tunnel, delay 50ms loss 1%", LOSSY_SIZE / 1e6 / down["seconds"], "MB/s")
    report("upload through the tunnel, delay 50ms loss 1%", LOSSY_SIZE / 1e6 / up["seconds"], "MB/s")
    no_tracebacks(relay, agent)


# ------------------------------------------------------------------------------------------- the home link cut

CUT_SIZE = 50 * 1000 * 1000
STARTED = 4 * 1000 * 1000  # what each transfer moves before the cut: the cut falls mid-way
MESSAGES = 200


def start_transfers(lab: Lab, name: str, go: Path) -> dict[str, Proc]:
    """A download, an upload and a WebSocket conversation, each paused once it got going until `go` exists."""
    transfers = {
        "download": visitor(lab, "download", name, "--size", CUT_SIZE, "--mark", STARTED, "--seed", "down",
                            "--go", go, "--timeout", WAIT),
        "upload": visitor(lab, "upload", name, "--size", CUT_SIZE, "--mark", STARTED, "--seed", "up", "--go", go,
                          "--timeout", WAIT),
        "websocket": visitor(lab, "websocket", name, "--size", MESSAGES, "--mark", MESSAGES // 4, "--go", go,
                             "--timeout", WAIT),
    }
    for proc in transfers.values():
        proc.wait_for_line(r"^started$", timeout=60)
    return transfers


def cut_home_link(lab: Lab, go: Path) -> float:
    """Cut the home link and let the paused transfers go on into the outage; returns when it was cut."""
    lab.ctl("impair", "home", "down")
    cut_at = time.monotonic()
    go.touch()
    return cut_at


def test_a_download_an_upload_and_a_websocket_outlive_a_5_s_cut_of_the_home_link(lab, tmp_path):
    flags = (*KEEPALIVE, "--resume-window", "30")
    relay, agent = tunnel(lab, "cut", relay_flags=flags, agent_flags=flags)
    go = tmp_path / "go"
    transfers = start_transfers(lab, "cut", go)
    cut_at = cut_home_link(lab, go)
    agent.wait_for_line(r"link to relay lost \(keepalive timeout", timeout=KEEPALIVE_TIMEOUT + SLACK)
    report("agent noticed the cut after", time.monotonic() - cut_at)
    time.sleep(max(0.0, cut_at + 5.0 - time.monotonic()))  # the outage itself: 5 s
    lab.ctl("impair", "home", "up")
    back_at = time.monotonic()
    agent.wait_for_line(r"open streams resumed", timeout=BACK_WITHIN + SLACK)
    report("streams resumed after the link came back", time.monotonic() - back_at)
    results = {kind: outcome(proc, WAIT) for kind, proc in transfers.items()}
    download, upload, conversation = results["download"], results["upload"], results["websocket"]
    assert download == {**download, "status": 200, "bytes": CUT_SIZE, "sha256": expected_sha256(CUT_SIZE, "down")}
    assert "error" not in download, download
    assert upload.get("status") == 200, upload
    assert json.loads(upload["body"]) == {"bytes": CUT_SIZE, "sha256": expected_sha256(CUT_SIZE, "up")}
    assert "error" not in conversation, conversation
    assert conversation["echoes"] == [f"Echo: message {number}" for number in range(MESSAGES)]
    relay.wait_for_line(r"tunnel cut online again .*: \d+ streams resumed", timeout=10)
    no_tracebacks(relay, agent)


def test_past_the_resume_window_transfers_fail_visibly_in_time_and_the_tunnel_serves_soon_after_the_link_returns(
        lab, tmp_path):
    resume_window, outage = 5.0, 15.0
    flags = (*KEEPALIVE, "--resume-window", str(resume_window))
    relay, agent = tunnel(lab, "gone", relay_flags=flags, agent_flags=flags)
    go = tmp_path / "go"
    transfers = start_transfers(lab, "gone", go)
    cut_at = cut_home_link(lab, go)
    bound = KEEPALIVE_TIMEOUT + resume_window + SLACK
    results = {}
    for kind, proc in transfers.items():
        results[kind] = outcome(proc, max(0.0, cut_at + bound - time.monotonic()))
        report(f"{kind} failed after the cut", time.monotonic() - cut_at)
    download, upload, conversation = results["download"], results["upload"], results["websocket"]
    assert "error" in download or download["bytes"] < CUT_SIZE, download  # a reset, or a body cut short
    assert "error" in upload or upload.get("status") == 502, upload
    assert "error" in conversation and len(conversation["echoes"]) < MESSAGES, conversation
    relay.wait_for_line(r"tunnel gone offline: the link was not resumed within", timeout=5)
    # a new visitor meanwhile gets an error page at once
    answer = visit(lab, "gone", timeout=KEEPALIVE_TIMEOUT + SLACK)
    assert answer.get("status") == 502 and "agent reconnecting" in answer["body"], answer
    time.sleep(max(0.0, cut_at + outage - time.monotonic()))  # the rest of the outage
    lab.ctl("impair", "home", "up")
    back_at = time.monotonic()
    agent.wait_for_line(r"reconnected: http://gone\.nat\.test", timeout=BACK_WITHIN + SLACK)
    wait_serving(lab, "gone", timeout=max(1.0, back_at + BACK_WITHIN + SLACK - time.monotonic()))
    report("serving new visitors again after the link came back", time.monotonic() - back_at)
    no_tracebacks(relay, agent)


# ------------------------------------------------------------------------------------------- relay restarts

SLOW_SIZE = 3_000_000
SLOW = ("--path", "/slow", "--query", "&ms=4000", "--size", SLOW_SIZE, "--seed", "0", "--mark", 1)


def test_relay_sigterm_drains_the_download_and_the_agent_is_back_soon_after_the_restart(lab):
    relay, agent = tunnel(lab, "drained", relay_flags=("--drain-timeout", "30"))
    download = visitor(lab, "download", "drained", *SLOW)
    download.wait_for_line(r"^started$", timeout=30)
    relay.popen.send_signal(signal.SIGTERM)
    relay.wait_for_line(r"stopping: no new visitors; 1 exchange\(s\) in flight")
    result = outcome(download, 30)
    assert result == {**result, "status": 200, "bytes": SLOW_SIZE, "sha256": expected_sha256(SLOW_SIZE)}
    assert "error" not in result, result
    assert relay.wait_exit(20) == 0
    agent.wait_for_line(r"link to relay lost .*the relay went away")
    restarted = start_relay(lab, label="restarted relay")
    listening_at = time.monotonic()
    agent.wait_for_line(r"reconnected: http://drained\.nat\.test", timeout=BACK_WITHIN + SLACK)
    report("agent back after the relay's graceful restart", time.monotonic() - listening_at)
    assert serves(lab, "drained")
    no_tracebacks(relay, restarted, agent)


def test_relay_sigkill_cuts_the_download_visibly_and_the_agent_is_back_after_the_restart(lab):
    relay, agent = tunnel(lab, "killed")
    download = visitor(lab, "download", "killed", *SLOW)
    download.wait_for_line(r"^started$", timeout=30)
    relay.kill(signal.SIGKILL)
    result = outcome(download, 30)
    assert "error" in result or result["bytes"] < SLOW_SIZE, result
    agent.wait_for_line(r"link to relay lost")
    time.sleep(3)  # a real outage: the agent's backoff grows meanwhile (the restart must not wait for it)
    restarted = start_relay(lab, label="restarted relay")
    listening_at = time.monotonic()
    agent.wait_for_line(r"reconnected: http://killed\.nat\.test", timeout=BACK_WITHIN + SLACK)
    report("agent back after the relay was killed and restarted", time.monotonic() - listening_at)
    assert serves(lab, "killed")
    no_tracebacks(restarted, agent)


# ------------------------------------------------------------------------------------------- a frozen agent

def test_a_frozen_agent_gets_visitors_an_error_page_within_the_keepalive_bound_and_recovers(lab):
    relay, agent = tunnel(lab, "frozen", relay_flags=KEEPALIVE, agent_flags=KEEPALIVE)
    assert serves(lab, "frozen")
    agent.popen.send_signal(signal.SIGSTOP)
    frozen_at = time.monotonic()
    try:
        answer = visit(lab, "frozen", timeout=KEEPALIVE_TIMEOUT + SLACK)
        report("a visitor's error page after the agent froze", time.monotonic() - frozen_at)
        assert answer.get("status") in (502, 504), answer
        relay.wait_for_line(r"tunnel frozen offline: keepalive timeout", timeout=KEEPALIVE_TIMEOUT + SLACK)
        report("relay declared the link dead after", time.monotonic() - frozen_at)
    finally:
        agent.popen.send_signal(signal.SIGCONT)
    woke_at = time.monotonic()
    agent.wait_for_line(r"reconnected: http://frozen\.nat\.test", timeout=KEEPALIVE_TIMEOUT + BACK_WITHIN + SLACK)
    wait_serving(lab, "frozen", timeout=SLACK)
    report("serving again after SIGCONT", time.monotonic() - woke_at)
    no_tracebacks(relay, agent)
