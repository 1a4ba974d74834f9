"""Where the authorities get their signers: CA keys in secrets, or an external CA.

``Signers`` keeps one provider per CA and makes it again only when its
secret changes, so a key is parsed once, not once per certificate. ``sign``
is the one way the authorities sign: through a provider, and — when the
provider is an external CA signing with its own templates — checked against
the profile before anything is handed out.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
from collections.abc import Callable

from meshtrust import errors, settings
from meshtrust.pki import bundle, issuer, keys, verify
from meshtrust.providers import base as providers
from meshtrust.providers import external, local
from meshtrust.store import base


def ca_from_secret(secret: base.Secret, lock: keys.KeyLock | None = None) -> issuer.CA:
    """An issuing CA from a secret in the tls form (``tls.crt``, ``tls.key``, ``ca.crt``)
    or the root form (``root-cert.pem``/``cert-chain.pem``, ``key.pem``); ``lock`` opens
    a key kept encrypted."""
    where = f"{secret.namespace}/{secret.name}"
    data = secret.data
    if "tls.crt" in data:
        cert_key, key_key, extra = "tls.crt", "tls.key", ("ca.crt",)
    else:
        cert_key = "cert-chain.pem" if "cert-chain.pem" in data else "root-cert.pem"
        key_key, extra = "key.pem", ("root-cert.pem",)
    if cert_key not in data or key_key not in data:
        raise errors.ConfigError(
            f"secret {where} holds no CA: it needs tls.crt and tls.key (with ca.crt), or "
            "root-cert.pem and key.pem (with cert-chain.pem for an intermediate)")
    chain = bundle.load_certificates(data[cert_key], f"{where}/{cert_key}")
    pool = [*chain[1:], *(c for k in extra if data.get(k)
                          for c in bundle.load_certificates(data[k], f"{where}/{k}"))]
    path = bundle.order_chain(chain[0], pool)
    try:
        key = (lock or keys.KeyLock()).open(data[key_key])
        return issuer.CA(certificate=chain[0], key=key, chain=tuple(path[1:]))
    except errors.PKIError as exc:
        raise errors.ConfigError(f"secret {where} is not a usable CA: {exc}") from exc


KEY_PASSPHRASE_ENV = "MESHTRUST_KEY_PASSPHRASE"


def key_lock(passphrase_file: str | None = None) -> keys.KeyLock:
    """The lock on the store's CA keys: a passphrase from a file (one trailing newline
    stripped) or from $MESHTRUST_KEY_PASSPHRASE; none means the keys are kept plain."""
    if passphrase_file:
        try:
            with open(passphrase_file, "rb") as handle:
                text = handle.read()
        except OSError as exc:
            raise errors.ConfigError(f"cannot read the key passphrase file: {exc}") from exc
        passphrase = text[:-1] if text.endswith(b"\n") else text
        if not passphrase:
            raise errors.ConfigError(f"the key passphrase file {passphrase_file} is empty")
        return keys.KeyLock(passphrase)
    env = os.environ.get(KEY_PASSPHRASE_ENV)
    return keys.KeyLock(env.encode()) if env else keys.KeyLock()


class Signers:
    """One provider per CA, made again when the CA's secret changes."""

    def __init__(self, open_external: Callable[[str, str], providers.CAProvider]
                 = external.open_external, *, lock: keys.KeyLock | None = None) -> None:
        self._open_external = open_external
        self.lock = lock or keys.KeyLock()  # how CA keys are kept in the store
        self._local: dict[tuple[str, str], tuple[int, local.LocalProvider]] = {}
        self._external: dict[tuple[str, str], providers.CAProvider] = {}

    def local(self, secret: base.Secret) -> local.LocalProvider:
        """The provider for the CA whose key is in ``secret``."""
        key = (secret.namespace, secret.name)
        cached = self._local.get(key)
        if cached is None or cached[0] != secret.resource_version:
            cached = (secret.resource_version,
                      local.LocalProvider(ca_from_secret(secret, self.lock)))
            self._local[key] = cached
        return cached[1]

    def external(self, provider: str, arn: str) -> providers.CAProvider:
        """The provider for CA ``arn`` at an external CA."""
        found = self._external.get((provider, arn))
        if found is None:
            found = self._external[(provider, arn)] = self._open_external(provider, arn)
        return found


async def sign(provider: providers.CAProvider, request: providers.SignRequest,
               now: dt.datetime) -> providers.Signed:
    """Sign through ``provider``; what an external CA returns must fit the profile."""
    signed = await provider.sign(request, now)
    if not isinstance(provider, local.LocalProvider):
        verify.check_issued(signed.certificate, signed.chain, request.request.public_key,
                            request.profile, now, cluster=request.subject.cluster,
                            trust_domain=request.subject.trust_domain)
    return signed


_CA_KEY_FIELDS = ("tls.key", "key.pem", "old-key.pem", "new-key.pem")


async def unlock(store: base.Store, lock: keys.KeyLock,
                 names: settings.SecretNames | None = None) -> list[str]:
    """Open every CA key meshtrust keeps in the store; seal the plain ones if ``lock`` seals.

    Run at the server's start: a missing or wrong passphrase is one clear error
    then, not a failed issuance later. Returns the secrets sealed in place.
    """
    names = names or settings.SecretNames()
    ns = names.relay_namespace
    sealed = []
    for secret in await store.list_secrets(namespace=ns):
        if not (secret.name in (names.relay_root, names.relay_signing, names.istio_signing)
                or secret.name.startswith(settings.ROOT_TRUST_SECRET_PREFIX)):
            continue
        fields = [f for f in _CA_KEY_FIELDS if secret.data.get(f)]
        try:
            opened = {f: lock.open(secret.data[f]) for f in fields}
        except errors.KeyPolicyError as exc:
            raise errors.ConfigError(f"secret {ns}/{secret.name}: {exc}") from exc
        plain = [f for f in fields if not keys.is_encrypted(secret.data[f])]
        if lock.sealing and plain and secret.labels.get(settings.MANAGED_LABEL) == "meshtrust":
            data = {**secret.data, **{f: lock.seal(opened[f]) for f in plain}}
            try:
                await store.update(dataclasses.replace(secret, data=data))
                sealed.append(f"{ns}/{secret.name}")
            except errors.Conflict:
                pass  # changed meanwhile; sealed at the next start
    return sealed
