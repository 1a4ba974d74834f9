"""Every certificate architecture of the reference in one step: ``meshtrust init``.

Three CA counts (``shared``: one root and one intermediate for relay and
Istio; ``split``: one root, a relay intermediate and an Istio signer;
``separate``: a relay root and an Istio root) times three placements of the
CA keys:

* ``internal`` — every CA key in the management store;
* ``hybrid``   — the roots at an external CA (AWS Private CA, or the user's
  own offline root through CAs brought as files), and for ``split`` the relay
  intermediate too, as the reference's ACM example does; meshtrust keeps the
  other intermediates and issues the relay and Istio certificates itself;
* ``external`` — every CA key at AWS Private CA, which signs the relay server
  and client certificates and the clusters' Istio CAs; or, with no provider,
  outside meshtrust altogether (bring your own: meshtrust only watches).

``initialize`` writes the relay secrets, a RootTrustPolicy and the
``CertificateAuthorities`` record the server reads, and returns the tree of
which CA signs what and where each key lives.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import secrets as secrets_module
from collections.abc import Mapping
from typing import Any

from cryptography import x509

from meshtrust import errors, settings
from meshtrust.authority import ca_config, istio, relay_pki, signers, trust_policy
from meshtrust.authority import registry as registry_module
from meshtrust.clock import Clock
from meshtrust.pki import bundle, csr, hierarchy, issuer, keys, profiles, verify
from meshtrust.providers import base as providers
from meshtrust.providers import local, secret
from meshtrust.store import base

Architecture = hierarchy.Architecture
Placement = ca_config.Placement
TLS_TYPE = relay_pki.TLS_TYPE
IN_STORE = "management store"
PROVIDERS = {
    Placement.INTERNAL: ("local",),
    Placement.HYBRID: ("aws-pca", "secret"),
    Placement.EXTERNAL: ("aws-pca", "none"),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Options:
    """What to set up."""

    architecture: Architecture
    placement: Placement
    provider: str = ""  # empty: the placement's first choice
    key_type: keys.KeyType = keys.KeyType.EC_P256
    server_names: tuple[str, ...] = ("localhost", "127.0.0.1")
    policy: str = settings.DEFAULT_POLICY_NAME
    trust_domain: str = settings.DEFAULT_TRUST_DOMAIN
    auto_restart_pods: bool = False
    root_arn: str = ""        # adopt this AWS Private CA root instead of creating one
    istio_root_arn: str = ""  # the Istio root to adopt (separate)
    relay_ca: Mapping[str, bytes] | None = None  # brought CAs (provider secret)
    istio_ca: Mapping[str, bytes] | None = None
    root_lifetime: dt.timedelta = profiles.RELAY_ROOT.default_lifetime
    intermediate_lifetime: dt.timedelta = profiles.RELAY_SIGNING.default_lifetime
    server_lifetime: dt.timedelta = profiles.RELAY_SERVER.default_lifetime
    names: settings.SecretNames = dataclasses.field(default_factory=settings.SecretNames)
    key_lock: keys.KeyLock = dataclasses.field(default_factory=keys.KeyLock)
    # Names this run's requests to the external CA: a retried call within the run is not
    # done twice, and another run makes its own CAs.
    run_id: str = dataclasses.field(default_factory=lambda: secrets_module.token_hex(6))

    @property
    def chosen_provider(self) -> str:
        return self.provider or PROVIDERS[self.placement][0]

    def check(self) -> None:
        allowed = PROVIDERS[self.placement]
        if self.chosen_provider not in allowed:
            raise errors.ConfigError(
                f"placement {self.placement.value} works with --provider "
                f"{' or '.join(allowed)}, not {self.chosen_provider!r}")
        if self.chosen_provider == "secret":
            if self.relay_ca is None:
                raise errors.ConfigError("--provider secret needs the relay CA you bring: "
                                         "--relay-ca DIR with tls.crt, tls.key and ca.crt")
            if self.architecture is not Architecture.SHARED and self.istio_ca is None:
                raise errors.ConfigError(
                    f"the {self.architecture.value} architecture has a separate Istio signer: "
                    "give it with --istio-ca DIR (tls.crt, tls.key and ca.crt)")
        elif self.relay_ca is not None or self.istio_ca is not None:
            raise errors.ConfigError("--relay-ca and --istio-ca go with --provider secret")
        if self.istio_root_arn and self.architecture is not Architecture.SEPARATE:
            raise errors.ConfigError("--istio-root-arn is for the separate architecture only")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Node:
    """One certificate of the hierarchy: what it is, where its key lives, what it signs."""

    role: str
    subject: str
    key_location: str
    not_after: dt.datetime | None = None
    children: tuple[Node, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"role": self.role, "subject": self.subject, "key": self.key_location,
                "notAfter": self.not_after.isoformat() if self.not_after else None,
                "signs": [c.to_dict() for c in self.children]}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Result:
    config: ca_config.CAConfig
    tree: tuple[Node, ...]
    secrets: tuple[str, ...]  # namespace/name of every secret written
    policy: str | None


@dataclasses.dataclass(kw_only=True)
class _Plan:
    """What one combination decided, before anything is written."""

    relay_root: x509.Certificate | None = None
    relay_signing: dict[str, bytes] | None = None   # relay-tls-signing-secret data
    relay_signer: providers.CAProvider | None = None
    relay_signer_kind: ca_config.RelaySigner = ca_config.RelaySigner.LOCAL
    relay_signer_arn: str = ""
    relay_root_key: keys.PrivateKey | None = None   # internal placements keep the root key
    extra: list[base.Secret] = dataclasses.field(default_factory=list)
    istio_ca: dict[str, Any] | None = None          # the policy's mgmtServerCa
    tree: list[Node] = dataclasses.field(default_factory=list)


async def initialize(store: base.Store, clock: Clock, options: Options, *,
                     external: providers.ExternalCA | None = None, force: bool = False) -> Result:
    """Set the management store up for ``options``; refuse a store already set up."""
    options.check()
    if options.chosen_provider == "aws-pca" and external is None:
        raise errors.ConfigError("--provider aws-pca needs an AWS region: pass --region")
    names = options.names
    if not force:
        # Bringing your own means the certificates are there already: only a previous
        # set-up is in the way then.
        await _refuse_existing(store, names, options.policy,
                               secrets=options.chosen_provider != "none")
    now = clock.now()
    plan = await _plan(options, now, external)
    written: list[str] = []

    async def put(item: base.Secret) -> None:
        await _put(store, item)
        written.append(f"{item.namespace}/{item.name}")

    ns = names.relay_namespace
    if plan.relay_root is not None:
        root_pem = bundle.dump_certificate(plan.relay_root)
        data = {"ca.crt": root_pem}
        if plan.relay_root_key is not None:
            data |= {"tls.crt": root_pem, "tls.key": options.key_lock.seal(plan.relay_root_key)}
        await put(base.Secret(namespace=ns, name=names.relay_root, type=TLS_TYPE,
                              labels=settings.MANAGED_BY, data=data))
    if plan.relay_signing is not None:
        await put(base.Secret(namespace=ns, name=names.relay_signing, type=TLS_TYPE,
                              labels=settings.MANAGED_BY, data=plan.relay_signing))
    for item in plan.extra:
        await put(item)
    if plan.relay_signer is not None:
        assert plan.relay_root is not None
        await put(await _server_secret(plan.relay_signer, plan.relay_root, options, now))
        await put(base.Secret(namespace=ns, name=names.relay_token, labels=settings.MANAGED_BY,
                              data={"token": secrets_module.token_urlsafe(32).encode()}))
    config = ca_config.CAConfig(architecture=options.architecture.value,
                                placement=options.placement,
                                relay_signer=plan.relay_signer_kind,
                                relay_signer_arn=plan.relay_signer_arn)
    policy = None
    if plan.istio_ca is not None:
        authority = istio.IstioAuthority(store, clock, registry_module.Registry(store, clock))
        await authority.apply(_policy_document(options, plan.istio_ca))
        policy = options.policy
    await ca_config.save(store, config, ns)
    return Result(config=config, tree=tuple(plan.tree), secrets=tuple(written), policy=policy)


async def _refuse_existing(store: base.Store, names: settings.SecretNames, policy: str, *,
                           secrets: bool) -> None:
    found = []
    for name in (names.relay_root, names.relay_signing, names.relay_server,
                 names.istio_signing, settings.SecretNames.root_trust(policy)) if secrets else ():
        try:
            await store.get_secret(names.relay_namespace, name)
            found.append(f"{names.relay_namespace}/{name}")
        except errors.NotFound:
            pass
    if await ca_config.load(store, names.relay_namespace) is not None:
        found.append(f"{ca_config.CONFIG_KIND}/{ca_config.CONFIG_NAME}")
    if found:
        raise errors.ConfigError(
            f"the store is set up already ({', '.join(found)}); pass --force to replace "
            "it, which makes every agent bootstrap again")


async def _put(store: base.Store, item: base.Secret) -> None:
    try:
        current = await store.get_secret(item.namespace, item.name)
    except errors.NotFound:
        await store.create(item)
        return
    await store.update(dataclasses.replace(current, data=item.data, labels=item.labels,
                                           type=item.type))


def _policy_document(options: Options, mgmt_server_ca: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": trust_policy.POLICY_API, "kind": trust_policy.POLICY_KIND,
            "metadata": {"name": options.policy, "namespace": options.names.relay_namespace},
            "spec": {"config": {"mgmtServerCa": mgmt_server_ca,
                                "autoRestartPods": options.auto_restart_pods,
                                "trustDomain": options.trust_domain}}}


def _node(role: str, certificate: x509.Certificate, where: str,
          *children: Node) -> Node:
    return Node(role=role, subject=certificate.subject.rfc4514_string(), key_location=where,
                not_after=certificate.not_valid_after_utc, children=children)


def _leaves(options: Options, signs_istio: bool, signs_relay: bool = True) -> tuple[Node, ...]:
    """What a signing CA issues once the server runs."""
    found = []
    if signs_relay:
        found.append(Node(role="relay server certificate", subject="CN=gloo-mesh-mgmt-server",
                          key_location=f"{IN_STORE} ({options.names.relay_server})"))
        found.append(Node(role="relay client certificates", subject="CN=<cluster>",
                          key_location=f"each cluster ({options.names.relay_client})"))
    if signs_istio:
        found.append(Node(role="Istio intermediates", subject="O=Istio,CN=Intermediate CA",
                          key_location=f"each cluster ({options.names.istio_ca})"))
    return tuple(found)


def _tls(ca: issuer.CA, lock: keys.KeyLock) -> dict[str, bytes]:
    """A CA in the tls form: its chain without the root, its key, the root as ca.crt."""
    return {"ca.crt": bundle.dump_certificate(ca.root),
            "tls.crt": bundle.dump_certificates(ca.path[:-1] or ca.path),
            "tls.key": lock.seal(ca.key)}


def _secret_ref(name: str, namespace: str) -> dict[str, Any]:
    return {"secretRef": {"name": name, "namespace": namespace}}


async def _plan(options: Options, now: dt.datetime, external: providers.ExternalCA | None) -> _Plan:
    placement, provider = options.placement, options.chosen_provider
    if placement is Placement.INTERNAL:
        return _internal(options, now)
    if provider == "secret":
        return _brought(options, now)
    if provider == "none":
        return _plan_byo(options)
    assert external is not None
    if placement is Placement.HYBRID:
        return await _hybrid_pca(options, now, external)
    return await _external_pca(options, external)


def _internal(options: Options, now: dt.datetime) -> _Plan:
    kt, arch, names = options.key_type, options.architecture, options.names
    ns = names.relay_namespace
    where = f"{IN_STORE} ({names.relay_root})"
    signing_where = f"{IN_STORE} ({names.relay_signing})"
    if arch is Architecture.SEPARATE:
        root = issuer.new_root(kt, profiles.RELAY_ROOT, now, options.root_lifetime)
    else:
        root = issuer.new_root(kt, profiles.RELAY_ROOT, now, options.root_lifetime,
                               issuer.Subject(common_name="meshtrust-root-ca"))
    plan = _Plan(relay_root=root.certificate, relay_root_key=root.key)
    if arch is Architecture.SHARED:
        signing = issuer.new_intermediate(kt, root, profiles.SHARED_SIGNING, now,
                                          options.intermediate_lifetime)
        plan.istio_ca = _secret_ref(names.relay_signing, ns)
        plan.tree = [_node("root", root.certificate, where,
                           _node("shared signing CA", signing.certificate, signing_where,
                                 *_leaves(options, True)))]
    else:
        signing = issuer.new_intermediate(kt, root, profiles.RELAY_SIGNING, now,
                                          options.intermediate_lifetime)
        relay_node = _node("relay signing CA", signing.certificate, signing_where,
                           *_leaves(options, False))
        if arch is Architecture.SPLIT:
            plan.istio_ca = _secret_ref(names.relay_root, ns)
            plan.tree = [_node("root", root.certificate, where, relay_node,
                               *_leaves(options, True, signs_relay=False))]
        else:
            istio_root = issuer.new_root(keys.KeyType.RSA_4096, profiles.ISTIO_ROOT, now,
                                         options.root_lifetime)
            secret_name = settings.SecretNames.root_trust(options.policy)
            plan.extra.append(base.Secret(
                namespace=ns, name=secret_name, labels=settings.MANAGED_BY,
                data={"root-cert.pem": bundle.dump_certificate(istio_root.certificate),
                      "key.pem": options.key_lock.seal(istio_root.key)}))
            plan.istio_ca = {"generated": {}}
            plan.tree = [_node("relay root", root.certificate, where, relay_node),
                         _node("Istio root", istio_root.certificate,
                               f"{IN_STORE} ({secret_name})",
                               *_leaves(options, True, signs_relay=False))]
    plan.relay_signing = _tls(signing, options.key_lock)
    plan.relay_signer = local.LocalProvider(signing)
    return plan


def _brought(options: Options, now: dt.datetime) -> _Plan:
    """Hybrid with CAs the user brings: their root stays offline, meshtrust holds these."""
    assert options.relay_ca is not None
    names = options.names
    shared = options.architecture is Architecture.SHARED
    relay_profile = profiles.SHARED_SIGNING if shared else profiles.RELAY_SIGNING
    relay = secret.load(options.relay_ca, relay_profile, now, where="--relay-ca")
    plan = _Plan(relay_root=relay.ca.root, relay_signer=relay,
                 relay_signing=_tls(relay.ca, options.key_lock))
    relay_node = _node("shared signing CA" if shared else "relay signing CA",
                       relay.ca.certificate, f"{IN_STORE} ({names.relay_signing})",
                       *_leaves(options, shared))
    if shared:
        plan.istio_ca = _secret_ref(names.relay_signing, names.relay_namespace)
        plan.tree = [_node("root", relay.ca.root, "outside meshtrust (brought)", relay_node)]
        return plan
    assert options.istio_ca is not None
    istio_ca = secret.load(options.istio_ca, profiles.SHARED_SIGNING, now, where="--istio-ca")
    same_root = bundle.fingerprint(istio_ca.ca.root) == bundle.fingerprint(relay.ca.root)
    if same_root != (options.architecture is Architecture.SPLIT):
        raise errors.ConfigError(
            "the split architecture needs --relay-ca and --istio-ca under one root; separate "
            "needs two roots" if options.architecture is Architecture.SPLIT else
            "the separate architecture needs --relay-ca and --istio-ca under different roots")
    plan.extra.append(base.Secret(namespace=names.relay_namespace, name=names.istio_signing,
                                  type=TLS_TYPE, labels=settings.MANAGED_BY,
                                  data=_tls(istio_ca.ca, options.key_lock)))
    plan.istio_ca = _secret_ref(names.istio_signing, names.relay_namespace)
    istio_node = _node("Istio signing CA", istio_ca.ca.certificate,
                       f"{IN_STORE} ({names.istio_signing})",
                       *_leaves(options, True, signs_relay=False))
    if same_root:
        plan.tree = [_node("root", relay.ca.root, "outside meshtrust (brought)", relay_node,
                           istio_node)]
    else:
        plan.tree = [_node("relay root", relay.ca.root, "outside meshtrust (brought)",
                           relay_node),
                     _node("Istio root", istio_ca.ca.root, "outside meshtrust (brought)",
                           istio_node)]
    return plan


def _plan_byo(options: Options) -> _Plan:
    """Nothing to make: the user brings and renews every certificate; meshtrust watches."""
    plan = _Plan(relay_signer_kind=ca_config.RelaySigner.NONE)
    plan.tree = [Node(role="every CA and certificate", subject="(yours)",
                      key_location="outside meshtrust: meshtrust watches the relay and "
                                   "cacerts secrets, reloads them and reports expiry")]
    return plan


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Remote:
    """A CA at the external CA service."""

    arn: str
    described: providers.Description

    @property
    def certificate(self) -> x509.Certificate:
        return self.described.certificate


async def _adopt(external: providers.ExternalCA, arn: str) -> _Remote:
    return _Remote(arn=arn, described=await asyncio.to_thread(external.adopt, arn))


async def _root_at(external: providers.ExternalCA, arn: str, common_name: str,
                   options: Options, idempotency: str) -> _Remote:
    """The root to use: adopted when an ARN is given, else created (and activated)."""
    if not arn:
        arn = await asyncio.to_thread(external.create_root, common_name=common_name,
                                      lifetime=options.root_lifetime,
                                      idempotency=f"{options.run_id}-{idempotency}")
    return await _adopt(external, arn)


async def _subordinate(external: providers.ExternalCA, parent: _Remote, common_name: str,
                       path_length: int, options: Options) -> _Remote:
    arn = await asyncio.to_thread(
        external.create_subordinate, parent_arn=parent.arn, common_name=common_name,
        path_length=path_length, lifetime=options.intermediate_lifetime,
        idempotency=f"{options.run_id}-{common_name}")
    return await _adopt(external, arn)


async def _local_under(external: providers.ExternalCA, parent: _Remote,
                       profile: profiles.Profile, options: Options, now: dt.datetime,
                       common_name: str) -> issuer.CA:
    """A CA whose key meshtrust keeps, its certificate signed at the external CA."""
    key = keys.generate_key(options.key_type)
    request_pem = csr.dump_csr(csr.build_csr(key, common_name=common_name, ca=True))
    assert profile.path_length is not None
    certificate, chain = await asyncio.to_thread(
        external.sign_ca_csr, parent_arn=parent.arn, csr_pem=request_pem,
        path_length=profile.path_length, lifetime=options.intermediate_lifetime,
        idempotency_key=f"{options.run_id}/{common_name}")
    verify.check_issued(certificate, chain, key.public_key(), profile, now)
    return issuer.CA(certificate=certificate, key=key, chain=chain)


async def _hybrid_pca(options: Options, now: dt.datetime, external: providers.ExternalCA) -> _Plan:
    arch, names = options.architecture, options.names
    ns = names.relay_namespace
    shared = arch is Architecture.SHARED
    root = await _root_at(external, options.root_arn,
                          "meshtrust-relay-root-ca" if arch is Architecture.SEPARATE
                          else "meshtrust-root-ca", options, "root")
    plan = _Plan(relay_root=root.certificate)
    if arch is Architecture.SPLIT:
        # As the reference's ACM example: the relay intermediate is a CA at AWS too.
        relay = await _subordinate(external, root, "meshtrust-relay-signing-ca", 0, options)
        plan.relay_signer = external.provider(relay.arn)
        plan.relay_signer_kind, plan.relay_signer_arn = ca_config.RelaySigner.AWS_PCA, relay.arn
        plan.relay_signing = {"ca.crt": bundle.dump_certificate(root.certificate),
                              "tls.crt": bundle.dump_certificate(relay.certificate)}
        relay_node = _node("relay signing CA", relay.certificate, relay.arn,
                           *_leaves(options, False))
    else:
        profile = profiles.SHARED_SIGNING if shared else profiles.RELAY_SIGNING
        signing = await _local_under(external, root, profile, options, now,
                                     "meshtrust-signing-ca" if shared
                                     else "meshtrust-relay-signing-ca")
        plan.relay_signer = local.LocalProvider(signing)
        plan.relay_signing = _tls(signing, options.key_lock)
        relay_node = _node("shared signing CA" if shared else "relay signing CA",
                           signing.certificate, f"{IN_STORE} ({names.relay_signing})",
                           *_leaves(options, shared))
    if shared:
        plan.istio_ca = _secret_ref(names.relay_signing, ns)
        plan.tree = [_node("root", root.certificate, root.arn, relay_node)]
        return plan
    istio_root = root
    if arch is Architecture.SEPARATE:
        istio_root = await _root_at(external, options.istio_root_arn, "meshtrust-istio-root-ca",
                                    options, "istio-root")
    istio_signing = await _local_under(external, istio_root, profiles.SHARED_SIGNING, options,
                                       now, "meshtrust-istio-signing-ca")
    plan.extra.append(base.Secret(namespace=ns, name=names.istio_signing, type=TLS_TYPE,
                                  labels=settings.MANAGED_BY,
                                  data=_tls(istio_signing, options.key_lock)))
    plan.istio_ca = _secret_ref(names.istio_signing, ns)
    istio_node = _node("Istio signing CA", istio_signing.certificate,
                       f"{IN_STORE} ({names.istio_signing})",
                       *_leaves(options, True, signs_relay=False))
    if arch is Architecture.SPLIT:
        plan.tree = [_node("root", root.certificate, root.arn, relay_node, istio_node)]
    else:
        plan.tree = [_node("relay root", root.certificate, root.arn, relay_node),
                     _node("Istio root", istio_root.certificate, istio_root.arn,
                           istio_node)]
    return plan


async def _external_pca(options: Options, external: providers.ExternalCA) -> _Plan:
    arch = options.architecture
    shared = arch is Architecture.SHARED
    root = await _root_at(external, options.root_arn,
                          "meshtrust-relay-root-ca" if arch is Architecture.SEPARATE
                          else "meshtrust-root-ca", options, "root")
    relay = await _subordinate(
        external, root, "meshtrust-signing-ca" if shared else "meshtrust-relay-signing-ca",
        1 if shared else 0, options)
    relay_arn = relay.arn
    plan = _Plan(relay_root=root.certificate, relay_signer=external.provider(relay_arn),
                 relay_signer_kind=ca_config.RelaySigner.AWS_PCA, relay_signer_arn=relay_arn,
                 relay_signing={"ca.crt": bundle.dump_certificate(root.certificate),
                                "tls.crt": bundle.dump_certificate(relay.certificate)})
    relay_node = _node("shared signing CA" if shared else "relay signing CA",
                       relay.certificate, relay_arn, *_leaves(options, shared))
    if shared:
        plan.istio_ca = {"awsPca": {"certificateAuthorityArn": relay_arn}}
        plan.tree = [_node("root", root.certificate, root.arn, relay_node)]
    elif arch is Architecture.SPLIT:
        plan.istio_ca = {"awsPca": {"certificateAuthorityArn": root.arn}}
        plan.tree = [_node("root", root.certificate, root.arn, relay_node,
                           *_leaves(options, True, signs_relay=False))]
    else:
        istio_root = await _root_at(external, options.istio_root_arn, "meshtrust-istio-root-ca",
                                    options, "istio-root")
        plan.istio_ca = {"awsPca": {"certificateAuthorityArn": istio_root.arn}}
        plan.tree = [_node("relay root", root.certificate, root.arn, relay_node),
                     _node("Istio root", istio_root.certificate, istio_root.arn,
                           *_leaves(options, True, signs_relay=False))]
    return plan


async def _server_secret(signer: providers.CAProvider, root: x509.Certificate,
                         options: Options, now: dt.datetime) -> base.Secret:
    """The relay server certificate, signed by whoever signs relay certificates."""
    key = keys.generate_key(options.key_type)
    names = [issuer.RELAY_SERVER_WILDCARD,
             *(n for n in options.server_names if n != issuer.RELAY_SERVER_WILDCARD)]
    request_pem = csr.dump_csr(csr.build_csr(key, common_name="gloo-mesh-mgmt-server",
                                             names=names))
    signed = await signers.sign(signer, providers.SignRequest(
        request=csr.load_csr(request_pem), profile=profiles.RELAY_SERVER,
        lifetime=options.server_lifetime, subject=issuer.Subject(names=options.server_names),
        idempotency_key=f"relay-server/{keys.public_key_der(key).hex()[-32:]}"), now)
    return base.Secret(
        namespace=options.names.relay_namespace, name=options.names.relay_server,
        type=TLS_TYPE, labels=settings.MANAGED_BY,
        data={"ca.crt": bundle.dump_certificate(root),
              "tls.crt": signed.pem(root=False),
              "tls.key": keys.dump_private_key(key)})
