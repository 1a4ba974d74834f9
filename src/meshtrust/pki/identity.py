"""Names in certificates: the one place that reads identity strings.

An identity string is a DNS name (``cluster-1``, ``*.gloo-mesh``), an IP
address, or a URI such as a SPIFFE ID (``spiffe://cluster.local/ns/x/sa/y``).
"""

from __future__ import annotations

import ipaddress
import re

from cryptography import x509

from meshtrust import errors

# Labels of letters, digits and inner dashes, at most 63 long; a first label may be "*";
# trailing dots are allowed.
_LABEL = r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?"
_DNS_NAME = re.compile(rf"(?:\*|{_LABEL})(?:\.{_LABEL})*\.*", re.IGNORECASE)
_SPIFFE_SEGMENT = re.compile(r"^[A-Za-z0-9._-]+$")
_TRUST_DOMAIN = re.compile(r"^[a-z0-9._-]+$")


def spiffe_id(trust_domain: str, namespace: str, service_account: str) -> str:
    """The SPIFFE ID of a Kubernetes service account: ``spiffe://td/ns/NS/sa/SA``."""
    if not _TRUST_DOMAIN.match(trust_domain):
        raise errors.ConfigError(
            f"trust domain {trust_domain!r} is invalid; use lower-case letters, digits, "
            "dots, dashes and underscores"
        )
    for label, value in (("namespace", namespace), ("service account", service_account)):
        if not _SPIFFE_SEGMENT.match(value):
            raise errors.ConfigError(f"{label} {value!r} cannot be part of a SPIFFE ID")
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"


def is_dns_name(text: str) -> bool:
    """True if ``text`` is a valid DNS name, with an optional leading ``*.`` label."""
    return 0 < len(text) <= 253 and _DNS_NAME.fullmatch(text) is not None


def parse_name(text: str) -> x509.GeneralName:
    """Turn an identity string into a subjectAltName entry.

    ``spiffe://…`` and other ``scheme://`` strings become URIs; IP addresses
    become IP entries; everything else must be a DNS name.
    """
    value = text.strip()
    if "://" in value:
        return x509.UniformResourceIdentifier(value)
    try:
        return x509.IPAddress(ipaddress.ip_address(value))
    except ValueError:
        pass
    if not is_dns_name(value):
        raise errors.ConfigError(f"{text!r} is not a DNS name, IP address or URI")
    return x509.DNSName(value.lower())


def format_name(name: x509.GeneralName) -> str:
    """The identity string of a subjectAltName entry, prefixed as openssl prints it."""
    if isinstance(name, x509.DNSName):
        return f"DNS:{name.value}"
    if isinstance(name, x509.UniformResourceIdentifier):
        return f"URI:{name.value}"
    if isinstance(name, x509.IPAddress):
        return f"IP:{name.value}"
    if isinstance(name, x509.RFC822Name):
        return f"email:{name.value}"
    return f"{type(name).__name__}:{name.value}"


def subject_alt_names(
    item: x509.Certificate | x509.CertificateSigningRequest,
) -> list[x509.GeneralName]:
    """The subjectAltName entries of a certificate or CSR (empty if it has none)."""
    try:
        ext = item.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return list(ext.value)


def common_name(name: x509.Name) -> str | None:
    """The first commonName of ``name``, or None."""
    attributes = name.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    if not attributes:
        return None
    value = attributes[0].value
    return value if isinstance(value, str) else value.decode("utf-8", "replace")
