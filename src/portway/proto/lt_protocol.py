"""The localtunnel (`lt`) protocol as the relay speaks it, without I/O.

Which requests to the relay's own host are `lt` registrations (`/?new`, `/NAME`) or status queries,
the answers `lt` understands, and the rules for the per-tunnel pool sockets: who may connect, how
many, and when a returning client may take its name back. docs/localtunnel.md describes the client
this has to satisfy; the asyncio side (relay/localtunnel.py) only moves bytes and keeps time.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
from dataclasses import dataclass
from enum import Enum
from urllib.parse import parse_qs, unquote

from .pages import json_response

# The pool size the relay advertises and enforces. `lt` opens exactly this many sockets and replaces
# each one the relay closes; advertising more than is enforced would make it reconnect in a loop.
MAX_SOCKETS = 10

# `lt` retries every non-2xx answer silently, forever; a 2xx other than 200 carrying {"message"} is
# the only refusal it prints (and then exits 1).
REFUSAL_STATUS = 201



@dataclass(frozen=True, slots=True)
class RegistrationRequest:
    """`GET /?new` (requested is None) or `GET /NAME` (requested is the name as sent)."""

    requested: str | None


def _segments(path: str) -> str | None:
    """The path without its leading slashes (`--host` with a trailing slash sends `//NAME`)."""
    if not path.startswith("/"):
        return None
    return path.lstrip("/")


def parse_registration(path: str, query: str) -> RegistrationRequest | None:
    """Whether a request to the relay's own host is an `lt` registration, and for which name.

    Only `/` with a `new` query key and single path segments that could be a name count; files
    (`/favicon.ico`, anything with a dot) and deeper paths (`/api/…`, `/_portway/…`) are left to
    the relay. Any method counts, as with localtunnel's own server.
    """
    rest = _segments(path)
    if rest is None:
        return None
    if rest == "":
        if "new" in parse_qs(query, keep_blank_values=True):
            return RegistrationRequest(None)
        return None
    if "/" in rest:
        return None
    segment = unquote(rest)
    if "." in segment or "/" in segment or not segment.strip():
        return None
    return RegistrationRequest(segment)


def taken_message(name: str) -> str:
    return f"name {name} is taken"


def token_message(*, given: bool) -> str:
    if given:
        return "the token was not accepted by this relay"
    return "this relay needs a token: put it in --host, as in lt -h http://lt:TOKEN@RELAY-HOST"


def token_from_basic(authorization: bytes | None) -> str | None:
    """The relay token `lt` sends: `lt -h http://user:TOKEN@relay` (or `http://TOKEN@relay`) makes it
    send Basic credentials; the password is the token when it is not empty, else the user name."""
    if authorization is None:
        return None
    scheme, _, encoded = authorization.strip().partition(b" ")
    if scheme.lower() != b"basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, _, password = decoded.partition(":")
    return password or user or None


def tunnel_status_name(path: str) -> str | None:
    """`/api/tunnels/NAME/status` → NAME (case-folded); None for any other path."""
    rest = _segments(path)
    if rest is None:
        return None
    parts = rest.split("/")
    if len(parts) != 4 or parts[0] != "api" or parts[1] != "tunnels" or parts[3] != "status" or not parts[2]:
        return None
    return unquote(parts[2]).lower()


def registration_answer(name: str, port: int, url: str, max_conn_count: int = MAX_SOCKETS) -> dict:
    """The 200 answer `lt` reads: it connects `max_conn_count` sockets to `port` and prints `url`."""
    return {"id": name, "port": port, "max_conn_count": max_conn_count, "url": url}


def tunnel_status(connected_sockets: int) -> dict:
    return {"connected_sockets": connected_sockets}


def refusal_response(message: str, *, close: bool = False) -> bytes:
    """A refusal `lt` shows its user (`Error: <message>`, exit status 1) instead of retrying silently."""
    return json_response(REFUSAL_STATUS, {"message": message}, close=close)


def normalize_ip(address: str) -> str:
    """One spelling per address: IPv4-mapped IPv6 becomes IPv4, IPv6 is compressed, zones dropped."""
    text = address.split("%", 1)[0]
    try:
        parsed = ipaddress.ip_address(text)
    except ValueError:
        return address
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        parsed = parsed.ipv4_mapped
    return str(parsed)


class Admission(Enum):
    ACCEPT = "accept"
    FOREIGN = "the socket comes from another address than the registration"
    FULL = "the tunnel already has all the sockets it advertised"
    CLOSED = "the tunnel is closed"


def admit_socket(peer_ip: str, owner_ip: str, connected: int, limit: int = MAX_SOCKETS) -> Admission:
    """May a socket arriving on a tunnel's pool port join the pool?

    Nothing on the wire identifies an `lt` pool socket, so the registering address is the only
    credential; and no more than the advertised count, so the client never has a reason to loop.
    """
    if normalize_ip(peer_ip) != normalize_ip(owner_ip):
        return Admission.FOREIGN
    if connected >= limit:
        return Admission.FULL
    return Admission.ACCEPT


def may_take_over(owner_ip: str, requester_ip: str, connected_sockets: int) -> bool:
    """A registration for a name held by an `lt` tunnel with no socket left (its grace period)
    gets it back when it comes from the same address: that is the same client restarting."""
    return connected_sockets == 0 and normalize_ip(owner_ip) == normalize_ip(requester_ip)
