"""Window auto-tuning on a real long lossy link, on the team's NAT test-bed (see tests/e2e/test_netlab.py).

Throughput itself is the benchmark's business (`python3 bench/run.py --wan`): no ratio on a shared 2-core machine
makes a reliable test. This checks the mechanism end to end instead: over 100 ms RTT with 1 % loss, with RTT probes
riding on the credit and the answers delayed by queues and loss recovery, a download's stream window grows to its
ceiling, and the relay's metrics show it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

from portway.proto.frame import INITIAL_STREAM_WINDOW
from portway.proto.mux import MuxConfig

from .payload import expected_sha256
from .test_netlab import NETLAB, lab  # noqa: F401  (the fixture)
from .test_netlab_survival import WAIT, no_tracebacks, outcome, tunnel, visitor

pytestmark = pytest.mark.netlab

# A stream reaches the 4 MiB ceiling after ~1.9 MB while its window is what limits it; under 1 % loss TCP's own
# recoveries limit it at times instead (no growth then), and in one CI run of 8 MB the last doubling never came.
SIZE = 16 * 1000 * 1000
METRICS = "127.0.0.1:9100"  # inside the relay's namespace

SCRAPE = """
import sys, urllib.request
print(urllib.request.urlopen(f"http://{sys.argv[1]}/metrics", timeout=10).read().decode())
"""


def metric(lab, name: str, tunnel_name: str) -> float | None:
    """One series of the relay's metrics, or None when the relay has no value for it yet."""
    done = subprocess.run([str(NETLAB), "exec", "relay", sys.executable, "-c", SCRAPE, METRICS],
                          env={**os.environ, **lab.env}, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    match = re.search(r'^%s\{tunnel="%s"\} (\S+)$' % (name, tunnel_name), done.stdout, re.M)
    return None if match is None else float(match.group(1))


def test_a_download_over_a_100_ms_link_with_1_percent_loss_grows_its_window_to_the_ceiling(lab):  # noqa: F811
    # impaired before the agent dials, as a real link is (bench/wan.py says why that matters to TCP)
    lab.ctl("impair", "home", "delay", "50ms", "loss", "1%")
    # a keepalive ping after 1 s of silence: the relay knows the idle round trip before the download, as on any
    # link up for more than a few seconds (before that, growth assumes a typical round trip)
    relay, agent = tunnel(lab, "wan", relay_flags=("--metrics", METRICS, "--keepalive-timeout", "3"))
    deadline = time.monotonic() + 10
    while (idle_rtt := metric(lab, "portway_link_rtt_seconds", "wan")) is None:
        assert time.monotonic() < deadline, "no keepalive ping was answered"
        time.sleep(0.2)
    assert idle_rtt >= 0.1
    assert metric(lab, "portway_link_window_growth_bytes_total", "wan") == 0
    down = outcome(visitor(lab, "download", "wan", "--size", SIZE, "--seed", "wan"), WAIT)
    assert down == {**down, "status": 200, "bytes": SIZE, "sha256": expected_sha256(SIZE, "wan")}
    print(f"[netlab] download, delay 50ms loss 1%: {SIZE / 1e6 / down['seconds']:.2f} MB/s")
    growth = metric(lab, "portway_link_window_growth_bytes_total", "wan")
    assert growth >= MuxConfig().max_window - INITIAL_STREAM_WINDOW
    no_tracebacks(relay, agent)
