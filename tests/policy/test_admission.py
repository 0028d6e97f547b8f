"""Per-address admission: what costs the relay is capped, established upgraded connections are counted apart,
and the state kept per address stays bounded. Time is passed in; no sockets."""

from __future__ import annotations

import pytest

from portway.policy.admission import Admission, AdmissionLimits, Refusal

A, B = "10.0.0.1", "10.0.0.2"


def admission(connections=3, upgraded=5, rate=1000.0, burst=1000.0) -> Admission:
    return Admission(AdmissionLimits(connections=connections, upgraded=upgraded, rate=rate, burst=burst))


def test_http_connections_are_capped_per_address():
    gate = admission(connections=3)
    assert [gate.admit(A, 0.0) for _ in range(3)] == [None] * 3
    assert gate.admit(A, 0.0) is Refusal.CONNECTIONS
    assert gate.admit(B, 0.0) is None, "the cap is per address"
    gate.release(A, upgraded=False, now=0.0)
    assert gate.admit(A, 0.0) is None


def test_room_made_by_closing_an_idle_connection_admits_past_the_cap():
    gate = admission(connections=2)
    gate.admit(A, 0.0)
    gate.admit(A, 0.0)
    assert gate.at_connection_cap(A)
    assert gate.admit(A, 0.0, make_room=True) is None
    assert gate.counts(A) == (3, 0)  # until the closed one is released


def test_upgraded_connections_leave_the_http_count_and_have_their_own_cap():
    gate = admission(connections=3, upgraded=300)
    for _ in range(300):
        assert gate.admit(A, 0.0) is None
        assert gate.may_upgrade(A) is None
        gate.upgraded(A)
    assert gate.counts(A) == (0, 300)
    assert gate.admit(A, 0.0) is None, "an office holding 300 WebSockets still gets a plain request through"
    assert gate.may_upgrade(A) is Refusal.UPGRADED
    gate.release(A, upgraded=True, now=0.0)
    assert gate.may_upgrade(A) is None
    assert gate.open_connections() == 300


def test_new_connections_are_rate_limited_per_address_with_a_burst():
    gate = admission(connections=100, rate=2.0, burst=4.0)
    assert [gate.admit(A, 10.0) for _ in range(4)] == [None] * 4
    assert gate.admit(A, 10.0) is Refusal.RATE
    assert gate.admit(B, 10.0) is None
    assert gate.admit(A, 10.4) is Refusal.RATE  # 0.8 of a token
    assert gate.admit(A, 10.5) is None  # one token back after 1 / rate seconds
    assert gate.admit(A, 10.5) is Refusal.RATE


def test_a_churner_closing_each_connection_before_the_next_still_meets_the_rate_limit():
    gate = admission(rate=1.0, burst=2.0)
    for _ in range(2):
        assert gate.admit(A, 0.0) is None
        gate.release(A, upgraded=False, now=0.0)
    assert gate.admit(A, 0.0) is Refusal.RATE


def test_refusals_at_the_cap_cost_no_token():
    gate = admission(connections=1, rate=1.0, burst=2.0)
    assert gate.admit(A, 0.0) is None
    for _ in range(10):
        assert gate.admit(A, 0.0) is Refusal.CONNECTIONS
    gate.release(A, upgraded=False, now=0.0)
    assert gate.admit(A, 0.0) is None, "the second token of the burst is still there"


def test_state_is_kept_only_for_addresses_that_still_decide_something():
    gate = admission(rate=10.0, burst=20.0)
    for i in range(1000):
        address = f"10.1.{i // 256}.{i % 256}"
        assert gate.admit(address, 0.0) is None
        gate.release(address, upgraded=False, now=0.0)
    assert gate.tracked() == 1000, "a fresh bucket not yet refilled still limits a churner"
    gate.admit(B, 5.0)  # past burst / rate seconds: the next admission sweeps
    assert gate.tracked() == 1
    gate.release(B, upgraded=False, now=100.0)
    assert gate.tracked() == 0


@pytest.mark.parametrize("limits", [
    {"connections": 0}, {"upgraded": 0}, {"rate": 0.0}, {"burst": 0.5},
])
def test_nonsense_limits_are_refused(limits):
    with pytest.raises(ValueError):
        AdmissionLimits(**limits)
