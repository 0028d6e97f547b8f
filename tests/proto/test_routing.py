import pytest

from portway.errors import HttpError
from portway.proto.names import SYSTEM_NAMES, InvalidName, random_name, validate_name
from portway.proto.routing import NotServed, Router, ToRelay, ToTunnel, hostname_of

router = Router("example.com", SYSTEM_NAMES)


@pytest.mark.parametrize(
    "host, route",
    [
        ("quiet-river.example.com", ToTunnel("quiet-river")),
        ("Quiet-River.EXAMPLE.com.:8443", ToTunnel("quiet-river")),
        ("example.com", ToRelay()),
        ("example.com:8000", ToRelay()),
        ("127.0.0.1:8000", ToRelay()),
        ("[::1]:8000", ToRelay()),
        ("localhost", ToRelay()),
        ("www.example.com", ToRelay()),
        ("a.b.example.com", NotServed("a.b.example.com")),
        ("evil.com", NotServed("evil.com")),
        ("example.com.evil.com", NotServed("example.com.evil.com")),
        ("xexample.com", NotServed("xexample.com")),
    ],
)
def test_routes(host, route):
    assert router.route(host) == route


@pytest.mark.parametrize("host", ["", ":80", "a.example.com:x", "[::1"])
def test_bad_hosts(host):
    with pytest.raises(HttpError):
        hostname_of(host) if host else router.route(host)


@pytest.mark.parametrize("raw, name", [("Quiet-River", "quiet-river"), ("a", "a"), ("a" * 63, "a" * 63), ("x1-2", "x1-2")])
def test_valid_names(raw, name):
    assert validate_name(raw) == name


@pytest.mark.parametrize("raw", ["", "-a", "a-", "../etc", "a" * 64, "a.b", "a_b", "www", "ünï"])
def test_invalid_names(raw):
    with pytest.raises(InvalidName):
        validate_name(raw)


def test_random_names_are_valid_and_free():
    taken = set()
    for _ in range(200):
        name = random_name(taken)
        assert validate_name(name) == name and name not in taken
        taken.add(name)
