"""Certificates as PEM, chains in order, and fingerprints.

A bundle is the set of files a secret holds: the ``cacerts`` form
(``ca-cert.pem``, ``ca-key.pem``, ``root-cert.pem``, ``cert-chain.pem``) or
the ``kubernetes.io/tls`` form (``tls.crt``, ``tls.key``, ``ca.crt``).
``load_bundle`` reads either from a mapping of key → bytes.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization

from meshtrust import errors
from meshtrust.pki import identity, keys

CACERTS_KEYS = ("ca-cert.pem", "ca-key.pem", "root-cert.pem", "cert-chain.pem")
TLS_KEYS = ("tls.crt", "tls.key", "ca.crt")


def dump_certificate(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def dump_certificates(certificates: Iterable[x509.Certificate]) -> bytes:
    return b"".join(dump_certificate(c) for c in certificates)


def load_certificates(data: bytes, what: str = "certificate file") -> list[x509.Certificate]:
    """Parse every PEM certificate in ``data`` (or one DER); raise ChainError if none."""
    try:
        if b"-----BEGIN" in data:
            found = x509.load_pem_x509_certificates(data)
        else:
            found = [x509.load_der_x509_certificate(data)]
        for certificate in found:
            # Read when first used: a key, a name or an extension that cannot be read
            # is refused here rather than wherever the certificate is used.
            _ = (certificate.public_key(), certificate.subject, certificate.issuer,
                 certificate.extensions)
    except (ValueError, TypeError, x509.InvalidVersion, UnsupportedAlgorithm,
            x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as exc:
        raise errors.ChainError(f"{what} holds no readable certificate ({exc})") from exc
    return list(found)


def load_certificate(data: bytes, what: str = "certificate file") -> x509.Certificate:
    """The first certificate in ``data``."""
    return load_certificates(data, what)[0]


def fingerprint(certificate: x509.Certificate) -> str:
    """SHA-256 fingerprint, upper-case hex pairs joined by colons, as openssl prints it."""
    return certificate.fingerprint(hashes.SHA256()).hex(":").upper()


def path_length(certificate: x509.Certificate) -> int | None:
    """How many CA levels ``certificate`` allows below it (None: no limit, or no CA)."""
    try:
        return certificate.extensions.get_extension_for_class(
            x509.BasicConstraints).value.path_length
    except x509.ExtensionNotFound:
        return None


@functools.lru_cache(maxsize=64)
def roots_fingerprint(roots: bytes) -> str:
    """One fingerprint for a set of roots (a trust bundle), whatever their order in the PEM.

    Remembered for the last few bundles: every relay issuance records the fingerprint of
    the same bundle, and parsing it is most of the cost.
    """
    prints = sorted(fingerprint(c) for c in load_certificates(roots, "roots"))
    return hashlib.sha256(",".join(prints).encode()).hexdigest()


def summary(certificate: x509.Certificate, now: dt.datetime) -> dict[str, Any]:
    """A certificate as plain values, for tables, JSON and status reports."""
    try:
        bc = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
        is_ca, path_length = bc.ca, bc.path_length
    except x509.ExtensionNotFound:
        is_ca, path_length = False, None
    left = certificate.not_valid_after_utc - now
    return {
        "subject": certificate.subject.rfc4514_string() or "(empty)",
        "issuer": certificate.issuer.rfc4514_string() or "(empty)",
        "serial": f"{certificate.serial_number:x}",
        "sans": [identity.format_name(n) for n in identity.subject_alt_names(certificate)],
        "key": keys.describe_key(certificate.public_key()),
        "ca": is_ca,
        "path_length": path_length,
        "not_before": certificate.not_valid_before_utc.isoformat(),
        "not_after": certificate.not_valid_after_utc.isoformat(),
        "days_left": int(left.total_seconds() // 86400),
        "fingerprint_sha256": fingerprint(certificate),
    }


def is_self_signed(certificate: x509.Certificate) -> bool:
    if certificate.subject != certificate.issuer:
        return False
    try:
        certificate.verify_directly_issued_by(certificate)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def issued_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    """True if ``parent`` signed ``child`` (names match and the signature verifies)."""
    if child.issuer != parent.subject:
        return False
    try:
        child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def order_chain(leaf: x509.Certificate,
                pool: Sequence[x509.Certificate]) -> list[x509.Certificate]:
    """Walk from ``leaf`` upward through ``pool``; return leaf first, as far as it goes."""
    path = [leaf]
    remaining = [c for c in pool if c != leaf]
    while not is_self_signed(path[-1]):
        parent = next((c for c in remaining if issued_by(path[-1], c)), None)
        if parent is None:
            break
        path.append(parent)
        remaining.remove(parent)
    return path


@dataclasses.dataclass(frozen=True, kw_only=True)
class Bundle:
    """A certificate with its key (if present), its chain and its trust anchors."""

    certificate: x509.Certificate
    key: keys.PrivateKey | None
    intermediates: tuple[x509.Certificate, ...]
    roots: tuple[x509.Certificate, ...]
    form: str


def load_bundle(files: Mapping[str, bytes], passphrase: bytes | None = None) -> Bundle:
    """Read a secret's files in the ``cacerts`` or ``tls`` form; raise ChainError if neither."""
    if "ca-cert.pem" in files:
        cert_key, key_key, root_key, chain_key, form = (
            "ca-cert.pem", "ca-key.pem", "root-cert.pem", "cert-chain.pem", "cacerts")
    elif "tls.crt" in files:
        cert_key, key_key, root_key, chain_key, form = (
            "tls.crt", "tls.key", "ca.crt", "tls.crt", "tls")
    else:
        raise errors.ChainError(
            "no certificate found: expected cacerts files (ca-cert.pem, ca-key.pem, "
            "root-cert.pem, cert-chain.pem) or tls files (tls.crt, tls.key, ca.crt)"
        )
    certs = load_certificates(files[cert_key], cert_key)
    certificate = certs[0]
    chain = load_certificates(files[chain_key], chain_key) if chain_key in files else certs
    roots = tuple(load_certificates(files[root_key], root_key)) if root_key in files else ()
    intermediates = tuple(c for c in [*certs[1:], *chain]
                          if c != certificate and c not in roots and not is_self_signed(c))
    # Deduplicate while keeping order.
    seen: list[x509.Certificate] = []
    for c in intermediates:
        if c not in seen:
            seen.append(c)
    key = keys.load_private_key(files[key_key], passphrase) if key_key in files else None
    return Bundle(certificate=certificate, key=key, intermediates=tuple(seen), roots=roots,
                  form=form)
