"""Where the authorities get their signers: CA keys in secrets, or an external CA.

``Signers`` keeps one provider per CA and makes it again only when its
secret changes, so a key is parsed once, not once per certificate. ``sign``
is the one way the authorities sign: through a provider, and — when the
provider is an external CA signing with its own templates — checked against
the profile before anything is handed out.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

from meshtrust import errors
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
