"""The node-link handshake: how one relay node of a cluster proves to another that it is a member, and how each
stream on the link says which tunnel it is for.

A node (B) that receives a visitor for a tunnel another node (A) holds opens one multiplexed link to A's
--advertise address and reuses it for every later visitor. The link starts as an HTTP/1.1 Upgrade request whose
proof is an HMAC-SHA256, keyed with the cluster secret, over who is asking, whom it asks, when, and a nonce:

    B → A   GET /_portway/node HTTP/1.1
            Upgrade: portway-node           Connection: Upgrade
            Portway-Node: B                 Portway-To-Node: A
            Portway-Time: UNIX-SECONDS      Portway-Nonce: 32 hex digits
            Portway-Proof: hex(HMAC(secret, "portway node link" B A TIME NONCE))
    A → B   HTTP/1.1 101 Switching Protocols (then frames, mux.py), or an error status

The secret itself never crosses the wire; a proof is good for MAX_CLOCK_SKEW seconds either side of A's clock
and for one use (A remembers the nonces it accepted for that long, boundedly). A node without --cluster-secret
accepts no node link at all: membership would rest on nothing but network reachability.

Every stream B opens on the link starts with one preamble line naming the tunnel; A answers with one line: the
tunnel's visitor rules (B checks them, as for a tunnel of its own) or a refusal. What follows is exactly what B
would send down an agent link, and A splices it to a stream of the tunnel's agent link (or an lt client's pool
socket) without reading it. The other way, A opens a stream only to say, in one line, that a tunnel's agent is
going away (B then keeps none of that tunnel's streams idle).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections import OrderedDict
from dataclasses import dataclass

from ..errors import HttpError, InvalidName
from .http1 import RequestHead
from .names import validate_name

NODE_LINK_PATH = "/_portway/node"
NODE_LINK_UPGRADE = b"portway-node"
MAX_CLOCK_SKEW = 30.0  # seconds a proof's time may differ from the accepting node's clock
MAX_REMEMBERED_NONCES = 4096  # accepted proofs kept for replay detection; beyond, new links are refused
MAX_PREAMBLE = 4096  # bytes: a stream whose first line is longer is not a node stream
_PROOF_CONTEXT = b"portway node link"
_PREAMBLE_MAGIC = b"PORTWAY-NODE-STREAM"


def proof(secret: str, from_node: str, to_node: str, timestamp: int, nonce: str) -> str:
    message = b"\n".join((_PROOF_CONTEXT, from_node.encode(), to_node.encode(), str(timestamp).encode(),
                          nonce.encode()))
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


@dataclass(frozen=True, slots=True)
class NodeLinkRequest:
    """What node `from_node` sends to open a link to `to_node`, proof included."""

    from_node: str
    to_node: str
    timestamp: int
    nonce: str
    proof: str

    @classmethod
    def make(cls, secret: str, from_node: str, to_node: str, now: float, nonce: str) -> "NodeLinkRequest":
        """`nonce`: fresh random hex from the caller (this module takes no randomness of its own)."""
        timestamp = int(now)
        return cls(from_node, to_node, timestamp, nonce, proof(secret, from_node, to_node, timestamp, nonce))

    def encode(self, host: str) -> bytes:
        lines = [f"GET {NODE_LINK_PATH} HTTP/1.1", f"Host: {host}", "Upgrade: portway-node", "Connection: Upgrade",
                 f"Portway-Node: {self.from_node}", f"Portway-To-Node: {self.to_node}",
                 f"Portway-Time: {self.timestamp}", f"Portway-Nonce: {self.nonce}", f"Portway-Proof: {self.proof}"]
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    @classmethod
    def parse(cls, head: RequestHead) -> "NodeLinkRequest":
        """Read a request for NODE_LINK_PATH; HttpError(426/400) when it isn't a well-formed one."""
        if head.upgrade is None or head.upgrade.strip().lower() != NODE_LINK_UPGRADE:
            raise HttpError(426, "the node link needs Upgrade: portway-node")
        fields = {}
        for name in (b"portway-node", b"portway-to-node", b"portway-time", b"portway-nonce", b"portway-proof"):
            value = head.header(name)
            if value is None:
                raise HttpError(400, f"the node link request lacks {name.decode()}")
            try:
                fields[name] = value.decode("ascii").strip()
            except UnicodeDecodeError:
                raise HttpError(400, f"{name.decode()} is not ASCII") from None
        try:
            timestamp = int(fields[b"portway-time"])
        except ValueError:
            raise HttpError(400, "Portway-Time is not a number of seconds") from None
        return cls(fields[b"portway-node"], fields[b"portway-to-node"], timestamp, fields[b"portway-nonce"],
                   fields[b"portway-proof"])


class NodeLinkGate:
    """The accepting node's side: checks each node link request's proof, its time and that its nonce is new.

    Sans-I/O: `now` is passed in. Refusals are HttpError(403) with one line saying why (the opening node logs it);
    a node configured without a cluster secret refuses every node link.
    """

    def __init__(self, node_id: str, secret: str | None) -> None:
        self.node_id = node_id
        self.secret = secret
        self._seen: OrderedDict[str, float] = OrderedDict()  # nonce -> when it stops mattering

    def admit(self, request: NodeLinkRequest, now: float) -> None:
        if self.secret is None:
            raise HttpError(403, f"relay node {self.node_id} accepts no node links: it runs without "
                                 "--cluster-secret")
        if request.to_node != self.node_id:
            raise HttpError(403, f"this is relay node {self.node_id}, not {request.to_node}")
        expected = proof(self.secret, request.from_node, request.to_node, request.timestamp, request.nonce)
        if not hmac.compare_digest(expected.encode(), request.proof.encode("ascii", "replace")):
            raise HttpError(403, "the node link's proof does not match this node's --cluster-secret")
        if abs(now - request.timestamp) > MAX_CLOCK_SKEW:
            raise HttpError(403, f"the node link's time is more than {MAX_CLOCK_SKEW:g} s off this node's clock")
        self._forget_expired(now)
        if request.nonce in self._seen:
            raise HttpError(403, "the node link's proof was used before")
        if len(self._seen) >= MAX_REMEMBERED_NONCES:
            raise HttpError(403, "too many node links opened recently; try again shortly")
        self._seen[request.nonce] = request.timestamp + MAX_CLOCK_SKEW

    def _forget_expired(self, now: float) -> None:
        seen = self._seen
        while seen:
            nonce, until = next(iter(seen.items()))
            if until >= now:
                break
            seen.popitem(last=False)


@dataclass(frozen=True, slots=True)
class StreamPreamble:
    """The first line of a stream on a node link: which tunnel it is for. (Not the visitor: a stream is reused for
    later visitors of the same tunnel, and each request's head carries its visitor in X-Forwarded-For.)"""

    tunnel: str

    def encode(self) -> bytes:
        return _PREAMBLE_MAGIC + b" " + self.tunnel.encode() + b"\r\n"


def parse_preamble(line: bytes) -> StreamPreamble:
    """HttpError(400) unless `line` is a preamble naming a valid, canonical tunnel name."""
    return StreamPreamble(_named_tunnel(line, _PREAMBLE_MAGIC, "node stream preamble"))


_GOING_AWAY_MAGIC = b"PORTWAY-NODE-AWAY"


@dataclass(frozen=True, slots=True)
class AgentGoingAway:
    """The only line of a stream the node holding a tunnel opens towards a node that forwards visitors to it: the
    tunnel's agent is going away (it sent GO_AWAY and waits for every stream it has open to end). The forwarding
    node then drops the streams it keeps idle for the tunnel and keeps none idle any more under that lease; else
    the agent would wait for them until its drain timeout."""

    tunnel: str

    def encode(self) -> bytes:
        return _GOING_AWAY_MAGIC + b" " + self.tunnel.encode() + b"\r\n"


def parse_going_away(line: bytes) -> AgentGoingAway:
    """HttpError(400) unless `line` is a going-away notice naming a valid, canonical tunnel name."""
    return AgentGoingAway(_named_tunnel(line, _GOING_AWAY_MAGIC, "going-away notice"))


def _named_tunnel(line: bytes, magic: bytes, what: str) -> str:
    parts = line.split(b" ")
    if len(parts) != 2 or parts[0] != magic:
        raise HttpError(400, f"not a {what}")
    try:
        tunnel = parts[1].decode("ascii")
        if validate_name(tunnel) != tunnel:
            raise InvalidName("not canonical")
    except (UnicodeDecodeError, InvalidName):
        raise HttpError(400, f"{what} names no valid tunnel") from None
    return tunnel


_ANSWER_MAGIC = b"PORTWAY-NODE-TUNNEL"


@dataclass(frozen=True, slots=True)
class TunnelAnswer:
    """The accepting node's first line on a stream: the tunnel is served here and these are its visitor rules
    (so the node that faces the visitor checks them, as for a local tunnel), or a refusal with a status.

    Basic auth travels as the SHA-256 of the expected `Authorization` value, never the password itself."""

    status: int  # 200: served; else the refusal's status
    message: str = ""
    basic_auth_digest: str | None = None  # hex
    allow_networks: tuple[str, ...] = ()

    def encode(self) -> bytes:
        if self.status != 200:
            return b"%s refused %d %s\r\n" % (_ANSWER_MAGIC, self.status, self.message.encode("utf-8"))
        return b" ".join((_ANSWER_MAGIC, b"ok", (self.basic_auth_digest or "-").encode(),
                          (",".join(self.allow_networks) or "-").encode())) + b"\r\n"


def parse_answer(line: bytes) -> TunnelAnswer:
    """HttpError(502) when the line is not a node's answer (the other end is no Portway node of this version)."""
    parts = line.split(b" ", 3)
    try:
        if parts[0] == _ANSWER_MAGIC and parts[1] == b"refused" and len(parts) == 4:
            status = int(parts[2])
            if 400 <= status <= 599:
                return TunnelAnswer(status, parts[3].decode("utf-8"))
        elif parts[0] == _ANSWER_MAGIC and parts[1] == b"ok" and len(parts) == 4:
            digest = None if parts[2] == b"-" else parts[2].decode("ascii")
            if digest is not None and (len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest)):
                raise ValueError(digest)
            networks = () if parts[3] == b"-" else tuple(
                str(ipaddress.ip_network(part.decode("ascii"), strict=False)) for part in parts[3].split(b","))
            return TunnelAnswer(200, "", digest, networks)
    except (ValueError, UnicodeDecodeError, IndexError):
        pass
    raise HttpError(502, "the other relay node's answer is not a node stream answer")


class LineReader:
    """One CRLF-ended line from bytes as they arrive: `feed` returns (line, rest) once complete, None before;
    HttpError(400) past MAX_PREAMBLE bytes without an end."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> tuple[bytes, bytes] | None:
        self._buffer += data
        end = self._buffer.find(b"\r\n")
        if end < 0 and len(self._buffer) <= MAX_PREAMBLE:
            return None
        if end < 0 or end > MAX_PREAMBLE:
            raise HttpError(400, "node stream line too long")
        line, rest = bytes(self._buffer[:end]), bytes(self._buffer[end + 2:])
        self._buffer.clear()
        return line, rest
