"""The localtunnel protocol's decisions, without sockets: registrations, answers, pool admission."""

from __future__ import annotations

import base64
import json

import httptools
import pytest

from portway.proto import lt_protocol as lt
from portway.proto.lt_protocol import Admission, RegistrationRequest


@pytest.mark.parametrize(
    "path, query, expected",
    [
        ("/", "new", RegistrationRequest(None)),
        ("/", "new=1", RegistrationRequest(None)),
        ("/", "x=1&new", RegistrationRequest(None)),
        ("//", "new", RegistrationRequest(None)),  # --host with a trailing slash
        ("/forwstest", "", RegistrationRequest("forwstest")),
        ("//forwstest", "", RegistrationRequest("forwstest")),
        ("/MyApp", "", RegistrationRequest("MyApp")),  # case is folded when the name is claimed
        ("/bad_name", "", RegistrationRequest("bad_name")),  # refused with a message, not ignored
        ("/my%2Dapp", "", RegistrationRequest("my-app")),
        ("/forwstest", "new", RegistrationRequest("forwstest")),
        ("/Xenon", "", RegistrationRequest("Xenon")),  # only slashes are stripped from the front
    ],
)
def test_registrations(path, query, expected):
    assert lt.parse_registration(path, query) == expected


@pytest.mark.parametrize(
    "path, query",
    [
        ("/", ""),  # the landing page
        ("", "new"),
        ("/", "renew"),
        ("/favicon.ico", ""),
        ("/robots.txt", ""),
        ("/api/status", ""),
        ("/api/tunnels/x/status", ""),
        ("/_portway/agent", ""),
        ("/a/b", ""),
        ("/name/", ""),
        ("/%2F", ""),
        ("*", ""),
        ("/%20", ""),
    ],
)
def test_not_registrations(path, query):
    assert lt.parse_registration(path, query) is None


@pytest.mark.parametrize(
    "path, name",
    [
        ("/api/tunnels/forwstest/status", "forwstest"),
        ("//api/tunnels/ForwsTest/status", "forwstest"),
        ("/api/tunnels//status", None),
        ("/api/tunnels/x/status/more", None),
        ("/api/tunnels/x", None),
        ("/api/status", None),
        ("/api/other/x/status", None),
    ],
)
def test_tunnel_status_path(path, name):
    assert lt.tunnel_status_name(path) == name


def parse_response(raw: bytes):
    seen = {}

    class Sink:
        def on_header(self, name, value):
            seen.setdefault("headers", {})[name.decode().lower()] = value.decode()

        def on_body(self, body):
            seen["body"] = seen.get("body", b"") + body

    parser = httptools.HttpResponseParser(Sink())
    parser.feed_data(raw)
    return parser.get_status_code(), seen["headers"], json.loads(seen["body"])


def test_registration_answer_has_the_fields_lt_reads():
    answer = lt.registration_answer("forwstest", 41234, "http://forwstest.example.com:8000")
    assert answer == {"id": "forwstest", "port": 41234, "max_conn_count": lt.MAX_SOCKETS,
                      "url": "http://forwstest.example.com:8000"}
    status, headers, body = parse_response(lt.json_response(200, answer))
    assert status == 200 and body == answer
    assert headers["content-type"] == "application/json"
    assert int(headers["content-length"]) == len(json.dumps(answer))


def test_refusal_is_a_2xx_other_than_200_with_a_message():
    # lt retries anything outside 200-299 silently forever; 201 + {"message"} makes it print and exit
    status, headers, body = parse_response(lt.refusal_response(lt.taken_message("forwstest")))
    assert status == 201
    assert body == {"message": "name forwstest is taken"}
    assert headers["connection"] == "keep-alive"
    assert parse_response(lt.refusal_response("x", close=True))[1]["connection"] == "close"


def test_answers_carry_their_status_line():
    assert lt.json_response(200, {}).startswith(b"HTTP/1.1 200 OK\r\n")
    assert lt.refusal_response("no").startswith(b"HTTP/1.1 201 Created\r\n")
    assert lt.json_response(404, {}).startswith(b"HTTP/1.1 404 Not Found\r\n")
    assert lt.json_response(599, {}).startswith(b"HTTP/1.1 599 Error\r\n")
    assert parse_response(lt.json_response(200, {"id": "x"}))[1]["connection"] == "keep-alive"  # lt reuses it


def test_refused_carries_the_message_for_the_lt_user():
    from portway.errors import LtRefused

    refused = LtRefused(lt.taken_message("forwstest"))
    assert refused.message == str(refused) == "name forwstest is taken"


def test_tunnel_status_shape():
    assert lt.tunnel_status(7) == {"connected_sockets": 7}


def basic(credentials: str) -> bytes:
    return b"Basic " + base64.b64encode(credentials.encode())


@pytest.mark.parametrize(
    "header, token",
    [
        (None, None),
        (basic("lt:s3cret"), "s3cret"),
        (basic("s3cret:"), "s3cret"),  # `lt -h http://TOKEN@relay`
        (basic("user:"), "user"),
        (basic(":"), None),
        (b"basic " + base64.b64encode(b"a:b"), "b"),
        (b"Bearer s3cret", None),
        (b"Basic !!!notbase64", None),
        (b"Basic " + base64.b64encode(b"\xff\xfe:x"), None),
        (b"Basic !" + base64.b64encode(b"lt:s3cret"), None),  # junk is refused, not skipped over
        (basic("lt:to:ken"), "to:ken"),  # the user name ends at the first colon; the token may hold more
        (b"Basic  " + base64.b64encode(b"lt:s3cret"), "s3cret"),  # more than one space after the scheme
    ],
)
def test_token_from_basic_credentials(header, token):
    assert lt.token_from_basic(header) == token


@pytest.mark.parametrize(
    "raw, normal",
    [
        ("127.0.0.1", "127.0.0.1"),
        ("::ffff:127.0.0.1", "127.0.0.1"),
        ("::FFFF:7f00:1", "127.0.0.1"),
        ("0:0:0:0:0:0:0:1", "::1"),
        ("fe80::1%eth0", "fe80::1"),
        ("not-an-ip", "not-an-ip"),
    ],
)
def test_normalize_ip(raw, normal):
    assert lt.normalize_ip(raw) == normal


def test_pool_admits_only_the_registering_address_up_to_the_advertised_count():
    assert lt.admit_socket("127.0.0.1", "127.0.0.1", 0) is Admission.ACCEPT
    assert lt.admit_socket("::ffff:127.0.0.1", "127.0.0.1", 9) is Admission.ACCEPT
    assert lt.admit_socket("127.0.0.1", "127.0.0.1", lt.MAX_SOCKETS) is Admission.FULL
    assert lt.admit_socket("127.0.0.2", "127.0.0.1", 0) is Admission.FOREIGN
    assert lt.admit_socket("127.0.0.2", "127.0.0.1", lt.MAX_SOCKETS) is Admission.FOREIGN
    assert lt.admit_socket("10.0.0.1", "10.0.0.1", 2, limit=3) is Admission.ACCEPT
    assert lt.admit_socket("10.0.0.1", "10.0.0.1", 3, limit=3) is Admission.FULL


def test_take_over_only_by_the_same_address_once_no_socket_is_left():
    assert lt.may_take_over("127.0.0.1", "127.0.0.1", 0)
    assert lt.may_take_over("127.0.0.1", "::ffff:127.0.0.1", 0)
    assert not lt.may_take_over("127.0.0.1", "127.0.0.1", 1)
    assert not lt.may_take_over("127.0.0.1", "127.0.0.2", 0)


def test_token_messages_tell_the_lt_user_where_the_token_goes():
    assert "lt -h http://lt:TOKEN@" in lt.token_message(given=False)
    assert "not accepted" in lt.token_message(given=True)
