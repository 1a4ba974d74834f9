"""Issuing certificates: the profile and the issuer decide, the CSR proposes.

``issue`` is the only way meshtrust signs a certificate with a local key.
It takes a checked ``csr.Request``, an issuing ``CA``, a ``Profile`` and the
``Subject`` facts the caller vouches for (the cluster name, the trust
domain), and builds every extension itself. From the CSR it takes only the
public key; for the relay client profile it also checks that the CSR names
the expected cluster, and for leaf profiles it refuses requests for CA:true
or for extended key usages beyond the profile's.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import hashlib
import os
from collections.abc import Callable

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.x509.oid import ExtensionOID, NameOID, SignatureAlgorithmOID

from meshtrust import errors
from meshtrust.pki import csr as csr_mod
from meshtrust.pki import der, identity, keys, pem
from meshtrust.pki.profiles import Naming, Profile

# NotBefore is set a little in the past to absorb clock skew: five minutes, but never
# more than a twentieth of the lifetime, so short-lived certificates keep their shape.
BACKDATE = dt.timedelta(minutes=5)
RELAY_SERVER_WILDCARD = "*.gloo-mesh"
ISTIOD_DNS = "istiod.istio-system.svc"
_VERSION_3 = der.explicit(0, der.integer(2))  # X.509 v3, the only version issued
_NO_TIME = dt.timedelta(0)
# The subjectKeyIdentifier extension up to its 20 octets of SHA-1: the identifier as an
# OCTET STRING, itself the extension's value, every length fixed by the hash's.
_SKI_PREFIX = der.encoded_extension(ExtensionOID.SUBJECT_KEY_IDENTIFIER, False,
                                    der.octet_string(bytes(20)))[:-20]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Subject:
    """What the caller vouches for about the certificate's owner.

    ``cluster`` is the registered cluster name (relay client, Istio
    intermediate); ``names`` are extra configured SANs (relay server);
    ``namespace``/``service_account`` name a SPIFFE workload.
    """

    cluster: str | None = None
    trust_domain: str = "cluster.local"
    names: tuple[str, ...] = ()
    namespace: str | None = None
    service_account: str | None = None
    common_name: str | None = None
    organization: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.names, str):
            raise TypeError("Subject.names must be a tuple of strings, not a string")
        if self.cluster is not None and not identity.is_dns_name(self.cluster):
            raise errors.ConfigError(
                f"cluster name {self.cluster!r} is invalid; use a DNS label such as cluster-1"
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class CA:
    """An issuing certificate authority with its key at hand.

    ``chain`` holds the certificates above ``certificate``, nearest first;
    the last is the root (empty for a root).
    """

    certificate: x509.Certificate
    key: keys.PrivateKey
    chain: tuple[x509.Certificate, ...] = ()

    def __post_init__(self) -> None:
        if not keys.key_matches(self.certificate, self.key):
            raise errors.ChainError("the CA's private key does not match its certificate")
        try:
            bc = self.certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            bc = None
        if bc is None or not bc.ca:
            raise errors.ChainError(
                f"{self.certificate.subject.rfc4514_string()} is not a CA certificate "
                "(basicConstraints CA:true is missing)"
            )

    @property
    def root(self) -> x509.Certificate:
        return self.chain[-1] if self.chain else self.certificate

    @property
    def path(self) -> tuple[x509.Certificate, ...]:
        """This CA's certificate followed by its chain."""
        return (self.certificate, *self.chain)

    @functools.cached_property
    def _aki(self) -> bytes:
        """The authorityKeyIdentifier extension of what this CA signs, as DER."""
        try:
            ski = self.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
            aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski.value)
        except x509.ExtensionNotFound:
            aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self.certificate.public_key())  # type: ignore[arg-type]
        return der.extension(aki, critical=False)

    @functools.cached_property
    def _name(self) -> bytes:
        """This CA's subject as DER: the issuer name of what it signs."""
        return self.certificate.subject.public_bytes()

    @functools.cached_property
    def _signer(self) -> _Signer:
        return _Signer.of(self.key)

    @functools.cached_property
    def _period(self) -> tuple[dt.datetime, dt.datetime]:
        """This CA's NotBefore and NotAfter (cryptography makes new datetimes on each read)."""
        return self.certificate.not_valid_before_utc, self.certificate.not_valid_after_utc


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Signer:
    """How a key signs a certificate: the AlgorithmIdentifier it names and the signing call."""

    algorithm: bytes
    sign: Callable[[bytes], bytes]

    @classmethod
    def of(cls, key: keys.PrivateKey) -> _Signer:
        digest = keys.signature_hash(key)
        sha384 = isinstance(digest, hashes.SHA384)
        if isinstance(key, ec.EllipticCurvePrivateKey):
            # RFC 5758 3.2: ECDSA algorithm identifiers have no parameters.
            oid = SignatureAlgorithmOID.ECDSA_WITH_SHA384 if sha384 else \
                SignatureAlgorithmOID.ECDSA_WITH_SHA256
            algorithm = ec.ECDSA(digest)
            return cls(algorithm=der.sequence(der.object_identifier(oid)),
                       sign=lambda data: key.sign(data, algorithm))
        # RFC 4055 5: PKCS #1 v1.5 identifiers carry an explicit NULL.
        oid = SignatureAlgorithmOID.RSA_WITH_SHA384 if sha384 else \
            SignatureAlgorithmOID.RSA_WITH_SHA256
        pkcs1 = padding.PKCS1v15()
        return cls(algorithm=der.sequence(der.object_identifier(oid), der.NULL),
                   sign=lambda data: key.sign(data, pkcs1, digest))


def backdated(now: dt.datetime, lifetime: dt.timedelta) -> dt.datetime:
    """The NotBefore of a certificate issued ``now`` for ``lifetime``: a little in the past."""
    return now - min(BACKDATE, lifetime / 20)


def random_serial() -> int:
    """A random positive serial number of 128 bits."""
    return int.from_bytes(os.urandom(16), "big") or 1


def issue(
    request: csr_mod.Request,
    issuer: CA,
    profile: Profile,
    now: dt.datetime,
    lifetime: dt.timedelta | None = None,
    subject: Subject | None = None,
) -> x509.Certificate:
    """Sign ``request`` under ``issuer`` with ``profile``; raise ProfileViolation if refused."""
    return _issue(request, issuer, profile, now, lifetime, subject)[0]


def issue_pem(
    request: csr_mod.Request,
    issuer: CA,
    profile: Profile,
    now: dt.datetime,
    lifetime: dt.timedelta | None = None,
    subject: Subject | None = None,
) -> tuple[x509.Certificate, bytes]:
    """``issue``, with the certificate's PEM written from the DER just signed."""
    certificate, encoded = _issue(request, issuer, profile, now, lifetime, subject)
    return certificate, pem.encode(encoded, b"CERTIFICATE")


def _issue(request: csr_mod.Request, issuer: CA, profile: Profile, now: dt.datetime,
           lifetime: dt.timedelta | None, subject: Subject | None,
           ) -> tuple[x509.Certificate, bytes]:
    subject = subject or Subject()
    _check_request(request, profile, subject)
    not_before, not_after = _validity(now, lifetime or profile.default_lifetime, issuer)
    return _sign(profile, subject, request.spki, not_before, not_after,
                 issuer_name=issuer._name, aki=issuer._aki, signer=issuer._signer)


def self_sign(
    key: keys.PrivateKey,
    profile: Profile,
    now: dt.datetime,
    lifetime: dt.timedelta | None = None,
    subject: Subject | None = None,
) -> x509.Certificate:
    """Make a self-signed root certificate for ``key`` with a CA ``profile``."""
    if not profile.is_ca:
        raise ValueError(f"cannot self-sign with leaf profile {profile.name}")
    subject = subject or Subject()
    lifetime = lifetime or profile.default_lifetime
    aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key())
    return _sign(profile, subject, keys.public_key_der(key), backdated(now, lifetime),
                 now + lifetime,
                 issuer_name=der.name(_subject_attributes(profile, subject)),
                 aki=der.extension(aki, critical=False), signer=_Signer.of(key))[0]


def new_root(
    key_type: keys.KeyType, profile: Profile, now: dt.datetime,
    lifetime: dt.timedelta | None = None, subject: Subject | None = None,
) -> CA:
    """Generate a key and a self-signed root CA for it."""
    key = keys.generate_key(key_type)
    return CA(certificate=self_sign(key, profile, now, lifetime, subject), key=key)


def new_intermediate(
    key_type: keys.KeyType, issuer: CA, profile: Profile, now: dt.datetime,
    lifetime: dt.timedelta | None = None, subject: Subject | None = None,
) -> CA:
    """Generate a key and an intermediate CA for it, signed by ``issuer``."""
    key = keys.generate_key(key_type)
    request = csr_mod.Request(csr=csr_mod.build_csr(key, ca=True),
                              public_key=key.public_key())
    certificate = issue(request, issuer, profile, now, lifetime, subject)
    return CA(certificate=certificate, key=key, chain=issuer.path)


def check(request: csr_mod.Request, profile: Profile, subject: Subject) -> None:
    """Raise ProfileViolation if ``profile`` would refuse ``request`` (what ``issue`` checks)."""
    _check_request(request, profile, subject)


def _check_request(request: csr_mod.Request, profile: Profile, subject: Subject) -> None:
    if not profile.is_ca:
        if request.requested_ca():
            raise errors.ProfileViolation(
                f"the CSR asks for CA:true, which the {profile.name} profile never grants; "
                "request a leaf certificate without basicConstraints CA:true"
            )
        extra = [oid for oid in request.requested_eku() if oid not in profile.extended_key_usage]
        if extra:
            names = ", ".join(getattr(oid, "_name", oid.dotted_string) for oid in extra)
            raise errors.ProfileViolation(
                f"the CSR asks for extended key usages ({names}) beyond what the "
                f"{profile.name} profile allows; remove them from the request"
            )
    if profile.naming is Naming.RELAY_CLIENT:
        _check_cluster_names(request, subject)


def _check_cluster_names(request: csr_mod.Request, subject: Subject) -> None:
    expected = subject.cluster
    if expected is None:
        raise ValueError("the relay-client profile needs Subject(cluster=...)")
    cn = request.common_name
    if cn is not None and cn != expected:
        raise errors.ProfileViolation(
            f"the CSR's common name {cn!r} is not the cluster name {expected!r}; "
            f"request a certificate for {expected!r}"
        )
    for name in request.names:
        if not (isinstance(name, x509.DNSName) and name.value.lower() == expected.lower()):
            raise errors.ProfileViolation(
                f"the CSR names {identity.format_name(name)}, but this cluster is registered "
                f"as {expected!r}; request only DNS:{expected}"
            )


def _validity(now: dt.datetime, lifetime: dt.timedelta,
              issuer: CA) -> tuple[dt.datetime, dt.datetime]:
    if lifetime <= _NO_TIME:
        raise ValueError("lifetime must be positive")
    issuer_before, issuer_after = issuer._period
    if issuer_after <= now:
        raise errors.ChainError(
            f"the issuing CA {issuer.certificate.subject.rfc4514_string()} expired at "
            f"{issuer_after.isoformat()}; renew it before issuing"
        )
    not_before = max(backdated(now, lifetime), issuer_before)
    return not_before, min(now + lifetime, issuer_after)


def _subject_attributes(profile: Profile,
                        subject: Subject) -> list[tuple[x509.ObjectIdentifier, str]]:
    """The subject's attributes, one per RDN, in order (``der.name`` encodes them)."""
    attrs: list[tuple[x509.ObjectIdentifier, str]] = []
    naming = profile.naming
    if naming is Naming.RELAY_ROOT:
        attrs = [(NameOID.COMMON_NAME, subject.common_name or "relay-root-ca")]
    elif naming is Naming.RELAY_SIGNING:
        attrs = [(NameOID.COMMON_NAME, subject.common_name or "relay-signing-ca")]
    elif naming is Naming.SHARED_SIGNING:
        attrs = [(NameOID.COMMON_NAME, subject.common_name or "meshtrust-signing-ca")]
    elif naming is Naming.RELAY_SERVER:
        attrs = [(NameOID.COMMON_NAME, subject.common_name or "gloo-mesh-mgmt-server")]
    elif naming is Naming.RELAY_CLIENT:
        attrs = [(NameOID.COMMON_NAME, _require_cluster(subject, profile))]
    elif naming is Naming.ISTIO_ROOT:
        attrs = [(NameOID.ORGANIZATION_NAME, subject.organization or "Istio"),
                 (NameOID.COMMON_NAME, subject.common_name or "Root CA")]
    elif naming is Naming.ISTIO_INTERMEDIATE:
        attrs = [(NameOID.ORGANIZATION_NAME, subject.organization or "Istio"),
                 (NameOID.COMMON_NAME, subject.common_name or "Intermediate CA"),
                 (NameOID.LOCALITY_NAME, _require_cluster(subject, profile))]
    return attrs


def _subject_alt_names(profile: Profile, subject: Subject) -> bytes:
    """The subjectAltName's value (GeneralNames) as DER; empty if the profile has none."""
    naming = profile.naming
    if naming is Naming.RELAY_CLIENT:
        # Subject checked the cluster name is a DNS name; parse_name would lower-case it too.
        return der.dns_names([_require_cluster(subject, profile).lower()])
    names: list[x509.GeneralName] = []
    if naming is Naming.RELAY_SERVER:
        wanted = [RELAY_SERVER_WILDCARD,
                  *(n for n in subject.names if n != RELAY_SERVER_WILDCARD)]
        names = [identity.parse_name(n) for n in wanted]
    elif naming is Naming.ISTIO_INTERMEDIATE:
        names = [x509.DNSName(ISTIOD_DNS), x509.UniformResourceIdentifier(
            identity.spiffe_id(subject.trust_domain, "istio-system", "istiod"))]
    elif naming is Naming.SPIFFE_WORKLOAD:
        if not subject.namespace or not subject.service_account:
            raise ValueError("the spiffe-workload profile needs namespace and service_account")
        names = [x509.UniformResourceIdentifier(identity.spiffe_id(
            subject.trust_domain, subject.namespace, subject.service_account))]
    return der.general_names(names) if names else b""


def _require_cluster(subject: Subject, profile: Profile) -> str:
    if not subject.cluster:
        raise ValueError(f"the {profile.name} profile needs Subject(cluster=...)")
    return subject.cluster


def _sign(profile: Profile, subject: Subject, spki: bytes,
          not_before: dt.datetime, not_after: dt.datetime, *,
          issuer_name: bytes, aki: bytes, signer: _Signer) -> tuple[x509.Certificate, bytes]:
    """Encode the certificate RFC 5280 section 4.1 describes, sign it, and parse it back;
    return it and its DER.

    The extensions come in one order for every profile: basicConstraints,
    keyUsage, subjectKeyIdentifier, extendedKeyUsage, subjectAltName,
    authorityKeyIdentifier.
    """
    attributes = _subject_attributes(profile, subject)
    # RFC 5280 4.2.1.2 method 1, as x509.SubjectKeyIdentifier.from_public_key computes it.
    ski = _SKI_PREFIX + hashlib.sha1(der.subject_public_key(spki)).digest()
    fixed = _profile_extensions(profile)
    extensions = [fixed.basic_constraints, fixed.key_usage, ski]
    if fixed.extended_key_usage:
        extensions.append(fixed.extended_key_usage)
    sans = _subject_alt_names(profile, subject)
    if sans:
        # An empty subject makes the SAN the only name, and RFC 5280 then wants it critical.
        extensions.append(der.encoded_extension(ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
                                                not attributes, sans))
    extensions.append(aki)
    tbs = der.sequence(
        _VERSION_3,
        der.integer(random_serial()),
        signer.algorithm,
        issuer_name,
        der.validity(not_before, not_after),
        der.name(attributes),
        spki,
        der.explicit(3, der.sequence(*extensions)),
    )
    signed = der.sequence(tbs, signer.algorithm, der.bit_string(signer.sign(tbs)))
    return x509.load_der_x509_certificate(signed), signed


@dataclasses.dataclass(frozen=True, kw_only=True)
class _ProfileExtensions:
    basic_constraints: bytes
    key_usage: bytes
    extended_key_usage: bytes | None


@functools.lru_cache(maxsize=64)
def _profile_extensions(profile: Profile) -> _ProfileExtensions:
    """The extensions fixed by ``profile`` alone, encoded once per profile."""
    eku = (der.extension(x509.ExtendedKeyUsage(list(profile.extended_key_usage)),
                         critical=False)
           if profile.extended_key_usage else None)
    return _ProfileExtensions(
        basic_constraints=der.extension(
            x509.BasicConstraints(ca=profile.is_ca, path_length=profile.path_length),
            critical=profile.basic_constraints_critical),
        key_usage=der.extension(_key_usage(profile), critical=profile.key_usage_critical),
        extended_key_usage=eku)


def _key_usage(profile: Profile) -> x509.KeyUsage:
    flags = {usage: usage in profile.key_usage for usage in
             ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
              "key_agreement", "key_cert_sign", "crl_sign")}
    return x509.KeyUsage(**flags, encipher_only=False, decipher_only=False)
