import random

import pytest

from portway.errors import HttpError
from portway.errors import InvalidName
from portway.proto.names import SYSTEM_NAMES, random_name, validate_name
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
    # a fresh router: the module's one caches routes, so a second look would not exercise the routing itself
    assert Router("example.com", SYSTEM_NAMES).route(host) == route


@pytest.mark.parametrize("host", [
    "", ":80", "a.example.com:x", "[::1",
    # a bracket must hold an IPv6 address and be followed by nothing but a port
    "[alpha.example.com]beta.example.com:80", "[alpha.example.com]", "[::1]x.example.com", "[::1]:80:80", "[]",
    "[v1.fe80::a]", "[::1%25eth0]",
    # ports: ASCII digits only, at most five, at most 65535
    "a.example.com:\u0663\u0660", "a.example.com:\uff18\uff10", "a.example.com:" + "8" * 20, "a.example.com:65536",
    "a.example.com:000080", "a.example.com:-1", "a.example.com:+80", "a.example.com: 80",
    # one trailing dot at most
    "a.example.com..", "a.example.com...:80", "..",
])
def test_bad_hosts(host):
    with pytest.raises(HttpError) as refused:
        hostname_of(host) if host else Router("example.com", SYSTEM_NAMES).route(host)
    # the visitor's 400 page says why (a message-less error could not be rendered)
    assert refused.value.status == 400 and isinstance(refused.value.message, str) and refused.value.message


@pytest.mark.parametrize("host, hostname", [
    ("a.example.com:", "a.example.com"), ("a.example.com:00080", "a.example.com"), ("a.example.com.:0", "a.example.com"),
    ("[::1]", "::1"), ("[2001:DB8::1]:65535", "2001:db8::1"), ("a.example.com.", "a.example.com"),
])
def test_host_spellings_rfc_3986_allows(host, hostname):
    assert hostname_of(host) == hostname


@pytest.mark.parametrize("raw, name", [("Quiet-River", "quiet-river"), ("a", "a"), ("a" * 63, "a" * 63), ("x1-2", "x1-2")])
def test_valid_names(raw, name):
    assert validate_name(raw) == name


@pytest.mark.parametrize("raw", ["", "-a", "a-", "../etc", "a" * 64, "a.b", "a_b", "www", "ünï"])
def test_invalid_names(raw):
    with pytest.raises(InvalidName):
        validate_name(raw)


def test_random_names_are_valid_and_free():
    taken = set()
    rng = random.Random(3)
    for _ in range(200):
        name = random_name(taken, rng)
        assert validate_name(name) == name and name not in taken
        taken.add(name)


def test_one_tunnel_takes_every_valid_host_and_still_refuses_bad_ones():
    from portway.proto.routing import OneTunnel

    router = OneTunnel("quiet-river", "localhost")
    for host in ("127.0.0.1:8001", "evil.example", "localhost", "[::1]:8001"):
        assert router.route(host) == ToTunnel("quiet-river")
    for host in ("", "a:99999", "[alpha]beta"):
        with pytest.raises(HttpError):
            router.route(host)


# ------------------------------------------------------------------------ mutation-testing survivors (issue 18)

@pytest.mark.parametrize("domain, base", [("Example.COM", "example.com"), ("example.com.", "example.com"),
                                          ("EXAMPLE.com.", "example.com"), ("Tunnels.BOX.", "tunnels.box")])
def test_the_relays_domain_is_matched_however_it_was_configured(domain, base):
    router = Router(domain, SYSTEM_NAMES)
    assert router.domain == base
    assert router.route(f"quiet-river.{base}") == ToTunnel("quiet-river")
    assert router.route(base.upper()) == ToRelay()
    assert router.route(f"quiet-river.{base}x") == NotServed(f"quiet-river.{base}x")


@pytest.mark.parametrize("host, hostname", [
    ("  a.example.com  ", "a.example.com"), ("\ta.example.com:80 ", "a.example.com"), (" [::1]:80 ", "::1"),
    ("[::FFFF:1.2.3.4]:", "::ffff:1.2.3.4"), ("a.example.com:65535", "a.example.com"), ("a.example.com:99999", None),
    ("a.example.com:1", "a.example.com"), ("[::1]:65536", None), ("[::1]:x", None), ("[::1]:", "::1"),
])
def test_host_header_edges(host, hostname):
    if hostname is None:
        with pytest.raises(HttpError) as refused:
            hostname_of(host)
        assert refused.value.status == 400
    else:
        assert hostname_of(host) == hostname


def test_a_repeated_host_header_value_routes_the_same_from_the_cache():
    router = Router("example.com", SYSTEM_NAMES)
    for _ in range(3):
        assert router.route("Quiet-River.example.com") == ToTunnel("quiet-river")
        assert router.route("evil.com") == NotServed("evil.com")
        assert router.route("www.example.com") == ToRelay()
        with pytest.raises(HttpError):
            router.route("a.example.com:x")


def test_routes_stay_right_after_the_cache_is_emptied():
    router = Router("example.com", SYSTEM_NAMES)
    for i in range(router.CACHE_SIZE + 10):
        assert router.route(f"n{i}.example.com") == ToTunnel(f"n{i}")
    assert router.route("n0.example.com") == ToTunnel("n0")


def test_one_tunnel_keeps_the_domain_it_announces():
    from portway.proto.routing import OneTunnel

    assert OneTunnel("quiet-river", "localhost").domain == "localhost"


@pytest.mark.parametrize("host", ["10.1.2.3", "[fe80::1]", "[2001:db8::1]:443", "0.0.0.0"])
def test_any_ip_literal_reaches_the_relay_itself(host):
    assert Router("example.com", SYSTEM_NAMES).route(host) == ToRelay()


@pytest.mark.parametrize("name", sorted(SYSTEM_NAMES))
def test_every_system_name_is_the_relay_not_a_tunnel(name):
    assert Router("example.com", SYSTEM_NAMES).route(f"{name}.example.com") == ToRelay()
