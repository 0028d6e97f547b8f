"""The relay's ACME pieces without an ACME server: the settings, the TLS-ALPN-01 challenge certificate, and the SNI
choice, driven through in-memory TLS handshakes (ssl.MemoryBIO) against the relay's real server context."""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from pathlib import Path

import josepy as jose
import pytest
import trustme
from acme import challenges, errors, messages
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

from portway.config import RELAY_SETTINGS, DnsUpdateTarget, RelayConfig, default_state_dir, load, relay_config
from portway.errors import ConfigurationError
from portway.relay.acme import AcmeCertificates, store_directory
from portway.relay.acme_client import (
    ACME_IDENTIFIER, ACME_TLS_ALPN, TLSALPN01, Issued, TlsAlpnSolver, challenge_certificate, describe,
)
from portway.relay.acme_plan import WILDCARD

DOMAIN = "tunnels.example.com"
SECRET = "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0"


# ------------------------------------------------------------------------------------------------- settings

def test_an_rfc2136_url_in_full():
    target = DnsUpdateTarget.parse(
        "rfc2136://acme-key:ab%2Fc%2Bd==@ns1.example.net:5353/example.com?algorithm=HMAC-SHA512")
    assert (target.key_name, target.secret, target.host, target.port, target.zone, target.algorithm) == \
        ("acme-key", "ab/c+d==", "ns1.example.net", 5353, "example.com", "hmac-sha512")
    assert "ab/c" not in str(target) and "ab/c" not in repr(target)  # the secret never shows


def test_an_rfc2136_url_with_its_defaults():
    target = DnsUpdateTarget.parse(f"rfc2136://k:{SECRET}@192.0.2.53")
    assert (target.port, target.zone, target.algorithm) == (53, None, "hmac-sha256")


@pytest.mark.parametrize("url, fragment", [
    ("https://k:c2VjcmV0@ns.example.net/z", "rfc2136://"),
    ("rfc2136://ns.example.net/z", "KEYNAME:SECRET@"),
    ("rfc2136://k@ns.example.net/z", "KEYNAME:SECRET@"),
    ("rfc2136://k:not base64!@ns.example.net/z", "base64"),
    ("rfc2136://k:c2VjcmV0@ns.example.net:99999/z", "port"),
    ("rfc2136://k:c2VjcmV0@ns.example.net/z?algorithm=rot13", "one of"),
    ("rfc2136://k:c2VjcmV0@ns.example.net/z?ttl=5", "only ?algorithm="),
])
def test_bad_rfc2136_urls_say_what_is_wrong(url, fragment):
    with pytest.raises(ValueError, match=fragment.replace("?", r"\?")):
        DnsUpdateTarget.parse(url)


def server_settings(**environ: str) -> RelayConfig:
    return relay_config(load(RELAY_SETTINGS, {}, {f"PORTWAY_{key.upper()}": value for key, value in environ.items()}))


def test_acme_settings_reach_the_config():
    built = server_settings(domain=DOMAIN, acme_email="ops@example.com", state_dir="/srv/pw",
                            acme_dns=f"rfc2136://k:{SECRET}@127.0.0.1:53/{DOMAIN}")
    assert built.acme_email == "ops@example.com" and built.state_dir == "/srv/pw"
    assert built.acme_directory == "https://acme-v02.api.letsencrypt.org/directory"
    assert built.acme_dns.zone == DOMAIN


@pytest.mark.parametrize("environ, fragment", [
    ({"acme_email": "ops@example.com"}, "public --domain"),
    ({"acme_email": "ops@example.com", "domain": DOMAIN, "tls_cert": "c.pem", "tls_key": "k.pem"}, "--tls-cert"),
    ({"acme_dns": f"rfc2136://k:{SECRET}@127.0.0.1/z", "domain": DOMAIN}, "need --acme-email"),
    ({"acme_email": "nobody", "domain": DOMAIN}, "e-mail"),
])
def test_acme_settings_that_cannot_work_are_refused(environ, fragment):
    with pytest.raises(ConfigurationError, match=fragment):
        server_settings(**environ)


def test_the_state_directory_follows_systemd_then_xdg(tmp_path):
    assert default_state_dir({"STATE_DIRECTORY": "/var/lib/portway", "XDG_STATE_HOME": str(tmp_path)}) == \
        Path("/var/lib/portway")
    assert default_state_dir({"XDG_STATE_HOME": str(tmp_path)}) == tmp_path / "portway"
    assert store_directory(str(tmp_path), "https://acme-staging-v02.api.letsencrypt.org/directory") != \
        store_directory(str(tmp_path), "https://acme-v02.api.letsencrypt.org/directory")


# ------------------------------------------------------------------------------------------------- TLS-ALPN-01

ACCOUNT = jose.JWKRSA(key=rsa.generate_private_key(public_exponent=65537, key_size=2048))


def alpn_challenge() -> TLSALPN01:
    body = messages.ChallengeBody.from_json(
        {"type": "tls-alpn-01", "url": "https://ca.example/chall/1", "status": "pending", "token": "A" * 43})
    assert isinstance(body.chall, TLSALPN01)  # the acme library parses the type registered by the relay
    return body.chall


def test_the_challenge_certificate_carries_the_key_authorization_digest():
    chall = alpn_challenge()
    chain_pem, _ = challenge_certificate(f"shop.{DOMAIN}", chall.validation(ACCOUNT))
    certificate = x509.load_pem_x509_certificate(chain_pem)
    extension = certificate.extensions.get_extension_for_oid(ACME_IDENTIFIER)
    digest = hashlib.sha256(chall.key_authorization(ACCOUNT).encode()).digest()
    assert extension.critical and extension.value.value == b"\x04\x20" + digest
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == [f"shop.{DOMAIN}"]
    assert chall.response(ACCOUNT).to_partial_json() == {}  # answered with an empty object (RFC 8555 §7.5.1)


# ------------------------------------------------------------------------------------------------- SNI

def handshake(context: ssl.SSLContext, server_name: str | None, ca: trustme.CA | None = None,
              alpn: list[str] | None = None) -> ssl.SSLObject:
    """A client handshake against `context` through memory buffers; returns the client's SSLObject."""
    client_context = ssl.create_default_context()
    if ca is not None:
        ca.configure_trust(client_context)
    else:
        client_context.check_hostname = False
        client_context.verify_mode = ssl.CERT_NONE
    if alpn:
        client_context.set_alpn_protocols(alpn)
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    from_server, from_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_context.wrap_bio(to_client, from_client, server_hostname=server_name)
    server = context.wrap_bio(to_server, from_server, server_side=True)
    client_done = server_done = False
    for _ in range(10):
        for done, side in ((client_done, client), (server_done, server)):
            if not done:
                try:
                    side.do_handshake()
                    if side is client:
                        client_done = True
                    else:
                        server_done = True
                except ssl.SSLWantReadError:
                    pass
        to_server.write(from_client.read())
        to_client.write(from_server.read())
        if client_done and server_done:
            return client
    raise AssertionError("the handshake did not finish")


def relay_tls(tmp_path, wildcard: bool, registered=lambda name: False) -> AcmeCertificates:
    dns = f"rfc2136://k:{SECRET}@127.0.0.1/{DOMAIN}" if wildcard else None
    config = server_settings(domain=DOMAIN, acme_email="ops@example.com", state_dir=str(tmp_path),
                             **({"acme_dns": dns} if dns else {}))
    return AcmeCertificates(config, registered)


def store(acme: AcmeCertificates, ca: trustme.CA, key: str, *names: str) -> None:
    issued = ca.issue_cert(*names)
    acme.store.prepare()
    acme.store.save(key, Issued.from_pem(b"".join(blob.bytes() for blob in issued.cert_chain_pems),
                                         issued.private_key_pem.bytes()))


def test_the_stored_wildcard_certificate_serves_every_tunnel_and_the_domain(tmp_path):
    ca = trustme.CA()
    acme = relay_tls(tmp_path, wildcard=True)
    store(acme, ca, WILDCARD, f"*.{DOMAIN}", DOMAIN)
    acme.prepare()
    for name in (f"shop.{DOMAIN}", f"blog.{DOMAIN}", DOMAIN):
        handshake(acme.context, name, ca)  # verified by the client, name included
    with pytest.raises(ssl.SSLError):
        handshake(acme.context, "a.b." + DOMAIN, ca)  # a wildcard covers one label: refused, not mis-served
    assert acme.store.account_key.parent.stat().st_mode & 0o077 == 0


def test_a_tls_alpn_challenge_is_answered_only_while_pending(tmp_path):
    ca = trustme.CA()
    acme = relay_tls(tmp_path, wildcard=False)
    store(acme, ca, DOMAIN, DOMAIN)
    acme.prepare()
    solver = acme.solver
    assert isinstance(solver, TlsAlpnSolver)
    pending = [(DOMAIN, alpn_challenge())]
    solver.publish(pending, ACCOUNT)
    client = handshake(acme.context, DOMAIN, alpn=[ACME_TLS_ALPN])
    assert client.selected_alpn_protocol() == ACME_TLS_ALPN
    served = x509.load_der_x509_certificate(client.getpeercert(binary_form=True))
    assert served.extensions.get_extension_for_oid(ACME_IDENTIFIER).critical
    solver.withdraw(pending, ACCOUNT)
    client = handshake(acme.context, DOMAIN, ca)  # the real certificate again
    assert client.selected_alpn_protocol() is None


def test_an_unregistered_name_is_refused_and_never_ordered(tmp_path):
    ca = trustme.CA()
    acme = relay_tls(tmp_path, wildcard=False, registered=lambda name: False)
    store(acme, ca, DOMAIN, DOMAIN)
    acme.prepare()
    with pytest.raises(ssl.SSLError):
        handshake(acme.context, f"nobody.{DOMAIN}", ca)
    with pytest.raises(ssl.SSLError):
        handshake(acme.context, "elsewhere.example.net", ca)
    assert set(acme.plan.states) == {DOMAIN} and not acme._tasks


def test_a_cluster_node_certifies_its_own_node_name_for_the_other_nodes_links(tmp_path):
    """Other nodes dial this one's node links with TLS and check its certificate as NODE-ID.DOMAIN: a per-name
    node orders that certificate at start (no tunnel holds the name) and serves it; the wildcard covers it."""
    ca = trustme.CA()
    cluster = {"cluster": "redis://127.0.0.1:1/0", "node_id": "node-a", "advertise": "127.0.0.1:9", "domain": DOMAIN,
               "acme_email": "ops@example.com", "state_dir": str(tmp_path)}
    acme = AcmeCertificates(server_settings(**cluster), lambda name: False)
    node_name = f"node-a.{DOMAIN}"
    store(acme, ca, node_name, node_name)
    acme.prepare()
    handshake(acme.context, node_name, ca)
    assert acme._may_order(node_name) and not acme._may_order(f"node-b.{DOMAIN}")

    async def started() -> set[str]:
        acme.start()
        wanted = {key for key, state in acme.plan.states.items() if state.scheduled}
        acme.close()
        return wanted

    assert asyncio.run(started()) == {DOMAIN, node_name}
    wildcard = AcmeCertificates(server_settings(**cluster, acme_dns=f"rfc2136://k:{SECRET}@127.0.0.1/{DOMAIN}"),
                                lambda name: False)
    assert wildcard.node_key == WILDCARD
    with pytest.raises(ConfigurationError, match="--node-id Relay_A: with ACME, a node's id must be a DNS label"):
        AcmeCertificates(server_settings(**{**cluster, "node_id": "Relay_A"}), lambda name: False)


def test_the_other_modes_certificates_are_not_served(tmp_path):
    ca = trustme.CA()
    acme = relay_tls(tmp_path, wildcard=False)
    store(acme, ca, WILDCARD, f"*.{DOMAIN}", DOMAIN)
    acme.prepare()
    assert acme.contexts == {}


# ------------------------------------------------------------------------------------------------- failures

def test_failures_are_one_line_each():
    url = "https://acme.example/dir"
    assert describe(errors.TimeoutError(), url) == "the order did not finish within 120 s"
    refused = messages.Error(typ="urn:ietf:params:acme:error:rateLimited", detail="too many certificates")
    assert describe(refused, url) == "the ACME server said: too many certificates"
    import requests

    assert "--acme-ca" in describe(requests.exceptions.SSLError("bad"), url)
    assert describe(requests.exceptions.ConnectionError("down"), url) == f"cannot reach {url}: ConnectionError"
    authorization = messages.AuthorizationResource(
        uri="https://acme.example/authz/1",
        body=messages.Authorization(
            identifier=messages.Identifier(typ=messages.IDENTIFIER_FQDN, value=DOMAIN),
            challenges=[messages.ChallengeBody(
                chall=challenges.DNS01(token=b"A" * 32), uri="https://acme.example/chall/1",
                error=messages.Error(typ="urn:ietf:params:acme:error:unauthorized", detail="no TXT record"))]))
    assert describe(errors.ValidationError([authorization]), url) == f"validation failed: {DOMAIN}: no TXT record"
    for line in (describe(errors.TimeoutError(), url), describe(refused, url)):
        assert "\n" not in line
