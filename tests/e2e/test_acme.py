"""Automatic HTTPS against a real ACME server: pebble (validating for real) with BIND 9 as the DNS it asks. The relay
gets a wildcard certificate through DNS-01 (RFC 2136 updates) or per-name ones through TLS-ALPN-01 on its own
port, stores them, reuses them after a restart and renews them without one."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import dns.message
import dns.query
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from .acme_servers import DOMAIN, Dns, Pebble, start_bind, start_pebble
from .conftest import FIXTURES, PORTWAY, Proc, Processes, free_port, start_origin, wait_until

EMAIL = "ops@example.com"
RESOLVING = [sys.executable, str(FIXTURES / "portway_resolving.py"), DOMAIN]  # portway with DOMAIN → 127.0.0.1
OBTAINED = r"ACME: certificate for {} obtained"
WILDCARD_NAMES = re.escape(f"*.{DOMAIN}, {DOMAIN}")


@dataclass
class AcmeRelay:
    proc: Proc
    port: int
    state: Path
    root: Path  # pebble's root, what visitors trust


def start_acme_relay(procs: Processes, pebble: Pebble, port: int, state: Path, root: Path, *extra: str) -> AcmeRelay:
    proc = procs.start(PORTWAY + ["server", "--port", str(port), "--domain", DOMAIN, "--acme-email", EMAIL,
                                  "--acme-directory", pebble.directory, "--acme-ca", str(pebble.https_ca),
                                  "--state-dir", str(state), *extra], "relay")
    proc.wait_for_line(r"listening on")
    return AcmeRelay(proc, port, state, root)


def acme_world(procs: Processes, tmp_path: Path, validity: int | None = None) -> tuple[Dns, Pebble, int, Path]:
    dns_server = start_bind(procs, tmp_path / "bind")
    relay_port = free_port()
    pebble = start_pebble(procs, tmp_path / "pebble", dns_server.port, relay_port, validity)
    root = tmp_path / "pebble-root.pem"
    root.write_text(pebble.root())
    return dns_server, pebble, relay_port, root


def start_tunnel(procs: Processes, relay: AcmeRelay, name: str) -> Proc:
    origin = start_origin(procs)
    agent = procs.start(RESOLVING + ["portway", "http", str(origin), "--relay", f"https://{DOMAIN}:{relay.port}",
                                     "--ca", str(relay.root), "--name", name, "--no-inspect"], f"agent {name}")
    agent.wait_for_line(r"^https://%s\.%s:%d$" % (name, re.escape(DOMAIN), relay.port))
    return agent


def curl(relay: AcmeRelay, host: str, path: str = "/") -> subprocess.CompletedProcess:
    """curl trusting pebble's root only, with `host` mapped to 127.0.0.1 by curl itself."""
    program = shutil.which("curl")
    assert program, "curl is needed"
    return subprocess.run([program, "-sS", "--max-time", "10", "--cacert", str(relay.root),
                           "--resolve", f"{host}:{relay.port}:127.0.0.1", f"https://{host}:{relay.port}{path}"],
                          capture_output=True, text=True, timeout=30)


def served_certificate(relay: AcmeRelay, host: str) -> x509.Certificate:
    """The certificate a handshake naming `host` gets, verified against pebble's root."""
    context = ssl.create_default_context(cafile=str(relay.root))
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=host) as tls:
            return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))


def handshake_refused(relay: AcmeRelay, host: str) -> None:
    """A handshake naming `host` that the relay aborts (an alert, or under uvloop a closed connection)."""
    context = ssl.create_default_context(cafile=str(relay.root))
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as raw:
        with pytest.raises(ssl.SSLError):
            context.wrap_socket(raw, server_hostname=host)


def txt_records(dns_server: Dns, name: str) -> list:
    reply = dns.query.tcp(dns.message.make_query(name, "TXT"), "127.0.0.1", port=dns_server.port, timeout=5)
    return reply.answer


def test_a_wildcard_certificate_through_dns01_serves_every_tunnel_and_survives_a_restart(procs, tmp_path):
    dns_server, pebble, port, root = acme_world(procs, tmp_path)
    state = tmp_path / "state"
    relay = start_acme_relay(procs, pebble, port, state, root, "--acme-dns", dns_server.update_url())
    relay.proc.wait_for_line(OBTAINED.format(WILDCARD_NAMES))
    start_tunnel(procs, relay, "web")

    answer = curl(relay, f"web.{DOMAIN}")
    assert answer.returncode == 0 and answer.stdout == "hello from origin", answer.stderr
    certificate = served_certificate(relay, f"web.{DOMAIN}")
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sorted(names.get_values_for_type(x509.DNSName)) == sorted([f"*.{DOMAIN}", DOMAIN])
    assert served_certificate(relay, DOMAIN).serial_number == certificate.serial_number  # the relay's own name too
    assert txt_records(dns_server, f"_acme-challenge.{DOMAIN}") == []  # the challenge records were removed
    stored = list((state / "acme").glob("*/certificates/_wildcard.key"))
    assert len(stored) == 1 and stored[0].stat().st_mode & 0o077 == 0
    assert (stored[0].parent.parent / "account.key").stat().st_mode & 0o077 == 0
    assert pebble.orders() == 1

    # a restart serves the stored certificate: no new order
    relay.proc.kill(signal.SIGTERM)
    relay = start_acme_relay(procs, pebble, port, state, root, "--acme-dns", dns_server.update_url())
    relay.proc.wait_for_line(r"ACME: using the stored certificate for " + WILDCARD_NAMES)
    assert served_certificate(relay, f"web.{DOMAIN}").serial_number == certificate.serial_number
    answer = curl(relay, DOMAIN, "/api/status")
    assert answer.returncode == 0 and '"tunnels"' in answer.stdout, answer.stderr
    # SIGHUP (systemctl reload) reads the stored certificates again; it doesn't stop the relay
    relay.proc.popen.send_signal(signal.SIGHUP)
    relay.proc.wait_for_line(r"ACME: reloaded the stored certificate for " + WILDCARD_NAMES)
    assert curl(relay, f"web.{DOMAIN}", "/api/status").returncode == 0 and relay.proc.popen.poll() is None
    assert pebble.orders() == 1
    assert "obtained" not in relay.proc.output() and "Traceback" not in relay.proc.output()


def test_per_name_certificates_through_tls_alpn01_only_for_registered_tunnels(procs, tmp_path):
    dns_server, pebble, port, root = acme_world(procs, tmp_path)
    relay = start_acme_relay(procs, pebble, port, tmp_path / "state", root, "-v")
    relay.proc.wait_for_line(OBTAINED.format(re.escape(DOMAIN)))  # the relay's own name, for its agents
    start_tunnel(procs, relay, "shop")

    # a name nobody registered: refused, and never ordered
    handshake_refused(relay, f"nobody.{DOMAIN}")
    relay.proc.wait_for_line(r"no certificate for nobody\.portway\.test: not a registered tunnel")
    # the registered one: its first visit orders its certificate (that handshake is refused meanwhile)
    handshake_refused(relay, f"shop.{DOMAIN}")
    relay.proc.wait_for_line(OBTAINED.format(re.escape(f"shop.{DOMAIN}")))
    answer = curl(relay, f"shop.{DOMAIN}")
    assert answer.returncode == 0 and answer.stdout == "hello from origin", answer.stderr
    names = served_certificate(relay, f"shop.{DOMAIN}").extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert names == [f"shop.{DOMAIN}"]
    # orders are placed one at a time, in the order asked: had `nobody` been ordered, it would be done by now
    assert pebble.orders() == 2
    assert "nobody" not in pebble.proc.output()
    assert not list((tmp_path / "state").glob("acme/*/certificates/nobody*"))
    assert "Traceback" not in relay.proc.output()


def test_a_certificate_near_its_end_is_renewed_while_a_websocket_stays_open(procs, tmp_path):
    from websockets.sync.client import connect

    dns_server, pebble, port, root = acme_world(procs, tmp_path, validity=12)  # renewed 8 s after issue
    relay = start_acme_relay(procs, pebble, port, tmp_path / "state", root, "--acme-dns", dns_server.update_url())
    relay.proc.wait_for_line(OBTAINED.format(WILDCARD_NAMES))
    start_tunnel(procs, relay, "live")
    first = served_certificate(relay, f"live.{DOMAIN}")

    context = ssl.create_default_context(cafile=str(root))
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    with connect(f"wss://live.{DOMAIN}:{port}/", sock=raw, ssl=context, server_hostname=f"live.{DOMAIN}",
                 open_timeout=10) as ws:
        ws.send("before")
        assert ws.recv(timeout=10) == "Echo: before"
        installed = len(re.findall(OBTAINED.format(WILDCARD_NAMES), relay.proc.output()))
        wait_until(lambda: len(re.findall(OBTAINED.format(WILDCARD_NAMES), relay.proc.output())) > installed,
                   timeout=40, interval=0.2, what="a renewal while the WebSocket is open")
        ws.send("after")
        assert ws.recv(timeout=10) == "Echo: after"
    renewed = served_certificate(relay, f"live.{DOMAIN}")
    assert renewed.serial_number != first.serial_number
    assert renewed.not_valid_after_utc > first.not_valid_after_utc
    assert "Traceback" not in relay.proc.output()


def test_a_refused_dns_update_is_one_line_and_no_certificate(procs, tmp_path):
    dns_server, pebble, port, root = acme_world(procs, tmp_path)
    wrong = base64.b64encode(os.urandom(32)).decode()
    relay = start_acme_relay(procs, pebble, port, tmp_path / "state", root,
                             "--acme-dns", dns_server.update_url(secret=wrong))
    line = relay.proc.wait_for_line(r"ACME: could not get a certificate for .*").group(0)
    assert WILDCARD_NAMES.replace("\\", "") in line and str(dns_server.port) in line
    assert "refused the TSIG key 'portway-test'" in line and line.endswith("none in use yet; next try in 60 s")
    assert "Traceback" not in relay.proc.output()
    assert "BEGIN" not in relay.proc.output() and wrong not in relay.proc.output()
    handshake_refused(relay, f"web.{DOMAIN}")


def test_a_failed_renewal_keeps_the_last_good_certificate_in_use(procs, tmp_path):
    dns_server, pebble, port, root = acme_world(procs, tmp_path, validity=12)
    relay = start_acme_relay(procs, pebble, port, tmp_path / "state", root, "--acme-dns", dns_server.update_url())
    relay.proc.wait_for_line(OBTAINED.format(WILDCARD_NAMES))
    first = served_certificate(relay, DOMAIN)
    dns_server.proc.kill()  # the DNS server is gone: the renewal (8 s after issue) can't set its TXT record
    line = relay.proc.wait_for_line(r"ACME: could not get a certificate for .*", timeout=30).group(0)
    assert str(dns_server.port) in line and line.endswith("the last good certificate stays in use; next try in 60 s")
    # the same certificate is served (compared unverified: this short-lived one may be past its end by now)
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=f"any.{DOMAIN}") as tls:
            served = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))
    assert served.serial_number == first.serial_number
    assert "Traceback" not in relay.proc.output()


@pytest.mark.parametrize("problem, expected", [
    ("state", r"cannot use .* for ACME state \(Not a directory\): pass --state-dir DIR"),
    ("ca", r"--acme-ca .*missing\.pem: not a readable PEM CA certificate \(No such file or directory\)"),
])
def test_an_unusable_state_directory_or_acme_ca_is_one_line_at_start(procs, tmp_path, problem, expected):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    state = blocked if problem == "state" else tmp_path / "state"
    extra = ["--acme-ca", str(tmp_path / "missing.pem")] if problem == "ca" else []
    proc = procs.start(PORTWAY + ["server", "--port", "0", "--domain", DOMAIN, "--acme-email", EMAIL,
                                  "--acme-directory", "https://127.0.0.1:9/dir", "--state-dir", str(state), *extra],
                       "relay")
    assert proc.wait_exit() == 2
    assert len(proc.stderr) == 1 and re.search(expected, proc.stderr[0]), proc.stderr


def test_chromium_opens_a_tunnel_over_https_with_the_acme_certificate(procs, tmp_path):
    from .test_inspector_browser import CHROMIUM

    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("Playwright is required: run `bash scripts/test.sh` (pip install -e '.[test]')")
    assert shutil.which(CHROMIUM), "Chromium is required: run `bash scripts/test.sh` (apt-get install chromium)"
    dns_server, pebble, port, root = acme_world(procs, tmp_path)
    relay = start_acme_relay(procs, pebble, port, tmp_path / "state", root, "--acme-dns", dns_server.update_url())
    relay.proc.wait_for_line(OBTAINED.format(WILDCARD_NAMES))
    start_tunnel(procs, relay, "browsed")

    # Chromium trusts pebble's CA by its issuing key (the intermediate every certificate is signed with: pebble's
    # root is made anew each run, so it can't be in a trust store); names map to 127.0.0.1 inside the browser
    intermediate = x509.load_pem_x509_certificate(pebble.intermediate().encode())
    spki = intermediate.public_key().public_bytes(serialization.Encoding.DER,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    pin = base64.b64encode(hashlib.sha256(spki).digest()).decode()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
            f"--host-resolver-rules=MAP *.{DOMAIN} 127.0.0.1, MAP {DOMAIN} 127.0.0.1",
            f"--ignore-certificate-errors-spki-list={pin}"])
        try:
            page = browser.new_page()
            reply = page.goto(f"https://browsed.{DOMAIN}:{port}/", timeout=15_000)
            assert reply is not None and reply.status == 200
            assert page.inner_text("body") == "hello from origin"
            assert page.evaluate("location.protocol") == "https:"
        finally:
            browser.close()
