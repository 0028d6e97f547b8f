"""Config files: what a relay's and an agent's TOML file sets reaches the configs they run with, below flags and
variables; every mistake in a file is one line naming the file and the key, and what is allowed."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from portway.cli import build_parser, config_from, start_config
from portway.config import AGENT_SETTINGS, RELAY_SETTINGS, AgentConfig, load, relay_config
from portway.configfile import (
    AGENT_WIDE,
    TUNNEL_KEYS,
    HttpTunnel,
    TcpTunnel,
    agent_file,
    check,
    default_agent_file,
    read_agent_file,
    read_toml,
    relay_file_values,
    relay_values,
)
from portway.errors import ConfigurationError
from portway.proto.mux import MuxConfig
from portway.proto.proxy_protocol import Version

ROOT = Path(__file__).resolve().parents[1]

ISSUE_SHAPE = """\
relay = "https://relay.example.com"
token = "t0ken"
[tunnels.web]
proto = "http"
port = 8080
[tunnels.db]
proto = "tcp"
port = 5432
remote_port = 20001
"""


def write(tmp_path: Path, text: str, name: str = "portway.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def server(*argv: str, environ: dict[str, str] | None = None):
    return config_from(build_parser().parse_args(["server", *argv]), environ or {})


def start(*argv: str, environ: dict[str, str] | None = None) -> AgentConfig:
    return start_config(build_parser().parse_args(["start", *argv]), environ or {})[1]


def refused(call, *args, **kwargs) -> str:
    with pytest.raises(ConfigurationError) as raised:
        call(*args, **kwargs)
    message = str(raised.value)
    assert "\n" not in message
    return message


# ----------------------------------------------------------------------------------------------- relay files

RELAY_FILE = """\
bind = "127.0.0.2"
port = 9001
domain = "t.example"
public_port = 443
grace_period = 3
tokens = ["a", "b"]
open_relay = true
head_timeout = 2
idle_timeout = 4.5
max_connections_per_ip = 9
max_upgraded_per_ip = 12
max_connection_rate_per_ip = 13
drain_timeout = 8
response_timeout = 5
pool_wait_timeout = 6
lt_grace_period = 7
metrics = ":9100"
access_log = false
log_format = "json"
link_window = 64
auth_failure_window = 2.5
tls_reload_interval = 11
keepalive_interval = 0.25
keepalive_timeout = 0.5
resume_window = 7
cluster = "redis://127.0.0.1:6390/2"
node_id = "node-a"
advertise = "10.0.0.1:9001"
cluster_secret = "shh"
cluster_ca = "cluster-ca.pem"
tokens_file = "tokens.toml"
tls_cert = "cert.pem"
tls_key = "key.pem"
tcp_ports = "20000-20100,20200"
"""

RELAY_FLAGS = ["--tcp-ports", "20000-20100,20200",
               "--bind", "127.0.0.2", "--port", "9001", "--domain", "t.example", "--public-port", "443",
               "--grace-period", "3", "--token", "a", "--token", "b", "--open", "--head-timeout", "2",
               "--idle-timeout", "4.5", "--max-connections-per-ip", "9", "--max-upgraded-per-ip", "12",
               "--max-connection-rate-per-ip", "13", "--drain-timeout", "8", "--response-timeout", "5",
               "--pool-wait-timeout", "6", "--lt-grace-period", "7", "--metrics", ":9100", "--no-access-log",
               "--log-format", "json", "--link-window", "64", "--auth-failure-window", "2.5",
               "--tls-reload-interval", "11", "--keepalive-interval", "0.25", "--keepalive-timeout", "0.5",
               "--resume-window", "7",
               "--cluster", "redis://127.0.0.1:6390/2", "--node-id", "node-a", "--advertise", "10.0.0.1:9001",
               "--cluster-secret", "shh"]


def test_a_relay_file_sets_what_the_flags_set(tmp_path):
    write(tmp_path, '[[token]]\nlabel = "alice"\ntoken = "s3cret"\n', "tokens.toml")
    from_file = server("--config", str(write(tmp_path, RELAY_FILE, "relay.toml")))
    assert from_file == server(*RELAY_FLAGS, "--tokens", str(tmp_path / "tokens.toml"),
                               "--tls-cert", str(tmp_path / "cert.pem"), "--tls-key", str(tmp_path / "key.pem"),
                               "--cluster-ca", str(tmp_path / "cluster-ca.pem"))
    assert from_file != server()
    assert (from_file.port, from_file.domain, from_file.mux.link_window) == (9001, "t.example", 64 * 1024 * 1024)


def test_flags_then_variables_then_the_file_then_the_defaults(tmp_path):
    path = str(write(tmp_path, 'port = 9001\ndomain = "file.example"\nidle_timeout = 30\n', "relay.toml"))
    environ = {"PORTWAY_PORT": "9002", "PORTWAY_DOMAIN": "env.example"}
    built = server("--config", path, "--port", "9003", environ=environ)
    assert (built.port, built.domain, built.idle_timeout, built.head_timeout) == (9003, "env.example", 30.0, 15.0)


def test_relative_paths_in_a_file_are_beside_it(tmp_path, monkeypatch):
    (tmp_path / "conf").mkdir()
    write(tmp_path / "conf", '[[token]]\nlabel = "alice"\ntoken = "s3cret"\n', "tokens.toml")
    path = write(tmp_path / "conf", 'tokens_file = "tokens.toml"\ntls_cert = "/etc/c.pem"\n', "relay.toml")
    monkeypatch.chdir(tmp_path)
    values = relay_file_values(Path("conf/relay.toml"))
    assert values == {"tokens_file": "conf/tokens.toml", "tls_cert": "/etc/c.pem"}
    assert [grant.label for grant in server("--config", str(path), "--tls-key", "k.pem").grants] == ["alice"]


# ACME gets the certificates itself, so its keys can't share a file with tls_cert/tls_key
ACME_RELAY_FILE = """\
domain = "t.example"
acme_email = "me@t.example"
acme_directory = "https://acme.t.example/dir"
acme_ca = "acme-ca.pem"
acme_dns = "rfc2136://key:c2VjcmV0@127.0.0.1:5353/t.example"
state_dir = "state"
"""


def test_a_relay_file_sets_the_acme_settings_the_flags_set(tmp_path):
    from_file = server("--config", str(write(tmp_path, ACME_RELAY_FILE, "relay.toml")))
    assert from_file == server("--domain", "t.example", "--acme-email", "me@t.example",
                               "--acme-directory", "https://acme.t.example/dir",
                               "--acme-ca", str(tmp_path / "acme-ca.pem"),
                               "--acme-dns", "rfc2136://key:c2VjcmV0@127.0.0.1:5353/t.example",
                               "--state-dir", str(tmp_path / "state"))
    assert from_file.acme_email == "me@t.example" and from_file.acme_dns is not None


def test_every_relay_setting_has_a_key_in_a_file():
    keys = {line.split(" = ")[0] for line in (RELAY_FILE + ACME_RELAY_FILE).splitlines()}
    assert keys == {setting.key for setting in RELAY_SETTINGS}


# ----------------------------------------------------------------------------------------------- mistakes

@pytest.mark.parametrize("text, expected", [
    ('port = \n', r"^{path}: invalid TOML: Invalid value \(at line 1, column 8\)$"),
    ('domain = "a"\nport = 1\nport = 2\n', r"^{path}: invalid TOML: .*\(at line 3, column 9\)$"),
    ('prot = 80\n', r"^unknown key 'prot' in {path} \(did you mean 'port'\?\); allowed in a relay's file: "
                    r"bind, port, domain, .*resume_window$"),
    ('port = "80"\n', r"^{path}: 'port' must be an integer, not \"80\"$"),
    ('port = 70000\n', r"^{path}: port = 70000: must be a port number \(0-65535\)$"),
    ('port = true\n', r"^{path}: 'port' must be an integer, not true$"),
    ('idle_timeout = -1\n', r"^{path}: idle_timeout = -1: must be a positive number of seconds$"),
    ('idle_timeout = nan\n', r"^{path}: idle_timeout = nan: must be a positive number of seconds$"),
    ('access_log = "yes"\n', r"^{path}: 'access_log' must be true or false, not \"yes\"$"),
    ('tokens = "a"\n', r"^{path}: 'tokens' must be an array, each item a string, e.g. tokens = \[\"SECRET\"\], "
                      r"not \"a\"$"),
    ('tokens = [1]\n', r"^{path}: 'tokens' must be an array, each item a string"),
    ('log_format = "xml"\n', r"^{path}: log_format = \"xml\": must be text or json$"),
    ('metrics = "nowhere"\n', r"^{path}: metrics = \"nowhere\": must be HOST:PORT$"),
    ('[port]\n', r"^{path}: 'port' must be an integer, not a table$"),
    ('tls_cert = "c.pem"\n', r"^--tls-cert and --tls-key go together$"),
    ('tcp_ports = [20000]\n', r"^{path}: 'tcp_ports' must be a port number or a string of ports and ranges, "
                               r"e.g. \"20000-20100\", not an array$"),
    ('tcp_ports = "20100-20000"\n', r"^{path}: tcp_ports = \"20100-20000\": '20100-20000' is not a range: its "
                                     r"first port is above its last$"),
    ('tcp_ports = 0\n', r"^{path}: tcp_ports = 0: '0' is not a port \(1-65535\) or a range"),
    ('tcp_ports = "7990-8010"\n', r"^--tcp-ports 7990-8010 includes the relay's own --port 8000$"),
])
def test_a_mistake_in_a_relay_file_names_the_file_and_the_key(tmp_path, text, expected):
    path = write(tmp_path, text, "relay.toml")
    assert re.search(expected.format(path=re.escape(str(path))), refused(server, "--config", str(path)))


def test_a_missing_or_undecodable_file_is_one_line(tmp_path):
    missing = tmp_path / "nope.toml"
    assert refused(server, "--config", str(missing)) == f"cannot read {missing}: No such file or directory"
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"port = \xff\n")
    assert refused(server, "--config", str(binary)) == f"{binary}: not UTF-8 text, so not TOML"


# ----------------------------------------------------------------------------------------------- agent files

def test_the_issue_shape_parses_into_tunnels(tmp_path):
    parsed = read_agent_file(write(tmp_path, ISSUE_SHAPE))
    assert dict(parsed.settings) == {"relay": ("https://relay.example.com",), "token": "t0ken"}
    assert parsed.tunnels == (HttpTunnel(key="web", name="web", port=8080),
                              TcpTunnel(key="db", name="db", port=5432, remote_port=20001))
    assert parsed.summary() == "1 http tunnel, 1 tcp tunnel"


def test_an_http_tunnel_takes_host_port_name_and_its_own_settings(tmp_path):
    parsed = read_agent_file(write(tmp_path, """\
local_host = "::1"
allow_ip = ["10.0.0.0/8"]
[tunnels.web]
proto = "http"
port = "127.0.0.1:8080"
name = "Front-End"
basic_auth = "u:p"
allow_ip = ["192.0.2.0/24", "::1/128"]
inspect = 4041
[tunnels.app]
proto = "http"
port = 3000
no_inspect = true
"""))
    web, app = parsed.tunnels
    assert web == HttpTunnel(key="web", name="front-end", port=8080, host="127.0.0.1",
                             settings=(("basic_auth", "u:p"), ("allow_ip", ("192.0.2.0/24", "::1/128")),
                                       ("inspect", ("127.0.0.1", 4041))))
    assert parsed.agent_config(web, {}, {}) == AgentConfig(
        port=8080, local_host="127.0.0.1", name="front-end", basic_auth="u:p", allow_ip=("192.0.2.0/24", "::1/128"),
        inspect=("127.0.0.1", 4041))
    assert parsed.agent_config(app, {}, {}) == AgentConfig(
        port=3000, local_host="::1", name="app", allow_ip=("10.0.0.0/8",), no_inspect=True)


def test_a_tunnel_runs_with_flags_over_variables_over_its_table_over_the_top_level(tmp_path):
    path = write(tmp_path, """\
relay = "http://top.example"
token = "top"
log_format = "json"
keepalive_interval = 5
[tunnels.web]
proto = "http"
port = 8080
basic_auth = "table:pw"
allow_ip = ["10.0.0.0/8"]
""")
    assert start("--config", str(path)) == AgentConfig(
        port=8080, relay=("http://top.example",), token="top", name="web", basic_auth="table:pw",
        allow_ip=("10.0.0.0/8",), log_format="json", mux=MuxConfig(keepalive_interval=5))
    environ = {"PORTWAY_TOKEN": "env", "PORTWAY_BASIC_AUTH": "env:pw", "PORTWAY_NAME": "ignored",
               "PORTWAY_RELAY": "http://env.example"}
    built = start("--config", str(path), "--relay", "http://flag.example", environ=environ)
    assert (built.relay, built.token, built.basic_auth, built.name, built.allow_ip) == \
        (("http://flag.example",), "env", "env:pw", "web", ("10.0.0.0/8",))


def test_every_agent_setting_but_the_name_is_a_top_level_key():
    assert {setting.key for setting in AGENT_WIDE} == {setting.key for setting in AGENT_SETTINGS} - {"name"}


TUNNEL = '[tunnels.web]\nproto = "http"\nport = 8080\n'


@pytest.mark.parametrize("text, expected", [
    ('relay = \n', r"^{path}: invalid TOML: Invalid value \(at line 1, column 9\)$"),
    ('[tunnels.web]\nproto = "http"\n[tunnels.web]\n', r"^{path}: invalid TOML: Cannot declare .* twice "
                                                       r"\(at line 3, column 13\)$"),
    ('rellay = "x"\n' + TUNNEL, r"^unknown key 'rellay' in {path} \(did you mean 'relay'\?\); allowed at the top "
                                r"level: relay, local_host, .*, tunnels$"),
    ('name = "x"\n' + TUNNEL, r"^unknown key 'name' in {path}"),
    ('[tunnel.web]\nproto = "http"\n', r"^unknown key 'tunnel' in {path} \(did you mean 'tunnels'\?\)"),
    (TUNNEL + 'remote_port = 20001\n', r"^unknown key 'tunnels.web.remote_port' in {path}; allowed in an? http "
                                       r"tunnel: proto, port, name, local_host, basic_auth, allow_ip, inspect, "
                                       r"no_inspect$"),
    ('[tunnels.db]\nproto = "tcp"\nport = 1\nremote_prot = 2\n',
     r"^unknown key 'tunnels.db.remote_prot' in {path} \(did you mean 'remote_port'\?\); allowed in a tcp tunnel: "
     r"proto, port, name, remote_port, local_host, allow_ip, proxy_protocol$"),
    ('[tunnels.web]\nproto = "udp"\nport = 1\n', r"^{path}: 'tunnels.web.proto' is \"udp\"; allowed: \"http\" "
                                                 r"or \"tcp\"$"),
    ('[tunnels.web]\nport = 1\n', r"^{path}: 'tunnels.web.proto' is missing; allowed: \"http\" or \"tcp\"$"),
    ('[tunnels.web]\nproto = "http"\n', r"^{path}: 'tunnels.web.port' is missing: the local port, or "
                                        r"\"HOST:PORT\"$"),
    ('[tunnels.web]\nproto = "http"\nport = 70000\n',
     r"^{path}: tunnels.web.port = 70000: '70000' is not a port \(1-65535\) or HOST:PORT$"),
    ('[tunnels.web]\nproto = "http"\nport = "localhost:"\n', r"^{path}: tunnels.web.port = \"localhost:\": "),
    ('[tunnels.web]\nproto = "http"\nport = 80.5\n',
     r"^{path}: 'tunnels.web.port' must be a port number or \"HOST:PORT\", not 80.5$"),
    ('[tunnels.db]\nproto = "tcp"\nport = 1\nremote_port = 0\n',
     r"^{path}: 'tunnels.db.remote_port' must be a port number \(1-65535\), not 0$"),
    (TUNNEL + 'basic_auth = "nocolon"\n', r"^{path}: tunnels.web.basic_auth = \"nocolon\": must be USER:PASS$"),
    (TUNNEL + 'allow_ip = "10.0.0.0/8"\n', r"^{path}: 'tunnels.web.allow_ip' must be an array, each item a string, "
                                             r"e.g. allow_ip = \[\"CIDR\"\], not \"10.0.0.0/8\"$"),
    (TUNNEL + 'allow_ip = ["10.0.0.0/33"]\n', r"^{path}: tunnels.web.allow_ip = \"10.0.0.0/33\": "),
    (TUNNEL + 'no_inspect = 1\n', r"^{path}: 'tunnels.web.no_inspect' must be true or false, not 1$"),
    (TUNNEL + 'name = 5\n', r"^{path}: 'tunnels.web.name' must be a string, not 5$"),
    (TUNNEL + 'name = "Not_A_Label"\n', r"^{path}: tunnels.web.name = \"Not_A_Label\": "),
    ('[tunnels.Web_App]\nproto = "http"\nport = 1\n', r"^{path}: \[tunnels.Web_App\]: the table's key is the "
                                                      r"tunnel's name unless name = \"…\" says otherwise, and "),
    (TUNNEL + '[tunnels.api]\nproto = "http"\nport = 1\nname = "WEB"\n',
     r"^{path}: tunnels.web and tunnels.api have the same name, 'web'; a name can be used once"),
    ('keepalive_interval = "5"\n' + TUNNEL, r"^{path}: 'keepalive_interval' must be a number, not \"5\"$"),
    ('tunnels = 5\n', r"^{path}: 'tunnels' must hold tables, \[tunnels.NAME\], not 5$"),
    ('tunnels.web = 5\n', r"^{path}: 'tunnels.web' must be a table, \[tunnels.web\], not 5$"),
    ('relay = "x"\n', r"^{path} defines no tunnels: add a \[tunnels.NAME\] table with proto and port$"),
    ('log_format = "xml"\n' + TUNNEL, r"^{path}: log_format = \"xml\": must be text or json$"),
])
def test_a_mistake_in_an_agent_file_names_the_file_and_the_key(tmp_path, text, expected):
    path = write(tmp_path, text)
    message = refused(start, "--config", str(path))
    assert re.search(expected.format(path=re.escape(str(path))), message), message
    assert message == refused(check, path, {}, relay=False)


def test_tunnel_keys_are_the_documented_ones():
    assert TUNNEL_KEYS == {
        "http": ("proto", "port", "name", "local_host", "basic_auth", "allow_ip", "inspect", "no_inspect"),
        "tcp": ("proto", "port", "name", "remote_port", "local_host", "allow_ip", "proxy_protocol")}


# ----------------------------------------------------------------------------------------------- start's selection

TWO_HTTP_ONE_TCP = ISSUE_SHAPE + '[tunnels.api]\nproto = "http"\nport = 3000\nname = "api-demo"\n'


def test_the_relay_key_takes_one_url_or_several(tmp_path):
    one = write(tmp_path, 'relay = "http://a.example"\n[tunnels.web]\nproto = "http"\nport = 8080\n', "one.toml")
    several = write(tmp_path, 'relay = ["http://a.example", "http://b.example:8000"]\n[tunnels.web]\n'
                              'proto = "http"\nport = 8080\n', "several.toml")
    assert start("--config", str(one)).relay == ("http://a.example",)
    assert start("--config", str(several)).relay == ("http://a.example", "http://b.example:8000")
    assert start("--config", str(several), environ={"PORTWAY_RELAY": "http://c.example, http://d.example"}).relay \
        == ("http://c.example", "http://d.example")
    with pytest.raises(ConfigurationError, match="'relay' must be an array, each item a string"):
        start("--config", str(write(tmp_path, 'relay = 8\n[tunnels.web]\nproto = "http"\nport = 1\n', "bad.toml")))


def test_start_runs_one_named_http_tunnel(tmp_path):
    path = str(write(tmp_path, TWO_HTTP_ONE_TCP))
    assert start("--config", path, "api-demo") == AgentConfig(port=3000, name="api-demo", relay=
                                                              ("https://relay.example.com",), token="t0ken")
    assert start("--config", path, "WEB").name == "web"


def tunnels_of(*argv: str) -> tuple:
    return start_config(build_parser().parse_args(["start", *argv]), {})[2]


def test_start_runs_every_tunnel_of_the_file_or_the_named_ones_over_one_link(tmp_path):
    path = str(write(tmp_path, TWO_HTTP_ONE_TCP.replace("remote_port = 20001\n",
                                                        'remote_port = 20001\nproxy_protocol = "v1"\n')))
    every = tunnels_of("--config", path)
    assert [(tunnel.proto, tunnel.label, tunnel.target) for tunnel in every] == [
        ("http", "web", "localhost:8080"), ("tcp", "db", "localhost:5432"), ("http", "api-demo", "localhost:3000")]
    assert every[1].remote_port == 20001 and every[1].proxy_protocol is Version.V1
    assert every[2].name == "api-demo"
    assert [tunnel.label for tunnel in tunnels_of("--config", path, "web", "db")] == ["web", "db"]
    assert [tunnel.label for tunnel in tunnels_of("--config", path, "db")] == ["db"]
    assert tunnels_of("--config", path, "web") == ()  # one http tunnel: run as `portway http` runs it


@pytest.mark.parametrize("names, expected", [
    (["nope"], r"^no tunnel named 'nope' in .*; its tunnels: api-demo, db, web$"),
    (["wbe"], r"^no tunnel named 'wbe' in .* \(did you mean 'web'\?\); its tunnels: api-demo, db, web$"),
])
def test_start_refuses_a_tunnel_the_file_does_not_have(tmp_path, names, expected):
    path = str(write(tmp_path, TWO_HTTP_ONE_TCP))
    assert re.search(expected, refused(start, "--config", path, *names))


def test_the_default_file_is_in_the_folder_then_in_the_users_config(tmp_path):
    here, config_home, home = tmp_path / "here", tmp_path / "xdg", tmp_path / "home"
    for folder in (here, config_home / "portway", home / ".config" / "portway"):
        folder.mkdir(parents=True)
    environ = {"XDG_CONFIG_HOME": str(config_home), "HOME": str(home)}
    message = refused(default_agent_file, environ, here)
    assert message == (f"no config file: looked for {here}/portway.toml and {config_home}/portway/portway.toml "
                       "(or pass --config FILE)")
    write(home / ".config" / "portway", TUNNEL)
    assert default_agent_file({"HOME": str(home)}, here) == home / ".config" / "portway" / "portway.toml"
    write(config_home / "portway", TUNNEL)
    assert default_agent_file(environ, here) == config_home / "portway" / "portway.toml"
    write(here, TUNNEL)
    assert default_agent_file(environ, here) == here / "portway.toml"


# ----------------------------------------------------------------------------------------------- config check

def test_check_tells_a_relay_file_from_an_agent_file(tmp_path):
    relay = write(tmp_path, 'port = 9001\ndomain = "t.example"\ntokens = ["a"]\n', "relay.toml")
    agent = write(tmp_path, TWO_HTTP_ONE_TCP)
    assert check(relay, {}) == \
        f"{relay}: ok — a relay's file: listens on 127.0.0.1:9001, tunnels at NAME.t.example, 1 token"
    assert check(agent, {}) == f"{agent}: ok — an agent's file: 2 http tunnels, 1 tcp tunnel"
    assert refused(check, relay, {}, relay=False).startswith(f"unknown key 'port' in {relay}")
    assert refused(check, agent, {}, relay=True).startswith(f"unknown key 'relay' in {agent}")
    shared = write(tmp_path, "keepalive_interval = 5\n", "shared.toml")
    assert refused(check, shared, {}) == f"{shared} defines no tunnels: add a [tunnels.NAME] table with proto and port"
    assert check(shared, {}, relay=True).endswith("no tokens")
    mixed = write(tmp_path, 'relay = "http://127.0.0.1:9"\nport = 8080\n[tunnel.web]\n', "mixed.toml")
    assert refused(check, mixed, {}).startswith(f"unknown key 'port' in {mixed}; allowed at the top level: ")


def test_check_names_the_tcp_ports(tmp_path):
    relay = write(tmp_path, 'tcp_ports = "20005,20000-20003"\n', "relay.toml")
    assert check(relay, {}) == (f"{relay}: ok — a relay's file: listens on 127.0.0.1:8000, tunnels at "
                                f"NAME.localhost, TCP ports 20000-20003,20005, no tokens")
    single = write(tmp_path, 'tcp_ports = 20001\n', "single.toml")
    assert check(single, {}).endswith("TCP ports 20001, no tokens")


def test_check_validates_with_the_environment_it_would_run_with(tmp_path):
    relay = write(tmp_path, 'port = 9001\n', "relay.toml")
    assert refused(check, relay, {"PORTWAY_PORT": "eighty"}).startswith("$PORTWAY_PORT='eighty'")
    assert "listens on 127.0.0.1:9002" in check(relay, {"PORTWAY_PORT": "9002"})


@pytest.mark.parametrize("name, summary", [
    ("portway.toml", "an agent's file: 2 http tunnels, 1 tcp tunnel"),
    ("relay.toml", "a relay's file: listens on 0.0.0.0:8000, tunnels at NAME.tunnels.example.com, 1 token"),
])
def test_the_example_files_pass_the_check(name, summary):
    path = ROOT / "examples" / name
    assert check(path, {}) == f"{path}: ok — {summary}"


def test_the_readme_lists_every_file_key():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Configuration file", 1)[1].split("\n## ", 1)[0]
    keys = {setting.key for setting in RELAY_SETTINGS + AGENT_WIDE} | {"tunnels"}
    keys |= {key for table in TUNNEL_KEYS.values() for key in table}
    for key in keys:
        assert f"`{key}`" in section, key


# ----------------------------------------------------------------------------------------------- never a traceback

# Documents near valid ones (each key's value often a good one) and far from them (any TOML value, any key).
_SCALARS = st.one_of(st.booleans(), st.integers(-2**64, 2**64), st.floats(), st.text(max_size=12), st.datetimes(),
                     st.dates())
_ANY = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.text(max_size=8), inner, max_size=3), max_leaves=6)
_GOOD = {
    **tomllib.loads(RELAY_FILE), **tomllib.loads(ACME_RELAY_FILE), "relay": "http://127.0.0.1:9", "token": "t", "name": "front-end", "proto": "tcp",
    "local_host": "::1", "basic_auth": "u:p", "allow_ip": ["10.0.0.0/8"], "ca_file": "ca.pem",
    "wait_for_relay": False, "inspect": 4041, "no_inspect": True, "port": "127.0.0.1:8080", "remote_port": 20001,
    "proxy_protocol": "v2", "scheduling": "batch",
}


def _mostly(usual: st.SearchStrategy, rarely: st.SearchStrategy) -> st.SearchStrategy:
    """`usual` nine times in ten, else `rarely`."""
    return st.integers(0, 9).flatmap(lambda draw: usual if draw else rarely)


def _table(keys: Iterable[str], **required: st.SearchStrategy) -> st.SearchStrategy:
    """Tables of some of `keys`, each value mostly a good one."""
    return st.fixed_dictionaries(required, optional={key: _mostly(st.just(_GOOD[key]), _ANY) for key in keys})


_TUNNEL_TABLE = st.sampled_from(sorted(TUNNEL_KEYS)).flatmap(lambda proto: _table(
    TUNNEL_KEYS[proto][2:], proto=st.just(proto), port=_mostly(st.just(_GOOD["port"]), _ANY)))
_TUNNELS = st.dictionaries(_mostly(st.sampled_from(["web", "app", "db", "Web", "api", "x_y"]), st.text(max_size=6)),
                           _mostly(_TUNNEL_TABLE, _ANY), min_size=1, max_size=4)
_AGENT_DOCUMENT = st.builds(
    lambda top, tunnels: {**top, **tunnels},
    st.just({}) | _table([setting.key for setting in AGENT_WIDE]),
    _mostly(st.fixed_dictionaries({"tunnels": _TUNNELS}), st.fixed_dictionaries({}, optional={"tunnels": _ANY})))
_RELAY_DOCUMENT = _table([setting.key for setting in RELAY_SETTINGS if setting.key != "tokens_file"])


@settings(max_examples=300, deadline=None)
@given(document=_AGENT_DOCUMENT)
def test_any_agent_document_is_a_file_or_one_line(document):
    path = Path("portway.toml")
    try:
        parsed = agent_file(document, path)
        for tunnel in parsed.tunnels:
            parsed.agent_config(tunnel, {}, {})
    except ConfigurationError as error:
        assert "\n" not in str(error) and str(error)


@settings(max_examples=300, deadline=None)
@given(document=_RELAY_DOCUMENT)
def test_any_relay_document_is_a_config_or_one_line(document):
    try:
        relay_config(load(RELAY_SETTINGS, {}, {}, relay_values(document, Path("relay.toml"))))
    except ConfigurationError as error:
        assert "\n" not in str(error) and str(error)


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=60))
def test_any_text_is_a_document_or_one_line(tmp_path_factory, text):
    path = tmp_path_factory.getbasetemp() / "any.toml"
    path.write_text(text, encoding="utf-8")
    try:
        read_toml(path)
    except ConfigurationError as error:
        assert "\n" not in str(error) and str(error).startswith(f"{path}: invalid TOML: ")


def test_a_tunnel_key_that_toml_must_quote_is_quoted_in_the_message(tmp_path):
    path = write(tmp_path, '[tunnels."a\\nb"]\nproto = "http"\nport = 8080\n', "portway.toml")
    with pytest.raises(ConfigurationError) as raised:
        read_agent_file(path)
    assert str(raised.value).startswith(f'{path}: [tunnels."a\\nb"]: ') and "\n" not in str(raised.value)
