"""Renewing what the reference leaves manual: the relay server certificate and signing CA.

Both are renewed by the grace-ratio rule, with a new key, when meshtrust made
them (they carry its managed-by label) and holds what signs them: the server
certificate through the relay signer (local key or external CA), the signing
CA with the relay root's key from the store. Trust needs no overlap step for
either: agents and the server trust the relay root, which does not change, so
certificates under the old signing CA stay valid until they expire, while new
ones come from the new CA.

What meshtrust did not make, or cannot sign, is not touched: a warning says
it is due, once per certificate, as it does for the relay root, whose
rotation changes what everyone trusts.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging

from cryptography import x509

from meshtrust import clock as clock_module
from meshtrust import errors, settings
from meshtrust.authority import signers
from meshtrust.pki import bundle, csr, identity, issuer, keys, profiles, rotation
from meshtrust.providers import base as providers
from meshtrust.store import base

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Options:
    grace_ratio: float = settings.DEFAULT_GRACE_RATIO
    server_lifetime: dt.timedelta = profiles.RELAY_SERVER.default_lifetime
    signing_lifetime: dt.timedelta = profiles.RELAY_SIGNING.default_lifetime
    names: settings.SecretNames = dataclasses.field(default_factory=settings.SecretNames)


class RelayRenewal:
    """Checks the management-side relay certificates; renews or warns about those due."""

    def __init__(self, store: base.Store, clock: clock_module.Clock, cache: signers.Signers,
                 options: Options | None = None) -> None:
        self._store = store
        self._clock = clock
        self._signers = cache
        self.options = options or Options()
        self._warned: set[str] = set()

    async def check(self, relay_signer: providers.CAProvider | None) -> list[str]:
        """Renew what is due and can be; return the names of the secrets renewed.

        ``relay_signer`` signs relay certificates (None when meshtrust issues none).
        """
        renewed = []
        if await self._signing_ca():
            renewed.append(self.options.names.relay_signing)
        if relay_signer is not None and await self._server(relay_signer):
            renewed.append(self.options.names.relay_server)
        await self._root()
        return renewed

    # -- each certificate ---------------------------------------------------------------------

    async def _signing_ca(self) -> bool:
        names = self.options.names
        found = await self._due(names.relay_signing)
        if found is None:
            return False
        secret, certificate = found
        if "new-tls.crt" in secret.data:
            return False  # a relay root rotation is under way and makes a new one anyway
        root = await self._get(names.relay_root)
        if (not _managed(secret) or "tls.key" not in secret.data or root is None
                or not _managed(root) or "tls.key" not in root.data):
            self._warn(secret, certificate, "its key or its root's key is not in the store")
            return False
        lock = self._signers.lock
        root_ca = signers.ca_from_secret(root, lock)
        old = signers.ca_from_secret(secret, lock)
        now = self._clock.now()
        made = issuer.new_intermediate(
            keys.key_type_of(old.key) or keys.KeyType.EC_P256, root_ca, signing_profile(old),
            now, self.options.signing_lifetime,
            issuer.Subject(common_name=identity.common_name(certificate.subject)))
        data = {**secret.data,
                "ca.crt": secret.data.get("ca.crt") or bundle.dump_certificate(root_ca.root),
                "tls.crt": bundle.dump_certificates(made.path[:-1]),
                "tls.key": lock.seal(made.key)}
        return await self._replace(secret, data, certificate, made.certificate)

    async def _server(self, signer: providers.CAProvider) -> bool:
        names = self.options.names
        found = await self._due(names.relay_server)
        if found is None:
            return False
        secret, certificate = found
        if not _managed(secret):
            self._warn(secret, certificate, "it was brought, not made by meshtrust")
            return False
        kept = tuple(n for n in (identity.format_name(g).split(":", 1)[1]
                                 for g in identity.subject_alt_names(certificate))
                     if n != issuer.RELAY_SERVER_WILDCARD)
        key = keys.generate_key(keys.key_type_of(certificate.public_key())  # type: ignore[arg-type]
                                or keys.KeyType.EC_P256)
        request_pem = csr.dump_csr(csr.build_csr(
            key, common_name=identity.common_name(certificate.subject),
            names=[issuer.RELAY_SERVER_WILDCARD, *kept]))
        now = self._clock.now()
        signed = await signers.sign(signer, providers.SignRequest(
            request=csr.load_csr(request_pem), profile=profiles.RELAY_SERVER,
            lifetime=self.options.server_lifetime,
            subject=issuer.Subject(names=kept,
                                   common_name=identity.common_name(certificate.subject)),
            idempotency_key=f"relay-server/{keys.public_key_der(key).hex()[-32:]}"), now)
        data = {**secret.data,
                "tls.crt": signed.pem(root=False),
                "tls.key": keys.dump_private_key(key)}
        return await self._replace(secret, data, certificate, signed.certificate)

    async def root_due(self) -> bool:
        """Whether the relay root is past its renewal time and meshtrust holds its key,
        so that the server should rotate it (``relay_rotation``)."""
        found = await self._due(self.options.names.relay_root)
        return found is not None and _managed(found[0]) and "tls.key" in found[0].data

    async def _root(self) -> None:
        found = await self._due(self.options.names.relay_root)
        if found is not None and not await self.root_due():
            self._warn(found[0], found[1], "its key is not in the store, so it is rotated "
                       "where its key is kept")

    # -- helpers ------------------------------------------------------------------------------

    async def _get(self, name: str) -> base.Secret | None:
        try:
            return await self._store.get_secret(self.options.names.relay_namespace, name)
        except errors.NotFound:
            return None

    async def _due(self, name: str) -> tuple[base.Secret, x509.Certificate] | None:
        """The secret and its certificate when past its renewal time, else None."""
        secret = await self._get(name)
        pem = secret.data.get("tls.crt") or secret.data.get("ca.crt") if secret else None
        if secret is None or not pem:
            return None
        try:
            certificate = bundle.load_certificates(pem, name)[0]
        except errors.PKIError:
            return None
        if self._clock.now() < rotation.renew_at(certificate, self.options.grace_ratio):
            return None
        return secret, certificate

    async def _replace(self, secret: base.Secret, data: dict[str, bytes],
                       old: x509.Certificate, new: x509.Certificate) -> bool:
        try:
            await self._store.update(dataclasses.replace(secret, data=data))
        except (errors.Conflict, errors.NotFound):
            return False  # changed meanwhile (another replica, an operator): look again later
        log.info("renewed %s/%s: %x (expiring %s) replaced by %x (expires %s)",
                 secret.namespace, secret.name, old.serial_number,
                 old.not_valid_after_utc.isoformat(), new.serial_number,
                 new.not_valid_after_utc.isoformat())
        return True

    def _warn(self, secret: base.Secret, certificate: x509.Certificate, why: str) -> None:
        key = f"{secret.name}/{certificate.serial_number:x}"
        if key in self._warned:
            return
        self._warned.add(key)
        log.warning("%s/%s (serial %x) is past its renewal time and expires at %s; meshtrust "
                    "does not renew it: %s", secret.namespace, secret.name,
                    certificate.serial_number, certificate.not_valid_after_utc.isoformat(), why)


def _managed(secret: base.Secret) -> bool:
    return secret.labels.get(settings.MANAGED_LABEL) == settings.MANAGED_BY[
        settings.MANAGED_LABEL]


def signing_profile(ca: issuer.CA) -> profiles.Profile:
    """The profile the current signing CA was made with: shared ones may sign CAs."""
    return profiles.SHARED_SIGNING if bundle.path_length(ca.certificate) else profiles.RELAY_SIGNING
