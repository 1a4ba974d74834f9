"""Whole CA hierarchies for the three certificate architectures, built in memory.

This is what the reference documentation's openssl scripts produce by hand:
the relay root, signing CA, server and client certificates, the identity
token, the Istio root and one Istio intermediate per cluster — laid out as
the secrets of design.md. ``build`` is pure: it returns the secrets and the
caller decides where to write them.

Architectures:

* ``shared``   one root and one intermediate that signs relay leaves and the
  clusters' Istio CAs (so the intermediate has pathlen 1);
* ``split``    one root; a relay signing intermediate, and the clusters' Istio
  CAs directly under the root;
* ``separate`` a relay root and an Istio root that share nothing.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import secrets
from collections.abc import Sequence

from cryptography import x509

from meshtrust import errors, settings
from meshtrust.pki import bundle, csr, identity, issuer, keys, profiles

MGMT = "mgmt"


class Architecture(enum.Enum):
    SHARED = "shared"
    SPLIT = "split"
    SEPARATE = "separate"

    @classmethod
    def parse(cls, text: str) -> Architecture:
        try:
            return cls(text)
        except ValueError:
            raise errors.ConfigError(
                f"unknown architecture {text!r}; use shared, split or separate") from None


@dataclasses.dataclass(frozen=True, kw_only=True)
class SecretFiles:
    """One secret: where it goes, its type and its files."""

    cluster: str
    namespace: str
    name: str
    type: str
    data: dict[str, bytes]

    @property
    def private_keys(self) -> tuple[str, ...]:
        return tuple(k for k in self.data if k.endswith((".key", "key.pem")) or k == "token")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Options:
    """What to build."""

    architecture: Architecture
    clusters: tuple[str, ...]
    key_type: keys.KeyType = keys.KeyType.EC_P256
    istio_key_type: keys.KeyType = keys.KeyType.RSA_4096
    trust_domain: str = settings.DEFAULT_TRUST_DOMAIN
    server_names: tuple[str, ...] = ()
    policy: str = settings.DEFAULT_POLICY_NAME
    client_lifetime: dt.timedelta = profiles.RELAY_CLIENT.default_lifetime
    names: settings.SecretNames = dataclasses.field(default_factory=settings.SecretNames)

    def __post_init__(self) -> None:
        if not self.clusters:
            raise errors.ConfigError("give at least one cluster name, e.g. --clusters cluster-1")
        for name in self.clusters:
            if not identity.is_dns_name(name) or "." in name or "*" in name:
                raise errors.ConfigError(
                    f"cluster name {name!r} is invalid; use lower-case letters, digits and "
                    "dashes, such as cluster-1")
        if MGMT in self.clusters:
            raise errors.ConfigError(f"{MGMT!r} is the management cluster's folder; "
                                     "choose another cluster name")
        if len(set(self.clusters)) != len(self.clusters):
            raise errors.ConfigError("cluster names must be unique")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Hierarchy:
    """The CAs that were made and every secret to write."""

    relay_root: issuer.CA
    relay_signing: issuer.CA
    istio_root: x509.Certificate
    istio_signing: issuer.CA
    secrets: tuple[SecretFiles, ...]


def build(options: Options, now: dt.datetime) -> Hierarchy:
    """Make every CA and certificate of ``options.architecture``."""
    kt = options.key_type
    arch = options.architecture
    if arch is Architecture.SHARED:
        root = issuer.new_root(kt, profiles.RELAY_ROOT, now,
                               subject=issuer.Subject(common_name="meshtrust-root-ca"))
        relay_signing = issuer.new_intermediate(kt, root, profiles.SHARED_SIGNING, now)
        istio_signing, istio_root = relay_signing, root.certificate
    elif arch is Architecture.SPLIT:
        root = issuer.new_root(kt, profiles.RELAY_ROOT, now,
                               subject=issuer.Subject(common_name="meshtrust-root-ca"))
        relay_signing = issuer.new_intermediate(kt, root, profiles.RELAY_SIGNING, now)
        istio_signing, istio_root = root, root.certificate
    else:
        root = issuer.new_root(kt, profiles.RELAY_ROOT, now)
        relay_signing = issuer.new_intermediate(kt, root, profiles.RELAY_SIGNING, now)
        istio_signing = issuer.new_root(kt, profiles.ISTIO_ROOT, now)
        istio_root = istio_signing.certificate

    n = options.names
    token = secrets.token_urlsafe(32).encode()
    out: list[SecretFiles] = []

    def add(cluster: str, namespace: str, name: str, data: dict[str, bytes],
            kind: str = "Opaque") -> None:
        out.append(SecretFiles(cluster=cluster, namespace=namespace, name=name, type=kind,
                               data=data))

    root_pem = bundle.dump_certificate(root.certificate)
    add(MGMT, n.relay_namespace, n.relay_root, {
        "ca.crt": root_pem, "tls.crt": root_pem, "tls.key": keys.dump_private_key(root.key)})
    add(MGMT, n.relay_namespace, n.relay_signing, {
        "ca.crt": root_pem,
        "tls.crt": bundle.dump_certificates(relay_signing.path[:-1]),
        "tls.key": keys.dump_private_key(relay_signing.key)})
    server_key = keys.generate_key(kt)
    server_cert = issuer.issue(
        _request(server_key), relay_signing, profiles.RELAY_SERVER, now,
        subject=issuer.Subject(names=options.server_names))
    add(MGMT, n.relay_namespace, n.relay_server, tls_data(server_cert, server_key, relay_signing),
        "kubernetes.io/tls")
    add(MGMT, n.relay_namespace, n.relay_token, {"token": token})
    istio_root_pem = bundle.dump_certificate(istio_root)
    trust = {"root-cert.pem": istio_root_pem, "key.pem": keys.dump_private_key(istio_signing.key)}
    if istio_signing.certificate != istio_root:
        trust["cert-chain.pem"] = bundle.dump_certificates(istio_signing.path)
    add(MGMT, n.relay_namespace, n.root_trust(options.policy), trust)

    for cluster in options.clusters:
        add(cluster, n.relay_namespace, n.relay_root, {"ca.crt": root_pem})
        add(cluster, n.relay_namespace, n.relay_token, {"token": token})
        client_key = keys.generate_key(kt)
        client_cert = issuer.issue(
            _request(client_key, cluster), relay_signing, profiles.RELAY_CLIENT, now,
            options.client_lifetime, issuer.Subject(cluster=cluster))
        add(cluster, n.relay_namespace, n.relay_client,
            tls_data(client_cert, client_key, relay_signing), "kubernetes.io/tls")
        ca_key = keys.generate_key(options.istio_key_type)
        ca_cert = issuer.issue(
            _request(ca_key), istio_signing, profiles.ISTIO_INTERMEDIATE, now,
            subject=issuer.Subject(cluster=cluster, trust_domain=options.trust_domain))
        add(cluster, n.istio_namespace, n.istio_ca, {
            "ca-cert.pem": bundle.dump_certificate(ca_cert),
            "ca-key.pem": keys.dump_private_key(ca_key),
            "root-cert.pem": istio_root_pem,
            "cert-chain.pem": bundle.dump_certificates([ca_cert, *istio_signing.path]),
        })
    return Hierarchy(relay_root=root, relay_signing=relay_signing, istio_root=istio_root,
                     istio_signing=istio_signing, secrets=tuple(out))


def _request(key: keys.PrivateKey, cluster: str | None = None) -> csr.Request:
    names: Sequence[str] = (cluster,) if cluster else ()
    built = csr.build_csr(key, common_name=cluster, names=names)
    return csr.Request(csr=built, public_key=key.public_key())


def tls_data(cert: x509.Certificate, key: keys.PrivateKey,
             signer: issuer.CA) -> dict[str, bytes]:
    """The kubernetes.io/tls form: leaf and intermediates, key, and the root as ca.crt."""
    return {
        "ca.crt": bundle.dump_certificate(signer.root),
        "tls.crt": bundle.dump_certificates([cert, *signer.path[:-1]]),
        "tls.key": keys.dump_private_key(key),
    }
