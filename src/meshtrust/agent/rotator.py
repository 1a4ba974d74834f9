"""The rotator: renews the client certificate before it expires, on the leader only.

It renews at ``notAfter − ratio × lifetime`` (moved earlier by jitter) with a
new key, over mTLS, and writes ``relay-client-tls-secret``; the watcher then
hands the new certificate to the provider. A renewal that is overdue when it
is planned (the agent was down, or the server asks for it) waits a random part
of ``renew_spread`` first, never more than a tenth of the time the certificate
has left: a fleet due at once then calls over that time, not within one second
that the server could not even answer in time. Failures back off and retry
until the certificate expires; after that the agent bootstraps again if it
has a token.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import random
import time

from meshtrust import clock as clock_module
from meshtrust import errors, metrics
from meshtrust.agent import backoff as retry
from meshtrust.agent import identity
from meshtrust.agent.config import AgentConfig
from meshtrust.agent.connection import RelayClient
from meshtrust.agent.provider import ClientIdentity, Provider
from meshtrust.pki import bundle, keys, rotation
from meshtrust.store import base

log = logging.getLogger(__name__)

WARN_EVERY = 300.0  # how often to repeat that a brought certificate needs renewing (seconds)
ASKED_SPACING = 5.0  # a renewal the server asks for waits this long after the last (seconds)
MAX_STEP = 1.0  # re-check leadership and the certificate at least this often (seconds)
MIN_SPACING = 1.0  # never renew more often than this, whatever the settings say (seconds)
SPREAD_SHARE = 0.1  # an overdue renewal waits at most this share of the time left


class Rotator:
    def __init__(self, config: AgentConfig, store: base.Store, provider: Provider,
                 client: RelayClient, leader: asyncio.Event,
                 clock: clock_module.Clock | None = None,
                 rng: random.Random | None = None,
                 meters: metrics.Metrics | None = None) -> None:
        self._config = config
        self._store = store
        self._provider = provider
        self._client = client
        self._leader = leader
        self._clock = clock or clock_module.SystemClock()
        self._rng = rng or random.Random()
        self._planned: dict[str, dt.datetime] = {}
        self._renewed_at = -ASKED_SPACING  # monotonic time of the last renewal
        self.renewals = 0
        self.metrics = meters

    def due_at(self, current: ClientIdentity) -> dt.datetime:
        """When to renew ``current``; jitter is drawn once per certificate."""
        serial = current.serial
        if serial not in self._planned:
            planned = rotation.renew_at(current.certificate, self._config.grace_ratio,
                                        self._config.jitter, self._rng)
            if planned <= self._clock.now():  # overdue already
                planned = self._spread(current)
            self._planned = {serial: planned}
        return self._planned[serial]

    def _spread(self, current: ClientIdentity) -> dt.datetime:
        """When an overdue renewal goes: now, plus a random part of ``renew_spread`` or of
        a tenth of the time ``current`` has left, whichever is shorter."""
        now = self._clock.now()
        left = (current.certificate.not_valid_after_utc - now).total_seconds()
        window = max(0.0, min(self._config.renew_spread, SPREAD_SHARE * left))
        return now + dt.timedelta(seconds=self._rng.uniform(0, window))

    def renew_now(self) -> None:
        """The server asks for a new certificate (a relay root rotation needs it): renew
        at the next look, unless a renewal just happened and the server has not seen it."""
        current = self._provider.current
        if current is None or time.monotonic() - self._renewed_at < ASKED_SPACING:
            return
        self.due_at(current)
        self._planned[current.serial] = min(self._planned[current.serial],
                                            self._spread(current))

    async def run(self) -> None:
        backoff = 1.0
        while True:
            await self._leader.wait()
            current = await self._provider.wait_ready()
            wait = (self.due_at(current) - self._clock.now()).total_seconds()
            if wait > 0:
                await self._provider.wait_for_change(current, timeout=min(wait, MAX_STEP))
                continue
            if not self._leader.is_set() or self._provider.current != current:
                continue
            if not current.managed and self._config.rotate is None:
                # Bring your own: someone else renews; the watcher picks it up. Say so
                # while it is due, and on until the certificate changes.
                log.warning("the client certificate %s in %s is past its renewal time and "
                            "expires at %s; it is not managed by meshtrust, so renew it "
                            "yourself", current.serial, self._config.names.relay_client,
                            current.certificate.not_valid_after_utc.isoformat())
                await self._provider.wait_for_change(current, timeout=WARN_EVERY)
                continue
            if current.expired(self._clock.now()):
                # Renewal needs a valid certificate; the agent re-bootstraps instead.
                await self._provider.wait_for_change(current, timeout=MAX_STEP)
                continue
            try:
                await self.renew(current)
                if self.metrics is not None:
                    self.metrics.renewals.labels("renewed").inc()
                backoff = 1.0
                await asyncio.sleep(MIN_SPACING)
            except errors.MeshTrustError as exc:
                wait = retry.delay(exc, backoff, self._rng)
                if retry.busy(exc):
                    # Not a failure: the server scheduled this renewal for later.
                    log.info("renewing the client certificate: %s; retrying in %.1f s",
                             exc, wait)
                else:
                    if self.metrics is not None:
                        self.metrics.renewals.labels("failed").inc()
                    log.warning("renewing the client certificate failed: %s; retrying in "
                                "%.0f s", exc, wait)
                await asyncio.sleep(wait)
                backoff = retry.next_backoff(exc, backoff, self._config.reconnect_max)

    async def renew(self, current: ClientIdentity) -> None:
        names = self._config.names
        key, key_pem = await identity.pending_key(self._store, names, self._config.key_type)
        response = await self._client.renew(identity.request_for(key, self._config.cluster))
        chain = bytes(response.certificate_chain)
        if not keys.key_matches(bundle.load_certificate(chain, "certificate chain"), key):
            raise errors.RPCError("the server returned a certificate for another key")
        written = await identity.store_certificate(
            self._store, names, chain=chain, key_pem=key_pem,
            trust=bytes(response.ca_bundle) or current.trust)
        self.renewals += 1
        self._renewed_at = time.monotonic()
        fresh = bundle.load_certificate(chain, "certificate chain")
        if rotation.renew_at(fresh, self._config.grace_ratio) <= self._clock.now():
            log.warning("the new certificate is due for renewal already: its lifetime is too "
                        "short for grace ratio %s; renewals are spaced %s s apart",
                        self._config.grace_ratio, MIN_SPACING)
        log.info("renewed client certificate: serial %s, expires %s (resource version %d)",
                 response.serial, dt.datetime.fromtimestamp(response.not_after_unix,
                                                            dt.UTC).isoformat(),
                 written.resource_version)

