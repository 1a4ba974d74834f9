"""Certificate signing requests: building our own, and reading untrusted ones.

A CSR from a peer is untrusted input. ``load_csr`` is the gate: it refuses
oversize input, unparsable bytes, a bad self-signature and unsupported keys,
each with an ``InvalidCSR`` or ``KeyPolicyError`` that says what to do.
What the CSR may obtain is decided later, by the profile (``issuer.issue``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import threading
import warnings
from collections.abc import Iterator, Sequence
from typing import TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID, PublicKeyAlgorithmOID, SignatureAlgorithmOID

from meshtrust import errors
from meshtrust.pki import der, identity, keys, pem

MAX_CSR_BYTES = 64 * 1024
_PEM_LABELS = (b"CERTIFICATE REQUEST", b"NEW CERTIFICATE REQUEST")

_E = TypeVar("_E", bound=x509.ExtensionType)
_WARNINGS_LOCK = threading.Lock()


@dataclasses.dataclass(frozen=True, kw_only=True)
class Request:
    """A CSR that passed ``load_csr``: parsed, self-signature checked, key accepted.

    The subject's common name and what the extensions ask for are read once,
    when the request is made: cryptography parses them again on every read, and
    issuing asks for them several times.
    """

    csr: x509.CertificateSigningRequest
    public_key: keys.PublicKey
    common_name: str | None = dataclasses.field(init=False)
    spki: bytes = dataclasses.field(init=False, repr=False, compare=False)
    """The public key as a DER SubjectPublicKeyInfo (``keys.public_key_der``)."""
    names: tuple[x509.GeneralName, ...] = dataclasses.field(init=False, repr=False,
                                                             compare=False)
    """The subjectAltNames the CSR asks for (empty if none)."""
    _ca: bool = dataclasses.field(init=False, repr=False, compare=False)
    _eku: tuple[x509.ObjectIdentifier, ...] = dataclasses.field(init=False, repr=False,
                                                                 compare=False)

    signed_part: dataclasses.InitVar[bytes | None] = None
    """The CSR's CertificationRequestInfo DER, if the caller has it at hand already."""

    def __post_init__(self, signed_part: bytes | None) -> None:
        parts = der.request_parts(signed_part or self.csr.tbs_certrequest_bytes)
        subject, spki, attributes = parts if parts is not None else (None, None, None)
        # A subject that is one commonName is read from its DER, with no Name object.
        name = der.common_name(subject)
        if name is None:
            with _bounded_names():
                name = identity.common_name(self.csr.subject)
        object.__setattr__(self, "common_name", name)
        object.__setattr__(self, "spki", keys.public_key_der_of(self.public_key, spki))
        # So are the extensions of a request that asks for DNS names only, or for nothing.
        dns_names = der.requested_dns_names(attributes) if attributes else None
        if dns_names is not None:
            names: tuple[x509.GeneralName, ...] = tuple(map(x509.DNSName, dns_names))
            ca, eku = False, ()
        elif attributes == der.NO_ATTRIBUTES:
            names, ca, eku = (), False, ()
        else:
            # A CSR names each extension once: cryptography refuses one named twice.
            with _bounded_names():
                extensions = {type(ext.value): ext.value for ext in self.csr.extensions}
            san = _value(extensions, x509.SubjectAlternativeName)
            basic = _value(extensions, x509.BasicConstraints)
            usages = _value(extensions, x509.ExtendedKeyUsage)
            names = tuple(san) if san is not None else ()
            ca = basic.ca if basic is not None else False
            eku = tuple(usages) if usages is not None else ()
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "_ca", ca)
        object.__setattr__(self, "_eku", eku)

    @property
    def key_sha256(self) -> str:
        """The SHA-256 of the public key's SubjectPublicKeyInfo, in hex: names the key."""
        return hashlib.sha256(self.spki).hexdigest()

    def requested_ca(self) -> bool:
        """True if the CSR asks for basicConstraints CA:true."""
        return self._ca

    def requested_eku(self) -> list[x509.ObjectIdentifier]:
        """The extended key usages the CSR asks for (empty if none)."""
        return list(self._eku)

    def dump(self) -> bytes:
        return self.csr.public_bytes(serialization.Encoding.PEM)


@contextlib.contextmanager
def _bounded_names() -> Iterator[None]:
    """Make cryptography's warning of a name attribute out of its bounds (a commonName of
    none or over 64 characters, a countryName not of two) an error, while names are read.

    Only names that cryptography reads into ``Name`` objects can warn; those read from
    their DER here never do. The lock keeps threads that read names at once from
    restoring each other's warning filters out of order.
    """
    with _WARNINGS_LOCK, warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        yield


def _value(extensions: dict[type[x509.ExtensionType], x509.ExtensionType],
           kind: type[_E]) -> _E | None:
    value = extensions.get(kind)
    return value if isinstance(value, kind) else None


def build_csr(
    key: keys.PrivateKey,
    *,
    common_name: str | None = None,
    names: Sequence[str] = (),
    organization: str | None = None,
    locality: str | None = None,
    ca: bool = False,
) -> x509.CertificateSigningRequest:
    """Make a CSR for ``key``. Names are identity strings (see ``identity.parse_name``)."""
    attributes = []
    if organization:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    if common_name:
        attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    if locality:
        attributes.append(x509.NameAttribute(NameOID.LOCALITY_NAME, locality))
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(attributes))
    if names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([identity.parse_name(n) for n in names]), critical=False
        )
    if ca:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None),
                                        critical=True)
    return builder.sign(key, keys.signature_hash(key))


def dump_csr(csr: x509.CertificateSigningRequest) -> bytes:
    return csr.public_bytes(serialization.Encoding.PEM)


def load_csr(data: bytes) -> Request:
    """Parse and check an untrusted CSR (PEM or DER).

    Raises InvalidCSR for oversize, unparsable or badly signed input and
    KeyPolicyError for a key meshtrust does not accept.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"load_csr takes bytes, not {type(data).__name__}")
    if len(data) > MAX_CSR_BYTES:
        raise errors.InvalidCSR(
            f"CSR is {len(data)} bytes, over the limit of {MAX_CSR_BYTES}; "
            "send a single PEM or DER request"
        )
    if not data:
        raise errors.InvalidCSR("CSR is empty; send a PEM or DER certificate signing request")
    raw = bytes(data)
    try:
        body = pem.decode_single(raw, _PEM_LABELS)
        if body is not None:
            csr = x509.load_der_x509_csr(body)
        elif raw.lstrip().startswith(b"-----BEGIN"):
            csr = x509.load_pem_x509_csr(raw)
        else:
            body = raw
            csr = x509.load_der_x509_csr(raw)
    except (ValueError, x509.InvalidVersion) as exc:
        raise errors.InvalidCSR(f"cannot parse the CSR ({exc}); send a PEM or DER PKCS#10 "
                                "request") from exc
    # (getattr: cryptography's type hints for requests name the attribute only from 51 on.)
    if getattr(csr, "public_key_algorithm_oid", None) == PublicKeyAlgorithmOID.DSA:
        # Refused before it is read: cryptography warns on reading a DSA key (deprecated).
        raise keys.unsupported_key_type("DSA")
    try:
        public_key = csr.public_key()
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:  # unsupported algorithm
        raise errors.KeyPolicyError(
            f"the CSR's key cannot be read ({exc}); use RSA or ECDSA P-256/P-384"
        ) from exc
    checked = keys.check_public_key(public_key)
    # The signed part as it was sent, which cryptography, having read it as strict DER,
    # would otherwise encode again (``tbs_certrequest_bytes``).
    signed_part = der.first_element(body) if body is not None else None
    if signed_part is None:
        signed_part = csr.tbs_certrequest_bytes
    try:
        valid = _signature_valid(csr, checked, signed_part)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise errors.InvalidCSR(f"the CSR's signature cannot be checked ({exc})") from exc
    if not valid:
        raise errors.InvalidCSR(
            "the CSR's signature does not match its public key; sign the request "
            "with the private key it names"
        )
    try:
        # Making the Request reads the subject and the extensions: malformed ones
        # (a bad string, an attribute of the wrong type, an extension twice, an unknown
        # name type) are refused here, and so is a name attribute out of its bounds.
        return Request(csr=csr, public_key=checked, signed_part=signed_part)
    except (ValueError, TypeError, UserWarning, x509.DuplicateExtension,
            x509.UnsupportedGeneralNameType) as exc:
        raise errors.InvalidCSR(f"the CSR has a malformed subject or extension ({exc})") \
            from exc


def _signature_valid(csr: x509.CertificateSigningRequest, public_key: keys.PublicKey,
                     signed: bytes) -> bool:
    """Check the CSR's self-signature with the key already read from it.

    The same check as ``csr.is_signature_valid``, which would read the public
    key a second time. The signature algorithm must fit the key: a CSR with an
    EC key and an RSA signature algorithm (or the reverse) is refused. The
    usual algorithms are looked up by OID; others (RSA-PSS with its parameters,
    older hashes) are read from the CSR.
    """
    signature = csr.signature
    oid = csr.signature_algorithm_oid
    try:
        if keys.is_ec_public(public_key) and oid in _ECDSA:
            public_key.verify(signature, signed, _ECDSA[oid])
            return True
        if keys.is_rsa_public(public_key) and oid in _PKCS1:
            public_key.verify(signature, signed, _PKCS1V15, _PKCS1[oid])
            return True
        scheme = csr.signature_algorithm_parameters
        if isinstance(public_key, ec.EllipticCurvePublicKey) and isinstance(scheme, ec.ECDSA):
            public_key.verify(signature, signed, scheme)
        elif isinstance(public_key, rsa.RSAPublicKey) and \
                isinstance(scheme, (padding.PKCS1v15, padding.PSS)):
            digest = csr.signature_hash_algorithm
            if digest is None:
                raise ValueError("the signature algorithm names no hash")
            public_key.verify(signature, signed, scheme, digest)
        else:
            raise ValueError(f"signature algorithm {oid.dotted_string} does not fit the CSR's "
                             f"{keys.describe_key(public_key)} key; sign the request with "
                             "its own key's algorithm")
    except InvalidSignature:
        return False
    return True


# The usual signature algorithms, by OID: no objects made per CSR to find them.
_ECDSA = {SignatureAlgorithmOID.ECDSA_WITH_SHA256: ec.ECDSA(hashes.SHA256()),
          SignatureAlgorithmOID.ECDSA_WITH_SHA384: ec.ECDSA(hashes.SHA384()),
          SignatureAlgorithmOID.ECDSA_WITH_SHA512: ec.ECDSA(hashes.SHA512())}
_PKCS1: dict[x509.ObjectIdentifier, hashes.HashAlgorithm] = {
    SignatureAlgorithmOID.RSA_WITH_SHA256: hashes.SHA256(),
    SignatureAlgorithmOID.RSA_WITH_SHA384: hashes.SHA384(),
    SignatureAlgorithmOID.RSA_WITH_SHA512: hashes.SHA512()}
_PKCS1V15 = padding.PKCS1v15()
