"""Authentication without sockets: token digests, the tokens file, constant-time lookup, the failure throttle,
the secure default, and the throttling of tunnels' basic-auth guessing (per address and per tunnel). The claim
rules that use them are in tests/policy/test_claims.py."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from portway.auth import (
    OPEN_GRANT,
    BasicAuthGuard,
    FailureThrottle,
    Grant,
    TokenBook,
    address_key,
    hash_token,
    load_tokens_file,
)
from portway.config import RelayConfig
from portway.errors import HttpError, TokenFileError
from portway.proto.http1 import RequestParser

DIGEST_A = hash_token("alpha-secret")
DIGEST_B = hash_token("beta-secret")


# ----------------------------------------------------------------------------------------------- digests and file

def test_tokens_are_kept_as_sha256_digests():
    assert hash_token("s3cret") == hashlib.sha256(b"s3cret").hexdigest()
    assert hash_token("ünïcode") == hashlib.sha256("ünïcode".encode()).hexdigest()


def write(tmp_path, text: str):
    path = tmp_path / "tokens.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_tokens_file_entries(tmp_path):
    path = write(tmp_path, f"""
[[token]]
sha256 = "{DIGEST_A.upper()}"
label = "team-a"
names = ["Reserved-A", "other"]
ports = [20001, 20005]
max_tunnels = 3

[[token]]
sha256 = "{DIGEST_B}"
""")
    first, second = load_tokens_file(path)
    assert first == Grant("team-a", DIGEST_A, frozenset({"reserved-a", "other"}), 3, frozenset({20001, 20005}))
    assert second == Grant("token-2", DIGEST_B, frozenset(), 0)
    book = TokenBook([first, second])
    assert book.port_owner(20005) is first and book.port_owner(20002) is None
    assert book.reserved_ports() == {20001, 20005}


BAD_FILES = [
    ("not-toml", "[[token]\nsha256 =", "cannot read tokens file"),
    ("empty", "", "defines no [[token]] entries"),
    ("short-digest", '[[token]]\nsha256 = "abcd"\n', "sha256 must be 64 hex digits"),
    ("non-hex-digest", '[[token]]\nsha256 = "' + "g" * 64 + '"\n', "sha256 must be 64 hex digits"),
    ("no-secret", '[[token]]\nlabel = "x"\n', "needs `sha256"),
    ("dot-dot-name", f'[[token]]\nsha256 = "{DIGEST_A}"\nnames = ["../etc"]\n', "token #1: tunnel name"),
    ("system-name", f'[[token]]\nsha256 = "{DIGEST_A}"\nnames = ["www"]\n', "reserved for the relay itself"),
    ("long-name", f'[[token]]\nsha256 = "{DIGEST_A}"\nnames = ["{"a" * 64}"]\n', "the limit is 63"),
    ("port-as-string", f'[[token]]\nsha256 = "{DIGEST_A}"\nports = ["20001"]\n', "ports must be an array"),
    ("port-zero", f'[[token]]\nsha256 = "{DIGEST_A}"\nports = [0]\n', "port numbers (1-65535)"),
    ("port-too-big", f'[[token]]\nsha256 = "{DIGEST_A}"\nports = [65536]\n', "port numbers (1-65535)"),
    ("port-not-array", f'[[token]]\nsha256 = "{DIGEST_A}"\nports = 20001\n', "ports must be an array"),
    ("port-boolean", f'[[token]]\nsha256 = "{DIGEST_A}"\nports = [true]\n', "ports must be an array"),
    ("port-twice", f'[[token]]\nsha256 = "{DIGEST_A}"\nlabel = "one"\nports = [20001]\n'
                   f'[[token]]\nsha256 = "{DIGEST_B}"\nports = [20002, 20001]\n',
     "token #2: port 20001 is already reserved by 'one'"),
    ("negative-quota", f'[[token]]\nsha256 = "{DIGEST_A}"\nmax_tunnels = -2\n', "can't be negative"),
]


@pytest.mark.parametrize("text, message", [row[1:] for row in BAD_FILES], ids=[row[0] for row in BAD_FILES])
def test_bad_tokens_files_are_refused_with_the_entry_named(tmp_path, text, message):
    with pytest.raises(TokenFileError) as refused:
        load_tokens_file(write(tmp_path, text))
    assert message in str(refused.value)


def test_missing_tokens_file(tmp_path):
    with pytest.raises(TokenFileError, match="cannot read tokens file"):
        load_tokens_file(tmp_path / "absent.toml")


# ----------------------------------------------------------------------------------------------- token book

GRANT_A = Grant("a", DIGEST_A, frozenset({"reserved-a"}), 2)
GRANT_B = Grant("b", DIGEST_B)


def test_open_book_lets_anyone_in():
    book = TokenBook()
    assert book.verify(None) is OPEN_GRANT and book.verify("anything") is OPEN_GRANT


@pytest.mark.parametrize("token", [None, "", "alpha-secret ", "ALPHA-SECRET", "alpha-secre", DIGEST_A, "beta"])
def test_wrong_tokens_get_nothing(token):
    assert TokenBook([GRANT_A, GRANT_B]).verify(token) is None


def test_right_tokens_get_their_own_grant():
    book = TokenBook([GRANT_A, GRANT_B])
    assert book.verify("alpha-secret") is GRANT_A and book.verify("beta-secret") is GRANT_B
    assert book.owner_of("reserved-a") is GRANT_A and book.owner_of("free") is None


@pytest.mark.parametrize("token", ["alpha-secret", "beta-secret", "nobody"])
def test_every_grant_is_compared_in_constant_time_whatever_matches(monkeypatch, token):
    """The lookup cost must not tell a guesser how close it got or which entry matched."""
    calls = []
    real = hmac.compare_digest

    def counting(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr("portway.auth.hmac.compare_digest", counting)
    TokenBook([GRANT_A, GRANT_B, Grant("c", hash_token("c"))]).verify(token)
    assert calls == [(64, 64)] * 3


# ----------------------------------------------------------------------------------------------- throttle

def test_throttle_blocks_after_too_many_failures_then_forgives():
    throttle = FailureThrottle(max_failures=3, window=60.0)
    for t in (0.0, 1.0, 2.0):
        assert not throttle.blocked("1.2.3.4", t)
        throttle.record_failure("1.2.3.4", t)
    assert throttle.blocked("1.2.3.4", 2.5)
    assert not throttle.blocked("5.6.7.8", 2.5)  # per address
    assert throttle.blocked("1.2.3.4", 59.9)
    assert not throttle.blocked("1.2.3.4", 60.5)  # the oldest failure left the window


def test_throttle_memory_is_bounded_under_address_spraying():
    throttle = FailureThrottle(max_failures=2, window=60.0, max_tracked=100)
    for i in range(10_000):
        throttle.record_failure(f"10.0.{i // 256}.{i % 256}", 0.0)
    assert len(throttle._failures) <= 100


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.floats(0, 5, allow_nan=False)), max_size=60),
       st.integers(1, 6), st.floats(0.5, 3))
def test_throttle_matches_a_sliding_window_model(events, max_failures, window):
    throttle = FailureThrottle(max_failures=max_failures, window=window)
    history: dict[str, list[float]] = {}
    now = 0.0
    for address, step in events:
        now += step
        recent = [t for t in history.get(address, []) if t > now - window]
        assert throttle.blocked(address, now) == (len(recent) >= max_failures)
        wait = throttle.retry_after(address, now)
        if len(recent) >= max_failures:
            assert wait == pytest.approx(recent[len(recent) - max_failures] + window - now)
        else:
            assert wait is None
        throttle.record_failure(address, now)
        history.setdefault(address, []).append(now)
        assert all(len(times) <= max_failures for times in throttle._failures.values())


def test_throttle_keeps_only_the_failure_times_that_can_decide():
    throttle = FailureThrottle(max_failures=3, window=60.0)
    for t in range(1000):
        throttle.record_failure("1.2.3.4", t / 100)
    assert list(throttle._failures["1.2.3.4"]) == [9.97, 9.98, 9.99]
    assert throttle.retry_after("1.2.3.4", 10.0) == pytest.approx(59.97)


def test_throttle_refuses_nonsense_limits():
    for kwargs in ({"max_failures": 0}, {"window": 0.0}, {"max_tracked": 0}):
        with pytest.raises(ValueError):
            FailureThrottle(**kwargs)


# ----------------------------------------------------------------------------------------------- basic-auth guard

@pytest.mark.parametrize("address, key", [
    ("198.51.100.7", "198.51.100.7"),
    ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
    ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),
    ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
    ("::ffff:198.51.100.7", "198.51.100.7"),
    ("not-an-address", "not-an-address"),
])
def test_addresses_are_counted_by_ipv4_address_or_ipv6_slash_64(address, key):
    assert address_key(address) == key


def test_guard_throttles_an_address_after_its_failures_on_any_tunnel():
    guard = BasicAuthGuard(per_address=3, per_tunnel=100, window=60.0)
    for t, tunnel in ((0.0, "a"), (1.0, "b"), (2.0, "a")):  # failures on several tunnels add up
        assert guard.refusal(tunnel, "192.0.2.1", True, t) is None
        guard.record(tunnel, "192.0.2.1", False, t)
    for presents_credentials in (True, False):  # refused with or without credentials
        assert guard.refusal("c", "192.0.2.1", presents_credentials, 3.0) == pytest.approx(57.0)
    assert guard.refusal("a", "192.0.2.2", True, 3.0) is None  # other addresses are not affected
    assert guard.refusal("a", "192.0.2.1", True, 60.0) is None  # the first failure left the window


def test_guard_counts_an_ipv6_slash_64_as_one_address():
    guard = BasicAuthGuard(per_address=2, window=60.0)
    guard.record("a", "2001:db8::1", False, 0.0)
    guard.record("a", "2001:db8::2", False, 0.0)
    assert guard.refusal("a", "2001:db8::ffff", True, 1.0) is not None
    assert guard.refusal("a", "2001:db8:0:1::1", True, 1.0) is None


def test_guard_locks_a_tunnel_guessed_from_many_addresses_but_not_for_known_visitors():
    guard = BasicAuthGuard(per_address=10, per_tunnel=5, window=60.0, trust_period=600.0)
    guard.record("t", "198.51.100.1", True, 0.0)  # a visitor who logged in earlier
    for i in range(5):
        guard.record("t", f"203.0.113.{i}", False, 10.0 + i)
    assert guard.refusal("t", "203.0.113.200", True, 15.0) == pytest.approx(55.0)  # locked for newcomers
    assert guard.refusal("t", "203.0.113.200", False, 15.0) is None  # no credentials: the usual 401
    assert guard.refusal("t", "198.51.100.1", True, 15.0) is None  # the known visitor carries on
    assert guard.refusal("other", "203.0.113.200", True, 15.0) is None  # other tunnels are not locked
    assert guard.refusal("t", "203.0.113.200", True, 70.0) is None  # the oldest failure left the window
    assert not guard.trusted("t", "198.51.100.1", 600.0)  # trust lasts trust_period after the last login


def test_guard_memory_is_bounded_under_address_spraying():
    guard = BasicAuthGuard(per_address=2, per_tunnel=3, window=60.0, max_tracked=100)
    for i in range(5000):
        address = f"10.{i // 65536}.{i // 256 % 256}.{i % 256}"
        guard.record(f"tunnel-{i}", address, i % 2 == 0, float(i))
    assert len(guard.addresses._failures) <= 100 and len(guard.tunnels._failures) <= 100
    assert len(guard._trusted) <= 100
    assert all(len(times) <= 3 for times in guard.tunnels._failures.values())


def basic_head(authorization: bytes | None, host: bytes = b"t.x"):
    raw = b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n"
    if authorization is not None:
        raw += b"Authorization: " + authorization + b"\r\n"
    return RequestParser().feed(raw + b"\r\n")[0]


RIGHT = b"Basic " + base64.b64encode(b"user:right")


def status_of(policy, guard, peer: str, authorization: bytes | None, now: float, tunnel: str = "t"):
    try:
        policy.check(peer, basic_head(authorization), guard, tunnel, now)
    except HttpError as error:
        return error.status, error.headers
    return 200, None


def test_policy_answers_429_with_retry_after_and_never_compares_a_throttled_password():
    from portway.relay.tunnels import AccessPolicy

    policy = AccessPolicy(basic_auth=RIGHT)
    guard = BasicAuthGuard(per_address=3, per_tunnel=100, window=60.0)
    for _ in range(20):  # a browser's credential-less requests are not guesses
        assert status_of(policy, guard, "192.0.2.1", None, 0.0) == (401, None)
    for i in range(3):
        assert status_of(policy, guard, "192.0.2.1", b"Basic " + base64.b64encode(b"user:%d" % i), 1.0)[0] == 401
    assert status_of(policy, guard, "192.0.2.1", RIGHT, 1.5) == (429, [("Retry-After", "60")])
    assert status_of(policy, guard, "192.0.2.1", None, 1.5)[0] == 429
    assert status_of(policy, guard, "192.0.2.2", RIGHT, 1.5) == (200, None)
    assert status_of(policy, guard, "192.0.2.1", RIGHT, 61.0) == (200, None)
    assert AccessPolicy().check("192.0.2.1", basic_head(None), guard, "t", 0.0) is None  # no basic auth: no guard


GUARD_LIMITS = {"per_address": 3, "per_tunnel": 5, "window": 10.0, "trust_period": 30.0}


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "b"]), st.integers(0, 7), st.sampled_from([None, "wrong", "right"]),
                          st.sampled_from([0.0, 0.1, 1.0, 4.0])), max_size=80))
def test_guard_matches_the_policy_it_documents(requests):
    """The guard against a model written straight from its docstring, kept with whole histories and lists."""
    from portway.relay.tunnels import AccessPolicy

    policy = AccessPolicy(basic_auth=RIGHT)
    guard = BasicAuthGuard(**GUARD_LIMITS)
    window, trust = GUARD_LIMITS["window"], GUARD_LIMITS["trust_period"]
    by_address: dict[str, list[float]] = {}
    by_tunnel: dict[str, list[float]] = {}
    logged_in: dict[tuple[str, str], float] = {}
    now = 0.0
    for tunnel, host, credentials, step in requests:
        now += step
        address = f"192.0.2.{host}"
        address_failures = [t for t in by_address.get(address, []) if t > now - window]
        tunnel_failures = [t for t in by_tunnel.get(tunnel, []) if t > now - window]
        known = now - logged_in.get((tunnel, address), -1e9) < trust
        if len(address_failures) >= GUARD_LIMITS["per_address"]:
            expected = 429
        elif credentials and not known and len(tunnel_failures) >= GUARD_LIMITS["per_tunnel"]:
            expected = 429
        elif credentials == "right":
            expected = 200
            logged_in[tunnel, address] = now
        else:
            expected = 401
            if credentials:
                by_address.setdefault(address, []).append(now)
                by_tunnel.setdefault(tunnel, []).append(now)
        authorization = {None: None, "wrong": b"Basic " + base64.b64encode(b"user:wrong"), "right": RIGHT}[credentials]
        assert status_of(policy, guard, address, authorization, now, tunnel)[0] == expected


# ----------------------------------------------------------------------------------------------- secure default

@pytest.mark.parametrize("bind", ["127.0.0.1", "127.9.8.7", "::1", "localhost"])
def test_loopback_relay_may_run_without_tokens(bind):
    from portway.relay.server import check_secure_default

    check_secure_default(RelayConfig(bind=bind))


@pytest.mark.parametrize("bind", ["0.0.0.0", "::", "192.0.2.1", "2001:db8::1", "relay.example.com", ""])
def test_reachable_relay_without_tokens_refuses_unless_told(bind):
    from portway.errors import InsecureConfiguration
    from portway.relay.server import check_secure_default

    with pytest.raises(InsecureConfiguration, match="--open"):
        check_secure_default(RelayConfig(bind=bind))
    check_secure_default(RelayConfig(bind=bind, open_relay=True))
    check_secure_default(RelayConfig(bind=bind, grants=(GRANT_A,)))


def head_with(*headers: bytes):
    raw = b"GET /_portway/agent HTTP/1.1\r\nHost: r\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n"
    return RequestParser().feed(raw)[0]


@pytest.mark.parametrize("header, token", [
    (b"Authorization: Bearer abc", "abc"),
    (b"Authorization: bearer abc ", "abc"),
    (b"Authorization: Basic YWJj", None),
    (b"Authorization: Bearerabc", None),
    (b"Proxy-Authorization: Bearer abc", None),
])
def test_agent_token_comes_from_the_bearer_authorization_only(header, token):
    from portway.proto.control import bearer_token

    assert bearer_token(head_with(header)) == token
