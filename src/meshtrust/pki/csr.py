"""Certificate signing requests: building our own, and reading untrusted ones.

A CSR from a peer is untrusted input. ``load_csr`` is the gate: it refuses
oversize input, unparsable bytes, a bad self-signature and unsupported keys,
each with an ``InvalidCSR`` or ``KeyPolicyError`` that says what to do.
What the CSR may obtain is decided later, by the profile (``issuer.issue``).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Sequence
from typing import TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

from meshtrust import errors
from meshtrust.pki import identity, keys

MAX_CSR_BYTES = 64 * 1024

_E = TypeVar("_E", bound=x509.ExtensionType)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Request:
    """A CSR that passed ``load_csr``: parsed, self-signature checked, key accepted."""

    csr: x509.CertificateSigningRequest
    public_key: keys.PublicKey

    @functools.cached_property
    def common_name(self) -> str | None:
        # Kept: cryptography parses the subject again on every read.
        return identity.common_name(self.csr.subject)

    @property
    def names(self) -> list[x509.GeneralName]:
        return identity.subject_alt_names(self.csr)

    def requested_ca(self) -> bool:
        """True if the CSR asks for basicConstraints CA:true."""
        value = self._extension_value(x509.BasicConstraints)
        return value.ca if value is not None else False

    def requested_eku(self) -> list[x509.ObjectIdentifier]:
        """The extended key usages the CSR asks for (empty if none)."""
        value = self._extension_value(x509.ExtendedKeyUsage)
        return list(value) if value is not None else []

    def _extension_value(self, kind: type[_E]) -> _E | None:
        # Same lookup as extensions.get_extension_for_class, without raising
        # ExtensionNotFound for the usual case of an absent extension (issuing
        # asks twice per certificate).
        for ext in self.csr.extensions:
            if isinstance(ext.value, kind):
                return ext.value
        return None

    def dump(self) -> bytes:
        return self.csr.public_bytes(serialization.Encoding.PEM)


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
        if raw.lstrip().startswith(b"-----BEGIN"):
            csr = x509.load_pem_x509_csr(raw)
        else:
            csr = x509.load_der_x509_csr(raw)
    except (ValueError, x509.InvalidVersion) as exc:
        raise errors.InvalidCSR(f"cannot parse the CSR ({exc}); send a PEM or DER PKCS#10 "
                                "request") from exc
    try:
        public_key = csr.public_key()
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:  # unsupported algorithm
        raise errors.KeyPolicyError(
            f"the CSR's key cannot be read ({exc}); use RSA or ECDSA P-256/P-384"
        ) from exc
    checked = keys.check_public_key(public_key)
    try:
        valid = _signature_valid(csr, checked)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise errors.InvalidCSR(f"the CSR's signature cannot be checked ({exc})") from exc
    if not valid:
        raise errors.InvalidCSR(
            "the CSR's signature does not match its public key; sign the request "
            "with the private key it names"
        )
    request = Request(csr=csr, public_key=checked)
    try:
        # The subject and the extensions are parsed when first read: malformed ones
        # (a bad string, an attribute of the wrong type, an extension twice, an unknown
        # name type) are refused here, and so is a name attribute out of its bounds,
        # which cryptography only warns of.
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            _ = request.common_name, csr.extensions
    except (ValueError, TypeError, UserWarning, x509.DuplicateExtension,
            x509.UnsupportedGeneralNameType) as exc:
        raise errors.InvalidCSR(f"the CSR has a malformed subject or extension ({exc})") \
            from exc
    return request


def _signature_valid(csr: x509.CertificateSigningRequest, public_key: keys.PublicKey) -> bool:
    """Check the CSR's self-signature with the key already read from it.

    The same check as ``csr.is_signature_valid``, which would read the public
    key a second time. The signature algorithm must fit the key: a CSR with an
    EC key and an RSA signature algorithm (or the reverse) is refused.
    """
    scheme = csr.signature_algorithm_parameters
    signature, signed = csr.signature, csr.tbs_certrequest_bytes
    try:
        if isinstance(public_key, ec.EllipticCurvePublicKey) and isinstance(scheme, ec.ECDSA):
            public_key.verify(signature, signed, scheme)
        elif isinstance(public_key, rsa.RSAPublicKey) and \
                isinstance(scheme, (padding.PKCS1v15, padding.PSS)):
            digest = csr.signature_hash_algorithm
            if digest is None:
                raise ValueError("the signature algorithm names no hash")
            public_key.verify(signature, signed, scheme, digest)
        else:
            algorithm = csr.signature_algorithm_oid.dotted_string
            raise ValueError(f"signature algorithm {algorithm} does not fit the CSR's "
                             f"{keys.describe_key(public_key)} key; sign the request with "
                             "its own key's algorithm")
    except InvalidSignature:
        return False
    return True
