"""The command line builds the configs the relay and the agent run with: flags, their environment variables and
their defaults end up where the code reads them."""

from __future__ import annotations

import pytest

from portway.cli import agent_config, build_parser, relay_config
from portway.proto.mux import MuxConfig


def parse(*argv: str):
    return build_parser().parse_args(list(argv))


@pytest.mark.parametrize("command, make", [(["server"], relay_config), (["http", "8080"], agent_config)])
def test_keepalive_flags_reach_the_mux_config(command, make):
    config = make(parse(*command, "--keepalive-interval", "2.5", "--keepalive-timeout", "0.5"))
    assert (config.mux.keepalive_interval, config.mux.keepalive_timeout) == (2.5, 0.5)
    default = make(parse(*command)).mux
    assert default == MuxConfig() and (default.keepalive_interval, default.keepalive_timeout) == (30.0, 10.0)


@pytest.mark.parametrize("command, make", [(["server"], relay_config), (["http", "8080"], agent_config)])
def test_keepalive_from_the_environment_and_the_flag_wins(monkeypatch, command, make):
    monkeypatch.setenv("PORTWAY_KEEPALIVE_INTERVAL", "7")
    monkeypatch.setenv("PORTWAY_KEEPALIVE_TIMEOUT", "3")
    assert make(parse(*command)).mux == MuxConfig(keepalive_interval=7.0, keepalive_timeout=3.0)
    assert make(parse(*command, "--keepalive-timeout", "4")).mux.keepalive_timeout == 4.0


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon"])
@pytest.mark.parametrize("flag", ["--keepalive-interval", "--keepalive-timeout"])
def test_keepalive_must_be_a_positive_number_of_seconds(capsys, flag, value):
    with pytest.raises(SystemExit) as exited:
        parse("server", flag, value)
    assert exited.value.code == 2 and flag in capsys.readouterr().err
