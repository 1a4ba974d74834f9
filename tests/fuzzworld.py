"""A management server's state, made once and copied fresh for every fuzz example.

``template()`` runs the real use cases once on a ``MemoryStore`` and a fake
clock, with every key, serial number, token and signature the same on every
run (``fuzzkit.deterministic``): the relay PKI, clusters ``c1`` and ``c2``
bootstrapped (``gone`` too, then deregistered), an unused single-use token for
``c1``, a trust policy with a generated Istio root and one outstanding work
item per cluster. It keeps the store and the values an example needs (the
token, the work item IDs, a client certificate per cluster, CSRs the agent
would send).

``World.fresh(template)`` copies that store, at the same revision, so each
example starts from the same state and a failure replays exactly. Keys are
parsed once: the ``Signers`` cache is shared, and a copied secret has the
version it was cached under.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

from meshtrust import settings
from meshtrust.authority import audit, istio, registry, relay, relay_pki, signers
from meshtrust.pki import csr, issuer, keys
from meshtrust.testing import FakeClock, MemoryStore

import fuzzkit

START = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)
CLIENT_LIFETIME = dt.timedelta(hours=1)
INTERMEDIATE_LIFETIME = dt.timedelta(seconds=1000)
NS = settings.RELAY_NAMESPACE
CLUSTERS = ("c1", "c2")
GONE = "gone"
POLICY: dict[str, Any] = {
    "apiVersion": "admin.gloo.solo.io/v2", "kind": "RootTrustPolicy",
    "metadata": {"name": "mesh", "namespace": NS},
    "spec": {"config": {
        "mgmtServerCa": {"generated": {"keyType": "ecdsa-p256"}},
        "intermediateCertOptions": {"keyType": "ecdsa-p256", "ttl": "1000s",
                                    "secretRotationGracePeriodRatio": 0.5}}}}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Template:
    store: MemoryStore           # kept open; never written after ``template()``
    token: str                   # c1's unused single-use token
    shared_token: str            # the shared token in relay-identity-token-secret
    work: dict[str, str]         # cluster -> its outstanding work item
    peers: dict[str, bytes]      # cluster -> a client certificate chain it holds (PEM)
    signing: issuer.CA           # the relay signing CA
    istio_ca: issuer.CA          # the policy's Istio root
    client_csrs: tuple[bytes, ...]        # what agents send to bootstrap and renew (c1)
    intermediate_csrs: tuple[bytes, ...]  # what agents send for the Istio CA (c1)


def copy_store(source: MemoryStore, clock: FakeClock) -> MemoryStore:
    """A new store holding what ``source`` holds, at its revision (watches start empty).

    Creating each object again costs 50 µs per object, most of an example's time;
    sharing the stored values is safe because the store never changes one in place
    (a write stores a new value, a read returns a copy).
    """
    store = MemoryStore(clock=clock)
    store._objects = dict(source._objects)
    store._revision = source._revision
    return store


def client_csr(cluster: str, key_name: str = "ec-p256") -> bytes:
    """The CSR an agent sends to bootstrap or renew, the same bytes every run."""
    with fuzzkit.deterministic():
        return csr.dump_csr(csr.build_csr(fuzzkit.key(key_name), common_name=cluster,
                                          names=[cluster]))


def intermediate_csr(cluster: str, key_name: str = "ec-p256") -> bytes:
    """The CSR an agent sends for its Istio CA, the same bytes every run."""
    with fuzzkit.deterministic():
        return csr.dump_csr(csr.build_csr(
            fuzzkit.key(key_name), common_name="Intermediate CA", organization="Istio",
            locality=cluster, ca=True,
            names=[issuer.ISTIOD_DNS, "spiffe://cluster.local/ns/istio-system/sa/istiod"]))


async def template() -> Template:
    """The server's state, made the same (keys, serials, tokens) on every run."""
    with fuzzkit.deterministic():
        return await _template()


async def _template() -> Template:
    clock = FakeClock(START)
    store = MemoryStore(clock=clock)
    await relay_pki.ensure(store, clock)
    reg = registry.Registry(store, clock)
    authority = relay.RelayAuthority(store, clock, reg,
                                     relay.Options(client_lifetime=CLIENT_LIFETIME))
    peers = {}
    for cluster in (*CLUSTERS, GONE):
        await reg.register(cluster)
        token = await reg.create_token(cluster)
        own = keys.generate_key(keys.KeyType.EC_P256)
        request = csr.dump_csr(csr.build_csr(own, common_name=cluster, names=[cluster]))
        peers[cluster] = (await authority.bootstrap(cluster, token, request)).chain_pem
    await reg.deregister(GONE)
    token = await reg.create_token("c1")
    shared = (await store.get_secret(NS, settings.SecretNames().relay_token)).data["token"]
    authority_istio = istio.IstioAuthority(store, clock, reg)
    await authority_istio.apply(POLICY)
    await authority_istio.reconcile()
    work = {}
    for cluster in CLUSTERS:
        [item] = await authority_istio.work_for(cluster)
        work[cluster] = item.id
    _, policy = await authority_istio.policy("mesh")
    root = await authority_istio.root_secret(policy)
    return Template(
        store=store, token=token,
        shared_token=shared.decode(), work=work, peers=peers,
        signing=await relay_pki.load_signing_ca(store),
        istio_ca=signers.ca_from_secret(root),
        client_csrs=tuple(client_csr("c1", k) for k in fuzzkit.ACCEPTED_KEYS),
        intermediate_csrs=tuple(intermediate_csr("c1", k) for k in ("ec-p256", "ec-p384")))


@dataclasses.dataclass
class World:
    """One example's server state and the use cases over it."""

    store: MemoryStore
    clock: FakeClock
    registry: registry.Registry
    relay: relay.RelayAuthority
    istio: istio.IstioAuthority

    @classmethod
    async def fresh(cls, made: Template, cache: signers.Signers,
                    token_mode: relay.TokenMode = relay.TokenMode.ANY) -> World:
        clock = FakeClock(START)
        store = copy_store(made.store, clock)
        log = audit.AuditLog(store, clock, actor=audit.SERVER)
        reg = registry.Registry(store, clock, audit=log)
        return cls(store=store, clock=clock, registry=reg,
                   relay=relay.RelayAuthority(
                       store, clock, reg, relay.Options(client_lifetime=CLIENT_LIFETIME,
                                                        token_mode=token_mode),
                       signer_cache=cache, audit=log),
                   istio=istio.IstioAuthority(store, clock, reg, signer_cache=cache, audit=log))

    async def close(self) -> None:
        await self.store.close()

