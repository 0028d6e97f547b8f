"""The command line builds the configs the relay and the agent run with: flags, their environment variables and
their defaults end up where the code reads them."""

from __future__ import annotations

import re

import pytest

from portway import __version__
from portway.build_info import compiled_hot_path
from portway.cli import build_parser, config_from
from portway.config import AGENT_SETTINGS, RELAY_SETTINGS, AgentConfig, RelayConfig
from portway.errors import ConfigurationError
from portway.proto.mux import MuxConfig

COMMANDS = [["server"], ["http", "8080"]]


def parse(*argv: str):
    return build_parser().parse_args(list(argv))


def config(*argv: str, environ: dict[str, str] | None = None):
    return config_from(parse(*argv), environ or {})


@pytest.mark.parametrize("command", COMMANDS)
def test_keepalive_flags_reach_the_mux_config(command):
    built = config(*command, "--keepalive-interval", "0.5", "--keepalive-timeout", "2.5")
    assert (built.mux.keepalive_interval, built.mux.keepalive_timeout) == (0.5, 2.5)
    default = config(*command).mux
    assert default == MuxConfig() and (default.keepalive_interval, default.keepalive_timeout) == (None, 10.0)
    assert config(*command, "--keepalive-timeout", "6").mux.ping_after == 2.0


@pytest.mark.parametrize("command", COMMANDS)
def test_keepalive_from_the_environment_and_the_flag_wins(command):
    environ = {"PORTWAY_KEEPALIVE_INTERVAL": "3", "PORTWAY_KEEPALIVE_TIMEOUT": "7"}
    assert config(*command, environ=environ).mux == MuxConfig(keepalive_interval=3.0, keepalive_timeout=7.0)
    assert config(*command, "--keepalive-timeout", "4", environ=environ).mux.keepalive_timeout == 4.0


@pytest.mark.parametrize("command", COMMANDS)
def test_a_keepalive_interval_not_below_the_timeout_is_refused_naming_both(command):
    with pytest.raises(ConfigurationError, match=r"--keepalive-interval \(30\) must be below --keepalive-timeout \(10\)"):
        config(*command, "--keepalive-interval", "30")


def test_every_relay_setting_reaches_the_config_from_its_flag_and_its_variable():
    flags = ["server", "--bind", "127.0.0.2", "--port", "9001", "--domain", "t.example", "--public-port", "443",
             "--grace-period", "3", "--token", "a", "--token", "b", "--open", "--head-timeout", "2",
             "--idle-timeout", "4", "--max-connections-per-ip", "9", "--response-timeout", "5",
             "--pool-wait-timeout", "6", "--lt-grace-period", "7", "--metrics", ":9100", "--no-access-log",
             "--log-format", "json", "--tcp-ports", "20000-20002,20005"]
    from_flags = config(*flags)
    environ = {"PORTWAY_BIND": "127.0.0.2", "PORTWAY_PORT": "9001", "PORTWAY_DOMAIN": "t.example",
               "PORTWAY_PUBLIC_PORT": "443", "PORTWAY_GRACE_PERIOD": "3", "PORTWAY_TOKENS": "a,b",
               "PORTWAY_OPEN_RELAY": "yes", "PORTWAY_HEAD_TIMEOUT": "2", "PORTWAY_IDLE_TIMEOUT": "4",
               "PORTWAY_MAX_CONNECTIONS_PER_IP": "9", "PORTWAY_RESPONSE_TIMEOUT": "5",
               "PORTWAY_POOL_WAIT_TIMEOUT": "6", "PORTWAY_LT_GRACE_PERIOD": "7", "PORTWAY_METRICS": ":9100",
               "PORTWAY_ACCESS_LOG": "off", "PORTWAY_LOG_FORMAT": "json", "PORTWAY_TCP_PORTS": "20000-20002,20005"}
    from_environment = config("server", environ=environ)
    assert from_flags == from_environment
    assert isinstance(from_flags, RelayConfig) and len(from_flags.grants) == 2
    assert (from_flags.bind, from_flags.port, from_flags.public_port, from_flags.metrics) == \
        ("127.0.0.2", 9001, 443, ("127.0.0.1", 9100))
    assert (from_flags.open_relay, from_flags.access_log, from_flags.log_format) == (True, False, "json")
    assert from_flags.tcp_ports == {20000, 20001, 20002, 20005}
    assert config("server") == RelayConfig(access_log=True)


def test_every_agent_setting_reaches_the_config():
    built = config("http", "8080", "--relay", "https://r.example", "--name", "Demo", "--local-host", "::1",
                   "--token", "t", "--basic-auth", "u:p", "--allow-ip", "10.0.0.0/8", "--allow-ip", "::1/128",
                   "--ca", "ca.pem")
    assert built == AgentConfig(port=8080, relay=("https://r.example",), name="demo", local_host="::1", token="t",
                                basic_auth="u:p", allow_ip=("10.0.0.0/8", "::1/128"), ca_file="ca.pem")
    assert config("http", "8080", environ={"PORTWAY_ALLOW_IP": "10.0.0.0/8, 192.0.2.0/24"}).allow_ip == \
        ("10.0.0.0/8", "192.0.2.0/24")


@pytest.mark.parametrize("argv, fragment", [
    (["http", "8080", "--basic-auth", "nocolon"], "USER:PASS"),
    (["http", "8080", "--allow-ip", "10.0.0.0/33"], "--allow-ip"),
    (["http", "8080", "--name", "Not_A_Label"], "--name"),
    (["server", "--port", "70000"], "--port"),
    (["server", "--log-format", "xml"], "text or json"),
    (["server", "--metrics", "nowhere"], "HOST:PORT"),
    (["server", "--tcp-ports", "30000-20000"], "--tcp-ports: '30000-20000' is not a range"),
])
def test_bad_flags_are_refused_naming_the_flag(capsys, argv, fragment):
    with pytest.raises(SystemExit) as exited:
        parse(*argv)
    assert exited.value.code == 2 and fragment in capsys.readouterr().err


@pytest.mark.parametrize("environ, fragment", [
    ({"PORTWAY_PORT": "eighty"}, "$PORTWAY_PORT='eighty'"),
    ({"PORTWAY_HEAD_TIMEOUT": "-1"}, "positive"),
    ({"PORTWAY_TLS_CERT": "cert.pem"}, "--tls-cert and --tls-key go together"),
    ({"PORTWAY_TCP_PORTS": "20000-"}, "$PORTWAY_TCP_PORTS='20000-': '20000-' is not a port (1-65535) or a range"),
    ({"PORTWAY_TCP_PORTS": "1-65535"}, "--tcp-ports 1-65535 includes the relay's own --port 8000"),
    ({"PORTWAY_TCP_PORTS": "9000-9200", "PORTWAY_METRICS": ":9100"},
     "--tcp-ports 9000-9200 includes the relay's own --metrics 9100"),
])
def test_bad_variables_are_refused_naming_the_variable(environ, fragment):
    with pytest.raises(ConfigurationError, match=re.escape(fragment)):
        config("server", environ=environ)


@pytest.mark.parametrize("tcp_ports, message", [
    ("20000-20100", None),
    ("20000,20002", "the tokens file reserves port 20001 for 'alice', but it is not a TCP port of this relay "
                    "(--tcp-ports 20000,20002)"),
    (None, "the tokens file reserves port 20001 for 'alice', but it is not a TCP port of this relay "
           "(no --tcp-ports given)"),
])
def test_reserved_ports_must_be_tcp_ports_of_the_relay(tmp_path, tcp_ports, message):
    tokens = tmp_path / "tokens.toml"
    tokens.write_text('[[token]]\nlabel = "alice"\ntoken = "s3cret"\nports = [20001]\n', encoding="utf-8")
    argv = ["server", "--tokens", str(tokens), *(["--tcp-ports", tcp_ports] if tcp_ports else [])]
    if message is None:
        assert config(*argv).grants[0].reserved_ports == {20001}
        return
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        config(*argv)


def test_every_setting_has_its_own_flag_and_variable():
    for settings in (RELAY_SETTINGS, AGENT_SETTINGS):
        assert len({s.flag for s in settings}) == len({s.env for s in settings}) == len(settings)


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon"])
@pytest.mark.parametrize("flag", ["--keepalive-interval", "--keepalive-timeout"])
def test_keepalive_must_be_a_positive_number_of_seconds(capsys, flag, value):
    with pytest.raises(SystemExit) as exited:
        parse("server", flag, value)
    assert exited.value.code == 2 and flag in capsys.readouterr().err


def test_the_readme_lists_every_flag_and_its_variable():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    for setting in RELAY_SETTINGS + AGENT_SETTINGS:
        flag = f"--no-{setting.flag[2:]}" if setting.is_switch and setting.default else setting.flag
        assert f"`{flag}" in readme and f"`${setting.env}`" in readme, setting.key
    assert "`--config FILE`" in readme and "portway start [--config FILE]" in readme


def test_budget_flags_default_to_the_configured_values():
    built = config("server")
    assert built.auth_failure_window == 60.0 and built.mux.link_window == 32 * 1024 * 1024


def test_budget_flags_reach_the_configuration():
    built = config("server", "--auth-failure-window", "2.5", "--link-window", "64")
    assert built.auth_failure_window == 2.5 and built.mux.link_window == 64 * 1024 * 1024
    assert config("server", environ={"PORTWAY_LINK_WINDOW": "8"}).mux.link_window == 8 * 1024 * 1024


@pytest.mark.parametrize("argv, fragment", [
    (["server", "--auth-failure-window", "0"], "--auth-failure-window"),
    (["server", "--link-window", "0.5"], "at least 1 and under 2048"),
    (["server", "--link-window", "2048"], "at least 1 and under 2048"),
])
def test_nonsense_budgets_are_refused(capsys, argv, fragment):
    with pytest.raises(SystemExit) as exited:
        parse(*argv)
    assert exited.value.code == 2 and fragment in capsys.readouterr().err


def test_version_says_which_build_of_the_hot_path_runs(capsys):
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["--version"])
    assert exited.value.code == 0
    build = "hot path compiled with mypyc" if compiled_hot_path() else "pure Python"
    assert capsys.readouterr().out == f"portway {__version__} ({build})\n"
