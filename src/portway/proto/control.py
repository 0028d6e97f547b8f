"""The agent-link handshake: how an agent asks for a tunnel and how the relay grants or refuses it.

The agent sends an HTTP/1.1 Upgrade request; the relay answers `101 Switching Protocols` naming the tunnel, or
an error status with a JSON `{"message": ...}`. After the 101 both sides speak the frame protocol (mux.py) on the
same connection, starting with the bytes that followed the 101 head in the same read.

    agent → relay   GET /_portway/agent?name=NAME HTTP/1.1
                    Upgrade: portway-mux            Connection: Upgrade
                    Authorization: Bearer TOKEN     (when the relay asks for tokens)
                    Portway-Resume: KEY             (reconnecting: proves it held NAME)
                    Portway-Resume-Streams: 1       (and it still holds the old link's streams)
                    Portway-Basic-Auth: base64(USER:PASS)      Portway-Allow-Ip: CIDR, CIDR
                    Portway-Move: 1                 (it understands MOVE: a stopping node names where to go)
    relay → agent   HTTP/1.1 101 Switching Protocols
                    Upgrade: portway-mux            Connection: Upgrade
                    Portway-Name: NAME   Portway-Url: URL   Portway-Resume: KEY
                    Portway-Streams: resumed | new  (whether the relay still held them too)

Several tunnels over one link (`portway tcp`, `portway start`, `portway http 8080 3000`): the request carries one
`Portway-Tunnel` header per tunnel, in order (its index is its position), instead of `?name=`; the grant answers
with one `Portway-Tunnel` header per tunnel, in the same order. Values are form-encoded:

    agent → relay   Portway-Tunnel: proto=http&name=web        Portway-Tunnel: proto=tcp&port=20001
    relay → agent   Portway-Tunnel: index=0&proto=http&name=web&url=https://web.example.com
                    Portway-Tunnel: index=1&proto=tcp&port=20001&url=tcp://example.com:20001

It is all or nothing: a refusal of any tunnel refuses the link, its JSON message one line per refused tunnel.
On such a link every stream the relay opens starts with a preamble: a PROXY v2 header (proxy_protocol.py)
naming the visitor, with the tunnel's index in a private TLV (type 0xE0, u16 big-endian). A link asked for the
old way carries no preamble and one http tunnel, as it always did.

When both sides hold the old link's streams, the new link starts with the resume exchange (proto/resume.py)
and the streams carry on; when either has lost them, each side resets its own, visibly.

Both ends live here: :class:`LinkRequest` is built by the agent and parsed by the relay, :class:`LinkGrant`
the other way, and :class:`AgentHandshake` is the agent's side as a sans-I/O object fed the relay's bytes.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
import struct
from urllib.parse import parse_qs, quote, urlencode

from ..errors import HttpError, RegistrationError
from . import http1
from .http1 import RequestHead
from .pages import PAGE_SIGNATURE, json_response
from .proxy_protocol import Endpoints, Header, encode_v2, tlv, tlv_value

LINK_PATH = "/_portway/agent"
LINK_UPGRADE = b"portway-mux"
MAX_TUNNELS = 32  # tunnels one link may carry
TUNNEL_INDEX_TLV = 0xE0  # PP2_TYPE_MIN_CUSTOM: the spec leaves 0xE0-0xEF to applications
PREAMBLE_LIMIT = 16 + 36 + 64  # bytes: the longest preamble a relay has reason to send (v2 fixed, IPv6, TLVs)


@dataclass(frozen=True, slots=True)
class TunnelRequest:
    """One tunnel of a link: an http tunnel (its name, or None for a random one) or a tcp one (its public port,
    or None for any port the relay offers), with its own visitor rules."""

    proto: str  # "http" | "tcp"
    name: str | None = None
    port: int | None = None
    allow_ip: tuple[str, ...] = ()  # CIDR networks visitors must come from
    basic_auth: str | None = None  # http: "USER:PASS" visitors must present

    def encode(self) -> str:
        fields: list[tuple[str, str]] = [("proto", self.proto)]
        if self.name:
            fields.append(("name", self.name))
        if self.port is not None:
            fields.append(("port", str(self.port)))
        fields += [("allow_ip", network) for network in self.allow_ip]
        if self.basic_auth is not None:
            fields.append(("basic_auth", self.basic_auth))
        return urlencode(fields)

    @classmethod
    def parse(cls, value: str) -> "TunnelRequest":
        values = parse_qs(value)
        fields = {key: found[0] for key, found in values.items()}
        proto = fields.get("proto")
        if proto not in ("http", "tcp"):
            raise HttpError(400, f"Portway-Tunnel must have proto=http or proto=tcp, not {proto!r}")
        port = fields.get("port")
        if port is not None and (not port.isdigit() or not 1 <= int(port) <= 65535):
            raise HttpError(400, f"Portway-Tunnel port must be 1-65535, not {port!r}")
        basic_auth = fields.get("basic_auth")
        if basic_auth is not None and ":" not in basic_auth:
            raise HttpError(400, "Portway-Tunnel basic_auth must be USER:PASS")
        allow_ip = tuple(values.get("allow_ip", ()))
        if proto == "http":
            return cls("http", name=fields.get("name") or None, allow_ip=allow_ip, basic_auth=basic_auth)
        return cls("tcp", port=int(port) if port is not None else None, allow_ip=allow_ip)


@dataclass(frozen=True, slots=True)
class GrantedTunnel:
    """The relay's yes for one tunnel of a link: its name (http) or port (tcp) and its public URL."""

    index: int
    proto: str
    url: str
    name: str | None = None
    port: int | None = None

    def encode(self) -> str:
        fields = {"index": str(self.index), "proto": self.proto}
        if self.name is not None:
            fields["name"] = self.name
        if self.port is not None:
            fields["port"] = str(self.port)
        fields["url"] = self.url
        return urlencode(fields)

    @classmethod
    def parse(cls, value: str) -> "GrantedTunnel":
        fields = {key: values[0] for key, values in parse_qs(value).items()}
        try:
            port = fields.get("port")
            return cls(int(fields["index"]), fields["proto"], fields["url"], fields.get("name"),
                       int(port) if port is not None else None)
        except (KeyError, ValueError):
            raise RegistrationError(502, f"the relay's answer has an invalid Portway-Tunnel field: {value!r}") \
                from None


def stream_preamble(index: int, endpoints: Endpoints | None) -> bytes:
    """The first bytes of a stream the relay opens on a several-tunnel link: whose it is and whom it carries."""
    return encode_v2(endpoints, tlv(TUNNEL_INDEX_TLV, struct.pack("!H", index)))


def preamble_index(header: Header) -> int | None:
    """The tunnel index a stream's preamble names; None when it names none."""
    value = tlv_value(header.tlvs, TUNNEL_INDEX_TLV)
    if value is None or len(value) != 2:
        return None
    return struct.unpack("!H", value)[0]


@dataclass(frozen=True, slots=True)
class LinkRequest:
    """What an agent asks for: a name (or a random one), with the credentials and visitor rules it brings."""

    name: str | None = None
    token: str | None = None
    resume_key: str | None = None
    basic_auth: str | None = None  # "USER:PASS" visitors must present
    allow_ip: tuple[str, ...] = ()  # CIDR networks visitors must come from
    resume_streams: bool = False  # with resume_key: the agent still holds the streams of the link it lost
    tunnels: tuple[TunnelRequest, ...] = ()  # the several-tunnel form (then `name` is unused); () the old form
    can_move: bool = False  # the agent understands MOVE (proto/frame.py): a stopping relay node may send it

    def encode(self, host: str) -> bytes:
        """The request head, for the relay reached as `host` (HOST:PORT)."""
        target = LINK_PATH + (f"?name={quote(self.name)}" if self.name and not self.tunnels else "")
        lines = [f"GET {target} HTTP/1.1", f"Host: {host}", "Upgrade: portway-mux", "Connection: Upgrade"]
        lines += [f"Portway-Tunnel: {tunnel.encode()}" for tunnel in self.tunnels]
        if self.token:
            lines.append(f"Authorization: Bearer {self.token}")
        if self.resume_key:
            lines.append(f"Portway-Resume: {self.resume_key}")
            if self.resume_streams:
                lines.append("Portway-Resume-Streams: 1")
        if self.basic_auth:
            lines.append("Portway-Basic-Auth: " + base64.b64encode(self.basic_auth.encode()).decode())
        if self.allow_ip:
            lines.append("Portway-Allow-Ip: " + ", ".join(self.allow_ip))
        if self.can_move:
            lines.append("Portway-Move: 1")
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    @classmethod
    def parse(cls, head: RequestHead, query: str) -> "LinkRequest":
        """The relay's reading of a request for LINK_PATH; HttpError (426/400) when it isn't a valid one."""
        if head.upgrade is None or head.upgrade.strip().lower() != LINK_UPGRADE:
            raise HttpError(426, "the agent link needs Upgrade: portway-mux")
        names = parse_qs(query).get("name")
        resume = head.header(b"portway-resume")
        basic = head.header(b"portway-basic-auth")
        basic_auth = None
        if basic:
            try:
                basic_auth = base64.b64decode(basic.strip(), validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                raise HttpError(400, "Portway-Basic-Auth must be base64 of USER:PASS") from None
            if ":" not in basic_auth:
                raise HttpError(400, "Portway-Basic-Auth must be base64 of USER:PASS")
        allow = head.header(b"portway-allow-ip")
        allow_ip = tuple(part.strip() for part in allow.decode("latin-1").split(",") if part.strip()) if allow else ()
        tunnels = tuple(TunnelRequest.parse(value.decode("latin-1")) for key, value in head.headers
                        if key.lower() == b"portway-tunnel")
        if len(tunnels) > MAX_TUNNELS:
            raise HttpError(400, f"a link may carry at most {MAX_TUNNELS} tunnels, {len(tunnels)} were asked for")
        asked = (("name", [tunnel.name for tunnel in tunnels if tunnel.name]),
                 ("port", [tunnel.port for tunnel in tunnels if tunnel.port]))
        for kind, values in asked:
            repeated = sorted({str(value) for value in values if values.count(value) > 1})
            if repeated:
                raise HttpError(400, f"the same {kind} was asked for twice on one link: {', '.join(repeated)}")
        return cls(
            name=names[0] if names else None,
            token=bearer_token(head),
            resume_key=resume.decode("latin-1").strip() if resume else None,
            basic_auth=basic_auth,
            allow_ip=allow_ip,
            resume_streams=bool(resume) and (head.header(b"portway-resume-streams") or b"").strip() == b"1",
            tunnels=tunnels,
            can_move=(head.header(b"portway-move") or b"").strip() == b"1",
        )


def bearer_token(head: RequestHead) -> str | None:
    value = head.header(b"authorization")
    if value is None or not value[:7].lower() == b"bearer ":
        return None
    return value[7:].strip().decode("latin-1")


@dataclass(frozen=True, slots=True)
class LinkGrant:
    """The relay's yes: the tunnel's name, its public URL and the key that lets this agent reclaim the name."""

    name: str
    url: str
    resume_key: str
    streams_resumed: bool = False  # the relay still held the streams the agent asked to resume
    tunnels: tuple[GrantedTunnel, ...] = ()  # the several-tunnel form: every tunnel, in the request's order

    def encode(self) -> bytes:
        tunnels = "".join(f"Portway-Tunnel: {tunnel.encode()}\r\n" for tunnel in self.tunnels)
        return (
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: portway-mux\r\nConnection: Upgrade\r\n"
            f"Portway-Name: {self.name}\r\nPortway-Url: {self.url}\r\nPortway-Resume: {self.resume_key}\r\n"
            f"{tunnels}Portway-Streams: {'resumed' if self.streams_resumed else 'new'}\r\n\r\n"
        ).encode()


def refusal(status: int, message: str, tunnels: list[dict] | None = None) -> bytes:
    """The relay's no: the status and a JSON message the agent prints (one line per refused tunnel of a
    several-tunnel link, each also listed in `tunnels`); the connection closes after it."""
    body: dict = {"message": message}
    if tunnels is not None:
        body["tunnels"] = tunnels
    return json_response(status, body, close=True)


@dataclass(frozen=True, slots=True)
class Granted:
    """The handshake succeeded; `link_bytes` arrived after the 101 head and belong to the frame protocol."""

    grant: LinkGrant
    link_bytes: bytes


class AgentHandshake:
    """The agent's side: feed the relay's bytes until :meth:`receive_data` returns :class:`Granted`.

    A refusal raises RegistrationError with the relay's status and message; an answer that isn't HTTP, or a 101
    without the fields above, raises RegistrationError(502) saying so.
    """

    def __init__(self) -> None:
        self._parser = http1.ResponseParser("GET", LINK_UPGRADE)
        self._body = b""

    def receive_data(self, data: bytes) -> Granted | None:
        """Feed bytes from the relay (b"" at end of stream); None while more are needed."""
        parser = self._parser
        try:
            events = parser.feed(data) if data else parser.feed_eof()
        except HttpError:
            raise RegistrationError(502, NOT_A_RELAY) from None
        for event in events:
            if isinstance(event, http1.Switched):
                assert parser.head is not None
                return Granted(_grant_of(parser.head), event.trailing)
            if isinstance(event, http1.Body):
                self._body += event.data
            elif event is http1.MESSAGE_END:
                assert parser.head is not None
                raise RegistrationError(parser.head.status, _message_of(self._body, parser.head.status))
        return None


def _grant_of(head: http1.ResponseHead) -> LinkGrant:
    fields = {key.decode("latin-1").lower(): value.decode("latin-1").strip() for key, value in head.headers}
    tunnels = tuple(GrantedTunnel.parse(value.decode("latin-1").strip()) for key, value in head.headers
                    if key.lower() == b"portway-tunnel")
    try:
        return LinkGrant(fields["portway-name"], fields["portway-url"], fields["portway-resume"],
                         fields.get("portway-streams") == "resumed", tunnels)
    except KeyError as missing:
        raise RegistrationError(502, f"the relay's answer lacks the {missing.args[0]} field") from None


NOT_A_RELAY = "the server at that address answered, but not as a Portway relay does (check --relay)"


def _message_of(body: bytes, status: int) -> str:
    """The relay's message: its JSON `message`, or the text of one of its own error pages. Anything else came
    from another kind of server, whose page is not worth printing."""
    try:
        return str(json.loads(body)["message"])
    except (ValueError, KeyError, TypeError):
        pass
    page = body.decode("utf-8", "replace")
    if PAGE_SIGNATURE in page and "<p>" in page:
        import html  # here: its 2,000-entity table stays out of an agent the relay never refused

        return html.unescape(page.split("<p>", 1)[1].split("</p>", 1)[0])
    return f"HTTP {status}: {NOT_A_RELAY}"
