"""Checking certificates: chains with cryptography's verifier, bundles against profiles.

``verify_chain`` never hand-rolls path validation: it asks
``cryptography.x509.verification`` (RFC 5280 / Web PKI rules, pathlen and
EKU included). ``check_bundle`` lists, in plain words, every way a
bring-your-own bundle falls short of a profile.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from cryptography import x509
from cryptography.x509 import verification as xv

from meshtrust import errors
from meshtrust.pki import bundle as bundle_mod
from meshtrust.pki import identity, keys
from meshtrust.pki.issuer import ISTIOD_DNS, RELAY_SERVER_WILDCARD
from meshtrust.pki.profiles import Naming, Profile


def verify_chain(
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    roots: Sequence[x509.Certificate],
    now: dt.datetime,
    *,
    client_auth: bool = False,
) -> list[x509.Certificate]:
    """Verify ``leaf`` up to one of ``roots``; return the path, leaf first.

    With ``client_auth`` the leaf must be a TLS client certificate (EKU
    clientAuth, as the relay server demands). Otherwise the leaf may be any
    certificate, a CA included — which is how an Istio intermediate is
    checked against its root. Raises ChainError saying why it fails.
    """
    if not roots:
        raise errors.ChainError("no trust anchor given: provide the root certificate")
    store = xv.Store(list(roots))
    builder = xv.PolicyBuilder().store(store).time(now).max_chain_depth(8)
    if not client_auth:
        builder = builder.extension_policies(
            ca_policy=xv.ExtensionPolicy.webpki_defaults_ca(),
            ee_policy=xv.ExtensionPolicy.permit_all(),
        )
    verifier = builder.build_client_verifier()
    try:
        verified = verifier.verify(leaf, list(intermediates))
    except xv.VerificationError as exc:
        raise errors.ChainError(
            f"the chain of {_describe(leaf)} does not verify: {exc}"
        ) from exc
    return list(verified.chain)


def _describe(certificate: x509.Certificate) -> str:
    return certificate.subject.rfc4514_string() or ",".join(
        identity.format_name(n) for n in identity.subject_alt_names(certificate)) or "(no name)"


def check_bundle(
    profile: Profile,
    found: bundle_mod.Bundle,
    now: dt.datetime,
    *,
    cluster: str | None = None,
    trust_domain: str = "cluster.local",
) -> list[str]:
    """Every problem of ``found`` against ``profile``, in plain words (empty when good)."""
    problems: list[str] = []
    cert = found.certificate
    if found.key is None:
        problems.append("the private key is missing")
    elif not keys.key_matches(cert, found.key):
        problems.append("the private key does not match the certificate")
    if not found.roots:
        problems.append("the root certificate is missing")
    else:
        try:
            path = verify_chain(cert, found.intermediates, found.roots, now)
        except errors.ChainError as exc:
            problems.append(str(exc))
        else:
            issuer = path[1] if len(path) > 1 else cert
            if cert.not_valid_after_utc > issuer.not_valid_after_utc:
                problems.append(
                    f"the certificate outlives its issuer: it expires "
                    f"{cert.not_valid_after_utc:%Y-%m-%d}, the issuer "
                    f"{issuer.not_valid_after_utc:%Y-%m-%d}")
    if cert.not_valid_after_utc <= now:
        problems.append(f"the certificate expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M}")
    try:
        keys.check_public_key(cert.public_key())
    except errors.KeyPolicyError as exc:
        problems.append(str(exc))
    problems.extend(_check_constraints(profile, cert))
    problems.extend(_check_usages(profile, cert))
    problems.extend(_check_names(profile, cert, cluster, trust_domain))
    return problems


def _extension(cert: x509.Certificate,
               kind: type[x509.ExtensionType]) -> x509.Extension[Any] | None:
    try:
        return cert.extensions.get_extension_for_class(kind)
    except x509.ExtensionNotFound:
        return None


def _check_constraints(profile: Profile, cert: x509.Certificate) -> list[str]:
    ext = _extension(cert, x509.BasicConstraints)
    if ext is None:
        return ["basicConstraints is missing"]
    bc: x509.BasicConstraints = ext.value
    problems = []
    if bc.ca != profile.is_ca:
        want = "CA:true" if profile.is_ca else "CA:false"
        problems.append(f"basicConstraints must be {want} for {profile.name}, "
                        f"found CA:{str(bc.ca).lower()}")
    if profile.is_ca and not ext.critical:
        problems.append("basicConstraints must be critical on a CA certificate")
    if (profile.is_ca and profile.path_length is not None and bc.ca
            and (bc.path_length is None or bc.path_length > profile.path_length)):
        found = "unlimited" if bc.path_length is None else bc.path_length
        problems.append(f"pathlen must be at most {profile.path_length}, found {found}")
    return problems


def _check_usages(profile: Profile, cert: x509.Certificate) -> list[str]:
    problems = []
    ext = _extension(cert, x509.KeyUsage)
    if ext is None:
        problems.append("keyUsage is missing")
    else:
        usage: x509.KeyUsage = ext.value
        for name in sorted(profile.key_usage):
            if name == "key_encipherment" and not _is_rsa(cert):
                continue  # meaningless for ECDSA keys; not required
            if not getattr(usage, name):
                problems.append(f"keyUsage lacks {_usage_label(name)}")
        if not profile.is_ca and usage.key_cert_sign:
            problems.append("keyUsage keyCertSign is not allowed on a leaf certificate")
    eku_ext = _extension(cert, x509.ExtendedKeyUsage)
    if profile.extended_key_usage:
        present = list(eku_ext.value) if eku_ext else []
        for oid in profile.extended_key_usage:
            if eku_ext is not None and oid not in present:
                problems.append(f"extendedKeyUsage lacks {getattr(oid, '_name', oid)}")
    return problems


def _check_names(profile: Profile, cert: x509.Certificate, cluster: str | None,
                 trust_domain: str) -> list[str]:
    names = {identity.format_name(n) for n in identity.subject_alt_names(cert)}
    wanted: list[str] = []
    if profile.naming is Naming.RELAY_SERVER:
        wanted = [f"DNS:{RELAY_SERVER_WILDCARD}"]
    elif profile.naming is Naming.RELAY_CLIENT and cluster:
        wanted = [f"DNS:{cluster}"]
    elif profile.naming is Naming.ISTIO_INTERMEDIATE:
        wanted = [f"DNS:{ISTIOD_DNS}",
                  f"URI:{identity.spiffe_id(trust_domain, 'istio-system', 'istiod')}"]
    return [f"subjectAltName lacks {w}" for w in wanted if w not in names]


def _is_rsa(cert: x509.Certificate) -> bool:
    return keys.describe_key(cert.public_key()).startswith("RSA")


def _usage_label(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.capitalize() for part in rest)


def check_issued(
    certificate: x509.Certificate,
    chain: Sequence[x509.Certificate],
    public_key: keys.PublicKey,
    profile: Profile,
    now: dt.datetime,
    *,
    cluster: str | None = None,
    trust_domain: str = "cluster.local",
) -> None:
    """Refuse a certificate an external CA returned unless it fits ``profile``.

    An external CA signs with its own templates, so what comes back is checked
    as strictly as a bring-your-own bundle: it must certify the requested key,
    chain to ``chain``'s root, and carry the profile's constraints, usages and
    names. Raises ProfileViolation listing every problem.
    """
    problems: list[str] = []
    if keys.public_key_der(certificate.public_key()) != keys.public_key_der(public_key):  # type: ignore[arg-type]
        problems.append("it certifies another public key than the one requested")
    if not chain:
        problems.append("it came without the chain to its root")
    else:
        try:
            verify_chain(certificate, chain[:-1], chain[-1:], now)
        except errors.ChainError as exc:
            problems.append(str(exc))
    problems.extend(_check_constraints(profile, certificate))
    problems.extend(_check_usages(profile, certificate))
    problems.extend(_check_names(profile, certificate, cluster, trust_domain))
    if problems:
        raise errors.ProfileViolation(
            f"the certificate {_describe(certificate)} returned by the CA does not fit the "
            f"{profile.name} profile: " + "; ".join(problems)
            + ". Check the CA's certificate template")
