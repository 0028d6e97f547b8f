"""Node links of a TLS node (relay/nodes.py): dialled with TLS, the other node's certificate verified as
NODE-ID.DOMAIN against the system trust store and --cluster-ca; a certificate that doesn't verify, or a node that
speaks no TLS, is one 502 line naming the node and the reason, never a silent fall back to plain TCP. The other
nodes here are asyncio servers on 127.0.0.1 (no name is resolved: the name checked is the server_hostname)."""

from __future__ import annotations

import asyncio
import ssl

import pytest
import trustme

from portway.config import ClusterTarget, RelayConfig
from portway.errors import ConfigurationError, HttpError
from portway.relay.metrics import RelayCounters
from portway.relay.nodes import NodeLinks, node_link_tls, node_server_name
from portway.relay.registry import MemoryRegistry, RemoteLease

DOMAIN = "cluster.test"


@pytest.fixture(scope="module")
def authority():
    return trustme.CA()


@pytest.fixture
def ca_file(authority, tmp_path):
    path = tmp_path / "cluster-ca.pem"
    authority.cert_pem.write_to_path(str(path))
    return str(path)


def node_config(**extra) -> RelayConfig:
    return RelayConfig(cluster=ClusterTarget.parse("redis://127.0.0.1:1/0"), node_id="node-b", domain=DOMAIN,
                       advertise="127.0.0.1:9101", cluster_secret="s", **extra)


def test_a_node_serving_plain_tcp_dials_plain_tcp():
    assert node_link_tls(node_config()) is None


def test_a_tls_node_dials_tls_and_verifies_name_and_chain(ca_file):
    for config in (node_config(tls_cert="cert.pem", tls_key="key.pem"),
                   node_config(tls_cert="cert.pem", tls_key="key.pem", cluster_ca=ca_file),
                   node_config(acme_email="ops@cluster.test")):
        context = node_link_tls(config)
        assert context is not None and context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert node_server_name("Relay-A", "Cluster.Test.") == "relay-a.cluster.test"


def test_cluster_ca_goes_with_a_tls_cluster_node_and_must_load(tmp_path):
    with pytest.raises(ConfigurationError, match="--cluster-ca .* goes with --cluster and --tls-cert"):
        node_config(cluster_ca="ca.pem")  # a plain node would never use it: refused, not ignored
    with pytest.raises(ConfigurationError, match="--cluster-ca"):
        RelayConfig(tls_cert="cert.pem", tls_key="key.pem", cluster_ca="ca.pem")
    garbage = tmp_path / "ca.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(ConfigurationError, match=r"--cluster-ca .*ca\.pem: not a readable PEM CA certificate"):
        node_link_tls(node_config(tls_cert="cert.pem", tls_key="key.pem", cluster_ca=str(garbage)))


async def dial_node_a(config: RelayConfig, server_context: ssl.SSLContext | None):
    """Node B opens a node link to node-a, an asyncio server that answers the upgrade with a refusal: what node B
    raised, its counters, and per upgrade request node-a read, the server name its TLS handshake asked for (None:
    plain TCP)."""
    asked: list[str | None] = []

    async def refuse(reader, writer):
        try:
            start = await reader.read(4)
            if start != b"GET ":  # not HTTP (a TLS hello to a plain node): answered as a plain relay would
                writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                await writer.drain()
                writer.close()
                return
            await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            writer.close()
            return
        asked.append(named.pop() if named else None)
        writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 23\r\nConnection: close\r\n\r\n"
                     b'{"message": "not you"}\n')
        await writer.drain()
        writer.close()

    named: list[str | None] = []  # the server name of the handshake being made
    if server_context is not None:
        server_context.sni_callback = lambda _connection, name, _context: named.append(name)
    server = await asyncio.start_server(refuse, "127.0.0.1", 0, ssl=server_context)
    port = server.sockets[0].getsockname()[1]
    counters = RelayCounters()
    links = NodeLinks(config, MemoryRegistry(), counters)
    try:
        with pytest.raises(HttpError) as failed:
            await links.session(RemoteLease("node-a", f"127.0.0.1:{port}", "portway", 1), "web")
    finally:
        links.close()
        server.close()
    assert failed.value.status == 502 and "relay node node-a" in failed.value.message
    assert "\n" not in failed.value.message
    return failed.value.message, counters.node_link_failures, asked


def serving(authority: trustme.CA, *names: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert(*names).configure_cert(context)
    return context


def test_a_node_whose_wildcard_certificate_verifies_gets_the_link_request_over_tls(authority, ca_file):
    config = node_config(tls_cert="cert.pem", tls_key="key.pem", cluster_ca=ca_file)
    message, failures, asked = asyncio.run(dial_node_a(config, serving(authority, f"*.{DOMAIN}", DOMAIN)))
    assert asked == [f"node-a.{DOMAIN}"]  # the upgrade went over TLS, under the node's own name
    assert "refused this node's link (not you)" in message and failures["refused"] == 1


@pytest.mark.parametrize("case", ["other name", "unknown CA"])
def test_a_node_whose_certificate_does_not_verify_is_refused_with_the_reason(authority, ca_file, case):
    if case == "other name":  # a certificate of the cluster's CA, but for another node only
        config = node_config(tls_cert="cert.pem", tls_key="key.pem", cluster_ca=ca_file)
        server_context, reason = serving(authority, f"node-c.{DOMAIN}"), "Hostname mismatch"
    else:  # the right name, from a CA that neither the system nor --cluster-ca vouches for
        config = node_config(tls_cert="cert.pem", tls_key="key.pem")
        server_context, reason = serving(authority, f"*.{DOMAIN}"), "unable to get local issuer certificate"
    message, failures, asked = asyncio.run(dial_node_a(config, server_context))
    assert message.startswith("Tunnel 'web' is served by relay node node-a, whose certificate this node does not "
                              f"accept for node-a.{DOMAIN} (")
    assert reason in message
    assert asked == [] and failures["untrusted"] == 1 and failures["refused"] == failures["unreachable"] == 0


def test_a_tls_node_does_not_fall_back_to_plain_tcp(ca_file):
    config = node_config(tls_cert="cert.pem", tls_key="key.pem", cluster_ca=ca_file)
    message, failures, asked = asyncio.run(dial_node_a(config, None))
    assert f"cannot reach over TLS as node-a.{DOMAIN}" in message
    assert asked == [] and failures["unreachable"] == 1


def test_a_plain_node_dials_plain_tcp(authority):
    message, failures, asked = asyncio.run(dial_node_a(node_config(), None))
    assert asked == [None] and "not you" in message and failures["refused"] == 1
