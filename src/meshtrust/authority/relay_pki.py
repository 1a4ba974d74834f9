"""The relay PKI in the management store: made on first start, never overwritten.

On a store with no relay secrets, ``ensure`` generates what the reference
documentation describes: a root in ``relay-root-tls-secret``, a signing
intermediate in ``relay-tls-signing-secret``, the server certificate in
``relay-server-tls-secret`` and the shared identity token in
``relay-identity-token-secret``. A secret that exists is used as it is, so a
user can bring their own CA or server certificate.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import secrets as secrets_module

from meshtrust import clock as clock_module
from meshtrust import errors, settings
from meshtrust.authority import signers
from meshtrust.pki import bundle, csr, hierarchy, issuer, keys, profiles
from meshtrust.store import base

TLS_TYPE = "kubernetes.io/tls"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Options:
    """How to generate missing relay material."""

    key_type: keys.KeyType = keys.KeyType.EC_P256
    server_names: tuple[str, ...] = ("localhost", "127.0.0.1")
    server_lifetime: dt.timedelta = profiles.RELAY_SERVER.default_lifetime
    signing_lifetime: dt.timedelta = profiles.RELAY_SIGNING.default_lifetime
    names: settings.SecretNames = dataclasses.field(default_factory=settings.SecretNames)
    # False once `meshtrust init` has set the CAs up: then a missing CA is an error.
    generate_cas: bool = True
    key_lock: keys.KeyLock = dataclasses.field(default_factory=keys.KeyLock)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServerCredentials:
    """What the relay listeners need: the server's chain and key, and the client trust."""

    certificate_chain: bytes
    private_key: bytes
    client_trust: bytes
    resource_version: int


async def _get(store: base.Store, namespace: str, name: str) -> base.Secret | None:
    try:
        return await store.get_secret(namespace, name)
    except errors.NotFound:
        return None


async def _create(store: base.Store, secret: base.Secret) -> base.Secret:
    """Create ``secret``; if another process made it first, use theirs."""
    try:
        return await store.create(secret)
    except errors.AlreadyExists:
        return await store.get_secret(secret.namespace, secret.name)


async def ensure(store: base.Store, clock: clock_module.Clock,
                 options: Options | None = None) -> list[str]:
    """Create whichever relay secrets are missing; return the names of those created."""
    options = options or Options()
    n = options.names
    ns = n.relay_namespace
    made: list[str] = []
    now = clock.now()
    root_secret = await _get(store, ns, n.relay_root)
    signing = await _get(store, ns, n.relay_signing)
    if not options.generate_cas:
        if signing is None:
            raise errors.ConfigError(
                f"secret {ns}/{n.relay_signing} is missing, and this store's CAs were set up "
                "by `meshtrust init`, so the server does not make new ones; restore it or "
                "run `meshtrust init --force`")
    elif signing is None:
        if root_secret is None:
            root = issuer.new_root(options.key_type, profiles.RELAY_ROOT, now)
            root_pem = bundle.dump_certificate(root.certificate)
            root_secret = await _create(store, base.Secret(
                namespace=ns, name=n.relay_root, type=TLS_TYPE, labels=settings.MANAGED_BY,
                data={"ca.crt": root_pem, "tls.crt": root_pem,
                      "tls.key": options.key_lock.seal(root.key)}))
            made.append(n.relay_root)
        root_ca = signers.ca_from_secret(root_secret, options.key_lock)
        made_ca = issuer.new_intermediate(options.key_type, root_ca, profiles.RELAY_SIGNING, now,
                                          options.signing_lifetime)
        signing = await _create(store, base.Secret(
            namespace=ns, name=n.relay_signing, type=TLS_TYPE, labels=settings.MANAGED_BY,
            data={"ca.crt": bundle.dump_certificate(made_ca.root),
                  "tls.crt": bundle.dump_certificates(made_ca.path[:-1]),
                  "tls.key": options.key_lock.seal(made_ca.key)}))
        made.append(n.relay_signing)
    elif root_secret is None:
        # Bring-your-own signing CA with no root secret: publish its root (ca.crt only).
        root_secret = await _create(store, base.Secret(
            namespace=ns, name=n.relay_root, labels=settings.MANAGED_BY,
            data={"ca.crt": _require(signing, "ca.crt", n.relay_signing)}))
        made.append(n.relay_root)
    if await _get(store, ns, n.relay_server) is None:
        if not options.generate_cas:
            raise errors.ConfigError(f"secret {ns}/{n.relay_server} is missing; restore it or "
                                     "run `meshtrust init --force`")
        signing_ca = signers.ca_from_secret(signing, options.key_lock)
        server_key = keys.generate_key(options.key_type)
        request = csr.Request(csr=csr.build_csr(server_key), public_key=server_key.public_key())
        cert = issuer.issue(request, signing_ca, profiles.RELAY_SERVER, now,
                            options.server_lifetime,
                            issuer.Subject(names=options.server_names))
        await _create(store, base.Secret(
            namespace=ns, name=n.relay_server, type=TLS_TYPE, labels=settings.MANAGED_BY,
            data=hierarchy.tls_data(cert, server_key, signing_ca)))
        made.append(n.relay_server)
    if await _get(store, ns, n.relay_token) is None:
        await _create(store, base.Secret(
            namespace=ns, name=n.relay_token, labels=settings.MANAGED_BY,
            data={"token": secrets_module.token_urlsafe(32).encode()}))
        made.append(n.relay_token)
    return made


def _require(secret: base.Secret, key: str, name: str) -> bytes:
    try:
        return secret.data[key]
    except KeyError:
        raise errors.ConfigError(
            f"secret {secret.namespace}/{name} has no {key!r}; it needs "
            "ca.crt, tls.crt and tls.key") from None


async def signing_secret(store: base.Store,
                         names: settings.SecretNames | None = None) -> base.Secret:
    """``relay-tls-signing-secret``: the CA that signs relay certificates, or its certificate."""
    names = names or settings.SecretNames()
    secret = await _get(store, names.relay_namespace, names.relay_signing)
    if secret is None:
        raise errors.ConfigError(
            f"secret {names.relay_namespace}/{names.relay_signing} is missing; start "
            "`meshtrust server` once to generate the relay PKI, set one up with "
            "`meshtrust init`, or create it with ca.crt, tls.crt and tls.key")
    return secret


async def load_signing_ca(store: base.Store,
                          names: settings.SecretNames | None = None) -> issuer.CA:
    """The CA that signs relay client certificates, from ``relay-tls-signing-secret``."""
    return signers.ca_from_secret(await signing_secret(store, names))


async def trust_bundle(store: base.Store, names: settings.SecretNames | None = None) -> bytes:
    """The relay root certificate(s) agents and the server trust (``ca.crt``)."""
    names = names or settings.SecretNames()
    ns = names.relay_namespace
    for name in (names.relay_root, names.relay_server):
        secret = await _get(store, ns, name)
        if secret is not None and secret.data.get("ca.crt"):
            return secret.data["ca.crt"]
    raise errors.ConfigError(
        f"no relay root found in {ns}/{names.relay_root}; start `meshtrust server` once to "
        "generate it")


async def server_credentials(store: base.Store,
                             names: settings.SecretNames | None = None) -> ServerCredentials:
    """The relay server's certificate chain, key and client trust bundle."""
    names = names or settings.SecretNames()
    secret = await _get(store, names.relay_namespace, names.relay_server)
    if secret is None:
        raise errors.ConfigError(
            f"secret {names.relay_namespace}/{names.relay_server} is missing")
    chain = _require(secret, "tls.crt", names.relay_server)
    key = _require(secret, "tls.key", names.relay_server)
    keys.load_private_key(key)  # refuse an unusable key before TLS does, with a clear error
    trust = secret.data.get("ca.crt") or await trust_bundle(store, names)
    return ServerCredentials(certificate_chain=chain, private_key=key, client_trust=trust,
                             resource_version=secret.resource_version)
