"""The provider: holds the agent's current client certificate and tells who waits.

The gRPC client dials with whatever the provider holds at that moment; an
open connection keeps the certificate it was opened with.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt

from cryptography import x509

from meshtrust.pki import bundle


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClientIdentity:
    """A client certificate chain, its key and the relay roots, as PEM."""

    chain: bytes
    key: bytes
    trust: bytes
    resource_version: int
    managed: bool

    @property
    def certificate(self) -> x509.Certificate:
        return bundle.load_certificate(self.chain, "tls.crt")

    @property
    def serial(self) -> str:
        return f"{self.certificate.serial_number:x}"

    def expired(self, now: dt.datetime) -> bool:
        return now >= self.certificate.not_valid_after_utc


class Provider:
    """The current client identity, or None before the first one.

    Waiters wait on an event that ``set`` fires and replaces, so cancelling a
    waiter never disturbs the others.
    """

    def __init__(self) -> None:
        self._current: ClientIdentity | None = None
        self._changed = asyncio.Event()

    @property
    def current(self) -> ClientIdentity | None:
        return self._current

    async def set(self, identity: ClientIdentity | None) -> None:
        if identity == self._current:
            return
        self._current = identity
        fired, self._changed = self._changed, asyncio.Event()
        fired.set()

    async def wait_for_change(self, seen: ClientIdentity | None,
                              timeout: float | None = None) -> ClientIdentity | None:
        """Wait until the identity is no longer ``seen`` (or ``timeout`` passes)."""
        if self._current != seen:
            await asyncio.sleep(0)  # always yield, so a caller's loop cannot starve the others
            return self._current
        try:
            async with asyncio.timeout(timeout):  # not wait_for: it can lose a cancellation
                await self._changed.wait()
        except TimeoutError:
            pass
        return self._current

    async def wait_ready(self) -> ClientIdentity:
        while self._current is None:
            await self._changed.wait()
        return self._current
