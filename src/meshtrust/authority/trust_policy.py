"""Trust policies: the RootTrustPolicy and VirtualMesh documents, read and checked.

Two shapes say the same thing and both are accepted:

* ``admin.gloo.solo.io/v2`` ``RootTrustPolicy``: ``spec.applyToMeshes``
  (selectors by cluster), ``spec.config.mgmtServerCa.generated``,
  ``.secretRef`` or ``.awsPca`` (an AWS Private CA signs the intermediates),
  ``spec.config.intermediateCertOptions`` and
  ``spec.config.autoRestartPods``;
* the older ``networking.mesh.gloo.solo.io/v1`` ``VirtualMesh``:
  ``spec.mtlsConfig.shared.rootCertificateAuthority`` (``generated`` or
  ``secret``), ``spec.mtlsConfig.autoRestartPods`` and ``spec.meshes``
  (names such as ``istiod-istio-system-cluster-1``).

``parse`` turns either into one ``TrustPolicy`` value. A wrong field raises
``ConfigError`` naming the field's path and what is allowed.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from collections.abc import Callable, Mapping
from typing import Any

from meshtrust import errors, settings
from meshtrust.pki import identity, keys
from meshtrust.store import base

POLICY_API = "admin.gloo.solo.io/v2"
POLICY_KIND = "RootTrustPolicy"
VIRTUAL_MESH_API = "networking.mesh.gloo.solo.io/v1"
VIRTUAL_MESH_KIND = "VirtualMesh"
ISTIOD_MESH_PREFIX = "istiod-istio-system-"
FORMS = ("cacerts", "tls")
MAX_NAME = 63
MAX_DAYS = 1000 * 365


@dataclasses.dataclass(frozen=True, kw_only=True)
class GeneratedRoot:
    """A root meshtrust makes once and keeps in ``root-trust.<policy>``."""

    lifetime: dt.timedelta = dt.timedelta(days=3650)
    key_type: keys.KeyType = keys.KeyType.RSA_4096
    organization: str = "Istio"


@dataclasses.dataclass(frozen=True, kw_only=True)
class SecretRoot:
    """A root the user brings: a secret with ``root-cert.pem`` and ``key.pem``."""

    name: str
    namespace: str = settings.RELAY_NAMESPACE


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExternalRoot:
    """An external CA that signs the intermediates itself: its key never leaves it."""

    provider: str
    arn: str

    @property
    def region(self) -> str:
        return self.arn.split(":")[3]


@dataclasses.dataclass(frozen=True, kw_only=True)
class IntermediateOptions:
    lifetime: dt.timedelta = dt.timedelta(days=365)
    key_type: keys.KeyType = keys.KeyType.RSA_4096
    grace_ratio: float = settings.DEFAULT_GRACE_RATIO
    organization: str = "Istio"


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrustPolicy:
    name: str
    namespace: str
    clusters: tuple[str, ...] | None  # None: every registered cluster
    root: GeneratedRoot | SecretRoot | ExternalRoot
    intermediate: IntermediateOptions
    auto_restart_pods: bool = False
    trust_domain: str = settings.DEFAULT_TRUST_DOMAIN
    form: str = "cacerts"

    def selects(self, cluster: str) -> bool:
        return self.clusters is None or cluster in self.clusters


def _fail(path: str, message: str) -> errors.ConfigError:
    return errors.ConfigError(f"{path}: {message}")


def _mapping(value: Any, path: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _fail(path, f"must be a mapping, got {type(value).__name__}")
    return value


def _only(value: Mapping[str, Any], path: str, allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(value) - set(allowed), key=str)  # YAML keys need not be strings
    if unknown:
        raise _fail(f"{path}.{unknown[0]}",
                    f"unknown field; allowed here: {', '.join(allowed)}")


def _positive_int(value: Any, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise _fail(path, f"must be a positive whole number, got {value!r}")
    return value


def _key_type(spec: Mapping[str, Any], path: str) -> keys.KeyType | None:
    if "keyType" in spec and "rsaKeySizeBytes" in spec:
        raise _fail(path, "give keyType or rsaKeySizeBytes, not both")
    if "keyType" in spec:
        try:
            return keys.KeyType.parse(str(spec["keyType"]))
        except errors.ConfigError as exc:
            raise _fail(f"{path}.keyType", str(exc)) from None
    if "rsaKeySizeBytes" in spec:
        bits = _positive_int(spec["rsaKeySizeBytes"], f"{path}.rsaKeySizeBytes")
        if bits not in keys.RSA_SIZES:
            raise _fail(f"{path}.rsaKeySizeBytes", "must be 2048, 3072 or 4096 (bits, as in "
                                                   "the reference)")
        return keys.KeyType.parse(f"rsa-{bits}")
    return None


def _org(spec: Mapping[str, Any], path: str, default: str) -> str:
    value = spec.get("orgName", default)
    if not isinstance(value, str) or not value.strip():
        raise _fail(f"{path}.orgName", "must be a non-empty string")
    return value


def _lifetime(spec: Mapping[str, Any], path: str, default: dt.timedelta) -> dt.timedelta:
    """``ttlDays`` (the reference's field) or ``ttl`` (a duration such as 90s or 12h)."""
    if "ttlDays" in spec and "ttl" in spec:
        raise _fail(path, "give ttlDays or ttl, not both")
    if "ttlDays" in spec:
        days = _positive_int(spec["ttlDays"], f"{path}.ttlDays")
        if days > MAX_DAYS:
            raise _fail(f"{path}.ttlDays", f"must be at most {MAX_DAYS} (1000 years)")
        return dt.timedelta(days=days)
    if "ttl" in spec:
        return settings.parse_duration(spec["ttl"], f"{path}.ttl")
    return default


def _generated(spec: Mapping[str, Any], path: str) -> GeneratedRoot:
    _only(spec, path, ("ttlDays", "ttl", "keyType", "rsaKeySizeBytes", "orgName"))
    root = GeneratedRoot()
    return GeneratedRoot(
        lifetime=_lifetime(spec, path, root.lifetime),
        key_type=_key_type(spec, path) or root.key_type,
        organization=_org(spec, path, root.organization))


def _secret_ref(spec: Mapping[str, Any], path: str) -> SecretRoot:
    _only(spec, path, ("name", "namespace"))
    name = spec.get("name")
    namespace = spec.get("namespace", settings.RELAY_NAMESPACE)
    if not isinstance(name, str) or not name:
        raise _fail(f"{path}.name", "give the name of a secret holding root-cert.pem and key.pem")
    if name == settings.ISTIO_CA_SECRET:
        raise _fail(f"{path}.name", "cannot be 'cacerts': that secret is the output Istio "
                                    "reads; keep the root in a secret of its own")
    _store_name(base.check_name, name, f"{path}.name")
    if not isinstance(namespace, str) or not namespace:
        raise _fail(f"{path}.namespace", "must be a namespace name")
    _store_name(base.check_namespace, namespace, f"{path}.namespace")
    return SecretRoot(name=name, namespace=namespace)


def _store_name(check: Callable[[object], str], value: str, path: str) -> None:
    """Refuse a name the store would refuse (``check`` is one of ``base.check_*``)."""
    try:
        check(value)
    except base.InvalidField as exc:
        raise _fail(path, exc.reason) from None


AWS_PCA_ARN = re.compile(
    r"arn:aws[a-z-]*:acm-pca:[a-z0-9-]+:[0-9]{12}:certificate-authority/[A-Za-z0-9_-]+")


def _aws_pca(spec: Mapping[str, Any], path: str) -> ExternalRoot:
    _only(spec, path, ("certificateAuthorityArn",))
    arn = spec.get("certificateAuthorityArn")
    if not isinstance(arn, str) or not AWS_PCA_ARN.fullmatch(arn):
        raise _fail(f"{path}.certificateAuthorityArn",
                    f"{arn!r} is not an AWS Private CA ARN such as arn:aws:acm-pca:us-east-1:"
                    "123456789012:certificate-authority/11111111-2222-3333-4444-555555555555")
    return ExternalRoot(provider="aws-pca", arn=arn)


def _root(spec: Mapping[str, Any], path: str,
          secret_key: str, *external: str) -> GeneratedRoot | SecretRoot | ExternalRoot:
    kinds = ("generated", secret_key, *external)
    _only(spec, path, kinds)
    if sum(kind in spec for kind in kinds) != 1:
        raise _fail(path, f"give exactly one of {', '.join(kinds)}")
    if "awsPca" in spec:
        return _aws_pca(_mapping(spec["awsPca"], f"{path}.awsPca"), f"{path}.awsPca")
    if "generated" in spec:
        return _generated(_mapping(spec["generated"], f"{path}.generated"), f"{path}.generated")
    return _secret_ref(_mapping(spec[secret_key], f"{path}.{secret_key}"), f"{path}.{secret_key}")


def _intermediate(spec: Mapping[str, Any], path: str) -> IntermediateOptions:
    _only(spec, path, ("ttlDays", "ttl", "keyType", "rsaKeySizeBytes", "orgName",
                       "secretRotationGracePeriodRatio"))
    default = IntermediateOptions()
    ratio = spec.get("secretRotationGracePeriodRatio", default.grace_ratio)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
        raise _fail(f"{path}.secretRotationGracePeriodRatio",
                    f"must be a number between 0 and 1, such as 0.1; got {ratio!r}")
    return IntermediateOptions(
        lifetime=_lifetime(spec, path, default.lifetime),
        key_type=_key_type(spec, path) or default.key_type,
        grace_ratio=float(ratio),
        organization=_org(spec, path, default.organization))


def _cluster_name(value: Any, path: str) -> str:
    if not isinstance(value, str) or not identity.is_dns_name(value) or "." in value:
        raise _fail(path, f"{value!r} is not a cluster name such as cluster-1")
    return value


def _selected_clusters(entries: Any, path: str) -> tuple[str, ...] | None:
    if entries is None:
        return None
    if not isinstance(entries, list):
        raise _fail(path, "must be a list of {selector: {cluster: NAME}} entries")
    found: list[str] = []
    for index, entry in enumerate(entries):
        where = f"{path}[{index}]"
        selector = _mapping(_mapping(entry, where).get("selector"), f"{where}.selector")
        _only(_mapping(entry, where), where, ("selector",))
        _only(selector, f"{where}.selector", ("cluster", "clusters"))
        if not selector:
            return None  # an empty selector selects every cluster
        if "cluster" in selector:
            found.append(_cluster_name(selector["cluster"], f"{where}.selector.cluster"))
        names = selector.get("clusters") or []
        if not isinstance(names, list):
            raise _fail(f"{where}.selector.clusters", "must be a list of cluster names")
        for n, name in enumerate(names):
            found.append(_cluster_name(name, f"{where}.selector.clusters[{n}]"))
    return tuple(dict.fromkeys(found)) or None


def _flag(spec: Mapping[str, Any], key: str, path: str) -> bool:
    value = spec.get(key, False)
    if not isinstance(value, bool):
        raise _fail(f"{path}.{key}", "must be true or false")
    return value


def _metadata(document: Mapping[str, Any]) -> tuple[str, str]:
    meta = _mapping(document.get("metadata"), "metadata")
    name = meta.get("name")
    # The name also labels each cluster's IssuedCertificate, and a label has 63 characters.
    if (not isinstance(name, str) or not identity.is_dns_name(name) or "*" in name
            or len(name) > MAX_NAME):
        raise _fail("metadata.name", f"{name!r} is not a valid name (a DNS name of at most "
                                     f"{MAX_NAME} characters, such as mesh)")
    _store_name(base.check_name, name, "metadata.name")
    namespace = meta.get("namespace", settings.RELAY_NAMESPACE)
    if not isinstance(namespace, str) or not namespace:
        raise _fail("metadata.namespace", "must be a namespace name")
    _store_name(base.check_namespace, namespace, "metadata.namespace")
    return name, namespace


def parse(document: Mapping[str, Any]) -> TrustPolicy:
    """A TrustPolicy from a RootTrustPolicy or VirtualMesh document; ConfigError if invalid."""
    kind = document.get("kind")
    api = document.get("apiVersion")
    if (api, kind) == (POLICY_API, POLICY_KIND):
        return _parse_root_trust_policy(document)
    if (api, kind) == (VIRTUAL_MESH_API, VIRTUAL_MESH_KIND):
        return _parse_virtual_mesh(document)
    raise _fail("kind", f"{api}/{kind} is not a trust policy; use {POLICY_API} {POLICY_KIND} "
                        f"or {VIRTUAL_MESH_API} {VIRTUAL_MESH_KIND}")


def _parse_root_trust_policy(document: Mapping[str, Any]) -> TrustPolicy:
    name, namespace = _metadata(document)
    spec = _mapping(document.get("spec"), "spec")
    _only(spec, "spec", ("applyToMeshes", "config"))
    cfg = _mapping(spec.get("config"), "spec.config")
    _only(cfg, "spec.config", ("mgmtServerCa", "intermediateCertOptions", "autoRestartPods",
                               "trustDomain", "secretForm"))
    ca = _mapping(cfg.get("mgmtServerCa"), "spec.config.mgmtServerCa")
    root = (_root(ca, "spec.config.mgmtServerCa", "secretRef", "awsPca") if ca
            else GeneratedRoot())
    return TrustPolicy(
        name=name, namespace=namespace,
        clusters=_selected_clusters(spec.get("applyToMeshes"), "spec.applyToMeshes"),
        root=root,
        intermediate=_intermediate(_mapping(cfg.get("intermediateCertOptions"),
                                            "spec.config.intermediateCertOptions"),
                                   "spec.config.intermediateCertOptions"),
        auto_restart_pods=_flag(cfg, "autoRestartPods", "spec.config"),
        trust_domain=_trust_domain(cfg, "spec.config"),
        form=_form(cfg, "spec.config"))


def _parse_virtual_mesh(document: Mapping[str, Any]) -> TrustPolicy:
    name, namespace = _metadata(document)
    spec = _mapping(document.get("spec"), "spec")
    _only(spec, "spec", ("mtlsConfig", "meshes", "federation"))
    mtls = _mapping(spec.get("mtlsConfig"), "spec.mtlsConfig")
    _only(mtls, "spec.mtlsConfig", ("autoRestartPods", "shared"))
    shared = _mapping(mtls.get("shared"), "spec.mtlsConfig.shared")
    _only(shared, "spec.mtlsConfig.shared", ("rootCertificateAuthority",))
    ca = _mapping(shared.get("rootCertificateAuthority"),
                  "spec.mtlsConfig.shared.rootCertificateAuthority")
    root = (_root(ca, "spec.mtlsConfig.shared.rootCertificateAuthority", "secret")
            if ca else GeneratedRoot())
    clusters: list[str] = []
    meshes = spec.get("meshes")
    if meshes is not None and not isinstance(meshes, list):
        raise _fail("spec.meshes", "must be a list of {name, namespace} mesh references")
    for index, mesh in enumerate(meshes or []):
        where = f"spec.meshes[{index}]"
        mesh_name = _mapping(mesh, where).get("name")
        if not isinstance(mesh_name, str) or not mesh_name.startswith(ISTIOD_MESH_PREFIX):
            raise _fail(f"{where}.name", f"{mesh_name!r} is not a mesh name such as "
                                         f"{ISTIOD_MESH_PREFIX}cluster-1")
        clusters.append(_cluster_name(mesh_name[len(ISTIOD_MESH_PREFIX):], f"{where}.name"))
    return TrustPolicy(name=name, namespace=namespace, clusters=tuple(clusters) or None,
                       root=root, intermediate=IntermediateOptions(),
                       auto_restart_pods=_flag(mtls, "autoRestartPods", "spec.mtlsConfig"))


def _trust_domain(cfg: Mapping[str, Any], path: str) -> str:
    value = cfg.get("trustDomain", settings.DEFAULT_TRUST_DOMAIN)
    try:
        identity.spiffe_id(str(value), "istio-system", "istiod")
    except errors.ConfigError as exc:
        raise _fail(f"{path}.trustDomain", str(exc)) from None
    return str(value)


def _form(cfg: Mapping[str, Any], path: str) -> str:
    value = cfg.get("secretForm", "cacerts")
    if value not in FORMS:
        raise _fail(f"{path}.secretForm", f"must be one of {', '.join(FORMS)}")
    return str(value)


def _duration(value: dt.timedelta) -> str:
    """A lifetime as ``settings.parse_duration`` reads it back: in seconds, with a fraction
    when it has one (a policy of ``ttl: 0.5s`` must not be stored as ``0s``)."""
    seconds = value.total_seconds()
    return f"{int(seconds)}s" if seconds == int(seconds) else f"{seconds!r}s"


def to_document(policy: TrustPolicy) -> dict[str, Any]:
    """The RootTrustPolicy document of ``policy`` (how a VirtualMesh is stored)."""
    root: dict[str, Any]
    if isinstance(policy.root, SecretRoot):
        root = {"secretRef": {"name": policy.root.name, "namespace": policy.root.namespace}}
    elif isinstance(policy.root, ExternalRoot):
        root = {"awsPca": {"certificateAuthorityArn": policy.root.arn}}
    else:
        root = {"generated": {"ttl": _duration(policy.root.lifetime),
                              "keyType": policy.root.key_type.value,
                              "orgName": policy.root.organization}}
    spec: dict[str, Any] = {"config": {
        "mgmtServerCa": root,
        "intermediateCertOptions": {
            "ttl": _duration(policy.intermediate.lifetime),
            "keyType": policy.intermediate.key_type.value,
            "secretRotationGracePeriodRatio": policy.intermediate.grace_ratio,
            "orgName": policy.intermediate.organization},
        "autoRestartPods": policy.auto_restart_pods,
        "trustDomain": policy.trust_domain,
        "secretForm": policy.form}}
    if policy.clusters is not None:
        spec["applyToMeshes"] = [{"selector": {"clusters": list(policy.clusters)}}]
    return {"apiVersion": POLICY_API, "kind": POLICY_KIND,
            "metadata": {"name": policy.name, "namespace": policy.namespace}, "spec": spec}
