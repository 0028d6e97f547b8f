#!/usr/bin/env python3
"""Make docs/inspector.png, the README's picture of the inspector:

    python3 scripts/screenshot-inspector.py [--out docs/inspector.png] [--chromium /usr/bin/chromium]

Starts the test suite's Node origin (tests/e2e/fixtures/ws_echo_server.js) and `portway http` with its
embedded relay (no --relay) and its inspector on a free port, sends a few requests and a WebSocket
conversation through the tunnel, replays one request twice (once edited), then opens the inspector in
headless Chromium (Playwright driving Debian's chromium), selects a JSON request and saves the
screenshot. Everything listens on 127.0.0.1; every process it starts is stopped at the end.
Needs what `bash scripts/test.sh` installs (node, the npm tools, chromium, playwright).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORIGIN = ROOT / "tests" / "e2e" / "fixtures" / "ws_echo_server.js"


class Child:
    def __init__(self, args: list[str], env: dict | None = None) -> None:
        self.lines: list[str] = []
        self.popen = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                      start_new_session=True, cwd=ROOT)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for raw in iter(self.popen.stdout.readline, b""):
            self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))

    def wait_for(self, pattern: str, timeout: float = 20.0) -> re.Match:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                match = regex.search(line)
                if match:
                    return match
            if self.popen.poll() is not None:
                break
            time.sleep(0.02)
        raise SystemExit(f"no line matching {pattern!r}; output:\n" + "\n".join(self.lines))

    def stop(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(10)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def request(port: int, host: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers={"Host": host, **(headers or {})})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def api(inspector: str, path: str, body: dict | None = None):
    conn = http.client.HTTPConnection(inspector.split("//")[1].split(":")[0], int(inspector.rsplit(":", 1)[1]),
                                      timeout=30)
    try:
        data = json.dumps(body).encode() if body is not None else None
        conn.request("POST" if data is not None or path.endswith("/replay") else "GET", path, body=data)
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def traffic(relay_port: int, host: str, inspector: str) -> int:
    """A few exchanges of each kind; returns the id of the JSON POST to show."""
    from websockets.sync.client import connect

    request(relay_port, host, "GET", "/")
    request(relay_port, host, "GET", "/whoami?user=ada&lang=en")
    request(relay_port, host, "POST", "/echo", b"user=ada&plan=pro&notify=on",
            {"Content-Type": "application/x-www-form-urlencoded"})
    request(relay_port, host, "GET", "/status/404")
    request(relay_port, host, "GET", "/download?bytes=4096&seed=png")
    sock = socket.create_connection(("127.0.0.1", relay_port))
    with connect(f"ws://{host}/live", sock=sock, open_timeout=10) as ws:
        for text in ("hello", '{"subscribe": "orders"}'):
            ws.send(text)
            ws.recv(timeout=10)
    order = {"order": 1042, "customer": {"name": "Ada Lovelace", "email": "ada@example.com"},
             "items": [{"sku": "PW-1", "qty": 2, "price": 9.5}, {"sku": "PW-7", "qty": 1, "price": 24.0}],
             "gift": False, "note": None}
    request(relay_port, host, "POST", "/echo", json.dumps(order).encode(),
            {"Content-Type": "application/json", "Authorization": "Bearer demo-token", "Cookie": "session=4f2a9c"})
    listed = api(inspector, "/api/requests")["requests"]
    original = next(item["id"] for item in listed if item["method"] == "POST" and item["content_type"] == "application/json")
    api(inspector, f"/api/requests/{original}/replay")
    request(relay_port, host, "GET", "/whoami?user=grace")
    return original


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "inspector.png"))
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    children = []
    try:
        origin_port = free_port()
        origin = Child(["node", str(ORIGIN), str(origin_port), "shop-api"])
        children.append(origin)
        origin.wait_for(r"^listening")
        agent = Child([sys.executable, "-m", "portway", "http", str(origin_port), "--name", "quiet-river",
                       "--inspect", "127.0.0.1:0"], env=env)
        children.append(agent)
        url = agent.wait_for(r"^http://(quiet-river\.localhost):(\d+)$")
        inspector = agent.wait_for(r"inspector: (http://127\.0\.0\.1:\d+)").group(1)
        host, relay_port = f"{url.group(1)}:{url.group(2)}", int(url.group(2))
        shown = traffic(relay_port, host, inspector)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=args.chromium)
            try:
                page = browser.new_page(viewport={"width": 1440, "height": 900}, device_scale_factor=1)
                page.goto(inspector + "/")
                page.locator(f'#list tbody tr[data-id="{shown}"]').click()
                page.locator("#tab-request pre.json").wait_for()
                page.locator("#live.on").wait_for()
                page.screenshot(path=args.out)
            finally:
                browser.close()
        print(f"wrote {args.out}")
    finally:
        for child in reversed(children):
            child.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
