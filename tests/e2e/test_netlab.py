"""An agent behind a real NAT whose link is cut, on the team's NAT test-bed (`../shared/netlab/netlab.sh`, network
namespaces: relay and visitor on an "internet" bridge, agent and local service on a home LAN behind a NAT router).

Unlike the loopback proxy, a cut here is a real outage: the agent's packets go nowhere, its connects fail or time
out instead of being refused. Needs root and `ip netns` (and nftables); skipped elsewhere with the reason. The bed
lives in namespaces of its own, removed at the end; nothing touches the host's network.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import ROOT, Proc

pytestmark = pytest.mark.netlab

NETLAB = Path(os.environ.get("NETLAB_SH", ROOT.parent / "shared" / "netlab" / "netlab.sh"))
RELAY_IP, HOME_IP = "203.0.113.10", "198.51.100.10"
KEEPALIVE_TIMEOUT = 3.0
SLACK = 8.0  # namespaces, NAT and a busy 2-core machine
BACK_WITHIN = 5.0

VISIT = """
import http.client, sys
host, port, name, timeout = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
conn = http.client.HTTPConnection(host, port, timeout=timeout)
try:
    conn.request("GET", "/hello.txt", headers={"Host": f"{name}.nat.test:{port}", "Connection": "close"})
    response = conn.getresponse()
    body = response.read().decode(errors="replace")
    print(response.status, body.split("<p>", 1)[-1].split("</p>", 1)[0].strip())  # an error page's message
except TimeoutError:
    print("timeout")
except OSError as error:
    print("error", error)
"""


def unavailable() -> str | None:
    if os.geteuid() != 0:
        return "the NAT test-bed needs root (network namespaces)"
    if not NETLAB.exists():
        return f"{NETLAB} not found (set NETLAB_SH)"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"{tool!r} not found (scripts/test.sh installs it)"
    probe = f"pwprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"'ip netns' is unavailable here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


class Lab:
    def __init__(self, prefix: str) -> None:
        self.env = {"NETLAB_PREFIX": prefix}
        self.procs: list[Proc] = []

    def ctl(self, *args: str) -> None:
        done = subprocess.run([str(NETLAB), *args], env={**os.environ, **self.env}, capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, f"netlab.sh {' '.join(args)}: {done.stderr.strip()}"

    def start(self, host: str, args: list[str], name: str) -> Proc:
        proc = Proc([str(NETLAB), "exec", host, *args], name, env=self.env, cwd=ROOT)
        self.procs.append(proc)
        return proc

    def visit(self, name: str, timeout: float) -> str:
        done = subprocess.run([str(NETLAB), "exec", "visitor", "python3", "-c", VISIT, RELAY_IP, "8080", name,
                               str(timeout)], env={**os.environ, **self.env}, capture_output=True, text=True,
                              timeout=timeout + 30)
        return done.stdout.strip()


@pytest.fixture
def lab():
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    bed = Lab(prefix=f"pw{os.getpid() % 100000}")
    bed.ctl("up")
    try:
        yield bed
    finally:
        for proc in reversed(bed.procs):
            proc.kill()
        subprocess.run([str(NETLAB), "down"], env={**os.environ, **bed.env}, capture_output=True, timeout=60)


def test_an_agent_behind_nat_survives_a_cut_home_link(lab, tmp_path):
    (tmp_path / "hello.txt").write_text("hello from home\n")
    python = ["python3"]
    relay = lab.start("relay", python + ["-m", "portway", "-v", "server", "--bind", RELAY_IP, "--port", "8080",
                                        "--domain", "nat.test", "--token", "netlab-secret",
                                        "--keepalive-timeout", str(KEEPALIVE_TIMEOUT)], "relay")
    relay.wait_for_line(r"listening on")
    lab.start("home", python + ["-m", "http.server", "3000", "--bind", "127.0.0.1", "--directory", str(tmp_path)],
              "home service")
    agent = lab.start("home", python + ["-m", "portway", "http", "3000", "--relay", f"http://{RELAY_IP}:8080",
                                        "--name", "natted", "--token", "netlab-secret", "--no-inspect",
                                        "--keepalive-timeout", str(KEEPALIVE_TIMEOUT)], "agent")
    agent.wait_for_line(r"^http://natted\.nat\.test:8080$", timeout=30)
    assert lab.visit("natted", 10) == "200 hello from home"

    lab.ctl("impair", "home", "down")
    cut_at = time.monotonic()
    # a visitor meanwhile: an error page within the keepalive bound, not a hang
    answer = lab.visit("natted", KEEPALIVE_TIMEOUT + SLACK)
    assert answer.split()[0] in ("502", "504"), answer
    relay.wait_for_line(r"tunnel natted offline: keepalive timeout", timeout=KEEPALIVE_TIMEOUT + SLACK)
    agent.wait_for_line(r"link to relay lost \(keepalive timeout", timeout=KEEPALIVE_TIMEOUT + SLACK)
    assert time.monotonic() - cut_at <= KEEPALIVE_TIMEOUT + SLACK
    assert "agent reconnecting" in lab.visit("natted", 10)
    # the outage goes on until the backoff has grown past the probes' period: the return must not wait for it
    agent.wait_for_line(r"reconnecting in [0-9.]+ s \(attempt 5\)", timeout=60)

    lab.ctl("impair", "home", "up")
    back_at = time.monotonic()
    agent.wait_for_line(r"reconnected: http://natted\.nat\.test:8080", timeout=BACK_WITHIN + SLACK)
    assert lab.visit("natted", 10) == "200 hello from home"
    assert time.monotonic() - back_at <= BACK_WITHIN + SLACK
    for proc in (relay, agent):
        assert "Traceback" not in proc.output(), proc.output()
