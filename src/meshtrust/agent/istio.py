"""The cluster's Istio CA: keys made here, certificates signed by the server, ``cacerts``.

For each work item the agent makes the intermediate's key in this cluster and
stores it (``cacerts-pending``) before it sends anything, so a retry — after a
lost reply or a restart — sends a CSR for the same key. Only the CSR crosses
the relay. With the signed chain back it writes ``cacerts`` in
``istio-system`` and, if the policy says so, restarts the pods that must pick
up the new CA. An existing ``cacerts`` that meshtrust did not write is left
alone and reported.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable

from meshtrust import errors, settings
from meshtrust.pki import bundle, csr, identity, issuer, keys
from meshtrust.store import base

log = logging.getLogger(__name__)

WORK_ANNOTATION = "meshtrust.io/work-id"
POLICY_ANNOTATION = "meshtrust.io/policy"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Request:
    """What the server asks for: one intermediate, for one work item."""

    id: str
    policy: str
    key_type: keys.KeyType
    organization: str
    form: str
    auto_restart_pods: bool
    trust_domain: str = settings.DEFAULT_TRUST_DOMAIN


@dataclasses.dataclass(frozen=True, kw_only=True)
class Outcome:
    ok: bool
    message: str = ""
    pods: tuple[str, ...] = ()
    restart_needed: bool = False


Sign = Callable[[bytes], Awaitable[tuple[bytes, bytes]]]  # CSR → (chain, root bundle)
Bounce = Callable[[bytes], Awaitable[list[str]]]           # new root → pods restarted


class IstioCA:
    def __init__(self, store: base.Store, cluster: str,
                 names: settings.SecretNames | None = None) -> None:
        self._store = store
        self._cluster = cluster
        self._names = names or settings.SecretNames()

    @property
    def _pending(self) -> str:
        return f"{self._names.istio_ca}-pending"

    async def key_for(self, request: Request) -> tuple[keys.PrivateKey, bytes]:
        """The key of work item ``request.id``: the stored one, or a new one stored first."""
        ns = self._names.istio_namespace
        try:
            pending = await self._store.get_secret(ns, self._pending)
        except errors.NotFound:
            pending = None
        if pending is not None and pending.annotations.get(WORK_ANNOTATION) == request.id:
            pem = pending.data["ca-key.pem"]
            return keys.load_private_key(pem), pem
        if pending is None:
            # cacerts may already hold this work item's key, if its outcome never arrived.
            try:
                written = await self._store.get_secret(ns, self._names.istio_ca)
            except errors.NotFound:
                written = None
            if (written is not None and written.labels.get(settings.MANAGED_LABEL) == "meshtrust"
                    and written.annotations.get(WORK_ANNOTATION) == request.id):
                held = written.data.get("ca-key.pem") or written.data.get("tls.key")
                if held:
                    return keys.load_private_key(held), held
        key = keys.generate_key(request.key_type)
        pem = keys.dump_private_key(key)
        secret = base.Secret(namespace=ns, name=self._pending, labels=settings.MANAGED_BY,
                             annotations={WORK_ANNOTATION: request.id},
                             data={"ca-key.pem": pem})
        if pending is None:
            await self._store.create(secret)
        else:
            await self._store.update(dataclasses.replace(
                secret, resource_version=pending.resource_version))
        return key, pem

    async def foreign_cacerts(self) -> bool:
        """True if ``cacerts`` exists and meshtrust did not write it."""
        try:
            current = await self._store.get_secret(self._names.istio_namespace,
                                                   self._names.istio_ca)
        except errors.NotFound:
            return False
        return current.labels.get(settings.MANAGED_LABEL) != "meshtrust"

    async def handle(self, request: Request, sign: Sign, bounce: Bounce | None) -> Outcome:
        """Make the key, get it signed, write ``cacerts``, restart what needs it."""
        where = f"{self._names.istio_namespace}/{self._names.istio_ca}"
        if await self.foreign_cacerts():
            message = (f"{where} exists and was not written by meshtrust; it is left alone. "
                       "Delete it (or label it app.kubernetes.io/managed-by=meshtrust) to let "
                       "meshtrust manage the Istio CA of this cluster")
            log.warning("%s", message)
            return Outcome(ok=False, message=message)
        key, key_pem = await self.key_for(request)
        # The names the server's profile gives anyway, proposed so that an external CA
        # that copies them from the CSR (AWS Private CA's templates do) gives the same.
        request_pem = csr.dump_csr(csr.build_csr(
            key, common_name="Intermediate CA", organization=request.organization,
            locality=self._cluster, ca=True,
            names=[issuer.ISTIOD_DNS,
                   identity.spiffe_id(request.trust_domain, "istio-system", "istiod")]))
        chain_pem, root_pem = await sign(request_pem)
        chain = bundle.load_certificates(chain_pem, "certificate chain")
        if not keys.key_matches(chain[0], key):
            return Outcome(ok=False, message="the server returned a certificate for another "
                                             "key; the request is retried")
        await self._write(request, chain_pem, key_pem, root_pem)
        log.info("wrote %s: intermediate %x for policy %s", where, chain[0].serial_number,
                 request.policy)
        if not request.auto_restart_pods:
            return Outcome(ok=True, restart_needed=True,
                           message="autoRestartPods is off: restart istiod, then the gateways "
                                   "and workloads, to use the new CA")
        if bounce is None:
            return Outcome(ok=True, restart_needed=True, message="no pod interface here")
        pods = await bounce(root_pem)
        return Outcome(ok=True, pods=tuple(pods))

    async def _write(self, request: Request, chain_pem: bytes, key_pem: bytes,
                     root_pem: bytes) -> None:
        ns, name = self._names.istio_namespace, self._names.istio_ca
        chain = bundle.load_certificates(chain_pem, "certificate chain")
        if request.form == "tls":
            data = {"tls.crt": chain_pem, "tls.key": key_pem, "ca.crt": root_pem}
        else:
            data = {"ca-cert.pem": bundle.dump_certificate(chain[0]), "ca-key.pem": key_pem,
                    "root-cert.pem": root_pem, "cert-chain.pem": chain_pem}
        secret = base.Secret(namespace=ns, name=name, labels=settings.MANAGED_BY, data=data,
                             annotations={WORK_ANNOTATION: request.id,
                                          POLICY_ANNOTATION: request.policy})
        try:
            current = await self._store.get_secret(ns, name)
        except errors.NotFound:
            await self._store.create(secret)
        else:
            await self._store.update(dataclasses.replace(
                secret, resource_version=current.resource_version))
        try:
            await self._store.delete(base.SECRET_KIND, ns, self._pending)
        except errors.NotFound:
            pass
