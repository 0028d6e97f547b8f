"""Deterministic payloads served by tests/e2e/fixtures/ws_echo_server.js.

The origin's /download, /download-chunked, /close-delimited and /slow routes send
``payload(N, seed)``, defined as follows (the JavaScript side documents the same thing):

    key   = SHA-256(b"portway-payload\\x00" + seed.encode("utf-8"))          # 32 bytes
    base  = SHA-256(key + be32(0)) + SHA-256(key + be32(1)) + ...
            + SHA-256(key + be32(2047))                                    # 65536 bytes
    block j (j = 0, 1, 2, ...) = be64(j) + base[8:]                        # 65536 bytes
    payload(N, seed) = first N bytes of block 0 + block 1 + block 2 + ...

``be32``/``be64`` are 4/8-byte big-endian unsigned integers. The seed is the raw ``seed``
query value (default ``"0"``), any string.

Self check by hand (needs nothing but Python; with ``--origin PORT`` also compares with a
running origin server):

    python3 tests/e2e/payload.py [--origin PORT]
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterator

BLOCK = 65536
DEFAULT_SEED = "0"
# Piece sizes the origin uses for /download-chunked (each piece is one HTTP chunk), cycled.
CHUNK_PATTERN = (65536, 1, 1000, 16384, 3, 65535, 32768, 7, 4096)


@functools.lru_cache(maxsize=16)
def _base_block(seed: str) -> bytes:
    key = hashlib.sha256(b"portway-payload\x00" + seed.encode("utf-8")).digest()
    return b"".join(
        hashlib.sha256(key + i.to_bytes(4, "big")).digest() for i in range(BLOCK // 32)
    )


def iter_download(n: int, seed: str = DEFAULT_SEED) -> Iterator[bytes]:
    """Yield ``payload(n, seed)`` in pieces of at most 64 KiB (for large sizes)."""
    if n < 0:
        raise ValueError("n must be >= 0")
    tail = _base_block(seed)[8:]
    j = 0
    left = n
    while left > 0:
        block = j.to_bytes(8, "big") + tail
        if left < BLOCK:
            block = block[:left]
        yield block
        left -= len(block)
        j += 1


def expected_download(n: int, seed: str = DEFAULT_SEED) -> bytes:
    """The exact ``n`` bytes the origin sends for ``/download?bytes=n&seed=seed``."""
    return b"".join(iter_download(n, seed))


def expected_sha256(n: int, seed: str = DEFAULT_SEED) -> str:
    """Hex SHA-256 of ``expected_download(n, seed)`` without holding it all in memory."""
    h = hashlib.sha256()
    for piece in iter_download(n, seed):
        h.update(piece)
    return h.hexdigest()


def _self_check(origin_port: int | None) -> None:
    base = _base_block("0")
    assert len(base) == BLOCK
    for n in (0, 1, 7, 8, 9, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 5):
        data = expected_download(n)
        assert len(data) == n, (n, len(data))
        assert hashlib.sha256(data).hexdigest() == expected_sha256(n)
    data = expected_download(3 * BLOCK)
    assert data[:8] == bytes(8)
    assert data[BLOCK : BLOCK + 8] == (1).to_bytes(8, "big")
    assert data[2 * BLOCK + 8 : 3 * BLOCK] == base[8:]
    assert expected_download(100, "a") != expected_download(100, "b")
    assert expected_download(10, "x") == expected_download(1000, "x")[:10]
    print("payload(16, '0') =", expected_download(16).hex())
    print("sha256(payload(1000000, '0')) =", expected_sha256(1_000_000))

    if origin_port is not None:
        import http.client

        cases = [
            ("/download", 0, "0"),
            ("/download", 1, "0"),
            ("/download", 1_000_003, "0"),
            ("/download", 200_000, "héllo wörld"),
            ("/download-chunked", 1_000_003, "s1"),
            ("/close-delimited", 300_001, "cd"),
            ("/slow", 5_000, "sl"),
        ]
        for path, n, seed in cases:
            from urllib.parse import urlencode

            query = {"bytes": n, "seed": seed}
            if path == "/slow":
                query["ms"] = 200
            conn = http.client.HTTPConnection("127.0.0.1", origin_port, timeout=30)
            conn.request("GET", f"{path}?{urlencode(query)}")
            resp = conn.getresponse()
            body = resp.read()
            conn.close()
            assert resp.status == 200, (path, resp.status)
            got = hashlib.sha256(body).hexdigest()
            want = expected_sha256(n, seed)
            assert got == want, (path, n, seed, got, want)
            print(f"origin {path} bytes={n} seed={seed!r}: sha256 matches ({got[:16]}...)")
    print("payload self check OK")


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--origin", type=int, metavar="PORT", help="also check a running origin")
    _self_check(ap.parse_args().origin)
