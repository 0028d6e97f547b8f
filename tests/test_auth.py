"""Agent authentication without sockets: token digests, the tokens file, constant-time lookup, the failure
throttle and the secure default. The claim rules that use them are in tests/policy/test_claims.py."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from portway.auth import OPEN_GRANT, FailureThrottle, Grant, TokenBook, hash_token, load_tokens_file
from portway.errors import TokenFileError
from portway.config import RelayConfig
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
max_tunnels = 3

[[token]]
sha256 = "{DIGEST_B}"
""")
    first, second = load_tokens_file(path)
    assert first == Grant("team-a", DIGEST_A, frozenset({"reserved-a", "other"}), 3)
    assert second == Grant("token-2", DIGEST_B, frozenset(), 0)


BAD_FILES = [
    ("not-toml", "[[token]\nsha256 =", "cannot read tokens file"),
    ("empty", "", "defines no [[token]] entries"),
    ("short-digest", '[[token]]\nsha256 = "abcd"\n', "sha256 must be 64 hex digits"),
    ("non-hex-digest", '[[token]]\nsha256 = "' + "g" * 64 + '"\n', "sha256 must be 64 hex digits"),
    ("no-secret", '[[token]]\nlabel = "x"\n', "needs `sha256"),
    ("dot-dot-name", f'[[token]]\nsha256 = "{DIGEST_A}"\nnames = ["../etc"]\n', "token #1: tunnel name"),
    ("system-name", f'[[token]]\nsha256 = "{DIGEST_A}"\nnames = ["www"]\n', "reserved for the relay itself"),
    ("long-name", f'[[token]]\nsha256 = "{DIGEST_A}"\nnames = ["{"a" * 64}"]\n', "the limit is 63"),
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
        throttle.record_failure(address, now)
        history.setdefault(address, []).append(now)


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
