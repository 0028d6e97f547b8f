"""ACME's decisions without a network or a clock (relay/acme_plan.py): when to renew, the backoff after failures,
which certificate serves a name, and which names may make the relay order one."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from portway.relay.acme_plan import (
    FIRST_RETRY, MAX_RETRY, WILDCARD, IssuancePlan, Verdict, certificate_key, certificate_names, renewal_time,
    retry_delay, tunnel_of,
)

DAY = 86400.0
DOMAIN = "tunnels.example.com"


def test_a_90_day_certificate_is_renewed_after_60_days():
    assert renewal_time(1000.0, 1000.0 + 90 * DAY) == 1000.0 + 60 * DAY


@given(st.floats(0, 2e9), st.floats(1, 400 * DAY))
def test_renewal_leaves_a_third_of_the_lifetime(not_before, lifetime):
    renew = renewal_time(not_before, not_before + lifetime)
    assert not_before < renew < not_before + lifetime
    assert (not_before + lifetime - renew) == pytest.approx(lifetime / 3)


def test_the_backoff_doubles_from_a_minute_up_to_six_hours():
    assert [retry_delay(n) for n in range(1, 6)] == [60, 120, 240, 480, 960]
    assert retry_delay(9) == 15360 and retry_delay(10) == MAX_RETRY == retry_delay(10_000)
    with pytest.raises(ValueError):
        retry_delay(0)


@given(st.integers(1, 10_000))
def test_the_backoff_never_shrinks_and_stays_bounded(failures):
    assert FIRST_RETRY <= retry_delay(failures) <= retry_delay(failures + 1) <= MAX_RETRY


@pytest.mark.parametrize("server_name, wildcard, key", [
    ("shop.tunnels.example.com", True, WILDCARD),
    ("SHOP.Tunnels.Example.COM.", True, WILDCARD),
    ("tunnels.example.com", True, WILDCARD),
    (None, True, WILDCARD),  # no SNI (an IP literal): the wildcard certificate is the default
    ("shop.tunnels.example.com", False, "shop.tunnels.example.com"),
    ("Shop.tunnels.example.com", False, "shop.tunnels.example.com"),
    ("tunnels.example.com", False, "tunnels.example.com"),
    (None, False, "tunnels.example.com"),
    ("a.b.tunnels.example.com", True, None),  # *.DOMAIN covers one label only
    ("a.b.tunnels.example.com", False, None),
    ("example.com", False, None),
    ("evil-tunnels.example.com", False, None),
    ("shop.tunnels.example.com.evil.net", False, None),
    ("-bad.tunnels.example.com", False, None),
    ("www.tunnels.example.com", False, None),  # reserved for the relay: never a tunnel
    ("_wildcard.tunnels.example.com", False, None),
])
def test_the_certificate_for_a_server_name(server_name, wildcard, key):
    assert certificate_key(server_name, DOMAIN, wildcard) == key


def test_names_of_a_certificate_and_its_tunnel():
    assert certificate_names(WILDCARD, DOMAIN) == [f"*.{DOMAIN}", DOMAIN]
    assert certificate_names(f"shop.{DOMAIN}", DOMAIN) == [f"shop.{DOMAIN}"]
    assert tunnel_of(f"shop.{DOMAIN}", DOMAIN) == "shop"
    assert tunnel_of(DOMAIN, DOMAIN) is None and tunnel_of(WILDCARD, DOMAIN) is None


def test_a_wanted_certificate_is_due_at_once_then_at_its_renewal_time():
    plan = IssuancePlan()
    plan.want(WILDCARD)
    assert plan.due(0.0) == [WILDCARD] and plan.next_wakeup() == 0.0
    plan.started(WILDCARD)
    assert plan.due(0.0) == [] and plan.next_wakeup() is None  # in flight: not twice
    plan.installed(WILDCARD, 0.0, 90 * DAY)
    assert plan.next_wakeup() == 60 * DAY
    assert plan.due(60 * DAY - 1) == [] and plan.due(60 * DAY) == [WILDCARD]


def test_failures_back_off_and_a_success_resets_them():
    plan = IssuancePlan()
    plan.want(WILDCARD)
    plan.started(WILDCARD)
    assert plan.failed(WILDCARD, now=1000.0) == 1060.0
    assert plan.due(1059.0) == [] and plan.due(1060.0) == [WILDCARD]
    plan.started(WILDCARD)
    assert plan.failed(WILDCARD, now=1060.0) == 1180.0
    assert not plan.has_certificate(WILDCARD)
    plan.started(WILDCARD)
    plan.installed(WILDCARD, 1200.0, 1200.0 + 90 * DAY)
    assert plan.next_wakeup() == 1200.0 + 60 * DAY
    plan.started(WILDCARD)
    assert plan.failed(WILDCARD, now=1200.0 + 60 * DAY) == 1200.0 + 60 * DAY + FIRST_RETRY  # counted from 1 again


def test_a_failed_renewal_keeps_the_certificate_and_retries_before_it_expires():
    plan = IssuancePlan()
    plan.installed(WILDCARD, 0.0, 90 * DAY)
    plan.started(WILDCARD)
    retry = plan.failed(WILDCARD, now=60 * DAY)
    assert plan.has_certificate(WILDCARD) and retry == 60 * DAY + FIRST_RETRY
    assert plan.next_wakeup() == retry


def test_the_earliest_of_several_certificates_wakes_the_timer():
    plan = IssuancePlan()
    plan.installed("a.d", 0.0, 90 * DAY)
    plan.installed("b.d", 0.0, 30 * DAY)
    assert plan.next_wakeup() == 20 * DAY
    plan.unscheduled("b.d")  # its tunnel is gone
    assert plan.next_wakeup() == 60 * DAY and plan.due(61 * DAY) == ["a.d"]
    plan.started("b.d")  # the tunnel came back, a visit ordered it anew: renewed on time again
    plan.installed("b.d", 61 * DAY, 91 * DAY)
    assert plan.next_wakeup() == 60 * DAY and plan.due(81 * DAY) == ["a.d", "b.d"]


KEY = f"shop.{DOMAIN}"


def test_only_a_registered_name_makes_the_relay_order():
    plan = IssuancePlan()
    assert plan.on_demand(KEY, registered=False, now=0.0) is Verdict.REFUSE
    assert plan.on_demand(None, registered=True, now=0.0) is Verdict.REFUSE  # outside the domain
    assert plan.states == {}  # a refused name leaves no trace to renew
    assert plan.on_demand(KEY, registered=True, now=0.0) is Verdict.ORDER


def test_on_demand_waits_for_an_order_in_flight_and_for_the_backoff():
    plan = IssuancePlan()
    plan.started(KEY)
    assert plan.on_demand(KEY, registered=True, now=0.0) is Verdict.WAIT
    retry = plan.failed(KEY, now=0.0)
    assert plan.on_demand(KEY, registered=True, now=retry - 1) is Verdict.WAIT
    assert plan.on_demand(KEY, registered=True, now=retry) is Verdict.ORDER


def test_on_demand_serves_a_valid_certificate_and_renews_one_that_is_due():
    plan = IssuancePlan()
    plan.installed(KEY, 0.0, 90 * DAY)
    assert plan.on_demand(KEY, registered=True, now=DAY) is Verdict.SERVE
    assert plan.on_demand(KEY, registered=True, now=60 * DAY) is Verdict.ORDER
    assert plan.on_demand(KEY, registered=False, now=60 * DAY) is Verdict.SERVE  # still served, never renewed
    plan.started(KEY)
    assert plan.on_demand(KEY, registered=True, now=60 * DAY) is Verdict.SERVE  # the old one while renewing


@given(st.lists(st.tuples(st.sampled_from(["want", "start", "install", "fail", "unschedule"]),
                          st.sampled_from(["a", "b", "c"]), st.floats(0, 1e6)), max_size=40))
def test_due_and_next_wakeup_agree(steps):
    """Whatever happened, the timer never sleeps past a due key, nor wakes for one in flight."""
    plan = IssuancePlan()
    for action, key, now in steps:
        if action == "want":
            plan.want(key)
        elif action == "start":
            plan.started(key)
        elif action == "install":
            plan.installed(key, now, now + DAY)
        elif action == "fail":
            plan.failed(key, now)
        else:
            plan.unscheduled(key)
    wake = plan.next_wakeup()
    if wake is None:
        assert plan.due(1e12) == []
    else:
        assert plan.due(wake) and all(not plan.states[key].in_flight for key in plan.due(wake))
        assert plan.due(wake - 1e-3) == [] or wake == 0.0
