"""The relay's own answers: error pages visitors see, the landing page of the bare domain, JSON for programs."""

from __future__ import annotations

import json

from .http1 import simple_response

REASONS = {
    200: "OK", 201: "Created", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 408: "Request Timeout", 409: "Conflict", 413: "Content Too Large",
    429: "Too Many Requests", 431: "Request Header Fields Too Large", 502: "Bad Gateway",
    503: "Service Unavailable", 504: "Gateway Timeout",
}


def reason(status: int) -> str:
    return REASONS.get(status, "Error")


PAGE_SIGNATURE = "<small>Portway relay</small>"  # how an agent tells the relay's own pages from a stranger's


def page(title: str, message: str) -> bytes:
    import html  # here: its 2,000-entity table stays out of a relay that never serves a page

    return (
        "<!doctype html><html><head><meta charset=utf-8><title>"
        f"{html.escape(title)}</title><style>body{{font-family:system-ui,sans-serif;max-width:40em;"
        "margin:4em auto;color:#222}h1{font-size:1.4em}code{background:#eee;padding:0 .2em}</style>"
        f"</head><body><h1>{html.escape(title)}</h1><p>{html.escape(message)}</p>"
        f"<hr>{PAGE_SIGNATURE}</body></html>"
    ).encode()


def error_response(status: int, message: str, *, close: bool = False,
                   extra_headers: list[tuple[str, str]] | None = None) -> bytes:
    title = f"{status} {reason(status)}"
    return simple_response(status, reason(status), page(title, message), close=close,
                           extra_headers=extra_headers)


def json_response(status: int, payload: dict, *, close: bool = False) -> bytes:
    """An answer for programs (the agent, `lt`, status checks) rather than people."""
    return simple_response(status, reason(status), json.dumps(payload).encode(), content_type="application/json",
                           close=close)


def landing_page(domain: str, port_suffix: str, tunnel_count: int) -> bytes:
    body = page(
        "Portway relay",
        f"This relay serves {tunnel_count} tunnel(s) at NAME.{domain}{port_suffix}. "
        f"Start one with: portway http 8080 --relay http://{domain}{port_suffix}",
    )
    return simple_response(200, "OK", body)
