"""The node-link handshake (proto/node_link.py) without sockets: a proof made with the cluster secret is
admitted once, anything else (wrong secret, wrong node, stale time, replay, no secret configured) is refused with
one line; stream preambles round-trip and malformed ones are refused however the bytes are split; so do the
going-away notices."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from portway.errors import HttpError
from portway.proto.http1 import RequestParser
from portway.proto.node_link import (MAX_CLOCK_SKEW, MAX_PREAMBLE, MAX_REMEMBERED_NONCES, AgentGoingAway,
                                     NodeLinkGate, NodeLinkRequest, LineReader, StreamPreamble, TunnelAnswer,
                                     parse_answer, parse_going_away, parse_preamble)

NOW = 1_800_000_000.0


def sent(request: NodeLinkRequest) -> NodeLinkRequest:
    head = RequestParser().feed(request.encode("10.0.0.1:8000"))[0]
    assert head.target == b"/_portway/node" and head.upgrade == b"portway-node"
    return NodeLinkRequest.parse(head)


def request(secret="s3cret", nonce="00" * 16, now=NOW, to_node="node-a") -> NodeLinkRequest:
    return sent(NodeLinkRequest.make(secret, "node-b", to_node, now, nonce))


def refusal(gate: NodeLinkGate, req: NodeLinkRequest, now: float = NOW) -> str:
    with pytest.raises(HttpError) as caught:
        gate.admit(req, now)
    assert caught.value.status == 403
    return caught.value.message


def test_a_proof_made_with_the_cluster_secret_is_admitted():
    NodeLinkGate("node-a", "s3cret").admit(request(), NOW)


def test_a_wrong_secret_is_refused():
    assert "--cluster-secret" in refusal(NodeLinkGate("node-a", "s3cret"), request(secret="other"))


def test_a_node_without_a_secret_accepts_no_node_link():
    assert "without --cluster-secret" in refusal(NodeLinkGate("node-a", None), request())


def test_a_proof_for_another_node_is_refused():
    assert "not node-c" in refusal(NodeLinkGate("node-a", "s3cret"), request(to_node="node-c"))


@pytest.mark.parametrize("offset", [MAX_CLOCK_SKEW + 1, -(MAX_CLOCK_SKEW + 1)])
def test_a_proof_too_far_from_the_clock_is_refused(offset):
    assert "clock" in refusal(NodeLinkGate("node-a", "s3cret"), request(now=NOW + offset))


def test_a_proof_at_the_edge_of_the_skew_is_admitted():
    NodeLinkGate("node-a", "s3cret").admit(request(now=NOW - MAX_CLOCK_SKEW), NOW)


def test_a_proof_is_good_once():
    gate = NodeLinkGate("node-a", "s3cret")
    gate.admit(request(), NOW)
    assert "used before" in refusal(gate, request())
    gate.admit(request(nonce="11" * 16), NOW)


def test_tampering_with_any_field_breaks_the_proof():
    good = request()
    gate = NodeLinkGate("node-a", "s3cret")
    for forged in (NodeLinkRequest("node-x", good.to_node, good.timestamp, good.nonce, good.proof),
                   NodeLinkRequest(good.from_node, good.to_node, good.timestamp + 1, good.nonce, good.proof),
                   NodeLinkRequest(good.from_node, good.to_node, good.timestamp, "22" * 16, good.proof)):
        assert "does not match" in refusal(gate, forged)


def test_remembered_nonces_are_bounded_and_expire():
    gate = NodeLinkGate("node-a", "s3cret")
    for index in range(MAX_REMEMBERED_NONCES):
        gate.admit(request(nonce=f"{index:032x}"), NOW)
    assert "too many" in refusal(gate, request(nonce="f" * 32))
    later = NOW + 2 * MAX_CLOCK_SKEW + 1  # every remembered proof is stale now: forgotten, room again
    gate.admit(request(nonce="f" * 32, now=later), later)


@pytest.mark.parametrize("missing", ["Portway-Node", "Portway-To-Node", "Portway-Time", "Portway-Nonce",
                                     "Portway-Proof"])
def test_a_request_lacking_a_field_is_a_bad_request(missing):
    raw = NodeLinkRequest.make("s", "node-b", "node-a", NOW, "00" * 16).encode("h:1").decode()
    raw = "\r\n".join(line for line in raw.split("\r\n") if not line.startswith(missing + ":")).encode()
    with pytest.raises(HttpError) as caught:
        NodeLinkRequest.parse(RequestParser().feed(raw)[0])
    assert caught.value.status == 400


def test_a_request_without_the_node_upgrade_is_refused():
    raw = b"GET /_portway/node HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    with pytest.raises(HttpError) as caught:
        NodeLinkRequest.parse(RequestParser().feed(raw)[0])
    assert caught.value.status == 426


@settings(max_examples=200, deadline=None)
@given(tunnel=st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True).filter(
           lambda name: name not in {"www", "api", "relay", "portway", "admin", "status", "metrics", "inspect"}),
       rest=st.binary(max_size=64), cut=st.integers(min_value=0, max_value=200))
def test_a_preamble_round_trips_however_split(tunnel, rest, cut):
    wire = StreamPreamble(tunnel).encode() + rest
    reader = LineReader()
    result = reader.feed(wire[:cut])
    if result is None:
        result = reader.feed(wire[cut:])
        assert result is not None
        after = result[1]
    else:  # the line ended in the first piece: what came after it there, then the second piece
        after = result[1] + wire[cut:]
    assert parse_preamble(result[0]) == StreamPreamble(tunnel) and after == rest


@pytest.mark.parametrize("line", [b"GET / HTTP/1.1", b"PORTWAY-NODE-STREAM web 1.2.3.4", b"PORTWAY-NODE-STREAM Web",
                                  b"PORTWAY-NODE-STREAM -web", b"PORTWAY-NODE-STREAM api", b"PORTWAY-NODE-STREAM"])
def test_a_malformed_preamble_is_refused(line):
    with pytest.raises(HttpError) as caught:
        parse_preamble(LineReader().feed(line + b"\r\n")[0])
    assert caught.value.status == 400


def test_a_preamble_without_an_end_is_bounded():
    reader = LineReader()
    assert reader.feed(b"P" * MAX_PREAMBLE) is None
    with pytest.raises(HttpError):
        reader.feed(b"P")


@pytest.mark.parametrize("answer", [
    TunnelAnswer(200), TunnelAnswer(200, "", "ab" * 32, ("10.0.0.0/8", "2001:db8::/32")),
    TunnelAnswer(502, "The agent for tunnel 'web' is not connected (agent reconnecting); try again."),
    TunnelAnswer(404, "There is no tunnel at web here.")])
def test_an_answer_round_trips(answer):
    line, rest = LineReader().feed(answer.encode() + b"GET")
    assert parse_answer(line) == answer and rest == b"GET"


@pytest.mark.parametrize("line", [b"HTTP/1.1 200 OK", b"PORTWAY-NODE-TUNNEL ok xyz -",
                                  b"PORTWAY-NODE-TUNNEL ok - 10.0.0.300", b"PORTWAY-NODE-TUNNEL refused 200 fine", b"PORTWAY-NODE-TUNNEL refused x y",
                                  b"PORTWAY-NODE-TUNNEL ok -"])
def test_a_line_that_is_no_answer_is_a_bad_gateway(line):
    with pytest.raises(HttpError) as caught:
        parse_answer(line)
    assert caught.value.status == 502


@pytest.mark.parametrize("tunnel", ["web", "a", "my-app-2"])
def test_a_going_away_notice_round_trips_and_is_not_a_preamble(tunnel):
    line, rest = LineReader().feed(AgentGoingAway(tunnel).encode() + b"after")
    assert parse_going_away(line) == AgentGoingAway(tunnel) and rest == b"after"
    with pytest.raises(HttpError):
        parse_preamble(line)
    with pytest.raises(HttpError):
        parse_going_away(StreamPreamble(tunnel).encode().rstrip())


@pytest.mark.parametrize("line", [b"PORTWAY-NODE-AWAY", b"PORTWAY-NODE-AWAY Web", b"PORTWAY-NODE-AWAY a b",
                                  b"PORTWAY-NODE-AWAY \xff"])
def test_a_malformed_going_away_notice_is_refused(line):
    with pytest.raises(HttpError) as caught:
        parse_going_away(line)
    assert caught.value.status == 400
