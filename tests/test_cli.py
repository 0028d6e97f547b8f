"""The relay's command line turns the budget flags into its configuration, and refuses nonsense."""

from __future__ import annotations

import pytest

from portway.cli import build_parser, relay_config


def relay(*args: str):
    return relay_config(build_parser().parse_args(["server", *args]))


def test_budget_flags_default_to_the_configured_values():
    config = relay()
    assert config.auth_failure_window == 60.0
    assert config.mux.link_window == 32 * 1024 * 1024


def test_budget_flags_reach_the_configuration():
    config = relay("--auth-failure-window", "2.5", "--link-window", "64")
    assert config.auth_failure_window == 2.5
    assert config.mux.link_window == 64 * 1024 * 1024


@pytest.mark.parametrize("args, message", [
    (("--auth-failure-window", "0"), "--auth-failure-window must be positive"),
    (("--link-window", "0.5"), "--link-window must be at least 1"),
    (("--link-window", "2048"), "--link-window must be at least 1"),
])
def test_nonsense_budgets_are_refused(args, message):
    with pytest.raises(ValueError, match=message):
        relay(*args)
