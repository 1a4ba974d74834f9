"""Enrolling a cluster: what an agent needs before its first start.

``enroll`` registers the cluster in the management store and returns the
relay root and a bootstrap token; ``install`` writes them into the cluster's
own store as ``relay-root-tls-secret`` (``ca.crt`` only) and
``relay-identity-token-secret``, where the agent looks for them.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

from meshtrust import clock as clock_module
from meshtrust import errors, settings
from meshtrust.authority import registry as registry_module
from meshtrust.authority import relay_pki
from meshtrust.store import base


@dataclasses.dataclass(frozen=True, kw_only=True)
class Enrollment:
    cluster: str
    server: str
    bootstrap_server: str
    ca_cert: bytes
    token: str

    def document(self) -> dict[str, Any]:
        return {"cluster": self.cluster, "server": self.server,
                "bootstrapServer": self.bootstrap_server,
                "caCert": self.ca_cert.decode(), "token": self.token}


async def enroll(store: base.Store, clock: clock_module.Clock, cluster: str, *,
                 server: str, bootstrap_server: str, shared_token: bool = False,
                 token_ttl: dt.timedelta = registry_module.DEFAULT_TOKEN_TTL,
                 names: settings.SecretNames | None = None) -> Enrollment:
    """Register ``cluster`` (if needed) and mint what its agent needs to bootstrap."""
    names = names or settings.SecretNames()
    registry = registry_module.Registry(store, clock, namespace=names.relay_namespace)
    await relay_pki.ensure(store, clock, relay_pki.Options(names=names))
    await registry.register(cluster)
    if shared_token:
        secret = await store.get_secret(names.relay_namespace, names.relay_token)
        token = secret.data["token"].decode().strip()
    else:
        token = await registry.create_token(cluster, token_ttl)
    return Enrollment(cluster=cluster, server=server, bootstrap_server=bootstrap_server,
                      ca_cert=await relay_pki.trust_bundle(store, names), token=token)


async def install(store: base.Store, enrollment: Enrollment,
                  names: settings.SecretNames | None = None) -> None:
    """Write the root and token of ``enrollment`` into a cluster's store."""
    names = names or settings.SecretNames()
    ns = names.relay_namespace
    for name, data in ((names.relay_root, {"ca.crt": enrollment.ca_cert}),
                       (names.relay_token, {"token": enrollment.token.encode()})):
        secret = base.Secret(namespace=ns, name=name, data=data,
                             labels=settings.MANAGED_BY)
        try:
            await store.create(secret)
        except errors.AlreadyExists:
            current = await store.get_secret(ns, name)
            await store.update(dataclasses.replace(secret,
                                                   resource_version=current.resource_version))
