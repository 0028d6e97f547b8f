"""The agent-link handshake (proto/control.py) without sockets: the agent's request as the relay reads it, the
relay's answers as the agent reads them, however the bytes are split."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from portway.errors import HttpError, RegistrationError
from portway.proto.control import NOT_A_RELAY, AgentHandshake, Granted, LinkGrant, LinkRequest, refusal
from portway.proto.http1 import RequestParser


def parsed(request: LinkRequest) -> LinkRequest:
    raw = request.encode("relay.example:8000")
    head = RequestParser().feed(raw)[0]
    path, _, query = head.target.decode().partition("?")
    assert path == "/_portway/agent" and head.upgrade == b"portway-mux"
    return LinkRequest.parse(head, query)


@settings(max_examples=200, deadline=None)
@given(
    name=st.none() | st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True),
    token=st.none() | st.text(alphabet="abcdefXYZ0123456789-_.", min_size=1, max_size=30),
    resume_key=st.none() | st.text(alphabet="abcXYZ019-_", min_size=1, max_size=32),
    basic_auth=st.none() | st.tuples(st.text(min_size=1, max_size=8).filter(lambda u: ":" not in u),
                                     st.text(max_size=8)).map(":".join),
    allow_ip=st.lists(st.sampled_from(["10.0.0.0/8", "127.0.0.2/32", "::1/128"]), max_size=3).map(tuple),
    resume_streams=st.booleans(),
    can_move=st.booleans(),
)
def test_what_the_agent_asks_is_what_the_relay_reads(name, token, resume_key, basic_auth, allow_ip, resume_streams,
                                                      can_move):
    request = LinkRequest(name, token, resume_key, basic_auth, allow_ip, resume_streams and resume_key is not None,
                          can_move=can_move)
    assert parsed(request) == request


def test_an_agent_that_does_not_say_it_understands_move_is_never_sent_one():
    assert not LinkRequest.parse(link_head(UPGRADE), "").can_move  # an older agent
    assert not LinkRequest.parse(link_head(UPGRADE + b"Portway-Move: yes\r\n"), "").can_move
    assert LinkRequest.parse(link_head(UPGRADE + b"Portway-Move: 1\r\n"), "").can_move


def test_streams_are_resumed_only_with_the_key_that_proves_the_name():
    head = link_head(UPGRADE + b"Portway-Resume-Streams: 1\r\n")
    assert not LinkRequest.parse(head, "").resume_streams
    assert b"Portway-Resume-Streams" not in LinkRequest(resume_streams=True).encode("r")


@pytest.mark.parametrize("resumed", [True, False])
def test_the_grant_says_whether_the_relay_still_had_the_streams(resumed):
    grant = LinkGrant("quiet-river", "http://q.localhost", "kkk", streams_resumed=resumed)
    assert AgentHandshake().receive_data(grant.encode()) == Granted(grant, b"")


@pytest.mark.parametrize("extra, status", [
    (b"Upgrade: websocket\r\nConnection: Upgrade\r\n", 426),
    (b"", 426),
    (b"Upgrade: portway-mux\r\nConnection: Upgrade\r\nPortway-Basic-Auth: !!notbase64\r\n", 400),
    (b"Upgrade: portway-mux\r\nConnection: Upgrade\r\nPortway-Basic-Auth: bm9jb2xvbg==\r\n", 400),  # "nocolon"
    # base64 with junk in it is refused, not read leniently as "u:p"
    (b"Upgrade: portway-mux\r\nConnection: Upgrade\r\nPortway-Basic-Auth: dTpw!!\r\n", 400),
    (b"Upgrade: portway-mux\r\nConnection: Upgrade\r\nPortway-Basic-Auth: dT*pw\r\n", 400),
    (b"Upgrade: portway-mux\r\nConnection: Upgrade\r\nPortway-Basic-Auth: //8=\r\n", 400),  # not UTF-8
])
def test_malformed_link_requests_are_refused(extra, status):
    head = RequestParser().feed(b"GET /_portway/agent HTTP/1.1\r\nHost: r\r\n" + extra + b"\r\n")[0]
    with pytest.raises(HttpError) as refused:
        LinkRequest.parse(head, "")
    # the agent prints the message: it must say something
    assert refused.value.status == status and isinstance(refused.value.message, str) and refused.value.message


def split_feed(raw: bytes, cut: int):
    handshake = AgentHandshake()
    outcome = None
    for piece in (raw[:cut], raw[cut:]):
        if piece and outcome is None:
            outcome = handshake.receive_data(piece)
    return outcome


GRANT = LinkGrant("quiet-river", "http://quiet-river.localhost:8000", "k" * 32)


def test_a_grant_is_read_whole_or_split_with_the_link_bytes_after_it():
    head = GRANT.encode()
    raw = head + b"\x00\x01frames"
    for cut in range(1, len(raw)):
        # what came in the read that completed the head is handed over; later reads are the session's
        link_bytes = raw[len(head):cut] if cut >= len(head) else raw[len(head):]
        assert split_feed(raw, cut) == Granted(GRANT, link_bytes)


@pytest.mark.parametrize("status, message", [(401, "the token was not accepted by this relay"),
                                             (409, "tunnel name 'x' is already in use"), (429, "slow down")])
def test_a_refusal_carries_the_relays_status_and_message(status, message):
    raw = refusal(status, message)
    assert json.loads(raw.split(b"\r\n\r\n", 1)[1]) == {"message": message}
    for cut in (1, len(raw) // 2, len(raw)):
        with pytest.raises(RegistrationError) as refused:
            split_feed(raw, cut)
        assert (refused.value.status, refused.value.message) == (status, message)


@pytest.mark.parametrize("raw, fragment", [
    (b"SSH-2.0-OpenSSH_9.2\r\n", "not as a Portway relay"),
    (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
     "not as a Portway relay"),
    (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: portway-mux\r\nConnection: Upgrade\r\n\r\n", "Portway-"),
])
def test_answers_that_are_not_a_relays_are_refused_clearly(raw, fragment):
    with pytest.raises(RegistrationError) as refused:
        handshake = AgentHandshake()
        handshake.receive_data(raw)
        handshake.receive_data(b"")
    assert refused.value.status == 502 and fragment.lower() in refused.value.message.lower()


def test_a_foreign_web_page_is_not_printed_but_the_relays_own_pages_are():
    from portway.proto.pages import error_response

    foreign = (b"HTTP/1.1 404 Not Found\r\nContent-Type: text/html\r\nContent-Length: 40\r\n\r\n"
               b"<html><body><h1>nginx</h1></body></html>")
    with pytest.raises(RegistrationError) as refused:
        AgentHandshake().receive_data(foreign)
    assert "nginx" not in refused.value.message and "not as a Portway relay" in refused.value.message
    with pytest.raises(RegistrationError) as refused:
        AgentHandshake().receive_data(error_response(429, "Too many connections from <your> address.", close=True))
    assert (refused.value.status, refused.value.message) == (429, "Too many connections from <your> address.")


# ------------------------------------------------------------------------ mutation-testing survivors (issue 18)

def link_head(extra: bytes):
    return RequestParser().feed(b"GET /_portway/agent HTTP/1.1\r\nHost: r\r\n" + extra + b"\r\n")[0]


UPGRADE = b"Upgrade: portway-mux\r\nConnection: Upgrade\r\n"


@pytest.mark.parametrize("upgrade", [b"Portway-Mux", b"PORTWAY-MUX", b" portway-mux "])
def test_the_link_upgrade_is_recognised_in_any_case(upgrade):
    head = link_head(b"Upgrade: " + upgrade + b"\r\nConnection: Upgrade\r\n")
    assert LinkRequest.parse(head, "name=quiet-river").name == "quiet-river"


def test_the_relay_reads_each_field_the_way_agents_spell_it():
    head = link_head(UPGRADE + b"Authorization: BEARER  tok-1 \r\nPortway-Resume:  key-9 \r\n"
                     b"Portway-Basic-Auth:  dTpwOnE= \r\nPortway-Allow-Ip: 10.0.0.0/8, ,::1/128,\r\n")
    request = LinkRequest.parse(head, "name=a&name=b")
    assert request == LinkRequest("a", "tok-1", "key-9", "u:p:q", ("10.0.0.0/8", "::1/128"))


@pytest.mark.parametrize("authorization", [b"Basic dTpw", b"Bearertok", b"Token tok"])
def test_only_a_bearer_authorization_is_a_token(authorization):
    head = link_head(UPGRADE + b"Authorization: " + authorization + b"\r\n")
    assert LinkRequest.parse(head, "").token is None


def test_a_request_without_options_asks_for_nothing():
    request = LinkRequest.parse(link_head(UPGRADE), "")
    assert request == LinkRequest()
    assert LinkRequest().encode("r:1") == (b"GET /_portway/agent HTTP/1.1\r\nHost: r:1\r\n"
                                         b"Upgrade: portway-mux\r\nConnection: Upgrade\r\n\r\n")


def test_a_name_is_quoted_into_the_target():
    raw = LinkRequest("a b&name=c").encode("r")
    assert raw.startswith(b"GET /_portway/agent?name=a%20b%26name%3Dc HTTP/1.1\r\n")
    assert parsed(LinkRequest("a b&name=c")).name == "a b&name=c"


def test_a_refusal_whose_body_arrives_in_pieces_is_read_whole():
    raw = refusal(409, "tunnel name 'quiet-river' is already in use")
    body_start = raw.index(b"\r\n\r\n") + 4
    handshake = AgentHandshake()
    for i in range(body_start):
        assert handshake.receive_data(raw[i:i + 1]) is None
    with pytest.raises(RegistrationError) as refused:
        for i in range(body_start, len(raw)):
            handshake.receive_data(raw[i:i + 1])
    assert (refused.value.status, refused.value.message) == (409, "tunnel name 'quiet-river' is already in use")


def test_a_grant_is_read_whatever_the_case_and_spacing_of_its_fields():
    raw = (b"HTTP/1.1 101 Switching Protocols\r\nUPGRADE: portway-mux\r\nConnection: Upgrade\r\n"
           b"PORTWAY-NAME:  quiet-river \r\nportway-url: http://q.localhost\r\nPortway-Resume: kkk\r\n\r\n")
    assert AgentHandshake().receive_data(raw) == Granted(LinkGrant("quiet-river", "http://q.localhost", "kkk"), b"")


@pytest.mark.parametrize("missing", ["Portway-Name", "Portway-Url", "Portway-Resume"])
def test_a_grant_without_one_of_its_fields_names_it(missing):
    raw = b"\r\n".join(line for line in GRANT.encode().split(b"\r\n") if not line.startswith(missing.encode()))
    with pytest.raises(RegistrationError) as refused:
        AgentHandshake().receive_data(raw)
    assert refused.value.status == 502 and missing.lower() in refused.value.message


def test_a_grant_carries_the_protocol_headers_the_agent_checks():
    lines = GRANT.encode().split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 101 Switching Protocols"
    assert b"Upgrade: portway-mux" in lines and b"Connection: Upgrade" in lines
    assert GRANT.encode().endswith(b"\r\n\r\n")


@pytest.mark.parametrize("body", [b'["message"]', b'{"msg": "x"}', b"42", b"not json"])
def test_a_json_answer_without_a_message_is_not_printed(body):
    raw = b"HTTP/1.1 403 Forbidden\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    with pytest.raises(RegistrationError) as refused:
        AgentHandshake().receive_data(raw)
    assert refused.value.status == 403 and refused.value.message == "HTTP 403: " + NOT_A_RELAY


def test_a_relay_page_without_a_paragraph_is_not_printed():
    from portway.proto.pages import PAGE_SIGNATURE

    body = b"<html><h1>x</h1>" + PAGE_SIGNATURE.encode() + b"</html>"
    raw = b"HTTP/1.1 500 Oops\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    with pytest.raises(RegistrationError) as refused:
        AgentHandshake().receive_data(raw)
    assert refused.value.message == "HTTP 500: " + NOT_A_RELAY


def test_a_connection_closed_before_any_answer_is_not_a_relay():
    handshake = AgentHandshake()
    assert handshake.receive_data(b"HTTP/1.1 101 Swi") is None
    with pytest.raises(RegistrationError) as refused:
        handshake.receive_data(b"")
    assert refused.value.status == 502 and refused.value.message == NOT_A_RELAY


def test_a_refusal_closes_the_connection():
    assert b"\r\nConnection: close\r\n" in refusal(401, "no")


@pytest.mark.parametrize("body", [b"<html><p>secret from a stranger</p></html>", b"\xff\xfe<p>x</p>\x80"])
def test_a_foreign_page_is_never_quoted_even_with_a_paragraph_or_bad_utf8(body):
    raw = b"HTTP/1.1 404 Not Found\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    with pytest.raises(RegistrationError) as refused:
        AgentHandshake().receive_data(raw)
    assert refused.value.message == "HTTP 404: " + NOT_A_RELAY


def test_the_first_paragraph_of_a_relay_page_is_its_message():
    from portway.proto.pages import PAGE_SIGNATURE

    body = ("<h1>t</h1><p>first &amp; real</p><p>second</p>" + PAGE_SIGNATURE).encode() + b"\xff"
    raw = b"HTTP/1.1 503 Unavailable\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    with pytest.raises(RegistrationError) as refused:
        AgentHandshake().receive_data(raw)
    assert (refused.value.status, refused.value.message) == (503, "first & real")
