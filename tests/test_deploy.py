"""The systemd unit in deploy/ is one systemd accepts, with no key it would ignore."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

UNIT = Path(__file__).resolve().parents[1] / "deploy" / "portway-relay.service"


def test_systemd_analyze_verifies_the_relay_unit(tmp_path):
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze (Debian's systemd package) is needed: run `bash scripts/test.sh`"
    portway = shutil.which("portway")
    assert portway, "the portway command must be installed (pip install -e .)"
    unit = tmp_path / UNIT.name
    # the unit names the usual install path; here the command lives wherever pip put it
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/portway", portway))
    verified = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert verified.returncode == 0 and not (verified.stdout + verified.stderr).strip(), \
        verified.stdout + verified.stderr


def test_the_unit_keeps_the_hardening_it_promises():
    text = UNIT.read_text()
    for setting in ("NoNewPrivileges=yes", "ProtectSystem=strict", "StateDirectory=portway", "DynamicUser=yes",
                    "CapabilityBoundingSet=CAP_NET_BIND_SERVICE", "PrivateTmp=yes"):
        assert setting in text
