"""The port every certificate authority sits behind.

A provider signs a checked CSR under one CA and describes that CA. What the
certificate may contain is decided above (the profile and the caller's
``Subject``); a provider that cannot set extensions itself (an external CA
with fixed templates) is checked afterwards by ``pki.verify.check_issued``.

``idempotency_key`` names one logical request: asking twice with the same
key must never produce two certificates.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Protocol

from cryptography import x509

from meshtrust.pki import bundle, csr, issuer, profiles


@dataclasses.dataclass(frozen=True, kw_only=True)
class SignRequest:
    """One request to sign: a checked CSR and what the certificate must be."""

    request: csr.Request
    profile: profiles.Profile
    lifetime: dt.timedelta
    subject: issuer.Subject
    idempotency_key: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class Signed:
    """A signed certificate and the certificates above it, nearest first, root last."""

    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...]
    # The certificate as PEM, when the provider has it at hand already.
    certificate_pem: bytes | None = None

    @property
    def root(self) -> x509.Certificate:
        return self.chain[-1] if self.chain else self.certificate

    def pem(self, *, root: bool) -> bytes:
        """The certificate and the chain above it as PEM, with the root or without it."""
        head = self.certificate_pem or bundle.dump_certificate(self.certificate)
        return head + bundle.dump_certificates(self.chain if root else self.chain[:-1])


@dataclasses.dataclass(frozen=True, kw_only=True)
class Description:
    """What a CA is and where its key lives."""

    provider: str                        # local | secret | aws-pca
    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...]  # above the CA, nearest first, root last
    key_location: str                    # e.g. "management store", "arn:aws:acm-pca:…"

    @property
    def root(self) -> x509.Certificate:
        return self.chain[-1] if self.chain else self.certificate

    @property
    def path(self) -> tuple[x509.Certificate, ...]:
        return (self.certificate, *self.chain)

    @property
    def not_after(self) -> dt.datetime:
        return self.certificate.not_valid_after_utc


class CAProvider(Protocol):
    """A certificate authority meshtrust can sign through."""

    async def describe(self) -> Description:
        """The CA's certificate, its chain to the root and where its key is kept."""
        ...

    async def sign(self, request: SignRequest, now: dt.datetime) -> Signed:
        """Sign ``request``; raise ProviderError (or a PKIError) if it cannot be done."""
        ...


class ExternalCA(Protocol):
    """An external CA service that can make CAs (AWS Private CA): what ``meshtrust init``
    needs. Its calls block; callers run them in a thread."""

    def create_root(self, *, common_name: str, lifetime: dt.timedelta,
                    idempotency: str) -> str: ...

    def create_subordinate(self, *, parent_arn: str, common_name: str, path_length: int,
                           lifetime: dt.timedelta, idempotency: str) -> str: ...

    def sign_ca_csr(self, *, parent_arn: str, csr_pem: bytes, path_length: int,
                    lifetime: dt.timedelta, idempotency_key: str,
                    ) -> tuple[x509.Certificate, tuple[x509.Certificate, ...]]: ...

    def adopt(self, arn: str) -> Description: ...

    def provider(self, arn: str) -> CAProvider: ...
