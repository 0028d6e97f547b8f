"""The ACME conversation (RFC 8555) through certbot's `acme` library: an account, an order for some names, its
challenges answered by a solver, the certificate. The library does its own blocking HTTP, so everything here is
blocking and runs off the event loop (acme.py). Two solvers: DNS-01 with the TXT record set by RFC 2136 dynamic
update (dnspython, TSIG-signed), and TLS-ALPN-01 (RFC 8737) answered on the relay's own TLS port."""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import socket
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import dns.exception
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.tsig
import dns.tsigkeyring
import dns.update
import josepy as jose
import requests
from acme import challenges, client, crypto_util, errors, messages
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from ..config import DnsUpdateTarget

log = logging.getLogger(__name__)

ACME_TLS_ALPN = "acme-tls/1"
ACME_IDENTIFIER = x509.ObjectIdentifier("1.3.6.1.5.5.7.1.31")  # RFC 8737's id-pe-acmeIdentifier
ORDER_TIMEOUT = 120.0  # seconds an order may take from its challenges' answers to the certificate
NETWORK_TIMEOUT = 30  # seconds for one request to the ACME server
DNS_TIMEOUT = 15.0  # seconds for one dynamic update
TXT_TTL = 60


class AcmeFailure(Exception):
    """An order that did not end in a certificate, said in one line."""


# The library knows the challenge types it solves itself; TLS-ALPN-01 is registered here with its machinery, so
# the key authorization and the (empty) response body are the library's.
@challenges.ChallengeResponse.register
class TLSALPN01Response(challenges.KeyAuthorizationChallengeResponse):
    typ = "tls-alpn-01"


@challenges.Challenge.register
class TLSALPN01(challenges.KeyAuthorizationChallenge):
    typ = "tls-alpn-01"
    response_cls = TLSALPN01Response

    def validation(self, account_key: jose.JWK, **unused: Any) -> bytes:
        """The SHA-256 of the key authorization, which the challenge certificate carries (RFC 8737 §3)."""
        return hashlib.sha256(self.key_authorization(account_key).encode()).digest()


@dataclass(frozen=True)
class Issued:
    """A certificate with its chain (PEM) and its key (PEM), valid from `not_before` to `not_after` (epoch s)."""

    chain_pem: bytes
    key_pem: bytes
    not_before: float
    not_after: float

    @classmethod
    def from_pem(cls, chain_pem: bytes, key_pem: bytes) -> Issued:
        leaf = x509.load_pem_x509_certificate(chain_pem)
        return cls(chain_pem, key_pem, leaf.not_valid_before_utc.timestamp(), leaf.not_valid_after_utc.timestamp())


def server_context(chain_pem: bytes, key_pem: bytes, scratch: Path, alpn: list[str] | None = None) -> ssl.SSLContext:
    """A server-side SSLContext for a certificate held in memory (`ssl` loads only files: a private scratch file
    in the state directory holds it for the moment of loading)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    if alpn:
        context.set_alpn_protocols(alpn)
    handle, path = tempfile.mkstemp(dir=scratch, prefix=".load-", suffix=".pem")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(key_pem + b"\n" + chain_pem)
        context.load_cert_chain(path)
    finally:
        os.unlink(path)
    return context


def challenge_certificate(domain: str, digest: bytes) -> tuple[bytes, bytes]:
    """RFC 8737's self-signed certificate: `domain` as its only name, the key authorization's digest in a critical
    acmeIdentifier extension (DER: an OCTET STRING of 32 bytes)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, domain)])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(domain)]), critical=False)
        .add_extension(x509.UnrecognizedExtension(ACME_IDENTIFIER, b"\x04\x20" + digest), critical=True)
        .sign(key, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def _key_pem(key: Any) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class Solver(Protocol):
    challenge_type: type[challenges.KeyAuthorizationChallenge]

    def publish(self, pending: list[tuple[str, challenges.KeyAuthorizationChallenge]], account_key: jose.JWK) -> None:
        """Make every (domain, challenge) answerable; raises AcmeFailure if it can't."""

    def withdraw(self, pending: list[tuple[str, challenges.KeyAuthorizationChallenge]],
                 account_key: jose.JWK) -> None:
        """Take back what publish() set up (best effort: a failure is logged, not raised)."""


class Rfc2136Solver:
    """DNS-01: `_acme-challenge.DOMAIN` TXT records added, then deleted, by TSIG-signed dynamic updates."""

    challenge_type = challenges.DNS01

    def __init__(self, target: DnsUpdateTarget, domain: str) -> None:
        self.target = target
        self.zone = dns.name.from_text(target.zone or domain)
        self.keyring = dns.tsigkeyring.from_text({target.key_name: target.secret})

    def _records(self, pending, account_key) -> list[tuple[dns.name.Name, str]]:
        return [(dns.name.from_text(chall.validation_domain_name(domain)), chall.validation(account_key))
                for domain, chall in pending]

    def _send(self, records: list[tuple[dns.name.Name, str]], add: bool) -> None:
        update = dns.update.UpdateMessage(self.zone, keyring=self.keyring,
                                          keyalgorithm=dns.name.from_text(self.target.algorithm))
        for name, value in records:
            if add:
                update.add(name, TXT_TTL, "TXT", f'"{value}"')
            else:
                update.delete(name, "TXT", f'"{value}"')
        where = f"{self.target.host}:{self.target.port}"
        try:
            address = socket.getaddrinfo(self.target.host, self.target.port, type=socket.SOCK_STREAM)[0][4][0]
            response = dns.query.tcp(update, address, port=self.target.port, timeout=DNS_TIMEOUT)
        except dns.tsig.PeerError as error:
            raise AcmeFailure(f"the DNS server {where} refused the TSIG key {self.target.key_name!r} "
                              f"({error}): check KEYNAME, SECRET and ?algorithm= in --acme-dns") from None
        except (OSError, dns.exception.DNSException) as error:
            raise AcmeFailure(f"the DNS update at {where} failed: {error or type(error).__name__}") from None
        if response.rcode() != dns.rcode.NOERROR:
            raise AcmeFailure(f"the DNS server {where} refused the update of zone {self.zone}: "
                              f"{dns.rcode.to_text(response.rcode())}")

    def publish(self, pending, account_key) -> None:
        self._send(self._records(pending, account_key), add=True)

    def withdraw(self, pending, account_key) -> None:
        try:
            self._send(self._records(pending, account_key), add=False)
        except AcmeFailure as error:
            log.warning("ACME: could not remove the DNS-01 TXT records: %s", error)


class TlsAlpnSolver:
    """TLS-ALPN-01: while a validation is pending, a handshake for the name with ALPN `acme-tls/1` gets the
    challenge certificate (the relay's SNI callback looks names up in `contexts`)."""

    challenge_type = TLSALPN01

    def __init__(self, contexts: dict[str, ssl.SSLContext], scratch: Path) -> None:
        self.contexts = contexts  # read by the event loop's SNI callback: single item assignments only
        self.scratch = scratch

    def publish(self, pending, account_key) -> None:
        for domain, chall in pending:
            chain_pem, key_pem = challenge_certificate(domain, chall.validation(account_key))
            self.contexts[domain] = server_context(chain_pem, key_pem, self.scratch, alpn=[ACME_TLS_ALPN])

    def withdraw(self, pending, account_key) -> None:
        for domain, _ in pending:
            self.contexts.pop(domain, None)


class AcmeAccount:
    """An account at one ACME server, its key kept in `key_file` (made on first use), and the orders placed with
    it. Blocking."""

    def __init__(self, directory_url: str, email: str, ca_file: str | None, key_file: Path) -> None:
        self.directory_url = directory_url
        self.email = email
        self.ca_file = ca_file
        self.key_file = key_file
        self._client: client.ClientV2 | None = None

    def _account_key(self) -> jose.JWKRSA:
        if self.key_file.exists():
            key = serialization.load_pem_private_key(self.key_file.read_bytes(), password=None)
        else:
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            write_private(self.key_file, _key_pem(key))
        return jose.JWKRSA(key=key)

    def _connect(self) -> client.ClientV2:
        if self._client is not None:
            return self._client
        net = client.ClientNetwork(self._account_key(), user_agent="portway",
                                   verify_ssl=self.ca_file or True, timeout=NETWORK_TIMEOUT)
        acme = client.ClientV2(client.ClientV2.get_directory(self.directory_url, net), net)
        registration = messages.NewRegistration.from_data(email=self.email, terms_of_service_agreed=True)
        try:
            acme.new_account(registration)
        except errors.ConflictError as existing:  # this key has an account already: use it
            net.account = messages.RegistrationResource(uri=existing.location, body=messages.Registration())
        self._client = acme
        return acme

    def obtain(self, names: list[str], solver: Solver) -> Issued:
        """Order a certificate for `names` (the first is its subject) and answer its challenges with `solver`."""
        try:
            return self._obtain(names, solver)
        except Exception:
            self._client = None  # the next try starts afresh: directory, nonces, the account (which may be gone)
            raise

    def _obtain(self, names: list[str], solver: Solver) -> Issued:
        acme = self._connect()
        account_key = acme.net.key
        key_pem = _key_pem(ec.generate_private_key(ec.SECP256R1()))
        order = acme.new_order(crypto_util.make_csr(key_pem, names))
        pending: list[tuple[str, challenges.KeyAuthorizationChallenge]] = []
        answers = []
        for authorization in order.authorizations:
            if authorization.body.status == messages.STATUS_VALID:
                continue  # validated recently for this account: nothing to prove
            domain = authorization.body.identifier.value
            offered = [body for body in authorization.body.challenges
                       if isinstance(body.chall, solver.challenge_type)]
            if not offered:
                raise AcmeFailure(f"the ACME server offers no {solver.challenge_type.typ} challenge for {domain}")
            pending.append((domain, offered[0].chall))
            answers.append(offered[0])
        solver.publish(pending, account_key)
        try:
            for body in answers:
                acme.answer_challenge(body, body.chall.response(account_key))
            deadline = datetime.datetime.now() + datetime.timedelta(seconds=ORDER_TIMEOUT)
            order = acme.poll_and_finalize(order, deadline)
        finally:
            solver.withdraw(pending, account_key)
        return Issued.from_pem(order.fullchain_pem.encode(), key_pem)


def write_private(path: Path, data: bytes) -> None:
    """Write `data` to `path` readable by the owner only, all at once (a crash leaves the old file or the new)."""
    handle, scratch = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(scratch, path)
    except BaseException:
        os.unlink(scratch)
        raise


def describe(error: BaseException, directory_url: str) -> str:
    """One line for why an order failed."""
    if isinstance(error, AcmeFailure):
        return str(error)
    if isinstance(error, errors.ValidationError):
        reasons = []
        for authorization in error.failed_authzrs:
            details = [body.error.detail or body.error.typ for body in authorization.body.challenges if body.error]
            reasons.append(f"{authorization.body.identifier.value}: {'; '.join(details) or 'invalid'}")
        return "validation failed: " + " | ".join(reasons)
    if isinstance(error, messages.Error):
        return f"the ACME server said: {error.detail or error.description or error.typ}"
    if isinstance(error, errors.TimeoutError):
        return f"the order did not finish within {ORDER_TIMEOUT:.0f} s"
    if isinstance(error, requests.exceptions.SSLError):
        return f"cannot verify the HTTPS certificate of {directory_url} (a private ACME server needs --acme-ca FILE)"
    if isinstance(error, requests.exceptions.RequestException):
        return f"cannot reach {directory_url}: {type(error).__name__}"
    if isinstance(error, OSError):
        return f"{error.strerror or error} ({getattr(error, 'filename', None) or type(error).__name__})"
    return f"{type(error).__name__}: {error}"
