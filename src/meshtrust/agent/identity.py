"""The agent's key and certificate requests, and where a fresh certificate is kept.

The key of a request is written to the store before the request is sent
(``<client secret>-pending``), so a retry after a lost response — or after
the agent was killed — sends the same key, which a consumed token still
accepts during its retry window.
"""

from __future__ import annotations

import dataclasses

from meshtrust import errors, settings
from meshtrust.pki import csr, keys
from meshtrust.store import base



def pending_name(names: settings.SecretNames) -> str:
    return f"{names.relay_client}-pending"


async def pending_key(store: base.Store, names: settings.SecretNames,
                      key_type: keys.KeyType) -> tuple[keys.PrivateKey, bytes]:
    """The key of the request in flight, made and persisted if there is none."""
    ns = names.relay_namespace
    try:
        secret = await store.get_secret(ns, pending_name(names))
        pem = secret.data["tls.key"]
        return keys.load_private_key(pem), pem
    except (errors.NotFound, KeyError, errors.PKIError):
        pass
    key = keys.generate_key(key_type)
    pem = keys.dump_private_key(key)
    secret = base.Secret(namespace=ns, name=pending_name(names), labels=settings.MANAGED_BY,
                         data={"tls.key": pem})
    try:
        await store.create(secret)
    except errors.AlreadyExists:
        current = await store.get_secret(ns, pending_name(names))
        await store.update(dataclasses.replace(secret,
                                               resource_version=current.resource_version))
    return key, pem


def request_for(key: keys.PrivateKey, cluster: str) -> bytes:
    """A CSR naming the cluster, as the relay client profile requires."""
    return csr.dump_csr(csr.build_csr(key, common_name=cluster, names=[cluster]))


async def store_certificate(store: base.Store, names: settings.SecretNames, *, chain: bytes,
                            key_pem: bytes, trust: bytes) -> base.Secret:
    """Write ``relay-client-tls-secret`` and drop the pending key."""
    ns = names.relay_namespace
    secret = base.Secret(namespace=ns, name=names.relay_client, type="kubernetes.io/tls",
                         labels=settings.MANAGED_BY,
                         data={"ca.crt": trust, "tls.crt": chain, "tls.key": key_pem})
    try:
        current = await store.get_secret(ns, names.relay_client)
    except errors.NotFound:
        written = await store.create(secret)
    else:
        written = await store.update(dataclasses.replace(
            secret, resource_version=current.resource_version))
    try:
        await store.delete(base.SECRET_KIND, ns, pending_name(names))
    except errors.NotFound:
        pass
    return written
