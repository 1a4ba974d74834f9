"""Federated Istio trust: one root per policy, one intermediate per cluster.

For every trust policy the server keeps a root (generated once into
``root-trust.<policy>``, or the user's ``secretRef``) and, for every selected
cluster, an ``IssuedCertificate`` resource whose status walks
PENDING → REQUESTED → ISSUED → FINISHED (or FAILED, with a message). The
cluster's agent makes the key and sends only a CSR; ``sign`` applies the
Istio intermediate profile. A spec change — a new root, new options — or the
grace-ratio renewal time sends the cluster back to PENDING, and the next
intermediate is made with a new key.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import enum
import hashlib
import json
import logging
from collections.abc import Collection, Iterator, Mapping
from typing import Any

from cryptography import x509

from meshtrust import clock as clock_module
from meshtrust import errors, settings
from meshtrust.authority import audit as audit_module
from meshtrust.authority import registry as registry_module
from meshtrust.authority import signers, trust_policy
from meshtrust.pki import bundle, csr, issuer, keys, profiles, rotation
from meshtrust.providers import base as providers
from meshtrust.store import base, follow, manifest

log = logging.getLogger(__name__)

ISSUED_KIND = "IssuedCertificate"
ISSUED_API = "meshtrust.io/v1"
TRUST_BUNDLE_KEY = "trust-bundle.pem"  # every root clusters must trust, during a rotation
_CAS_ATTEMPTS = 5
RETRY_FIRST = 10.0  # seconds before a FAILED intermediate is tried again; doubles each time
RETRY_MAX = 300.0
RECONCILE_PARALLEL = 64  # clusters whose intermediates one reconcile round handles at once


class State(enum.Enum):
    PENDING = "PENDING"
    REQUESTED = "REQUESTED"
    ISSUED = "ISSUED"
    FINISHED = "FINISHED"
    FAILED = "FAILED"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Work:
    """One intermediate a cluster's agent must make a key and a CSR for."""

    id: str
    cluster: str
    policy: str
    key_type: str
    trust_domain: str
    organization: str
    form: str
    auto_restart_pods: bool


@dataclasses.dataclass(frozen=True, kw_only=True)
class Signed:
    certificate: x509.Certificate
    chain_pem: bytes    # cert-chain.pem: the intermediate and every CA above it
    root_bundle: bytes  # root-cert.pem: every root the cluster must trust


@dataclasses.dataclass(frozen=True, kw_only=True)
class Signer:
    """What signs a policy's intermediates: a provider, its CA and the roots to trust."""

    provider: providers.CAProvider
    ca: providers.Description
    roots: bytes  # root-cert.pem: every root the clusters must trust


def issued_name(policy: str, cluster: str) -> str:
    return f"{policy}.{cluster}"


def work_id(resource: base.Resource) -> str:
    return f"{resource.name}/{resource.generation}/{resource.status.get('round', 0)}"


def _policy_of(id_: str, cluster: str) -> str | None:
    """The policy a work item ID names, if it is one of ``cluster``'s."""
    name = id_.split("/", 1)[0]
    suffix = f".{cluster}"
    return name[:-len(suffix)] if name.endswith(suffix) and len(name) > len(suffix) else None


def _spec_digest(spec: Mapping[str, Any]) -> str:
    """What an intermediate is issued for: its spec without the policy's generation
    number, which a restore renumbers."""
    kept = {key: value for key, value in spec.items() if key != "policyGeneration"}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()


def _interrupted(resource: base.Resource) -> bool:
    """True when the status is not about the stored spec: a writer died between the two."""
    status = resource.status
    if not status.get("state"):
        return True  # created, never set PENDING
    recorded = status.get("specDigest")
    return recorded is not None and recorded != _spec_digest(resource.spec)


_AT_ONCE = dt.datetime.min.replace(tzinfo=dt.UTC)
_BACKOFF_DOUBLINGS = 16  # past RETRY_MAX already: more failures do not lengthen the wait


def _due_at(status: Mapping[str, Any]) -> dt.datetime | None:
    """When the reconcile round next acts on an intermediate whose spec is in line: its
    renewal (ISSUED, FINISHED), or its retry, backing off from 10 s to 5 minutes
    (FAILED); None for neither."""
    state = status.get("state")
    if state in (State.ISSUED.value, State.FINISHED.value):
        return manifest.read_time(status.get("renewAt"))
    if state != State.FAILED.value:
        return None
    failed_at = manifest.read_time(status.get("updated"))
    if failed_at is None:
        return _AT_ONCE
    failures = min(max(int(status.get("failures", 0)), 0), _BACKOFF_DOUBLINGS)
    return failed_at + dt.timedelta(seconds=min(RETRY_FIRST * 2 ** failures, RETRY_MAX))


def _without_cluster(spec: Mapping[str, Any]) -> str:
    """A spec without its cluster, as JSON: the same for every cluster of a policy."""
    return json.dumps({key: value for key, value in spec.items() if key != "cluster"},
                      sort_keys=True)


_Summary = tuple[str, Any, bool, dt.datetime | None]


class Summaries(follow.Index[_Summary | None]):
    """What a reconcile round needs of each IssuedCertificate, kept in memory from the
    store's watch (``follow.Index``, as ``registry.Members`` keeps the clusters).

    A round looks for the few intermediates out of line: a spec that is not the
    policy's, an update a writer left half done, a renewal or a retry that is due.
    Listing them all for that parses every record each round, ten thousand of them
    with a large fleet, and the server's memory keeps the high mark. Kept here for each:
    its spec without the cluster (one copy shared by the records alike), its cluster,
    whether it was left half done and when it is next due; None for a record that
    cannot be read this way. A round then reads only the records these say are out of
    line, or does not know. Until filled, ``names`` is None: the round lists the store.
    """

    def __init__(self, namespace: str = settings.RELAY_NAMESPACE) -> None:
        super().__init__(namespace)

    def in_line(self, name: str, spec: str, cluster: str, now: dt.datetime) -> bool:
        """Whether the round may leave ``name`` alone: known, with the spec ``spec`` (from
        ``_without_cluster``) for ``cluster``, not half done and not due at ``now``."""
        summary = self.get(name)
        if summary is None:
            return False
        stored_spec, stored_cluster, interrupted, due = summary
        return (stored_spec == spec and stored_cluster == cluster and not interrupted
                and (due is None or now < due))

    def summarize(self, resource: base.Resource) -> _Summary | None:
        try:
            return (self.share(_without_cluster(resource.spec)), resource.spec.get("cluster"),
                    _interrupted(resource), _due_at(resource.status))
        except (TypeError, ValueError, ArithmeticError):  # the round reads it
            return None



def _signed_for(resource: base.Resource, id_: str, request: csr.Request) -> bytes | None:
    """The chain already issued for work item ``id_`` and the CSR's key, if there is one."""
    status = resource.status
    chain = status.get("certificateChain")
    if (status.get("state") in (State.ISSUED.value, State.FINISHED.value)
            and status.get("workId") == id_ and isinstance(chain, str)
            and isinstance(status.get("auditId"), str)
            and status.get("keySha256") == request.key_sha256):
        return chain.encode("ascii")
    return None


bundle_fingerprint = bundle.roots_fingerprint






def _spec_template(policy: trust_policy.TrustPolicy, generation: int,
                   signer: Signer) -> dict[str, Any]:
    """What every selected cluster's IssuedCertificate spec holds but its name."""
    return {
        "policy": policy.name, "policyGeneration": generation,
        "rootFingerprint": bundle.fingerprint(signer.ca.root),
        "signerFingerprint": bundle.fingerprint(signer.ca.certificate),
        "bundleFingerprint": bundle_fingerprint(signer.roots),
        "lifetimeSeconds": int(policy.intermediate.lifetime.total_seconds()),
        "keyType": policy.intermediate.key_type.value,
        "gracePeriodRatio": policy.intermediate.grace_ratio,
        "organization": policy.intermediate.organization,
        "trustDomain": policy.trust_domain, "form": policy.form,
        "autoRestartPods": policy.auto_restart_pods,
    }


class IstioAuthority:
    """Keeps policies, roots and per-cluster intermediates in the management store."""

    def __init__(self, store: base.Store, clock: clock_module.Clock,
                 registry: registry_module.Registry, *,
                 namespace: str = settings.RELAY_NAMESPACE,
                 signer_cache: signers.Signers | None = None,
                 audit: audit_module.AuditLog | None = None) -> None:
        self._store = store
        self._clock = clock
        self._registry = registry
        self._ns = namespace
        self._signers = signer_cache or signers.Signers()
        self.audit = audit or registry.audit
        # Each stored policy parsed, by (namespace, name), with the spec it was parsed
        # from: every CSR looks its policy up, and a policy seldom changes.
        self._parsed: dict[tuple[str, str],
                           tuple[Mapping[str, Any], trust_policy.TrustPolicy]] = {}

    @property
    def namespace(self) -> str:
        """Where the IssuedCertificates are kept."""
        return self._ns

    @property
    def key_lock(self) -> keys.KeyLock:
        """How the CA keys this authority makes are kept in the store."""
        return self._signers.lock

    # -- policies ---------------------------------------------------------------------------

    async def apply(self, document: Mapping[str, Any]) -> tuple[base.Resource, bool]:
        """Check a RootTrustPolicy or VirtualMesh and store it as a RootTrustPolicy.

        Returns the stored resource and whether it was created.
        """
        try:
            policy = trust_policy.parse(document)
        except errors.ConfigError as exc:
            metadata = document.get("metadata")
            name = metadata.get("name") if isinstance(metadata, Mapping) else None
            await self.audit.refused(audit_module.Kind.POLICY, exc,
                                     policy=name if isinstance(name, str) else None)
            raise
        spec = trust_policy.to_document(policy)["spec"]
        try:
            current = await self._store.get_resource(trust_policy.POLICY_KIND,
                                                     policy.namespace, policy.name)
        except errors.NotFound:
            stored, created = await self._store.create(base.Resource(
                api_version=trust_policy.POLICY_API, kind=trust_policy.POLICY_KIND,
                namespace=policy.namespace, name=policy.name, spec=spec)), True
        else:
            stored = await self._store.update(dataclasses.replace(current, spec=spec))
            created = False
        await self.audit.record(audit_module.Kind.POLICY, policy=policy.name,
                                message=f"{'created' if created else 'configured'} in "
                                        f"{policy.namespace} (generation {stored.generation})")
        return stored, created

    async def policies(self) -> list[tuple[base.Resource, trust_policy.TrustPolicy]]:
        found, parsed = [], {}
        for resource in await self._store.list_resources(trust_policy.POLICY_KIND):
            key = (resource.namespace, resource.name)
            known = self._parsed.get(key)
            if known is None or known[0] != resource.spec:
                document = {"apiVersion": resource.api_version, "kind": resource.kind,
                            "metadata": {"name": resource.name,
                                         "namespace": resource.namespace},
                            "spec": resource.spec}
                known = (resource.spec, trust_policy.parse(document))
            parsed[key] = known
            found.append((resource, known[1]))
        self._parsed = parsed  # a policy deleted meanwhile is forgotten
        return found

    async def policy(self, name: str) -> tuple[base.Resource, trust_policy.TrustPolicy]:
        for resource, policy in await self.policies():
            if policy.name == name:
                return resource, policy
        raise errors.ConfigError(f"no trust policy named {name!r}; apply one with "
                                 "`meshtrust apply -f policy.yaml`")

    # -- roots ------------------------------------------------------------------------------

    async def root_secret(self, policy: trust_policy.TrustPolicy) -> base.Secret:
        """The secret holding the policy's signing CA, made once if generated."""
        if isinstance(policy.root, trust_policy.ExternalRoot):
            raise errors.ConfigError(f"policy {policy.name} signs at {policy.root.arn}; its "
                                     "key is not in a secret")
        if isinstance(policy.root, trust_policy.SecretRoot):
            ref = policy.root
            try:
                return await self._store.get_secret(ref.namespace, ref.name)
            except errors.NotFound:
                raise errors.ConfigError(
                    f"policy {policy.name}: secret {ref.namespace}/{ref.name} (secretRef) does "
                    "not exist; create it with root-cert.pem and key.pem") from None
        name = settings.SecretNames.root_trust(policy.name)
        try:
            return await self._store.get_secret(policy.namespace, name)
        except errors.NotFound:
            pass
        root = issuer.new_root(policy.root.key_type, profiles.ISTIO_ROOT, self._clock.now(),
                               policy.root.lifetime,
                               issuer.Subject(organization=policy.root.organization))
        secret = base.Secret(namespace=policy.namespace, name=name, labels=settings.MANAGED_BY,
                             data={"root-cert.pem": bundle.dump_certificate(root.certificate),
                                   "key.pem": self.key_lock.seal(root.key)})
        try:
            made = await self._store.create(secret)
        except errors.AlreadyExists:
            return await self._store.get_secret(policy.namespace, name)
        log.info("generated the Istio root of policy %s in %s/%s", policy.name,
                 policy.namespace, name)
        await self.audit.record(audit_module.Kind.ISSUE, policy=policy.name,
                                profile=profiles.ISTIO_ROOT.name, certificate=root.certificate,
                                message=f"generated in {policy.namespace}/{name}")
        return made

    async def signer(self, policy: trust_policy.TrustPolicy) -> Signer:
        """What signs the policy's intermediates, and the roots clusters must trust."""
        if isinstance(policy.root, trust_policy.ExternalRoot):
            provider = self._signers.external(policy.root.provider, policy.root.arn)
            described = await provider.describe()
            return Signer(provider=provider, ca=described,
                          roots=bundle.dump_certificate(described.root))
        secret = await self.root_secret(policy)
        try:
            local = self._signers.local(secret)
        except errors.MeshTrustError as exc:
            raise errors.ConfigError(f"policy {policy.name}: {exc}") from exc
        described = await local.describe()
        roots = (secret.data.get(TRUST_BUNDLE_KEY) or secret.data.get("root-cert.pem")
                 or secret.data.get("ca.crt") or bundle.dump_certificate(described.root))
        return Signer(provider=local, ca=described, roots=roots)

    # -- reconcile --------------------------------------------------------------------------

    async def reconcile(self, clusters: Collection[str] | None = None,
                        known: Summaries | None = None) -> None:
        """Bring every IssuedCertificate in line with the policies, clusters and the clock.

        Up to ``RECONCILE_PARALLEL`` clusters are brought in line at once, so that their
        writes share commits; the event loop gets a turn after each cluster read, so
        that a round over a fleet of thousands does not hold every call meanwhile.
        ``clusters``: the registered clusters' names, from a caller that follows them
        (``registry.Members``); without them the registry is listed, if a policy needs it.
        ``known``: the intermediates, from a caller that follows them (``Summaries``):
        the round reads only those out of line or unknown. Without it, or until it is
        filled, the round reads them all in one list.
        """
        names = None if known is None else known.names
        existing: dict[str, base.Resource] = {}
        if names is None:
            existing = {item.name: item for item in
                        await self._store.list_resources(ISSUED_KIND, namespace=self._ns)}
            names = frozenset(existing)
        now = self._clock.now()
        policies = await self.policies()
        if clusters is None and policies:
            clusters = {c.name for c in await self._registry.list()}
        wanted: set[str] = set()
        for resource, policy in policies:
            try:
                current = await self.signer(policy)
            except errors.MeshTrustError as exc:
                await self._policy_status(resource, {"state": "FAILED", "message": str(exc)})
                continue
            selected = sorted(c for c in clusters or () if policy.selects(c))
            # How many, not which: the list would make every read of the policy (each
            # signature, each work lookup) cost as much as the fleet is large.
            await self._policy_status(resource, {
                "state": "ACCEPTED", "message": "", "selectedClusters": len(selected),
                "rootFingerprint": bundle.fingerprint(current.ca.root),
                "signer": current.ca.provider}, drop=("clusters",))
            template = _spec_template(policy, resource.generation, current)
            queue = iter(selected)

            async def worker(policy: trust_policy.TrustPolicy = policy,
                             template: dict[str, Any] = template,
                             wanted_spec: str = _without_cluster(template),
                             queue: Iterator[str] = queue) -> None:
                for cluster in queue:
                    name = issued_name(policy.name, cluster)
                    if known is not None and known.in_line(name, wanted_spec, cluster, now):
                        continue
                    await self._ensure(policy, cluster, {**template, "cluster": cluster},
                                       existing.get(name))
                    await asyncio.sleep(0)

            wanted.update(issued_name(policy.name, cluster) for cluster in selected)
            outcomes = await asyncio.gather(*(worker() for _ in range(RECONCILE_PARALLEL)),
                                            return_exceptions=True)
            for outcome in outcomes:
                if isinstance(outcome, BaseException):
                    raise outcome
        for name in names:
            if name not in wanted:
                try:
                    await self._store.delete(ISSUED_KIND, self._ns, name)
                except errors.NotFound:
                    pass

    async def _policy_status(self, resource: base.Resource, status: dict[str, Any], *,
                             drop: tuple[str, ...] = ()) -> None:
        merged = {k: v for k, v in {**resource.status, **status}.items() if k not in drop}
        if merged != resource.status:
            try:
                await self._store.update_status(dataclasses.replace(resource, status=merged))
            except (errors.Conflict, errors.NotFound):
                pass  # the next round sees the newer policy

    async def _ensure(self, policy: trust_policy.TrustPolicy, cluster: str,
                      spec: dict[str, Any], listed: base.Resource | None) -> None:
        """Create or update one cluster's intermediate; ``listed`` is how a list found it."""
        name = issued_name(policy.name, cluster)
        for attempt in range(_CAS_ATTEMPTS):
            try:
                if attempt == 0 and listed is not None:
                    current = listed  # a lost compare-and-swap reads it again
                else:
                    current = await self._store.get_resource(ISSUED_KIND, self._ns, name)
            except errors.NotFound:
                # Spec and state in one write: no reader sees a spec without its round.
                try:
                    await self._store.create(base.Resource(
                        api_version=ISSUED_API, kind=ISSUED_KIND, namespace=self._ns,
                        name=name, labels={"cluster": cluster, "policy": policy.name},
                        spec=spec, status=self._state({}, State.PENDING, round_=1,
                                                      specDigest=_spec_digest(spec))))
                    return
                except errors.AlreadyExists:
                    continue
            try:
                if current.spec != spec:
                    await self._store.update(dataclasses.replace(
                        current, spec=spec, status=self._state(
                            current.status, State.PENDING,
                            round_=int(current.status.get("round", 0)) + 1,
                            specDigest=_spec_digest(spec))), with_status=True)
                elif _interrupted(current):
                    # The spec was written, then whoever wrote it died before the state (a
                    # server before spec and state were written together): the state still
                    # describes an intermediate of the spec before.
                    await self._set_state(current, State.PENDING,
                                          round_=int(current.status.get("round", 0)) + 1,
                                          specDigest=_spec_digest(current.spec),
                                          message="resumed an interrupted update")
                elif not self._due(current):
                    pass
                elif current.status.get("state") != State.FAILED.value:
                    await self._set_state(current, State.PENDING,
                                          round_=int(current.status.get("round", 0)) + 1,
                                          message="renewal due")
                else:  # tried again, backing off
                    failures = int(current.status.get("failures", 0)) + 1
                    await self._set_state(current, State.PENDING,
                                          round_=int(current.status.get("round", 0)) + 1,
                                          message=f"retry {failures}: "
                                                  f"{current.status.get('message')}",
                                          failures=failures)
                return
            except errors.Conflict:
                continue

    def _due(self, resource: base.Resource) -> bool:
        """Whether a renewal (ISSUED, FINISHED) or a retry (FAILED) is due (``_due_at``)."""
        due = _due_at(resource.status)
        return due is not None and self._clock.now() >= due

    def _state(self, status: Mapping[str, Any], state: State, *,
               round_: int | None = None, **extra: Any) -> dict[str, Any]:
        """``status`` moved to ``state`` now (in round ``round_`` if given)."""
        moved = {**status, "state": state.value, "message": "",
                 "updated": manifest.dump_time(self._clock.now()), **extra}
        if round_ is not None:
            moved["round"] = round_
        return moved

    async def _set_state(self, resource: base.Resource, state: State, *,
                         round_: int | None = None, **extra: Any) -> base.Resource:
        return await self._store.update_status(dataclasses.replace(
            resource, status=self._state(resource.status, state, round_=round_, **extra)))

    # -- the relay side ---------------------------------------------------------------------

    async def work_for(self, cluster: str) -> list[Work]:
        """The intermediates ``cluster`` must make keys for; each is marked REQUESTED.

        An ISSUED item is sent again too: until the agent's outcome arrives (it may
        have been lost with a server that died) the work is not done. The cluster's
        items are read by name, one per policy, so the cost does not grow with the fleet.
        """
        found = []
        for listed in await self._items_of(cluster):
            state = listed.status.get("state")
            if state not in (State.PENDING.value, State.REQUESTED.value, State.ISSUED.value):
                continue
            item = listed
            if state == State.PENDING.value:
                try:
                    item = await self._set_state(listed, State.REQUESTED)
                except (errors.Conflict, errors.NotFound):
                    continue
            spec = item.spec
            found.append(Work(id=work_id(item), cluster=cluster, policy=spec["policy"],
                              key_type=spec["keyType"], trust_domain=spec["trustDomain"],
                              organization=spec["organization"], form=spec["form"],
                              auto_restart_pods=bool(spec["autoRestartPods"])))
        return found

    async def _items_of(self, cluster: str) -> list[base.Resource]:
        """The cluster's IssuedCertificates: one per policy at most, in policy order."""
        policies = sorted({r.name for r in
                           await self._store.list_resources(trust_policy.POLICY_KIND)})
        items = []
        for policy in policies:
            try:
                item = await self._store.get_resource(ISSUED_KIND, self._ns,
                                                      issued_name(policy, cluster))
            except (errors.NotFound, ValueError):  # ValueError: not even a valid name
                continue
            if item.labels.get("cluster") == cluster:
                items.append(item)
        return items

    async def _current(self, cluster: str, id_: str) -> base.Resource:
        name = id_.split("/", 1)[0]
        try:
            resource = await self._store.get_resource(ISSUED_KIND, self._ns, name)
        except (errors.NotFound, ValueError):
            raise errors.ConfigError(f"no work item {id_!r} is waiting for this cluster") from None
        if resource.spec.get("cluster") != cluster:
            raise errors.AuthError(f"work item {id_!r} belongs to another cluster")
        if work_id(resource) != id_:
            raise errors.ConfigError(f"work item {id_!r} is stale; the server sends a newer one")
        return resource

    async def sign(self, cluster: str, id_: str, csr_pem: bytes) -> Signed:
        """Sign a cluster's intermediate CSR for work item ``id_``; refusals are recorded.

        A deregistered cluster is refused (``UnknownCluster``), as on every relay call."""
        await self._registry.get(cluster)
        try:
            return await self._sign(cluster, id_, csr_pem)
        except errors.MeshTrustError as exc:
            await self.audit.refused(audit_module.Kind.ISSUE, exc, actor=cluster,
                                     cluster=cluster, profile=profiles.ISTIO_INTERMEDIATE.name,
                                     policy=_policy_of(id_, cluster))
            raise

    async def _sign(self, cluster: str, id_: str, csr_pem: bytes) -> Signed:
        resource = await self._current(cluster, id_)
        spec = resource.spec
        _, policy = await self.policy(spec["policy"])
        request = csr.load_csr(csr_pem)
        wanted = keys.KeyType.parse(spec["keyType"])
        if keys.key_type_of(request.public_key) is not wanted:
            raise errors.ProfileViolation(
                f"policy {policy.name} asks for {wanted.value} keys, but the CSR has a "
                f"{keys.describe_key(request.public_key)} key")
        current = await self.signer(policy)
        if _signed_for(resource, id_, request) is None:
            resource = await self._issue(resource, id_, request, current)
        # Once per work item and key: a CSR sent again (the agent lost the reply, the
        # replica that answered died) gets the stored certificate, on any replica.
        chain_pem = _signed_for(resource, id_, request)
        assert chain_pem is not None
        certificate = bundle.load_certificates(chain_pem, "cert-chain.pem")[0]
        # Recorded before it is handed out: no record, no intermediate. A fixed record
        # id: however often this runs for the work item, the audit log holds one record.
        await self.audit.record(audit_module.Kind.ISSUE, actor=cluster, cluster=cluster,
                                policy=policy.name, profile=profiles.ISTIO_INTERMEDIATE.name,
                                certificate=certificate, message=f"work {id_}",
                                id=str(resource.status["auditId"]))
        return Signed(certificate=certificate, chain_pem=chain_pem, root_bundle=current.roots)

    async def _issue(self, resource: base.Resource, id_: str, request: csr.Request,
                     current: Signer) -> base.Resource:
        """Sign and store the intermediate of work item ``id_`` (ISSUED); return the resource.

        The store's compare-and-swap decides between two replicas signing the same
        item at once: the loser hands out the winner's certificate, and its own
        is never recorded nor handed out.
        """
        spec, cluster = resource.spec, str(resource.spec["cluster"])
        now = self._clock.now()
        signed = await signers.sign(current.provider, providers.SignRequest(
            request=request, profile=profiles.ISTIO_INTERMEDIATE,
            lifetime=dt.timedelta(seconds=int(spec["lifetimeSeconds"])),
            subject=issuer.Subject(cluster=cluster, trust_domain=spec["trustDomain"],
                                   organization=spec["organization"]),
            idempotency_key=f"istio/{id_}/{request.key_sha256}"), now)
        certificate = signed.certificate
        renew_at = rotation.renew_at(certificate, float(spec["gracePeriodRatio"]))
        try:
            return await self._set_state(
                resource, State.ISSUED, serial=f"{certificate.serial_number:x}",
                notAfter=manifest.dump_time(certificate.not_valid_after_utc),
                renewAt=manifest.dump_time(renew_at), issuedAt=manifest.dump_time(now),
                keySha256=request.key_sha256, workId=id_,
                certificateChain=signed.pem(root=True).decode("ascii"),
                auditId=audit_module.new_id(now))
        except errors.Conflict:
            again = await self._current(cluster, id_)
            if _signed_for(again, id_, request) is None:
                raise errors.Conflict(f"work item {id_!r} changed while it was signed; the "
                                      "server sends it again") from None
            return again

    async def report(self, cluster: str, id_: str, *, ok: bool, message: str = "",
                     pods: list[str] | None = None, restart_needed: bool = False) -> None:
        """Record how the agent finished a work item: FINISHED, or FAILED with the reason
        (``UnknownCluster`` for a deregistered cluster)."""
        await self._registry.get(cluster)
        resource = await self._current(cluster, id_)
        await self._set_state(resource, State.FINISHED if ok else State.FAILED,
                              message=message, bouncedPods=pods or [],
                              **({"failures": 0} if ok else {}),
                              restartNeeded=restart_needed)

