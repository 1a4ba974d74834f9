"""The watcher: follows ``relay-client-tls-secret`` and hands every change to the provider.

Whoever writes the secret — our rotator, cert-manager or a person — the
provider gets the new certificate. The relay root comes from the secret's
``ca.crt``, or from ``relay-root-tls-secret`` when the secret has none.
"""

from __future__ import annotations

import logging

from meshtrust import errors, settings
from meshtrust.agent.provider import ClientIdentity, Provider
from meshtrust.pki import bundle, keys
from meshtrust.store import base, follow

log = logging.getLogger(__name__)



async def read_trust(store: base.Store, names: settings.SecretNames) -> bytes | None:
    """The relay root(s) from ``relay-root-tls-secret`` (``ca.crt``), if present."""
    try:
        secret = await store.get_secret(names.relay_namespace, names.relay_root)
    except errors.NotFound:
        return None
    return secret.data.get("ca.crt") or None


async def read_identity(store: base.Store, names: settings.SecretNames) -> ClientIdentity | None:
    """The client identity in the store, or None if absent or unusable (which it logs)."""
    try:
        secret = await store.get_secret(names.relay_namespace, names.relay_client)
    except errors.NotFound:
        return None
    chain, key = secret.data.get("tls.crt"), secret.data.get("tls.key")
    trust = secret.data.get("ca.crt") or await read_trust(store, names)
    where = f"{names.relay_namespace}/{names.relay_client}"
    if not chain or not key or not trust:
        log.warning("%s lacks tls.crt, tls.key or a relay root (ca.crt); ignoring it", where)
        return None
    try:
        certificate = bundle.load_certificate(chain, f"{where}/tls.crt")
        if not keys.key_matches(certificate, keys.load_private_key(key)):
            log.warning("%s: tls.key does not match tls.crt; ignoring it", where)
            return None
    except errors.PKIError as exc:
        log.warning("%s is unusable: %s", where, exc)
        return None
    return ClientIdentity(chain=chain, key=key, trust=trust,
                          resource_version=secret.resource_version,
                          managed=secret.labels.get(settings.MANAGED_LABEL) == "meshtrust")


class Watcher:
    """Keeps the provider equal to what the store holds."""

    def __init__(self, store: base.Store, provider: Provider,
                 names: settings.SecretNames) -> None:
        self._store = store
        self._provider = provider
        self._names = names

    async def refresh(self) -> None:
        await self._provider.set(await read_identity(self._store, self._names))

    async def run(self) -> None:
        names = self._names
        watched = {names.relay_client, names.relay_root}

        async def changed(event: base.WatchEvent) -> None:
            if event.object.name in watched:
                await self.refresh()

        await follow.follow(self._store, base.SECRET_KIND, changed,
                            namespace=names.relay_namespace, resync=self.refresh)
