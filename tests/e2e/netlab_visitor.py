"""One visitor's transfer through a tunnel, run inside the NAT test-bed's visitor namespace by
tests/e2e/test_netlab_survival.py (a test there cannot open sockets in another namespace itself).

    python3 netlab_visitor.py get|download|upload|websocket RELAY_IP PORT NAME [options]

It prints `started` once --mark bytes (messages for `websocket`) went through; with --go FILE it then waits until
FILE exists (the test creates it once the link is cut, so the rest crosses the outage); then it prints one line,
`result {json}`: what it got, or the error that ended it, with the bytes moved and the seconds taken.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from payload import iter_download  # noqa: E402  (next to this script, which runs outside the tests package)


def say(line: str) -> None:
    print(line, flush=True)


def wait_for_go(path: str | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while path and not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.02)


def download(args, outcome: dict) -> None:
    conn = http.client.HTTPConnection(args.relay, args.port, timeout=args.timeout)
    conn.request("GET", f"{args.path}?bytes={args.size}&seed={args.seed}{args.query}",
                 headers={"Host": f"{args.name}.nat.test:{args.port}"})
    response = conn.getresponse()
    outcome["status"] = response.status
    digest = hashlib.sha256()
    marked = False
    while chunk := response.read(1 << 20 if marked or args.mark <= outcome["bytes"] else args.mark - outcome["bytes"]):
        digest.update(chunk)
        outcome["bytes"] += len(chunk)
        if not marked and outcome["bytes"] >= args.mark:
            marked = True
            say("started")
            wait_for_go(args.go, args.timeout)
    outcome["sha256"] = digest.hexdigest()  # a short read (fewer bytes than the size) is how a cut body ends


def get(args, outcome: dict) -> None:
    """One request to --path; the body is kept (an error page says why)."""
    conn = http.client.HTTPConnection(args.relay, args.port, timeout=args.timeout)
    conn.request("GET", args.path, headers={"Host": f"{args.name}.nat.test:{args.port}", "Connection": "close"})
    response = conn.getresponse()
    outcome["status"] = response.status
    outcome["body"] = response.read().decode(errors="replace")


def upload(args, outcome: dict) -> None:
    conn = http.client.HTTPConnection(args.relay, args.port, timeout=args.timeout)
    conn.putrequest("POST", "/upload", skip_host=True)
    conn.putheader("Host", f"{args.name}.nat.test:{args.port}")
    conn.putheader("Content-Length", str(args.size))
    conn.endheaders()
    marked = False
    for block in iter_download(args.size, args.seed):
        conn.send(block)
        outcome["bytes"] += len(block)
        if not marked and outcome["bytes"] >= args.mark:
            marked = True
            say("started")
            wait_for_go(args.go, args.timeout)
    response = conn.getresponse()
    outcome["status"] = response.status
    outcome["body"] = response.read().decode(errors="replace")


def websocket(args, outcome: dict) -> None:
    """Text messages one at a time, each echo awaited before the next is sent: a lost, repeated or reordered
    echo shows as a mismatch in `echoes`."""
    from websockets.sync.client import connect

    outcome["echoes"] = []
    with socket.create_connection((args.relay, args.port), timeout=args.timeout) as sock, connect(
        f"ws://{args.name}.nat.test:{args.port}/", sock=sock, open_timeout=args.timeout
    ) as ws:
        for number in range(args.size):
            if number == args.mark:
                say("started")
                wait_for_go(args.go, args.timeout)
            ws.send(f"message {number}")
            outcome["echoes"].append(ws.recv(timeout=args.timeout))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("get", "download", "upload", "websocket"))
    parser.add_argument("relay")
    parser.add_argument("port", type=int)
    parser.add_argument("name")
    parser.add_argument("--size", type=int, default=0, help="bytes, or messages for websocket")
    parser.add_argument("--mark", type=int, default=0)
    parser.add_argument("--seed", default="netlab")
    parser.add_argument("--path", default="/download", help="for download and get")
    parser.add_argument("--query", default="", help="appended to the download's query, e.g. &ms=4000")
    parser.add_argument("--go")
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args()
    outcome: dict = {"bytes": 0}
    began = time.monotonic()
    try:
        {"get": get, "download": download, "upload": upload, "websocket": websocket}[args.mode](args, outcome)
    except Exception as error:  # the outcome says what ended the transfer; the test judges it
        outcome["error"] = f"{type(error).__name__}: {error}"
    outcome["seconds"] = round(time.monotonic() - began, 3)
    say("result " + json.dumps(outcome))


if __name__ == "__main__":
    main()
