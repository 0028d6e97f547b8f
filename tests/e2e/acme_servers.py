"""An ACME test CA and the DNS it validates against, started by the tests on 127.0.0.1 free ports: Debian's
`pebble` (Let's Encrypt's test CA) and `named` (BIND 9) serving a throwaway zone that accepts TSIG-signed dynamic
updates. Names under DOMAIN exist only there (and in the clients' explicit host mappings)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import ssl
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import trustme

from .conftest import Proc, Processes, free_port, wait_until

DOMAIN = "portway.test"  # a reserved name (RFC 6761): never a real lookup
TSIG_KEY = "portway-test"
NAMED = shutil.which("named") or "/usr/sbin/named"


def require(program: str, package: str) -> str:
    found = shutil.which(program) or (program if os.access(program, os.X_OK) else None)
    assert found, f"{program} (Debian's {package} package) is needed: run `bash scripts/test.sh`"
    return found


@dataclass
class Dns:
    proc: Proc
    port: int
    secret: str

    def update_url(self, secret: str | None = None) -> str:
        quoted = (secret or self.secret).replace("/", "%2F").replace("+", "%2B")
        return f"rfc2136://{TSIG_KEY}:{quoted}@127.0.0.1:{self.port}/{DOMAIN}"


def start_bind(procs: Processes, directory: Path) -> Dns:
    """BIND 9 in the foreground, authoritative for DOMAIN: DOMAIN and *.DOMAIN are 127.0.0.1; updates signed with
    the key are accepted."""
    named = require(NAMED, "bind9")
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    secret = base64.b64encode(os.urandom(32)).decode()
    (directory / "zone").write_text(
        "$TTL 60\n"
        f"@ IN SOA ns.{DOMAIN}. admin.{DOMAIN}. 1 60 60 600 60\n"
        f"@ IN NS ns.{DOMAIN}.\n"
        "ns IN A 127.0.0.1\n@ IN A 127.0.0.1\n* IN A 127.0.0.1\n")
    (directory / "named.conf").write_text(f"""
options {{
    directory "{directory}";
    pid-file "{directory}/named.pid";
    session-keyfile "{directory}/session.key";
    managed-keys-directory "{directory}";
    listen-on port {port} {{ 127.0.0.1; }};
    listen-on-v6 {{ none; }};
    recursion no;
    dnssec-validation no;
    allow-query {{ any; }};
}};
controls {{ }};
key "{TSIG_KEY}" {{ algorithm hmac-sha256; secret "{secret}"; }};
zone "{DOMAIN}" {{ type primary; file "{directory}/zone"; allow-update {{ key "{TSIG_KEY}"; }}; }};
""")
    proc = procs.start([named, "-g", "-c", str(directory / "named.conf")], "named")
    proc.wait_for_line(r"\brunning\b")
    return Dns(proc, port, secret)


@dataclass
class Pebble:
    proc: Proc
    port: int
    management_port: int
    https_ca: Path  # the CA of pebble's own HTTPS certificate (what --acme-ca trusts)

    @property
    def directory(self) -> str:
        return f"https://127.0.0.1:{self.port}/dir"

    def _get(self, path: str) -> str:
        context = ssl.create_default_context(cafile=str(self.https_ca))
        with urllib.request.urlopen(f"https://127.0.0.1:{self.management_port}{path}", context=context,
                                    timeout=10) as reply:
            return reply.read().decode()

    def root(self) -> str:
        """The root that issued the certificates (made anew at each start of pebble); "" if pebble doesn't answer."""
        try:
            return self._get("/roots/0")
        except OSError:
            return ""

    def intermediate(self) -> str:
        return self._get("/intermediates/0")

    def orders(self) -> int:
        """How many orders pebble has taken."""
        return sum("Added order" in line for line in self.proc.stdout + self.proc.stderr)

    def issued(self) -> int:
        return sum("Issued certificate serial" in line for line in self.proc.stdout + self.proc.stderr)


def start_pebble(procs: Processes, directory: Path, dns_port: int, relay_port: int,
                 validity: int | None = None) -> Pebble:
    """pebble validating against the DNS on `dns_port`: TLS-ALPN-01 (and HTTP-01) go to `relay_port`. It really
    validates (no PEBBLE_VA_ALWAYS_VALID) and never reuses an authorization (each order proves control anew)."""
    pebble = require("pebble", "pebble")
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    served = ca.issue_cert("127.0.0.1", "localhost")
    served.private_key_pem.write_to_path(str(directory / "key.pem"))
    served.cert_chain_pems[0].write_to_path(str(directory / "cert.pem"))
    ca.cert_pem.write_to_path(str(directory / "https-ca.pem"))
    port, management_port = free_port(), free_port()
    settings = {
        "listenAddress": f"127.0.0.1:{port}",
        "managementListenAddress": f"127.0.0.1:{management_port}",
        "certificate": str(directory / "cert.pem"),
        "privateKey": str(directory / "key.pem"),
        "httpPort": relay_port,
        "tlsPort": relay_port,
        "ocspResponderURL": "",
        "externalAccountBindingRequired": False,
    }
    if validity is not None:
        settings["certificateValidityPeriod"] = validity
    (directory / "pebble.json").write_text(json.dumps({"pebble": settings}))
    env = {"PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0", "PEBBLE_AUTHZREUSE": "0"}
    proc = procs.start([pebble, "-config", str(directory / "pebble.json"), "-dnsserver", f"127.0.0.1:{dns_port}"],
                       "pebble", env=env)
    proc.wait_for_line(r"ACME directory available")
    started = Pebble(proc, port, management_port, directory / "https-ca.pem")
    # pebble prints its addresses just before it listens on them: wait until both answer
    wait_until(lambda: answers(started.directory, started.https_ca) and started.root(), what="pebble to answer")
    return started


def answers(url: str, ca: Path) -> bool:
    try:
        with urllib.request.urlopen(url, context=ssl.create_default_context(cafile=str(ca)), timeout=5):
            return True
    except OSError:
        return False
