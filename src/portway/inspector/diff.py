"""Two exchanges' responses side by side: status, headers (by name), body lines (pure)."""

from __future__ import annotations

import difflib
import json

from .capture import Exchange, Response
from .views import decode_text, decoded_body

MAX_LINES = 5000  # lines of each body compared; the rest is summarised


def _values(headers: list[tuple[bytes, bytes]]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for name, value in headers:
        found.setdefault(name.decode("latin-1").lower(), []).append(value.decode("latin-1"))
    return found


def _names(headers: list[tuple[bytes, bytes]]) -> dict[str, str]:
    return {name.decode("latin-1").lower(): name.decode("latin-1") for name, _ in headers}


def _lines(response: Response | None) -> list[str] | None:
    """The body as lines to compare (JSON pretty-printed with sorted keys first, so layout doesn't hide values), or
    None when it is not text."""
    if response is None:
        return []
    data = bytes(response.body)
    inflated = decoded_body(response.headers, data)
    text = decode_text(inflated[0], True) if inflated is not None else decode_text(data, response.truncated)
    if text is None:
        return None
    if text.lstrip()[:1] in ("{", "["):  # JSON whatever its Content-Type says, so a relabelled body compares equal
        try:
            text = json.dumps(json.loads(text), indent=2, ensure_ascii=False, sort_keys=True)
        except ValueError:
            pass
    return text.splitlines()


def diff(a: Exchange, b: Exchange) -> dict:
    ra, rb = a.response, b.response
    status_a = ra.status if ra is not None else None
    status_b = rb.status if rb is not None else None
    headers_a = _values(ra.headers) if ra is not None else {}
    headers_b = _values(rb.headers) if rb is not None else {}
    names = {**(_names(rb.headers) if rb is not None else {}), **(_names(ra.headers) if ra is not None else {})}
    rows = []
    for key in list(headers_a) + [key for key in headers_b if key not in headers_a]:
        va, vb = headers_a.get(key), headers_b.get(key)
        if va is None:
            change = "added"
        elif vb is None:
            change = "removed"
        else:
            change = "same" if va == vb else "changed"
        rows.append({"name": names[key], "a": "\n".join(va) if va is not None else None,
                     "b": "\n".join(vb) if vb is not None else None, "change": change})
    shown = {
        "a": a.id,
        "b": b.id,
        "status": {"a": status_a, "b": status_b, "changed": status_a != status_b},
        "headers": rows,
        "body_a_size": ra.body_size if ra is not None else None,
        "body_b_size": rb.body_size if rb is not None else None,
        "body_truncated": bool((ra is not None and ra.truncated) or (rb is not None and rb.truncated)),
    }
    lines_a, lines_b = _lines(ra), _lines(rb)
    if lines_a is None or lines_b is None:
        same = ra is not None and rb is not None and bytes(ra.body) == bytes(rb.body)
        shown.update(body_binary=True, body_same=same, body=[])
        return shown
    clipped = len(lines_a) > MAX_LINES or len(lines_b) > MAX_LINES
    lines_a, lines_b = lines_a[:MAX_LINES], lines_b[:MAX_LINES]
    body = []
    matcher = difflib.SequenceMatcher(None, lines_a, lines_b, autojunk=False)
    for op, a0, a1, b0, b1 in matcher.get_opcodes():
        if op == "equal":
            body += [{"op": " ", "text": line} for line in lines_a[a0:a1]]
            continue
        body += [{"op": "-", "text": line} for line in lines_a[a0:a1]]
        body += [{"op": "+", "text": line} for line in lines_b[b0:b1]]
    shown.update(body_binary=False, body_same=lines_a == lines_b and not clipped, body=body, body_clipped=clipped)
    return shown
