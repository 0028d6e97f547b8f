"""The relay's TLS certificate, kept fresh: `--tls-cert`/`--tls-key` are re-read when they change (checked every
`--tls-reload-interval` seconds) or on SIGHUP, so certbot's renewals need no restart. New connections get the new
certificate; open ones keep theirs. Files that fail to load leave the last good certificate in use, logged."""

from __future__ import annotations

import asyncio
import logging
import os
import ssl

log = logging.getLogger(__name__)


class CertificateFiles:
    def __init__(self, cert_file: str, key_file: str) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(cert_file, key_file)  # at start a bad file is an error, not a warning
        self._stamp = self._files_stamp()
        self._timer: asyncio.TimerHandle | None = None

    def _files_stamp(self) -> tuple:
        stamp = []
        for path in (self.cert_file, self.key_file):
            try:
                status = os.stat(path)
                stamp.append((status.st_mtime_ns, status.st_size, status.st_ino))
            except OSError:
                stamp.append(None)
        return tuple(stamp)

    def reload(self, why: str = "SIGHUP") -> bool:
        """Load the files again into the context new connections use; False (and the old certificate kept)
        if they don't load."""
        self._stamp = self._files_stamp()
        try:
            self.context.load_cert_chain(self.cert_file, self.key_file)
        except (OSError, ssl.SSLError) as error:
            log.warning("keeping the current TLS certificate: %s and %s did not load (%s)",
                        self.cert_file, self.key_file, error)
            return False
        log.warning("TLS certificate reloaded from %s (%s)", self.cert_file, why)
        return True

    def watch(self, interval: float) -> None:
        """Check the files every `interval` seconds and reload them when they changed."""
        loop = asyncio.get_running_loop()

        def check() -> None:
            if self._files_stamp() != self._stamp:
                self.reload("the files changed")
            self._timer = loop.call_later(interval, check)

        self._timer = loop.call_later(interval, check)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
