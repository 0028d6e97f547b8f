"""Streams that outlive the agent link, in the running programs: a download, an upload and a WebSocket
conversation go on through a link reset under them, byte-exact, once the agent is back; past the resume window
each of them fails visibly.

The agent's link runs through an in-test proxy (tests/e2e/linkproxy.py) whose `cut()` resets it at both ends
while new connections are forwarded, so the agent reconnects through it at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import re
import socket
import threading

import pytest

from .conftest import PORTWAY, free_port, start_origin, wait_until
from .linkproxy import LinkProxy
from .payload import expected_sha256, iter_download

SIZE = 50 * 1000 * 1000
STARTED = 4 * 1000 * 1000  # what each transfer moves before the cut: the cut falls mid-way
WAIT = 120.0  # bound on each transfer and wait; they take seconds on loopback, more on a busy 2-core machine
MESSAGES = 200


def tunnel(procs, resume_window: float):
    origin = start_origin(procs)
    port = free_port()
    relay = procs.start(PORTWAY + ["-v", "server", "--port", str(port), "--resume-window", str(resume_window)],
                        "relay")
    relay.wait_for_line(r"listening on")
    proxy = LinkProxy(port)
    try:
        agent = procs.start(PORTWAY + ["http", str(origin), "--relay", f"http://127.0.0.1:{proxy.port}",
                                       "--name", "resumer", "--resume-window", str(resume_window)], "agent")
        agent.wait_for_line(r"^http://resumer\.localhost:%d$" % port)
    except BaseException:
        proxy.close()
        raise
    return port, relay, agent, proxy


def connect(port: int) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)


class Transfer(threading.Thread):
    """One visitor's transfer, in a thread: it moves STARTED bytes, says so, waits until the link has been cut,
    then finishes. `outcome` is what it got, or the error that ended it."""

    def __init__(self, port: int, cut: threading.Event) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.cut = cut
        self.started = threading.Event()
        self.outcome: object = None

    def run(self) -> None:
        try:
            self.outcome = self.transfer()
        except Exception as error:  # the test looks at what ended it
            self.outcome = error
        finally:
            self.started.set()

    def halfway(self) -> None:
        self.started.set()
        assert self.cut.wait(WAIT)


class Download(Transfer):
    def transfer(self) -> str:
        with contextlib.closing(connect(self.port)) as conn:
            conn.request("GET", f"/download?bytes={SIZE}&seed=resume",
                         headers={"Host": f"resumer.localhost:{self.port}"})
            response = conn.getresponse()
            assert response.status == 200
            digest = hashlib.sha256(response.read(STARTED))
            self.halfway()
            while chunk := response.read(1 << 20):
                digest.update(chunk)
            return digest.hexdigest()


class Upload(Transfer):
    def transfer(self) -> tuple[int, bytes]:
        with contextlib.closing(connect(self.port)) as conn:
            conn.putrequest("POST", "/upload", skip_host=True)
            conn.putheader("Host", f"resumer.localhost:{self.port}")
            conn.putheader("Content-Length", str(SIZE))
            conn.endheaders()
            sent = 0
            for block in iter_download(SIZE, "upload"):
                conn.send(block)
                sent += len(block)
                if sent == STARTED - STARTED % len(block):
                    self.halfway()
            response = conn.getresponse()
            return response.status, response.read()


class Conversation(Transfer):
    """Text messages one at a time, each answered before the next; binary ones in between."""

    def transfer(self) -> list[str]:
        from websockets.sync.client import connect as ws_connect

        echoes = []
        with contextlib.closing(socket.create_connection(("127.0.0.1", self.port))) as sock, ws_connect(
            f"ws://resumer.localhost:{self.port}/", sock=sock, open_timeout=10
        ) as ws:
            for number in range(MESSAGES):
                if number == MESSAGES // 4:
                    self.halfway()
                ws.send(f"message {number}")
                echoes.append(ws.recv(timeout=WAIT))
        return echoes


def start_transfers(port: int, cut: threading.Event) -> list[Transfer]:
    transfers = [Download(port, cut), Upload(port, cut), Conversation(port, cut)]
    for transfer in transfers:
        transfer.start()
    for transfer in transfers:
        assert transfer.started.wait(WAIT), f"{type(transfer).__name__} never got going"
    return transfers


def finish(transfers: list[Transfer]) -> list[object]:
    for transfer in transfers:
        transfer.join(WAIT)
        assert not transfer.is_alive(), f"{type(transfer).__name__} hangs"
    return [transfer.outcome for transfer in transfers]


def test_a_download_an_upload_and_a_websocket_carry_on_through_a_link_reset(procs):
    port, relay, agent, proxy = tunnel(procs, resume_window=30)
    with proxy:
        cut = threading.Event()
        transfers = start_transfers(port, cut)
        assert proxy.cut() == 1
        cut.set()
        agent.wait_for_line(r"open streams resumed", timeout=WAIT)
        download, upload, echoes = finish(transfers)
        assert download == expected_sha256(SIZE, "resume")
        assert upload[0] == 200 and json.loads(upload[1]) == {"bytes": SIZE, "sha256": expected_sha256(SIZE, "upload")}
        assert echoes == [f"Echo: message {number}" for number in range(MESSAGES)]
        assert proxy.accepted == 2
    relay.wait_for_line(r"tunnel resumer online again .*: \d+ streams resumed", timeout=10)
    assert not re.search(r"Traceback|Exception in callback|never retrieved", relay.output() + agent.output())


def test_past_the_resume_window_each_transfer_fails_visibly_and_the_tunnel_serves_again(procs):
    port, relay, agent, proxy = tunnel(procs, resume_window=1)
    with proxy:
        cut = threading.Event()
        transfers = start_transfers(port, cut)
        proxy.refusing = True  # the way back stays down past the window
        assert proxy.cut() == 1
        relay.wait_for_line(r"tunnel resumer offline: the link was not resumed within 1s", timeout=WAIT)
        proxy.refusing = False
        cut.set()
        download, upload, echoes = finish(transfers)
        assert isinstance(download, (http.client.IncompleteRead, ConnectionError)), download
        # the origin never answered it: the relay says so, or the connection is reset mid-body
        assert isinstance(upload, (ConnectionError, http.client.HTTPException)) or upload[0] == 502, upload
        from websockets.exceptions import ConnectionClosedError

        assert isinstance(echoes, ConnectionClosedError), echoes
        agent.wait_for_line(r"reconnected: http://resumer\.localhost", timeout=WAIT)

        def served() -> bool:
            conn = connect(port)
            try:
                conn.request("GET", "/", headers={"Host": f"resumer.localhost:{port}"})
                return conn.getresponse().read() == b"hello from origin"
            except OSError:
                return False
            finally:
                conn.close()

        assert wait_until(served, timeout=WAIT, interval=0.2, what="the tunnel to serve again")
    assert not re.search(r"Traceback|Exception in callback|never retrieved", relay.output() + agent.output())


def test_a_websocket_outlives_one_link_reset_after_another(procs):
    port, relay, agent, proxy = tunnel(procs, resume_window=30)
    from websockets.sync.client import connect as ws_connect

    with proxy, contextlib.closing(socket.create_connection(("127.0.0.1", port))) as sock, ws_connect(
        f"ws://resumer.localhost:{port}/", sock=sock, open_timeout=10
    ) as ws:
        for cut in range(3):
            for number in range(10):
                ws.send(f"before cut {cut}: {number}")
                assert ws.recv(timeout=WAIT) == f"Echo: before cut {cut}: {number}"
            ws.send(f"across cut {cut}")  # in flight, or waiting in the relay, when the link goes
            assert proxy.cut() == 1
            assert ws.recv(timeout=WAIT) == f"Echo: across cut {cut}"
            wait_until(lambda: len(re.findall(r"open streams resumed", agent.output())) == cut + 1, timeout=WAIT,
                       what=f"resume number {cut + 1}")
        assert proxy.accepted == 4
    assert not re.search(r"Traceback|Exception in callback|never retrieved", relay.output() + agent.output())
