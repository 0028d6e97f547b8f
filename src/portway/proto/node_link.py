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

Every stream B opens on the link starts with one preamble line naming the tunnel, the visitor's address and the
scheme the visitor used; what follows is exactly what B would send down an agent link for that visitor.
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
MAX_PREAMBLE = 512  # bytes: a stream whose first line is longer is not a node stream
_PROOF_CONTEXT = b"portway node link"
_PREAMBLE_MAGIC = b"PORTWAY-NODE-STREAM"
_SCHEMES = (b"http", b"https")


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
    """The first line of a stream on a node link: which tunnel, for which visitor address, over which scheme."""

    tunnel: str
    visitor_ip: str
    scheme: str

    def encode(self) -> bytes:
        return b" ".join((_PREAMBLE_MAGIC, self.tunnel.encode(), self.visitor_ip.encode(),
                          self.scheme.encode())) + b"\r\n"


class PreambleReader:
    """Reads a stream's preamble from the bytes as they arrive: `feed` returns (preamble, rest) once the line is
    complete, None before; HttpError(400) when it is malformed or longer than MAX_PREAMBLE."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> tuple[StreamPreamble, bytes] | None:
        self._buffer += data
        end = self._buffer.find(b"\r\n")
        if end < 0:
            if len(self._buffer) > MAX_PREAMBLE:
                raise HttpError(400, "node stream preamble too long")
            return None
        if end > MAX_PREAMBLE:
            raise HttpError(400, "node stream preamble too long")
        line, rest = bytes(self._buffer[:end]), bytes(self._buffer[end + 2:])
        self._buffer.clear()
        return parse_preamble(line), rest


def parse_preamble(line: bytes) -> StreamPreamble:
    parts = line.split(b" ")
    if len(parts) != 4 or parts[0] != _PREAMBLE_MAGIC or parts[3] not in _SCHEMES:
        raise HttpError(400, "not a node stream preamble")
    try:
        tunnel = parts[1].decode("ascii")
        address = str(ipaddress.ip_address(parts[2].decode("ascii")))
    except (UnicodeDecodeError, ValueError):
        raise HttpError(400, "node stream preamble names no tunnel or no visitor address") from None
    try:
        if validate_name(tunnel) != tunnel:
            raise InvalidName("not canonical")
    except InvalidName:
        raise HttpError(400, "node stream preamble names no valid tunnel") from None
    return StreamPreamble(tunnel, address, parts[3].decode("ascii"))
