"""Automatic HTTPS: the relay's certificates from an ACME server (Let's Encrypt), kept in the state directory,
served by SNI and renewed in the background. With `--acme-dns` one wildcard certificate (`*.DOMAIN` and DOMAIN)
through DNS-01; without, one certificate per name through TLS-ALPN-01 on the relay's own port: DOMAIN at start,
a tunnel's name on its first visit, and only while that tunnel is registered. The decisions are acme_plan.py's,
the ACME conversation acme_client.py's (blocking: it runs in a thread); this is the asyncio glue."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import ssl
import threading
import time
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

from ..config import RelayConfig, default_state_dir
from ..errors import ConfigurationError
from .acme_client import AcmeAccount, Issued, Rfc2136Solver, TlsAlpnSolver, describe, write_private
from .acme_plan import (WILDCARD, IssuancePlan, Verdict, certificate_key, certificate_names, renewal_time,
                        tunnel_of)

log = logging.getLogger(__name__)

LONGEST_TIMER = 6 * 3600.0  # wake up at least this often: the wall clock may have jumped meanwhile


class CertificateStore:
    """`DIR/account.key` and `DIR/certificates/KEY.crt` + `KEY.key`, readable by the relay's user only."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.certificates = directory / "certificates"
        self.account_key = directory / "account.key"

    def prepare(self) -> None:
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)  # (parents get the umask's mode)
            self.certificates.mkdir(mode=0o700, exist_ok=True)
        except OSError as error:
            raise ConfigurationError(f"cannot use {self.directory} for ACME state ({error.strerror}): "
                                     "pass --state-dir DIR, a directory the relay may write") from None

    def files(self, key: str) -> tuple[Path, Path]:
        return self.certificates / f"{key}.crt", self.certificates / f"{key}.key"

    def stored(self) -> dict[str, Issued]:
        found = {}
        for chain_file in sorted(self.certificates.glob("*.crt")):
            key_file = chain_file.with_suffix(".key")
            try:
                found[chain_file.stem] = Issued.from_pem(chain_file.read_bytes(), key_file.read_bytes())
            except (OSError, ValueError) as error:
                log.warning("ACME: ignoring the stored certificate %s: %s", chain_file, error)
        return found

    def save(self, key: str, issued: Issued) -> None:
        chain_file, key_file = self.files(key)
        write_private(key_file, issued.key_pem)
        write_private(chain_file, issued.chain_pem)


def store_directory(state_dir: str | None, directory_url: str) -> Path:
    """Each ACME server's account and certificates apart (staging's never mix with production's)."""
    server = urlsplit(directory_url)
    label = (server.hostname or "acme") + (f"-{server.port}" if server.port else "")
    digest = hashlib.sha256(directory_url.encode()).hexdigest()[:8]
    return Path(state_dir or default_state_dir()) / "acme" / f"{label}-{digest}"


async def in_thread(function: Callable[..., Any], *args: Any) -> Any:
    """Run blocking `function` in a daemon thread (a stuck ACME request must not hold the relay's exit)."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def run() -> None:
        try:
            result, error = function(*args), None
        except Exception as failure:
            result, error = None, failure
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the loop closed while we worked: nobody waits for the answer
            pass

    threading.Thread(target=run, name="acme", daemon=True).start()
    return await future


def _when(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class AcmeCertificates:
    """The relay's TLS context when ACME is on: `context` picks a per-name context by SNI."""

    def __init__(self, config: RelayConfig, registered: Callable[[str], bool]) -> None:
        self.domain = config.domain.lower().rstrip(".")
        self.wildcard = config.acme_dns is not None
        self.registered = registered  # is this tunnel name registered right now?
        # A cluster node's own name, NODE-ID.DOMAIN: the other nodes check its certificate under that name on
        # their node links to it, so it is certified like the bare domain (covered by the wildcard one).
        self.node_key: str | None = None
        if config.cluster is not None and config.node_id:
            self.node_key = certificate_key(f"{config.node_id}.{self.domain}", self.domain, self.wildcard)
            if self.node_key is None:
                raise ConfigurationError(f"--node-id {config.node_id}: with ACME, a node's id must be a DNS label "
                                         "(lowercase letters, digits, '-'; not a reserved name like 'relay'): the "
                                         f"other nodes check its certificate as {config.node_id}.{self.domain}")
        self.store = CertificateStore(store_directory(config.state_dir, config.acme_directory))
        self.account = AcmeAccount(config.acme_directory, config.acme_email, config.acme_ca, self.store.account_key)
        self.directory_url = config.acme_directory
        self.ca_file = config.acme_ca
        self.challenges: dict[str, ssl.SSLContext] = {}  # name → its TLS-ALPN-01 context while validated
        self.solver = (Rfc2136Solver(config.acme_dns, self.domain) if config.acme_dns is not None
                       else TlsAlpnSolver(self.challenges, self.store.certificates))
        self.contexts: dict[str, ssl.SSLContext] = {}  # certificate key → the context serving it
        self.plan = IssuancePlan()
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.sni_callback = self._choose
        self._orders = asyncio.Lock()  # one order at a time: gentle on rate limits, one DNS update at a time
        self._tasks: set[asyncio.Task] = set()
        self._timer: asyncio.TimerHandle | None = None

    def prepare(self) -> None:
        """Before the relay listens: --acme-ca, the state directory, and the certificates stored there."""
        if self.ca_file is not None:
            try:
                ssl.create_default_context(cafile=self.ca_file)
            except (OSError, ssl.SSLError) as error:
                raise ConfigurationError(f"--acme-ca {self.ca_file}: not a readable PEM CA certificate "
                                         f"({getattr(error, 'strerror', None) or error})") from None
        self.store.prepare()
        self._load_stored("using the stored certificate")

    def _load_stored(self, what: str) -> None:
        for key, issued in self.store.stored().items():
            if (key == WILDCARD) != self.wildcard:
                continue  # the other mode's: kept on disk, not served
            try:
                self._install(key, issued)
            except (OSError, ssl.SSLError) as error:
                log.warning("ACME: ignoring the stored certificate for %s: %s", key, error)
                continue
            log.warning("ACME: %s for %s (valid until %s)", what, ", ".join(certificate_names(key, self.domain)),
                        _when(issued.not_after))

    def reload(self) -> None:
        """SIGHUP (`systemctl reload`): read the stored certificates again, and plan their renewals anew."""
        self._load_stored("reloaded the stored certificate")
        self._schedule()

    def start(self) -> None:
        """Once the relay listens (TLS-ALPN-01 validations come to its port): the certificate the relay itself needs
        is ordered if it has none, and every certificate renewed on time from now on."""
        self.plan.want(WILDCARD if self.wildcard else self.domain)
        if self.node_key is not None:
            self.plan.want(self.node_key)
        for key in list(self.contexts):
            self.plan.want(key)
        self._schedule()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for task in self._tasks:
            task.cancel()

    # the timer
    def _schedule(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        wake = self.plan.next_wakeup()
        if wake is None:
            return
        delay = min(max(0.0, wake - time.time()), LONGEST_TIMER)
        self._timer = asyncio.get_running_loop().call_later(delay, self._tick)

    def _tick(self) -> None:
        self._timer = None
        for key in self.plan.due(time.time()):
            if self._may_order(key):
                self._order(key)
            else:
                self.plan.unscheduled(key)
                log.info("ACME: not renewing the certificate for %s: no such tunnel now", key)
        self._schedule()

    def _may_order(self, key: str) -> bool:
        tunnel = tunnel_of(key, self.domain)
        return tunnel is None or key == self.node_key or self.registered(tunnel)

    # orders
    def _order(self, key: str) -> None:
        self.plan.started(key)
        task = asyncio.get_running_loop().create_task(self._obtain(key))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _obtain(self, key: str) -> None:
        names = certificate_names(key, self.domain)
        try:
            async with self._orders:
                log.info("ACME: ordering a certificate for %s from %s", ", ".join(names), self.directory_url)
                issued = await in_thread(self.account.obtain, names, self.solver)
                self.store.save(key, issued)
                self._install(key, issued)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 - any failure: logged in one line, retried later
            now = time.time()
            retry_at = self.plan.failed(key, now)
            kept = ("the last good certificate stays in use" if self.plan.has_certificate(key)
                    else "none in use yet")
            log.warning("ACME: could not get a certificate for %s: %s; %s; next try in %s", ", ".join(names),
                        describe(error, self.directory_url), kept, _duration(retry_at - now))
        else:
            log.warning("ACME: certificate for %s obtained, valid until %s (renewal from %s)", ", ".join(names),
                        _when(issued.not_after), _when(renewal_time(issued.not_before, issued.not_after)))
        self._schedule()

    def _install(self, key: str, issued: Issued) -> None:
        """Serve `issued`, stored under `key` (loaded from its files: `ssl` reads certificates from files only)."""
        chain_file, key_file = self.store.files(key)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(chain_file, key_file)
        self.contexts[key] = context  # new handshakes use it; open connections keep theirs
        self.plan.installed(key, issued.not_before, issued.not_after)

    # the SNI callback (in the event loop, during a handshake: it must not block)
    def _choose(self, connection: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> int | None:
        if server_name is not None:
            challenge = self.challenges.get(server_name.lower())
            if challenge is not None:
                connection.context = challenge
                return None
        key = certificate_key(server_name, self.domain, self.wildcard)
        if not self.wildcard and key is not None:
            verdict = self.plan.on_demand(key, self._may_order(key), time.time())
            if verdict is Verdict.ORDER:
                self._order(key)
                self._schedule()
            elif verdict is Verdict.REFUSE:
                log.info("ACME: no certificate for %s: not a registered tunnel", server_name)
        context = self.contexts.get(key) if key is not None else None
        if context is None:
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        connection.context = context
        return None
