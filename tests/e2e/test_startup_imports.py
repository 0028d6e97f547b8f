"""A plain relay and a plain agent load only what they use: every module a process imports stays in its memory
for the whole run (a relay idles at ~30 MiB, rich alone is ~2 of them), so the console library, the inspector
and the ACME and cluster clients are imported when a command needs them, never at start.

The processes run with PYTHONPROFILEIMPORTTIME (python -X importtime), which lists every module they import on
stderr, and carry a request each way before they stop."""

from __future__ import annotations

import re
import signal
import urllib.request

from .conftest import PORTWAY, Proc, Processes, Relay, free_port, start_origin, start_relay

IMPORT_LINE = re.compile(r"^import time:\s+\d+ \|\s+\d+ \|\s+(\S+)$")
# and neither reads a TOML file (tomllib, and the datetime it loads), suggests a mistyped key (difflib) or serves
# an error page (html's entity table) here
UNUSED_BY_BOTH = ("rich", "portway.inspector", "tomllib", "datetime", "difflib", "html")
NEVER_IN_A_PLAIN_RELAY = (*UNUSED_BY_BOTH, "portway.relay.acme", "portway.relay.cluster", "acme", "josepy",
                          "cryptography", "redis")
NEVER_IN_AGENT_WITHOUT_INSPECTOR = (*UNUSED_BY_BOTH, "wsproto", "h11", "email")


def imported(proc: Proc) -> set[str]:
    proc.kill(signal.SIGINT)  # stops gracefully: everything it printed is read
    modules = {match.group(1) for line in proc.stderr if (match := IMPORT_LINE.match(line))}
    assert modules, f"{proc.name} listed no imports:\n{proc.output()}"
    return modules


def loaded(modules: set[str], packages: tuple[str, ...]) -> list[str]:
    return sorted(name for name in modules if any(name == p or name.startswith(p + ".") for p in packages))


def test_a_plain_relay_and_agent_import_neither_the_console_library_nor_the_inspector(procs: Processes):
    origin = start_origin(procs)
    port = free_port()
    profile = {"PYTHONPROFILEIMPORTTIME": "1"}
    relay_proc = procs.start(PORTWAY + ["server", "--port", str(port), "--domain", "localhost"], "relay", env=profile)
    relay_proc.wait_for_line(r"listening on")
    relay = Relay(relay_proc, port, "localhost")
    agent = procs.start(PORTWAY + ["http", str(origin), "--relay", relay.url, "--name", "plain", "--no-inspect"],
                        "agent", env=profile)
    agent.wait_for_line(r"^http://plain\.localhost:%d$" % port)
    request = urllib.request.Request(f"http://127.0.0.1:{port}/", headers={"Host": f"plain.localhost:{port}"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert answer.status == 200

    agent_modules = imported(agent)
    relay_modules = imported(relay_proc)
    assert "portway.agent.client" in agent_modules and "portway.relay.server" in relay_modules
    assert loaded(relay_modules, NEVER_IN_A_PLAIN_RELAY) == []
    assert loaded(agent_modules, NEVER_IN_AGENT_WITHOUT_INSPECTOR) == []


def test_the_agent_imports_the_inspector_when_it_is_on(procs: Processes):
    """The other side of the check above: the list it reads does show the inspector when one runs."""
    origin = start_origin(procs)
    relay = start_relay(procs)
    agent = procs.start(PORTWAY + ["http", str(origin), "--relay", relay.url, "--name", "seen", "--inspect",
                                   "127.0.0.1:0"], "agent", env={"PYTHONPROFILEIMPORTTIME": "1"})
    agent.wait_for_line(r"^http://seen\.localhost:%d$" % relay.port)
    assert "portway.inspector.app" in imported(agent)
