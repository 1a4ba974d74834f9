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
from meshtrust.pki import bundle, csr, hierarchy, issuer, keys, profiles
from meshtrust.store import base

TLS_TYPE = "kubernetes.io/tls"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Options:
    """How to generate missing relay material."""

    key_type: keys.KeyType = keys.KeyType.EC_P256
    server_names: tuple[str, ...] = ("localhost", "127.0.0.1")
    server_lifetime: dt.timedelta = profiles.RELAY_SERVER.default_lifetime
    names: settings.SecretNames = dataclasses.field(default_factory=settings.SecretNames)


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
    signing_secret = await _get(store, ns, n.relay_signing)
    if signing_secret is None:
        if root_secret is None:
            root = issuer.new_root(options.key_type, profiles.RELAY_ROOT, now)
            root_pem = bundle.dump_certificate(root.certificate)
            root_secret = await _create(store, base.Secret(
                namespace=ns, name=n.relay_root, type=TLS_TYPE, labels=settings.MANAGED_BY,
                data={"ca.crt": root_pem, "tls.crt": root_pem,
                      "tls.key": keys.dump_private_key(root.key)}))
            made.append(n.relay_root)
        root_ca = _load_ca(root_secret, n.relay_root)
        signing = issuer.new_intermediate(options.key_type, root_ca, profiles.RELAY_SIGNING, now)
        signing_secret = await _create(store, base.Secret(
            namespace=ns, name=n.relay_signing, type=TLS_TYPE, labels=settings.MANAGED_BY,
            data={"ca.crt": bundle.dump_certificate(signing.root),
                  "tls.crt": bundle.dump_certificates(signing.path[:-1]),
                  "tls.key": keys.dump_private_key(signing.key)}))
        made.append(n.relay_signing)
    elif root_secret is None:
        # Bring-your-own signing CA with no root secret: publish its root (ca.crt only).
        root_secret = await _create(store, base.Secret(
            namespace=ns, name=n.relay_root, labels=settings.MANAGED_BY,
            data={"ca.crt": _require(signing_secret, "ca.crt", n.relay_signing)}))
        made.append(n.relay_root)
    if await _get(store, ns, n.relay_server) is None:
        signing_ca = _load_ca(signing_secret, n.relay_signing)
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


def _load_ca(secret: base.Secret, name: str) -> issuer.CA:
    """An issuing CA from a ``tls.crt``/``tls.key``/``ca.crt`` secret."""
    chain = bundle.load_certificates(_require(secret, "tls.crt", name), f"{name}/tls.crt")
    key = keys.load_private_key(_require(secret, "tls.key", name))
    roots = (bundle.load_certificates(secret.data["ca.crt"], f"{name}/ca.crt")
             if secret.data.get("ca.crt") else [])
    path = bundle.order_chain(chain[0], [*chain[1:], *roots])
    return issuer.CA(certificate=chain[0], key=key, chain=tuple(path[1:]))


async def load_signing_ca(store: base.Store,
                          names: settings.SecretNames | None = None) -> issuer.CA:
    """The CA that signs relay client certificates, from ``relay-tls-signing-secret``."""
    names = names or settings.SecretNames()
    secret = await _get(store, names.relay_namespace, names.relay_signing)
    if secret is None:
        raise errors.ConfigError(
            f"secret {names.relay_namespace}/{names.relay_signing} is missing; start "
            "`meshtrust server` once to generate the relay PKI, or create it with ca.crt, "
            "tls.crt and tls.key")
    return _load_ca(secret, names.relay_signing)


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
