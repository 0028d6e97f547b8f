"""Config files with the real CLI: `config check` answers in one line, `portway start` runs a file's http tunnel
through a real relay with the file's settings, `portway server --config` listens where its file says (a flag wins)."""

from __future__ import annotations

import base64
import re
import http.client
import subprocess
from pathlib import Path

from .conftest import PORTWAY, ROOT, Relay, free_port, start_origin, start_relay

EXIT_TIMEOUT = 20.0


def run(*args: str, cwd: Path | None = None, environ: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(PORTWAY + list(args), capture_output=True, text=True, timeout=EXIT_TIMEOUT, cwd=cwd,
                          env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin", **(environ or {})})


def get(relay: Relay, name: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", relay.port, timeout=EXIT_TIMEOUT)
    try:
        conn.request("GET", "/", headers={"Host": relay.host(name), **(headers or {})})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_config_check_says_ok_in_one_line_for_the_examples():
    for name, kind in (("portway.toml", "an agent's file: 2 http tunnels, 1 tcp tunnel"),
                       ("relay.toml", "a relay's file:")):
        done = run("config", "check", str(ROOT / "examples" / name))
        assert done.returncode == 0 and done.stderr == "", done.stderr
        assert done.stdout.startswith(f"{ROOT / 'examples' / name}: ok — {kind}") and done.stdout.count("\n") == 1


def test_config_check_gives_one_line_and_status_2_for_a_broken_file(tmp_path):
    cases = {
        'relay = "http://127.0.0.1:9"\n[tunnels.web]\nproto = "http"\nport = \n':
            "invalid TOML: Invalid value (at line 4, column 8)",
        'relay = "http://127.0.0.1:9"\n[tunnels.web]\nproto = "http"\nprot = 1\n':
            "unknown key 'tunnels.web.prot' in",
        '[tunnels.web]\nproto = "http"\nport = true\n':
            "'tunnels.web.port' must be a port number or \"HOST:PORT\", not true",
        '[tunnels.web]\nproto = "http"\nport = 1\n[tunnels.app]\nproto = "http"\nport = 2\nname = "web"\n':
            "tunnels.web and tunnels.app have the same name, 'web'",
    }
    for text, fragment in cases.items():
        path = tmp_path / "portway.toml"
        path.write_text(text, encoding="utf-8")
        done = run("config", "check", str(path))
        assert done.returncode == 2 and done.stdout == "", (text, done.stdout)
        assert done.stderr.startswith(f"error: {path}") or done.stderr.startswith("error: unknown key")
        assert fragment in done.stderr and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def test_start_runs_the_named_http_tunnel_of_the_file_in_the_folder(procs, tmp_path):
    relay = start_relay(procs)
    origin = start_origin(procs)
    (tmp_path / "portway.toml").write_text(f"""\
relay = "{relay.url}"
no_inspect = true
[tunnels.web]
proto = "http"
port = "127.0.0.1:{origin}"
name = "from-file"
basic_auth = "demo:pw"
[tunnels.other]
proto = "http"
port = 1
""", encoding="utf-8")
    agent = procs.start(PORTWAY + ["start", "from-file"], "agent from file", cwd=tmp_path)
    agent.wait_for_line(rf"^tunnel from-file of {re.escape(str(tmp_path.resolve() / 'portway.toml'))}$")
    agent.wait_for_line(rf"^http://from-file\.localhost:{relay.port}$")
    assert get(relay, "from-file")[0] == 401
    login = base64.b64encode(b"demo:pw").decode()
    assert get(relay, "from-file", {"Authorization": f"Basic {login}"}) == (200, b"hello from origin")


def test_start_with_config_and_a_flag_over_the_file(procs, tmp_path):
    relay = start_relay(procs)
    origin = start_origin(procs)
    path = tmp_path / "tunnels.toml"
    path.write_text(f'relay = "http://127.0.0.1:9"\n[tunnels.web]\nproto = "http"\nport = {origin}\n'
                    "no_inspect = true\n", encoding="utf-8")
    agent = procs.start(PORTWAY + ["start", "--config", str(path), "--relay", relay.url], "agent --config")
    agent.wait_for_line(rf"^http://web\.localhost:{relay.port}$")
    assert get(relay, "web") == (200, b"hello from origin")


def test_start_refuses_a_tunnel_the_file_does_not_have_or_no_file(tmp_path):
    path = tmp_path / "portway.toml"
    path.write_text('relay = "http://127.0.0.1:9"\n[tunnels.web]\nproto = "http"\nport = 8080\n'
                    '[tunnels.app]\nproto = "http"\nport = 3000\n[tunnels.db]\nproto = "tcp"\nport = 5432\n',
                    encoding="utf-8")
    done = run("start", "--config", str(path), "web", "dbb")
    assert done.returncode == 2 and "no tunnel named 'dbb'" in done.stderr and done.stderr.count("\n") == 1, \
        done.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    nowhere = run("start", cwd=empty, environ={"HOME": str(empty)})
    assert nowhere.returncode == 2 and "no config file: looked for" in nowhere.stderr


def test_server_reads_its_file_and_a_flag_wins(procs, tmp_path):
    port = free_port()
    path = tmp_path / "relay.toml"
    path.write_text(f'port = {port}\ndomain = "t.example"\naccess_log = false\n', encoding="utf-8")
    relay = procs.start(PORTWAY + ["server", "--config", str(path)], "relay from file")
    relay.wait_for_line(rf"^listening on 127\.0\.0\.1:{port}$")
    relay.wait_for_line(rf"tunnels at http://NAME\.t\.example:{port}")
    relay.wait_for_line(r"access log off")
    other = free_port()
    flagged = procs.start(PORTWAY + ["server", "--config", str(path), "--port", str(other)], "relay --port")
    flagged.wait_for_line(rf"^listening on 127\.0\.0\.1:{other}$")
    broken = run("server", "--config", str(path), environ={"PORTWAY_PORT": "eighty"})
    assert broken.returncode == 2 and broken.stderr.startswith("error: $PORTWAY_PORT='eighty'")
