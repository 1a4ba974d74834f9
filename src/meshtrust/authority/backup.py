"""Backup and restore of the management store: every CA key and what refers to it.

The reference tells operators to download the relay and Istio root secrets by
hand, because losing them means re-issuing every agent's certificate and
every mesh's CA. ``collect`` gathers that set from the management store, and
what makes it usable again: the relay secrets (root, signing CA, server
certificate, shared identity token), every ``root-trust.<policy>`` secret and
every secret a policy's ``secretRef`` names, the ``RootTrustPolicy``,
``RootRotation``, ``KubernetesCluster`` and ``IssuedCertificate`` resources
with their status. Restored with the same roots and the same issued
intermediates on record, the server asks no cluster to re-bootstrap and no
mesh to re-issue its CA. Bootstrap tokens are left out: they are single-use
secrets, and a restored store must not accept one twice.

``dump_contents`` / ``load_contents`` turn the set into canonical JSON and back
(sealing it is ``pki.envelope``'s job). ``check_contents`` validates all of it
— certificates parse, keys match them, the relay chain holds — so that
``restore`` writes nothing from a backup it cannot restore completely.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Iterable, Mapping
from typing import Any

from meshtrust import clock as clock_module
from meshtrust import errors, settings
from meshtrust.authority import ca_config, istio, registry, root_rotation, trust_policy
from meshtrust.pki import bundle, keys
from meshtrust.store import base, manifest

API_VERSION = "meshtrust.io/v1"
KIND = "Backup"
# Restore order: what a later kind refers to comes first.
RESOURCE_KINDS = (trust_policy.POLICY_KIND, root_rotation.ROTATION_KIND,
                  registry.CLUSTER_KIND, istio.ISSUED_KIND, ca_config.CONFIG_KIND)
# Each private key file and the certificate files (first found) it must match.
_KEY_PAIRS = {"tls.key": ("tls.crt",), "key.pem": ("cert-chain.pem", "root-cert.pem"),
              "ca-key.pem": ("ca-cert.pem",), "old-key.pem": ("old-root-cert.pem",),
              "new-key.pem": ("new-root-cert.pem",)}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Contents:
    """What a backup holds; ``notes`` are what ``collect`` could not take, in words."""

    created: dt.datetime
    secrets: tuple[base.Secret, ...]
    resources: tuple[base.Resource, ...]
    notes: tuple[str, ...] = ()

    @property
    def objects(self) -> tuple[base.Object, ...]:
        return (*self.secrets, *self.resources)


def describe(obj: base.Object) -> str:
    """``secret gloo-mesh/relay-root-tls-secret``, ``KubernetesCluster gloo-mesh/cluster-1``."""
    kind = "secret" if isinstance(obj, base.Secret) else obj.kind
    return f"{kind} {obj.namespace}/{obj.name}"


def _bare(obj: base.ObjectT) -> base.ObjectT:
    """``obj`` without what a store assigns: it is written anew elsewhere."""
    return dataclasses.replace(obj, resource_version=0, created=None, updated=None)


async def _get(store: base.Store, namespace: str, name: str) -> base.Secret | None:
    try:
        return await store.get_secret(namespace, name)
    except errors.NotFound:
        return None


# -- collect ------------------------------------------------------------------------------------


async def collect(store: base.Store, clock: clock_module.Clock,
                  names: settings.SecretNames | None = None) -> Contents:
    """Everything a backup of the management ``store`` holds; ConfigError if it has no relay PKI."""
    names = names or settings.SecretNames()
    ns = names.relay_namespace
    notes: list[str] = []
    found: dict[tuple[str, str], base.Secret] = {}
    for name in (names.relay_root, names.relay_signing, names.relay_server, names.relay_token):
        secret = await _get(store, ns, name)
        if secret is not None:
            found[(ns, name)] = secret
        elif name == names.relay_token:
            notes.append(f"secret {ns}/{name} does not exist: the server makes a new shared "
                         "token when it starts")
        else:
            raise errors.ConfigError(
                f"secret {ns}/{name} does not exist, so there is no relay PKI to back up; "
                "--store must name the management store")
    for secret in await store.list_secrets():
        if secret.name.startswith(settings.ROOT_TRUST_SECRET_PREFIX):
            found[(secret.namespace, secret.name)] = secret
    policies = await store.list_resources(trust_policy.POLICY_KIND)
    for resource in policies:
        where = f"policy {resource.namespace}/{resource.name}"
        try:
            policy = trust_policy.parse(_policy_document(resource))
        except errors.ConfigError as exc:
            notes.append(f"{where} is invalid ({exc}); it is kept as it is")
            continue
        if isinstance(policy.root, trust_policy.SecretRoot):
            ref = policy.root
            secret = await _get(store, ref.namespace, ref.name)
            if secret is None:
                notes.append(f"{where}: its secretRef {ref.namespace}/{ref.name} does not exist")
            else:
                found[(ref.namespace, ref.name)] = secret
        elif (policy.namespace, names.root_trust(policy.name)) not in found:
            notes.append(f"{where}: its root is not generated yet; the server makes it")
    resources = [*policies]
    for kind in RESOURCE_KINDS[1:]:
        resources.extend(await store.list_resources(kind, namespace=ns))
    return Contents(created=clock.now(),
                    secrets=tuple(_bare(s) for _, s in sorted(found.items())),
                    resources=tuple(_bare(r) for r in resources), notes=tuple(notes))


def _policy_document(resource: base.Resource) -> dict[str, Any]:
    return {"apiVersion": resource.api_version, "kind": resource.kind,
            "metadata": {"name": resource.name, "namespace": resource.namespace},
            "spec": resource.spec}


# -- the payload --------------------------------------------------------------------------------


def dump_contents(contents: Contents) -> bytes:
    """The canonical JSON of a backup: sorted keys, no spaces, values in base64."""
    document = {
        "apiVersion": API_VERSION, "kind": KIND, "created": manifest.dump_time(contents.created),
        "notes": list(contents.notes),
        "secrets": [manifest.dump(_bare(s)) for s in contents.secrets],
        "resources": [manifest.dump(_bare(r)) for r in contents.resources],
    }
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode("ascii")


def load_contents(data: bytes) -> Contents:
    """A backup's contents from ``dump_contents`` JSON; ConfigError naming what is wrong."""
    try:
        document = json.loads(data)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep to read
        raise errors.ConfigError(f"backup: the contents are not JSON ({exc})") from exc
    if not isinstance(document, dict) or (document.get("apiVersion"), document.get("kind")) != (
            API_VERSION, KIND):
        raise errors.ConfigError(f"backup: the contents are not a {API_VERSION} {KIND}; "
                                 "a newer meshtrust may have written it")
    try:
        created = manifest.load_time(document.get("created"))
    except ValueError as exc:
        raise errors.ConfigError(f"backup: created: {exc}") from exc
    notes = document.get("notes") or []
    if not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
        raise errors.ConfigError("backup: notes must be a list of strings")
    secrets = [_load(item, "secret", index)
               for index, item in enumerate(_list(document, "secrets"))]
    resources = [_load(item, "resource", index)
                 for index, item in enumerate(_list(document, "resources"))]
    seen: set[tuple[str, str, str]] = set()
    for obj in (*secrets, *resources):
        if (obj.kind, obj.namespace, obj.name) in seen:
            raise errors.ConfigError(f"backup: {describe(obj)} appears twice")
        seen.add((obj.kind, obj.namespace, obj.name))
        if isinstance(obj, base.Resource) and obj.kind not in RESOURCE_KINDS:
            raise errors.ConfigError(f"backup: {describe(obj)}: this meshtrust does not restore "
                                     f"{obj.kind} resources; a newer one may")
    return Contents(created=created,
                    secrets=tuple(s for s in secrets if isinstance(s, base.Secret)),
                    resources=tuple(r for r in resources if isinstance(r, base.Resource)),
                    notes=tuple(notes))


def _list(document: Mapping[str, Any], field: str) -> list[Any]:
    value = document.get(field) or []
    if not isinstance(value, list):
        raise errors.ConfigError(f"backup: {field} must be a list")
    return value


def _load(item: Any, what: str, index: int) -> base.Object:
    obj = manifest.load(item, source=f"backup {what} {index + 1}")
    if isinstance(obj, base.Secret) != (what == "secret"):
        raise errors.ConfigError(f"backup {what} {index + 1}: is a {obj.kind}")
    return _bare(obj) if isinstance(obj, base.Secret) else _bare(obj)


# -- validation ---------------------------------------------------------------------------------


def check_contents(contents: Contents, names: settings.SecretNames | None = None) -> None:
    """Raise ConfigError unless every object of ``contents`` can be restored and used."""
    names = names or settings.SecretNames()
    for secret in contents.secrets:
        _check_secret(secret)
    by_name = {(s.namespace, s.name): s for s in contents.secrets}
    _check_relay(by_name, names)
    for resource in contents.resources:
        if resource.kind == registry.CLUSTER_KIND:
            try:
                registry.check_cluster_name(resource.name)
            except errors.ConfigError as exc:
                raise errors.ConfigError(f"backup: {describe(resource)}: {exc}") from exc


def _is_key_file(name: str) -> bool:
    return name in _KEY_PAIRS or name.endswith((".key", "-key.pem"))


def _check_secret(secret: base.Secret) -> None:
    where = f"backup: {describe(secret)}"
    certificates = {}
    try:
        for name, value in secret.data.items():
            if name.endswith((".crt", ".pem")) and not _is_key_file(name):
                certificates[name] = bundle.load_certificates(value, name)
        for name, value in secret.data.items():
            if not _is_key_file(name) or keys.is_encrypted(value):
                continue  # a key sealed with the CA key passphrase stays sealed in the backup
            key = keys.load_private_key(value)
            wanted = _KEY_PAIRS.get(name, ())
            partner = next((c for c in wanted if c in certificates), None)
            if wanted and partner is None:
                raise errors.ConfigError(f"{name} has no certificate ({' or '.join(wanted)})")
            if partner is not None and not keys.key_matches(certificates[partner][0], key):
                raise errors.ConfigError(f"{name} is not the key of the certificate in {partner}")
    except errors.MeshTrustError as exc:
        raise errors.ConfigError(f"{where}: {exc}") from exc


def _check_relay(by_name: Mapping[tuple[str, str], base.Secret],
                 names: settings.SecretNames) -> None:
    ns = names.relay_namespace

    def need(name: str, *fields: str) -> base.Secret:
        secret = by_name.get((ns, name))
        if secret is None:
            raise errors.ConfigError(f"backup: it holds no secret {ns}/{name}, so it cannot "
                                     "restore a management server")
        for field in fields:
            if not secret.data.get(field):
                raise errors.ConfigError(f"backup: secret {ns}/{name} has no {field}")
        return secret

    root = need(names.relay_root)
    # The key is absent when an external CA signs relay certificates (meshtrust init).
    signing = need(names.relay_signing, "tls.crt")
    server = need(names.relay_server, "tls.crt", "tls.key")
    token = by_name.get((ns, names.relay_token))
    if token is not None and not token.data.get("token", b"").strip():
        raise errors.ConfigError(f"backup: secret {ns}/{names.relay_token} has an empty token")
    anchor_pem = root.data.get("ca.crt") or root.data.get("tls.crt")
    if not anchor_pem:
        raise errors.ConfigError(f"backup: secret {ns}/{names.relay_root} has no ca.crt")
    anchors = {bundle.fingerprint(c) for c in bundle.load_certificates(anchor_pem)}
    pool = [*bundle.load_certificates(anchor_pem), *_certificates(signing, "tls.crt", "ca.crt")]
    for secret in (signing, server):
        leaf, *rest = bundle.load_certificates(secret.data["tls.crt"])
        path = bundle.order_chain(leaf, [*rest, *_certificates(secret, "ca.crt"), *pool])
        if not anchors.intersection(bundle.fingerprint(c) for c in path):
            raise errors.ConfigError(
                f"backup: secret {ns}/{secret.name}: tls.crt does not chain to the relay root "
                f"in {ns}/{names.relay_root}")


def _certificates(secret: base.Secret, *fields: str) -> list[Any]:
    return [c for f in fields if secret.data.get(f)
            for c in bundle.load_certificates(secret.data[f], f)]


# -- restore ------------------------------------------------------------------------------------


async def existing(store: base.Store, contents: Contents,
                   names: settings.SecretNames | None = None) -> list[str]:
    """What ``store`` holds already that a restore would replace: the relay secrets and
    every object of ``contents``, as ``describe`` names them."""
    names = names or settings.SecretNames()
    ns = names.relay_namespace
    wanted: dict[tuple[str, str, str], str] = {
        (base.SECRET_KIND, ns, n): f"secret {ns}/{n}"
        for n in (names.relay_root, names.relay_signing, names.relay_server, names.relay_token)}
    wanted.update({(o.kind, o.namespace, o.name): describe(o) for o in contents.objects})
    present = []
    for (kind, namespace, name), text in wanted.items():
        try:
            if kind == base.SECRET_KIND:
                await store.get_secret(namespace, name)
            else:
                await store.get_resource(kind, namespace, name)
        except errors.NotFound:
            continue
        present.append(text)
    return present


async def restore(store: base.Store, contents: Contents, *, force: bool = False,
                  names: settings.SecretNames | None = None) -> list[str]:
    """Write ``contents`` into ``store``; return one line per object written.

    The contents are checked first and nothing is written if they fail. An
    object that exists is refused (``AlreadyExists`` naming every one) unless
    ``force``, which replaces it. Restored ``IssuedCertificate`` records are
    pointed at the restored policies' generation, so the server sees them as
    current and re-issues nothing.
    """
    check_contents(contents, names)
    present = await existing(store, contents, names)
    if present and not force:
        raise errors.AlreadyExists(
            f"the store is not empty: it holds {', '.join(present)}; restore into an empty "
            "store (stop the server first: it makes a new relay PKI when it starts), or pass "
            "--force to replace these")
    ordered: list[base.Object] = [
        *contents.secrets,
        *sorted(contents.resources, key=lambda r: RESOURCE_KINDS.index(r.kind))]
    done: list[str] = []
    generations: dict[str, int] = {}
    try:
        for listed in ordered:
            if isinstance(listed, base.Secret):
                verb = await _put_secret(store, listed, force)
            else:
                verb = await _put_resource(store, _follow_policy(listed, generations), force,
                                           generations)
            done.append(f"{verb} {describe(listed)}")
    except errors.StoreError as exc:
        raise type(exc)(f"restore stopped after writing {len(done)} of {len(ordered)} objects: "
                        f"{exc}; run it again with --force to finish") from exc
    return done


def _follow_policy(issued: base.Resource, generations: Mapping[str, int]) -> base.Resource:
    """An IssuedCertificate refers to its policy's generation, which a store sets anew."""
    policy = issued.spec.get("policy")
    if (issued.kind != istio.ISSUED_KIND or "policyGeneration" not in issued.spec
            or not isinstance(policy, str) or policy not in generations):
        return issued
    return dataclasses.replace(issued, spec={**issued.spec,
                                             "policyGeneration": generations[str(policy)]})


async def _put_secret(store: base.Store, secret: base.Secret, force: bool) -> str:
    try:
        await store.create(secret)
        return "created"
    except errors.AlreadyExists:
        if not force:
            raise
    current = await store.get_secret(secret.namespace, secret.name)
    await store.update(dataclasses.replace(secret, resource_version=current.resource_version))
    return "replaced"


async def _put_resource(store: base.Store, resource: base.Resource, force: bool,
                        generations: dict[str, int]) -> str:
    """Create or (with ``force``) replace ``resource``; note a policy's new generation."""
    verb = "created"
    try:
        stored = await store.create(resource)
    except errors.AlreadyExists:
        if not force:
            raise
        current = await store.get_resource(resource.kind, resource.namespace, resource.name)
        stored = await store.update(dataclasses.replace(
            resource, resource_version=current.resource_version))
        if stored.status != resource.status:
            stored = await store.update_status(dataclasses.replace(stored,
                                                                   status=resource.status))
        verb = "replaced"
    if stored.kind == trust_policy.POLICY_KIND:
        generations[stored.name] = stored.generation
    return verb


def unbootstrapped(contents: Contents) -> list[str]:
    """Registered clusters whose agent never got a client certificate: they need a new token."""
    return sorted(r.name for r in contents.resources if r.kind == registry.CLUSTER_KIND
                  and not _client_serial(r))


def _client_serial(cluster: base.Resource) -> Any:
    """The serial of the client certificate a cluster's status records, if it records one."""
    client = cluster.status.get("clientCertificate")
    return client.get("serial") if isinstance(client, dict) else None


def inventory(contents: Contents, now: dt.datetime) -> list[tuple[str, str, str, str]]:
    """(kind, namespace, name, what) for each object, with no secret value in it."""
    rows = []
    for secret in contents.secrets:
        rows.append(("Secret", secret.namespace, secret.name, _secret_detail(secret, now)))
    for resource in contents.resources:
        rows.append((resource.kind, resource.namespace, resource.name, _detail(resource)))
    return rows


def _secret_detail(secret: base.Secret, now: dt.datetime) -> str:
    parts = [", ".join(sorted(secret.data))]
    for name in ("tls.crt", "cert-chain.pem", "root-cert.pem", "ca.crt"):
        if secret.data.get(name):
            summary = bundle.summary(bundle.load_certificate(secret.data[name], name), now)
            parts.append(f"{summary['subject']} serial {summary['serial']} "
                         f"until {summary['not_after'][:10]}")
            break
    return "; ".join(parts)


def _detail(resource: base.Resource) -> str:
    status = resource.status
    if resource.kind == registry.CLUSTER_KIND:
        serial = _client_serial(resource)
        return f"client certificate {serial}" if serial else "not bootstrapped yet"
    if resource.kind == istio.ISSUED_KIND:
        return " ".join(str(v) for v in (status.get("state"), status.get("serial")) if v)
    if resource.kind == root_rotation.ROTATION_KIND:
        return f"step {status.get('step')}"
    return str(status.get("state") or "")


def count(objects: Iterable[base.Object]) -> dict[str, int]:
    """How many objects of each kind, for a summary line."""
    counts: dict[str, int] = {}
    for obj in objects:
        counts[obj.kind] = counts.get(obj.kind, 0) + 1
    return counts
