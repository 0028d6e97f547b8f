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
    relay → agent   HTTP/1.1 101 Switching Protocols
                    Upgrade: portway-mux            Connection: Upgrade
                    Portway-Name: NAME   Portway-Url: URL   Portway-Resume: KEY
                    Portway-Streams: resumed | new  (whether the relay still held them too)

When both sides hold the old link's streams, the new link starts with the resume exchange (proto/resume.py)
and the streams carry on; when either has lost them, each side resets its own, visibly.

Both ends live here: :class:`LinkRequest` is built by the agent and parsed by the relay, :class:`LinkGrant`
the other way, and :class:`AgentHandshake` is the agent's side as a sans-I/O object fed the relay's bytes.
"""

from __future__ import annotations

import base64
import binascii
import html
import json
from dataclasses import dataclass
from urllib.parse import parse_qs, quote

from ..errors import HttpError, RegistrationError
from . import http1
from .http1 import RequestHead
from .pages import PAGE_SIGNATURE, json_response

LINK_PATH = "/_portway/agent"
LINK_UPGRADE = b"portway-mux"


@dataclass(frozen=True, slots=True)
class LinkRequest:
    """What an agent asks for: a name (or a random one), with the credentials and visitor rules it brings."""

    name: str | None = None
    token: str | None = None
    resume_key: str | None = None
    basic_auth: str | None = None  # "USER:PASS" visitors must present
    allow_ip: tuple[str, ...] = ()  # CIDR networks visitors must come from
    resume_streams: bool = False  # with resume_key: the agent still holds the streams of the link it lost

    def encode(self, host: str) -> bytes:
        """The request head, for the relay reached as `host` (HOST:PORT)."""
        target = LINK_PATH + (f"?name={quote(self.name)}" if self.name else "")
        lines = [f"GET {target} HTTP/1.1", f"Host: {host}", "Upgrade: portway-mux", "Connection: Upgrade"]
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
        return cls(
            name=names[0] if names else None,
            token=bearer_token(head),
            resume_key=resume.decode("latin-1").strip() if resume else None,
            basic_auth=basic_auth,
            allow_ip=allow_ip,
            resume_streams=bool(resume) and (head.header(b"portway-resume-streams") or b"").strip() == b"1",
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

    def encode(self) -> bytes:
        return (
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: portway-mux\r\nConnection: Upgrade\r\n"
            f"Portway-Name: {self.name}\r\nPortway-Url: {self.url}\r\nPortway-Resume: {self.resume_key}\r\n"
            f"Portway-Streams: {'resumed' if self.streams_resumed else 'new'}\r\n\r\n"
        ).encode()


def refusal(status: int, message: str) -> bytes:
    """The relay's no: the status and a JSON message the agent prints; the connection closes after it."""
    return json_response(status, {"message": message}, close=True)


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
    try:
        return LinkGrant(fields["portway-name"], fields["portway-url"], fields["portway-resume"],
                         fields.get("portway-streams") == "resumed")
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
        return html.unescape(page.split("<p>", 1)[1].split("</p>", 1)[0])
    return f"HTTP {status}: {NOT_A_RELAY}"
