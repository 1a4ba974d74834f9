"""Every certificate of the fleet, as the management store sees it, with what needs doing.

An operator wants one answer to "what expires, what is due for renewal, what
is broken" without visiting each cluster. The management store already holds
it: the relay secrets, each cluster's ``KubernetesCluster`` status (the client
certificate the server issued and the certificates its agent reported), each
cluster's ``IssuedCertificate`` (its Istio intermediate) and each trust
policy's root. ``collect`` reads them, never writes, and turns each into one
``Item``.

Nothing here raises for a missing or broken certificate: the item says
``missing`` or ``unreadable`` with a message. Only the store's own errors
(it cannot be reached) propagate.

Renewal times follow ``pki.rotation``: an Istio intermediate's is the one the
server recorded with its policy's grace ratio; a relay certificate's is
``notAfter − ratio × lifetime`` with the agent rotator's default ratio; a
relay client certificate's is the one its agent reported, when it did.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
from collections.abc import Callable, Mapping
from typing import Any, Required, TypedDict

from cryptography import x509

from meshtrust import clock as clock_module
from meshtrust import errors, settings
from meshtrust.authority import istio, registry, trust_policy
from meshtrust.pki import bundle, rotation
from meshtrust.store import base, manifest

MGMT = "mgmt"  # the cluster of everything kept on the management side

RELAY_ROOT = "relay-root"
RELAY_SIGNING = "relay-signing"
RELAY_SERVER = "relay-server"
RELAY_CLIENT = "relay-client"
ISTIO_ROOT = "istio-root"
ISTIO_INTERMEDIATE = "istio-intermediate"

MANAGED = "meshtrust"
BRING_YOUR_OWN = "bring-your-own"
EXTERNAL_CA = "external-ca"


class State(enum.Enum):
    """How a certificate stands; the Istio lifecycle states appear for intermediates."""

    OK = "ok"
    RENEWAL_DUE = "renewal-due"
    EXPIRED = "expired"
    MISSING = "missing"
    UNREADABLE = "unreadable"
    PENDING = "pending"      # an Istio intermediate waiting for its agent
    REQUESTED = "requested"  # its agent is making a key and a CSR
    ISSUED = "issued"        # signed; its agent is writing cacerts and restarting pods
    FAILED = "failed"        # the last attempt failed; the server retries with backoff
    EXTERNAL = "external"    # kept at an external CA: the store does not say when it expires


ATTENTION = frozenset({State.EXPIRED, State.RENEWAL_DUE, State.MISSING, State.UNREADABLE,
                       State.FAILED})


@dataclasses.dataclass(frozen=True, kw_only=True)
class Item:
    """One certificate: where it is kept, what it is, when it expires and is renewed.

    ``subject``, ``issuer`` and ``serial`` are empty, and the times None, when
    the store does not record them; ``secret`` is empty for a certificate kept
    at an external CA.
    """

    kind: str
    cluster: str
    namespace: str
    secret: str
    state: State
    subject: str = ""
    issuer: str = ""
    serial: str = ""
    not_after: dt.datetime | None = None
    days_left: int | None = None
    renew_at: dt.datetime | None = None
    managed_by: str = ""
    policy: str = ""
    message: str = ""

    def __post_init__(self) -> None:
        for name in ("kind", "cluster", "namespace"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"Item.{name} must be a non-empty string")
        if not isinstance(self.secret, str):  # empty for a CA kept outside the store
            raise ValueError("Item.secret must be a string")
        if not isinstance(self.state, State):
            raise ValueError(f"Item.state must be a State, got {self.state!r}")
        for name in ("not_after", "renew_at"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, clock_module.require_utc(value, f"Item.{name}"))

    @property
    def needs_attention(self) -> bool:
        """Expired, past its renewal time, missing, unreadable or failed."""
        return self.state in ATTENTION

    def document(self) -> dict[str, Any]:
        """The item as plain values, for JSON and YAML."""
        return {"kind": self.kind, "cluster": self.cluster, "namespace": self.namespace,
                "secret": self.secret or None, "policy": self.policy or None,
                "subject": self.subject, "issuer": self.issuer, "serial": self.serial,
                "notAfter": _iso(self.not_after), "daysLeft": self.days_left,
                "renewAt": _iso(self.renew_at), "managedBy": self.managed_by or None,
                "state": self.state.value, "needsAttention": self.needs_attention,
                "message": self.message}


Ownership = Callable[[base.Secret], str]


class _Where(TypedDict, total=False):
    """Where a certificate is kept: the fields every item of one secret shares."""

    kind: Required[str]
    cluster: Required[str]
    namespace: Required[str]
    secret: Required[str]
    policy: str


# An intermediate in time takes its lifecycle state; FINISHED is simply ok.
_LIFECYCLE = {istio.State.PENDING.value: State.PENDING,
              istio.State.REQUESTED.value: State.REQUESTED,
              istio.State.ISSUED.value: State.ISSUED,
              istio.State.FINISHED.value: State.OK,
              istio.State.FAILED.value: State.FAILED}


def owner_of(secret: base.Secret) -> str:
    """Who manages a secret: meshtrust if it carries meshtrust's label, else its user.

    ``collect`` takes this as its ``ownership`` argument, so another answer
    (an external CA, told by an annotation) can be given without changing it.
    """
    ours = all(secret.labels.get(k) == v for k, v in settings.MANAGED_BY.items())
    return MANAGED if ours else BRING_YOUR_OWN


async def collect(store: base.Store, clock: clock_module.Clock, *,
                  names: settings.SecretNames | None = None,
                  ownership: Ownership = owner_of,
                  grace_ratio: float = settings.DEFAULT_GRACE_RATIO) -> list[Item]:
    """One item per certificate of the fleet, management side first, then by cluster.

    ``grace_ratio`` sets the renewal time of relay certificates and policy
    roots, whose ratio the store does not record.
    """
    if not 0 < grace_ratio < 1:
        raise ValueError(f"grace_ratio must be between 0 and 1, got {grace_ratio}")
    names = names or settings.SecretNames()
    reader = _Reader(store, clock.now(), ownership, grace_ratio)
    ns = names.relay_namespace
    items = [
        await reader.secret_item(_Where(kind=RELAY_ROOT, cluster=MGMT, namespace=ns,
                                        secret=names.relay_root), ("tls.crt", "ca.crt")),
        await reader.secret_item(_Where(kind=RELAY_SIGNING, cluster=MGMT, namespace=ns,
                                        secret=names.relay_signing), ("tls.crt",)),
        await reader.secret_item(_Where(kind=RELAY_SERVER, cluster=MGMT, namespace=ns,
                                        secret=names.relay_server), ("tls.crt",)),
    ]
    for resource in await store.list_resources(trust_policy.POLICY_KIND):
        items += await reader.policy_roots(resource)
    by_cluster: dict[str, list[Item]] = {}
    for resource in await store.list_resources(registry.CLUSTER_KIND, namespace=ns):
        by_cluster.setdefault(resource.name, []).append(reader.client_item(resource, names))
    for resource in await store.list_resources(istio.ISSUED_KIND):
        item = reader.intermediate_item(resource, names)
        by_cluster.setdefault(item.cluster, []).append(item)
    for resource in await store.list_resources(registry.CLUSTER_KIND, namespace=ns):
        if not any(i.kind == ISTIO_INTERMEDIATE for i in by_cluster.get(resource.name, [])):
            by_cluster[resource.name] += reader.reported_intermediates(resource)
    for cluster in sorted(by_cluster):
        items += sorted(by_cluster[cluster], key=lambda i: (i.kind != RELAY_CLIENT, i.policy))
    return items


class _Reader:
    """Turns stored secrets and resources into items, at one moment ``now``."""

    def __init__(self, store: base.Store, now: dt.datetime, ownership: Ownership,
                 grace_ratio: float) -> None:
        self._store = store
        self._now = now
        self._ownership = ownership
        self._ratio = grace_ratio

    # -- management-side secrets ------------------------------------------------------------

    async def secret_item(self, where: _Where, cert_keys: tuple[str, ...]) -> Item:
        """The first certificate under the first of ``cert_keys`` the secret holds."""
        loaded = await self._load(where, cert_keys)
        if isinstance(loaded, Item):
            return loaded
        secret, certificate = loaded
        return self._certificate_item(certificate, where, self._ownership(secret))

    async def _load(self, where: _Where, cert_keys: tuple[str, ...]
                    ) -> tuple[base.Secret, x509.Certificate] | Item:
        """The secret and its certificate, or a missing or unreadable item saying why."""
        namespace, name = where["namespace"], where["secret"]
        try:
            secret = await self._store.get_secret(namespace, name)
        except errors.NotFound:
            return Item(**where, state=State.MISSING,
                        message=f"secret {namespace}/{name} does not exist")
        key = next((k for k in cert_keys if secret.data.get(k)), None)
        if key is None:
            return Item(**where, state=State.UNREADABLE, managed_by=self._ownership(secret),
                        message=f"secret {namespace}/{name} has no {' or '.join(cert_keys)}")
        try:
            certificate = bundle.load_certificate(secret.data[key], f"{namespace}/{name}/{key}")
        except errors.MeshTrustError as exc:
            return Item(**where, state=State.UNREADABLE, managed_by=self._ownership(secret),
                        message=str(exc))
        return secret, certificate

    def _certificate_item(self, certificate: x509.Certificate, where: _Where,
                          managed_by: str, message: str = "") -> Item:
        not_after = certificate.not_valid_after_utc
        try:
            renew_at: dt.datetime | None = rotation.renew_at(certificate, self._ratio)
        except ValueError:  # notAfter before notBefore: no renewal time to speak of
            renew_at = None
        return Item(**where, state=self._timing(not_after, renew_at),
                    subject=certificate.subject.rfc4514_string(),
                    issuer=certificate.issuer.rfc4514_string(),
                    serial=f"{certificate.serial_number:x}", not_after=not_after,
                    days_left=self._days_left(not_after), renew_at=renew_at,
                    managed_by=managed_by, message=message)

    async def policy_roots(self, resource: base.Resource) -> list[Item]:
        """The signing root of a trust policy and, during a rotation, the other one trusted."""
        try:
            policy = trust_policy.parse({
                "apiVersion": resource.api_version, "kind": resource.kind,
                "metadata": {"name": resource.name, "namespace": resource.namespace},
                "spec": resource.spec})
        except errors.ConfigError as exc:
            return [Item(kind=ISTIO_ROOT, cluster=MGMT, namespace=resource.namespace,
                         secret=settings.SecretNames.root_trust(resource.name),
                         policy=resource.name, state=State.UNREADABLE,
                         message=f"policy {resource.name} is invalid: {exc}")]
        if isinstance(policy.root, trust_policy.SecretRoot):
            namespace, name = policy.root.namespace, policy.root.name
        elif isinstance(policy.root, trust_policy.GeneratedRoot):
            namespace, name = policy.namespace, settings.SecretNames.root_trust(policy.name)
        else:  # an external CA signs: nothing of it is in the store
            return [Item(kind=ISTIO_ROOT, cluster=MGMT, namespace=policy.namespace, secret="",
                         policy=policy.name, state=State.EXTERNAL, managed_by=EXTERNAL_CA,
                         message=f"signed at an external CA; its certificate is not kept in "
                                 f"the store ({policy.root.arn})")]
        where = _Where(kind=ISTIO_ROOT, cluster=MGMT, namespace=namespace, secret=name,
                       policy=policy.name)
        loaded = await self._load(where, ("root-cert.pem",))
        if isinstance(loaded, Item):
            return [loaded]
        secret, root = loaded
        managed_by = self._ownership(secret)
        found = [self._certificate_item(root, where, managed_by)]
        try:
            trusted = bundle.load_certificates(secret.data.get(istio.TRUST_BUNDLE_KEY, b""))
        except errors.MeshTrustError:
            trusted = []  # no rotation under way: root-cert.pem is the one root
        for certificate in trusted:
            if bundle.fingerprint(certificate) != bundle.fingerprint(root):
                found.append(self._certificate_item(
                    certificate, where, managed_by,
                    message="also trusted by the clusters during a root rotation"))
        return found

    # -- per-cluster records ----------------------------------------------------------------

    def client_item(self, resource: base.Resource, names: settings.SecretNames) -> Item:
        """A cluster's relay client certificate, from what the server issued and the agent said.

        The server records the serial and notAfter of each certificate it
        issues; the agent reports the one it holds, with subject, issuer and its
        renewal time. When the two differ the later-expiring one is shown: a
        renewal the agent has not reported yet (with no subject, issuer or
        renewal time), or a certificate brought from elsewhere after bootstrap.
        """
        status = resource.status
        issued = _mapping(status.get("clientCertificate"))
        reported = next((_mapping(c) for c in _list(status.get("certificates"))
                         if _mapping(c).get("kind") == RELAY_CLIENT), {})
        where = _Where(kind=RELAY_CLIENT, cluster=resource.name,
                       namespace=str(reported.get("namespace") or names.relay_namespace),
                       secret=str(reported.get("secret") or names.relay_client))
        if not issued and not reported:
            return Item(**where, state=State.MISSING,
                        message="no client certificate issued or reported; "
                                "the cluster's agent has not bootstrapped")
        record, message = reported, ""
        if issued and (not reported or _later(issued, reported)):
            record, message = issued, "not yet reported by the cluster's agent"
        serial = str(record.get("serial") or "")
        ours = bool(issued) and issued.get("serial") == record.get("serial")
        managed_by = MANAGED if ours else BRING_YOUR_OWN
        not_after = manifest.read_time(record.get("notAfter"))
        renew_at = manifest.read_time(record.get("renewAt"))
        if not_after is None:
            return Item(**where, state=State.UNREADABLE, serial=serial, managed_by=managed_by,
                        message="the cluster's status records no readable notAfter")
        return Item(**where, state=self._timing(not_after, renew_at),
                    subject=str(record.get("subject") or ""),
                    issuer=str(record.get("issuer") or ""), serial=serial,
                    not_after=not_after, days_left=self._days_left(not_after),
                    renew_at=renew_at, managed_by=managed_by, message=message)

    def reported_intermediates(self, resource: base.Resource) -> list[Item]:
        """The Istio CA an agent reported when no policy of meshtrust's made it: brought."""
        found = []
        for record in map(_mapping, _list(resource.status.get("certificates"))):
            if record.get("kind") != ISTIO_INTERMEDIATE:
                continue
            not_after = manifest.read_time(record.get("notAfter"))
            renew_at = manifest.read_time(record.get("renewAt"))
            where = _Where(kind=ISTIO_INTERMEDIATE, cluster=resource.name,
                           namespace=str(record.get("namespace") or ""),
                           secret=str(record.get("secret") or ""))
            if not_after is None:
                continue
            found.append(Item(**where, state=self._timing(not_after, renew_at),
                              subject=str(record.get("subject") or ""),
                              issuer=str(record.get("issuer") or ""),
                              serial=str(record.get("serial") or ""), not_after=not_after,
                              days_left=self._days_left(not_after), renew_at=renew_at,
                              managed_by=MANAGED if record.get("managed") else BRING_YOUR_OWN,
                              message="reported by the cluster's agent"))
        return found

    def intermediate_item(self, resource: base.Resource, names: settings.SecretNames) -> Item:
        """A cluster's Istio intermediate, from its ``IssuedCertificate`` resource."""
        spec, status = resource.spec, resource.status
        cluster = str(spec.get("cluster") or resource.labels.get("cluster") or resource.name)
        where = _Where(kind=ISTIO_INTERMEDIATE, cluster=cluster,
                       namespace=names.istio_namespace, secret=names.istio_ca,
                       policy=str(spec.get("policy") or resource.labels.get("policy") or ""))
        not_after = manifest.read_time(status.get("notAfter"))
        renew_at = manifest.read_time(status.get("renewAt"))
        if renew_at is None and not_after is not None:
            renew_at = _renewal_from_spec(spec, not_after)
        lifecycle = status.get("state") or istio.State.PENDING.value
        message = str(status.get("message") or "")
        timing = State.OK if not_after is None else self._timing(not_after, renew_at)
        if not isinstance(lifecycle, str) or lifecycle not in _LIFECYCLE:
            state, message = State.UNREADABLE, f"unknown state {lifecycle!r}"
        elif timing is not State.OK:
            state = timing  # the intermediate the cluster runs expired or is due, whatever round
        else:
            state = _LIFECYCLE[lifecycle]
        return Item(**where, state=state, serial=str(status.get("serial") or ""),
                    not_after=not_after,
                    days_left=None if not_after is None else self._days_left(not_after),
                    renew_at=renew_at, managed_by=MANAGED, message=message)

    # -- time -------------------------------------------------------------------------------

    def _timing(self, not_after: dt.datetime, renew_at: dt.datetime | None) -> State:
        if self._now >= not_after:
            return State.EXPIRED
        if renew_at is not None and self._now >= renew_at:
            return State.RENEWAL_DUE
        return State.OK

    def _days_left(self, not_after: dt.datetime) -> int:
        return int((not_after - self._now).total_seconds() // 86400)


def _renewal_from_spec(spec: Mapping[str, Any], not_after: dt.datetime) -> dt.datetime | None:
    """An intermediate's renewal time from its policy's lifetime and grace ratio."""
    try:
        lifetime = dt.timedelta(seconds=int(spec["lifetimeSeconds"]))
        return rotation.renewal_time(not_after - lifetime, not_after,
                                     float(spec["gracePeriodRatio"]))
    except (KeyError, TypeError, ValueError, OverflowError):
        return None


def _later(issued: Mapping[str, Any], reported: Mapping[str, Any]) -> bool:
    """Whether the server issued a certificate after the one the agent reported."""
    if issued.get("serial") == reported.get("serial"):
        return False
    issued_end = manifest.read_time(issued.get("notAfter"))
    reported_end = manifest.read_time(reported.get("notAfter"))
    return issued_end is not None and (reported_end is None or issued_end > reported_end)


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


def _iso(value: dt.datetime | None) -> str | None:
    return manifest.dump_time(value) if value is not None else None
