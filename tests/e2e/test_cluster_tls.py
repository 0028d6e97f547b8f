"""A cluster of TLS nodes: three real `portway server --cluster --tls-cert …` nodes on one real redis-server, their
certificates from one test CA given as --cluster-ca. A visitor over HTTPS on node B reaches the tunnel on node A
through a node link that node B dialled with TLS and verified as node-a.DOMAIN (body checksummed). Node C's
certificate covers 127.0.0.1 and its tunnel's name but not node-c.DOMAIN: node B refuses to link to it, in one line
naming node C and the reason. When node C stops, it sends its agent to another node (MOVE) over TLS, and the
tunnel is served again. Every connection goes to 127.0.0.1 with the TLS server name set: no name is resolved."""

from __future__ import annotations

import hashlib
import html
import http.client
import signal
import socket
import ssl

import pytest

from .cluster_nodes import redis_server, start_node  # noqa: F401 (a fixture)
from .conftest import PORTWAY, Relay, start_origin
from .payload import expected_sha256

TOKEN = "tls-cluster-token"
DOMAIN = "cluster.test"


@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    """The cluster's CA; a wildcard certificate (nodes A and B) and one without node-c.DOMAIN (node C)."""
    trustme = pytest.importorskip("trustme")
    authority = trustme.CA()
    directory = tmp_path_factory.mktemp("cluster-tls")
    paths = {"ca": directory / "ca.pem"}
    authority.cert_pem.write_to_path(str(paths["ca"]))
    for kind, names in (("wildcard", ("127.0.0.1", DOMAIN, f"*.{DOMAIN}")),
                        ("narrow", ("127.0.0.1", DOMAIN, f"other.{DOMAIN}"))):
        issued = authority.issue_cert(*names)
        paths[kind] = (directory / f"{kind}.pem", directory / f"{kind}-key.pem")
        issued.cert_chain_pems[0].write_to_path(str(paths[kind][0]))
        issued.private_key_pem.write_to_path(str(paths[kind][1]))
    return paths


def tls_node(procs, redis, node_id: str, tokens, certificates, kind: str) -> Relay:
    cert, key = certificates[kind]
    node = start_node(procs, redis, node_id, tokens, "--domain", DOMAIN, "--tls-cert", str(cert),
                      "--tls-key", str(key), "--cluster-ca", str(certificates["ca"]), "--drain-timeout", "5")
    return Relay(node.proc, node.port, DOMAIN)


def tls_agent(procs, node: Relay, origin: int, name: str, ca):
    agent = procs.start(PORTWAY + ["http", str(origin), "--relay", f"https://127.0.0.1:{node.port}", "--ca", str(ca),
                                   "--name", name, "--token", TOKEN, "--no-inspect"], f"agent {name}")
    agent.wait_for_line(r"https://%s\.%s:%d" % (name, DOMAIN.replace(".", r"\."), node.port))
    return agent


def https_get(node: Relay, name: str, path: str, ca) -> tuple[int, bytes]:
    """GET over HTTPS from 127.0.0.1:PORT, the certificate checked as NAME.DOMAIN, as a browser would."""
    context = ssl.create_default_context(cafile=str(ca))
    conn = http.client.HTTPSConnection("127.0.0.1", node.port, timeout=30)
    conn.sock = context.wrap_socket(socket.create_connection(("127.0.0.1", node.port), timeout=30),
                                    server_hostname=f"{name}.{DOMAIN}")
    try:
        conn.request("GET", path, headers={"Host": node.host(name)})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_tls_nodes_forward_over_verified_tls_and_hand_agents_over(procs, redis_server, tmp_path,  # noqa: F811
                                                                   certificates):
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(f'[[token]]\nlabel = "team"\ntoken = "{TOKEN}"\n')
    node_a, node_b = (tls_node(procs, redis_server, f"node-{letter}", tokens, certificates, "wildcard")
                      for letter in "ab")
    node_c = tls_node(procs, redis_server, "node-c", tokens, certificates, "narrow")
    node_b.proc.wait_for_line(r"node links over TLS, each node checked as NODE-ID\.cluster\.test")
    origin = start_origin(procs)
    tls_agent(procs, node_a, origin, "web", certificates["ca"])
    other = tls_agent(procs, node_c, origin, "other", certificates["ca"])

    size = 1024 * 1024
    status, body = https_get(node_b, "web", f"/download?bytes={size}&seed=tls", certificates["ca"])
    assert status == 200 and len(body) == size and hashlib.sha256(body).hexdigest() == expected_sha256(size, "tls")
    assert "node link to" not in node_b.proc.output()  # (only failures are logged at the default level)

    status, body = https_get(node_b, "other", "/", certificates["ca"])
    refusal = (f"Tunnel 'other' is served by relay node node-c, whose certificate this node does not accept for "
               f"node-c.{DOMAIN} (Hostname mismatch, certificate is not valid for 'node-c.{DOMAIN}').")
    assert status == 502 and refusal in html.unescape(body.decode())
    node_b.proc.wait_for_line(r"node link to node-c at 127\.0\.0\.1:%d: " % node_c.port + "(.*)")
    assert refusal in node_b.proc.output()

    node_c.proc.popen.send_signal(signal.SIGTERM)  # it sends its agent to node A or B, dialled over TLS
    other.wait_for_line(r"moved to relay node at 127\.0\.0\.1:(%d|%d)" % (node_a.port, node_b.port))
    assert node_c.proc.wait_exit(timeout=15) == 0
    assert https_get(node_b, "other", "/", certificates["ca"]) == (200, b"hello from origin")
