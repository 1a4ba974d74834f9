"""AWS Private CA as a certificate authority: setting CAs up, adopting them, signing through them.

This is the one module that imports boto3 and botocore. It exists so the rest of
meshtrust sees AWS Private CA as one more ``CAProvider`` and never sees the SDK:

* Retries happen here and nowhere else. botocore's own retries are switched off,
  because two retrying layers multiply: a peer project whose SDK and controller
  both retried sent ten calls for every one while it was being throttled.
* Every call against one CA, waiter polls included, draws from that CA's token
  bucket, so many concurrent signings stay under the CA's request-rate quota.
* One request issues at most one certificate. The IdempotencyToken is derived
  from the request's idempotency key, and the certificate ARN is remembered in
  process, so a retry after a lost response fetches rather than issues again
  (AWS itself forgets idempotency tokens after a few minutes).
* Every SDK failure becomes a ``ProviderError`` whose message names the fix.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import datetime as dt
import hashlib
import logging
import random
import re
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import boto3
import botocore.config
import botocore.exceptions
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshtrust import clock as clock_module
from meshtrust import errors
from meshtrust.pki import bundle, issuer, keys, profiles
from meshtrust.pki import csr as csr_mod
from meshtrust.providers import base

log = logging.getLogger(__name__)

_T = TypeVar("_T")

PROVIDER = "aws-pca"
ROOT_TEMPLATE = "RootCACertificate/V1"
END_ENTITY_TEMPLATE = "EndEntityCertificate/V1"
RETRYABLE_CODES = frozenset({"ThrottlingException", "TooManyRequestsException",
                             "RequestInProgressException"})
RETRYABLE_STATUS = frozenset({429, 503})
_THROTTLED = frozenset({"ThrottlingException", "TooManyRequestsException"})
# The signature algorithm that goes with each key algorithm AWS Private CA offers.
SIGNING_ALGORITHMS = {
    "RSA_2048": "SHA256WITHRSA", "RSA_3072": "SHA256WITHRSA", "RSA_4096": "SHA256WITHRSA",
    "EC_prime256v1": "SHA256WITHECDSA", "EC_secp384r1": "SHA384WITHECDSA",
    "EC_secp521r1": "SHA512WITHECDSA", "SM2": "SM3WITHSM2",
}
# What to do about a CA in each state but ACTIVE.
_STATE_FIX = {
    "CREATING": "it is still being created; wait a minute and try again",
    "PENDING_CERTIFICATE": "it has no CA certificate installed yet; install one with "
                           "'aws acm-pca import-certificate-authority-certificate' "
                           "(meshtrust init does this for the CAs it creates)",
    "DISABLED": "enable it with 'aws acm-pca update-certificate-authority "
                "--certificate-authority-arn {arn} --status ACTIVE'",
    "EXPIRED": "its CA certificate expired; install a renewed one with "
               "'aws acm-pca import-certificate-authority-certificate'",
    "FAILED": "its creation failed; delete it and create a new CA",
    "DELETED": "it is scheduled for deletion; restore it with 'aws acm-pca "
               "restore-certificate-authority', then enable it",
}
_ARN = re.compile(r"^arn:(?P<partition>aws[a-z-]*):acm-pca:(?P<region>[a-z0-9-]+):"
                  r"(?P<account>\d{12}):certificate-authority/(?P<id>[0-9A-Za-z-]+)$")
_REMEMBERED = 4096   # certificate ARNs kept for retries, most recent first
_STRIPES = 64        # locks that keep two signings of one key from both issuing


@dataclasses.dataclass(frozen=True, kw_only=True)
class Arn:
    """A CA's ARN, taken apart: arn:PARTITION:acm-pca:REGION:ACCOUNT:certificate-authority/ID."""

    text: str
    partition: str
    region: str
    account: str

    @classmethod
    def parse(cls, text: str) -> Arn:
        """Read a CA ARN; raise ConfigError saying what one looks like if ``text`` is not one."""
        match = _ARN.match(text.strip())
        if match is None:
            raise errors.ConfigError(
                f"{text!r} is not an AWS Private CA ARN; expected "
                "arn:aws:acm-pca:REGION:ACCOUNT:certificate-authority/ID")
        return cls(text=match.group(0), partition=match["partition"], region=match["region"],
                   account=match["account"])

    def template(self, name: str) -> str:
        """The ARN of the AWS-owned certificate template ``name`` in this CA's partition."""
        return f"arn:{self.partition}:acm-pca:::template/{name}"


def region_of(arn: str) -> str:
    """The region a CA ARN names (ConfigError if ``arn`` is not a CA ARN)."""
    return Arn.parse(arn).region


def idempotency_token(key: str) -> str:
    """The IdempotencyToken sent for ``key``: AWS takes 36 characters at most, keys run longer."""
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def subordinate_template(path_length: int) -> str:
    """The template for a CA certificate allowing ``path_length`` CAs below it (0 to 3)."""
    if path_length not in (0, 1, 2, 3):
        raise ValueError(f"AWS Private CA offers path lengths 0 to 3, not {path_length}")
    return f"SubordinateCACertificate_PathLen{path_length}/V1"


def template_for(profile: profiles.Profile) -> str:
    """The AWS template closest to ``profile``; ProviderError if none fits (a root, say)."""
    if not profile.is_ca:
        return END_ENTITY_TEMPLATE
    if profile.path_length is None or not 0 <= profile.path_length <= 3:
        raise errors.ProviderError(
            f"AWS Private CA cannot issue a {profile.name} certificate: its CA templates fix a "
            "path length of 0 to 3; create roots with 'meshtrust init' instead")
    return subordinate_template(profile.path_length)


class TokenBucket:
    """``rate`` calls a second, bursts of up to ``burst``; callers past that wait their turn."""

    def __init__(self, rate: float, burst: float | None = None, *,
                 monotonic: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self._rate = rate
        self._burst = burst if burst is not None else max(1.0, rate)
        self._tokens = self._burst
        self._monotonic = monotonic
        self._sleep = sleep
        self._stamp = monotonic()
        self._lock = threading.Lock()

    def acquire(self) -> float:
        """Take one token, sleeping until it is due; return how long this waited."""
        with self._lock:
            now = self._monotonic()
            self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
            self._stamp = now
            self._tokens -= 1  # a reservation: a negative balance queues later callers
            wait = -self._tokens / self._rate if self._tokens < 0 else 0.0
        if wait > 0:
            self._sleep(wait)
        return wait


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Authority:
    """What one DescribeCertificateAuthority said about a CA."""

    arn: Arn
    not_after: dt.datetime | None
    signing_algorithm: str


class AwsPca:
    """A client of AWS Private CA in one region, with one layer of retries and rate limits.

    ``rate_per_second`` is per CA. Throttled calls are retried up to
    ``max_attempts`` times with exponential backoff (``backoff_base`` doubling up
    to ``backoff_cap`` seconds, with jitter). ``waiter_delay`` is the pause
    between polls while AWS creates a CSR or a certificate.
    """

    def __init__(self, region: str, *, endpoint_url: str | None = None,
                 rate_per_second: float = 10.0, max_attempts: int = 6,
                 backoff_base: float = 0.2, backoff_cap: float = 5.0,
                 waiter_delay: float = 3.0, waiter_max_attempts: int = 60,
                 clock: clock_module.Clock | None = None,
                 sleep: Callable[[float], None] = time.sleep,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self.region = region
        self._rate = rate_per_second
        self._max_attempts = max_attempts
        self._backoff = (backoff_base, backoff_cap)
        self._waiter = {"Delay": waiter_delay, "MaxAttempts": waiter_max_attempts}
        self._clock = clock or clock_module.SystemClock()
        self._sleep = sleep
        self._monotonic = monotonic  # the rate limits' clock, which ``sleep`` waits on
        self._random = random.Random()
        self._lock = threading.Lock()
        self._buckets: dict[str, TokenBucket] = {}
        self._issued: collections.OrderedDict[tuple[str, str], tuple[str, str]] = (
            collections.OrderedDict())
        self._stripes = [threading.Lock() for _ in range(_STRIPES)]
        config = botocore.config.Config(
            region_name=region, retries={"total_max_attempts": 1, "mode": "standard"},
            connect_timeout=10, read_timeout=30)
        self._client = boto3.session.Session().client(
            "acm-pca", region_name=region, endpoint_url=endpoint_url, config=config)
        self._client.meta.events.register("before-parameter-build.acm-pca", self._before_call)

    # -- setting CAs up -----------------------------------------------------------------

    def create_root(self, common_name: str, *, lifetime: dt.timedelta, idempotency: str,
                    organization: str | None = None,
                    organizational_unit: str | None = None) -> str:
        """Create a root CA, self-sign its certificate, install it; return the ARN once ACTIVE."""
        arn = self._create("ROOT", _subject(common_name, organization, organizational_unit),
                           idempotency)
        csr_pem = self._ca_csr(arn)
        now = self._clock.now()
        validity = (issuer.backdated(now, lifetime),
                    _validity_end(now, lifetime, None, arn.text))
        cert_arn = self._issue_once(arn, csr_pem, ROOT_TEMPLATE, validity, "SHA256WITHRSA",
                                    f"{idempotency}/root-certificate")
        certificate, _ = self._fetch(arn.text, cert_arn)
        self._install(arn.text, certificate, ())
        return arn.text

    def create_subordinate(self, parent_arn: str, common_name: str, *, path_length: int,
                           lifetime: dt.timedelta, idempotency: str,
                           organization: str | None = None,
                           organizational_unit: str | None = None) -> str:
        """Create a CA signed by ``parent_arn``, install its certificate; return its ARN."""
        template = subordinate_template(path_length)
        parent = self._authority(parent_arn)
        arn = self._create("SUBORDINATE",
                           _subject(common_name, organization, organizational_unit), idempotency)
        csr_pem = self._ca_csr(arn)
        now = self._clock.now()
        validity = (issuer.backdated(now, lifetime),
                    _validity_end(now, lifetime, parent.not_after, parent_arn))
        cert_arn = self._issue_once(parent.arn, csr_pem, template, validity,
                                    parent.signing_algorithm, f"{idempotency}/ca-certificate")
        certificate, chain = self._fetch(parent_arn, cert_arn)
        self._install(arn.text, certificate, chain)
        return arn.text

    def sign_ca_csr(self, parent_arn: str, csr_pem: bytes, *, path_length: int,
                    lifetime: dt.timedelta, idempotency_key: str,
                    ) -> tuple[x509.Certificate, tuple[x509.Certificate, ...]]:
        """Sign the CSR of a CA whose key is kept elsewhere; return it and its chain.

        This is the hybrid placement: a locally held intermediate under a PCA root.
        """
        template = subordinate_template(path_length)
        request = csr_mod.load_csr(csr_pem)
        parent = self._authority(parent_arn)
        now = self._clock.now()
        validity = (issuer.backdated(now, lifetime),
                    _validity_end(now, lifetime, parent.not_after, parent_arn))
        cert_arn = self._issue_once(parent.arn, request.dump(), template, validity,
                                    parent.signing_algorithm, idempotency_key)
        return self._fetch(parent_arn, cert_arn)

    def adopt(self, arn: str) -> base.Description:
        """Describe an existing CA for use; ProviderError saying what to do unless it is ACTIVE."""
        self._authority(arn)
        response = self._call("GetCertificateAuthorityCertificate", arn,
                              lambda: self._client.get_certificate_authority_certificate(
                                  CertificateAuthorityArn=arn))
        certificate = bundle.load_certificate(str(response["Certificate"]).encode(),
                                              f"the CA certificate of {arn}")
        chain = _ordered_chain(certificate, response.get("CertificateChain"), arn)
        return base.Description(provider=PROVIDER, certificate=certificate, chain=chain,
                                key_location=arn)

    def provider(self, arn: str) -> AwsPcaProvider:
        """The ``CAProvider`` that signs through the CA ``arn``."""
        return AwsPcaProvider(self, arn)

    # -- signing ------------------------------------------------------------------------

    def sign(self, arn: str, request: base.SignRequest, now: dt.datetime) -> base.Signed:
        """Sign ``request`` with the CA ``arn`` (blocking; ``AwsPcaProvider.sign`` is async)."""
        now = clock_module.require_utc(now, "now")
        issuer.check(request.request, request.profile, request.subject)
        template = template_for(request.profile)
        authority = self._authority(arn)
        # NotBefore is ours, not AWS's default of an hour back: that would make a short
        # certificate look older than it is, and due for renewal at once.
        validity = (issuer.backdated(now, request.lifetime),
                    _validity_end(now, request.lifetime, authority.not_after, arn))
        cert_arn = self._issue_once(authority.arn, request.request.dump(), template,
                                    validity, authority.signing_algorithm,
                                    request.idempotency_key)
        certificate, chain = self._fetch(arn, cert_arn)
        if not _same_key(certificate, request.request.public_key):
            raise errors.ProviderError(
                f"AWS Private CA returned {cert_arn} for a different key than the request's; "
                "retry with a new idempotency key")
        return base.Signed(certificate=certificate, chain=chain)

    def _issue_once(self, ca: Arn, csr_pem: bytes, template: str,
                    validity: tuple[dt.datetime, dt.datetime],
                    signing_algorithm: str, key: str) -> str:
        """IssueCertificate for ``key`` unless it was issued already; return the certificate ARN."""
        digest = hashlib.sha256(csr_pem).hexdigest()
        slot = (ca.text, key)
        with self._stripes[hash(slot) % _STRIPES]:
            with self._lock:
                known = self._issued.get(slot)
            if known is not None:
                if known[1] != digest:
                    raise ValueError(f"idempotency key {key!r} was already used for another CSR")
                return known[0]
            response = self._call("IssueCertificate", ca.text,
                                  lambda: self._client.issue_certificate(
                                      CertificateAuthorityArn=ca.text, Csr=csr_pem,
                                      SigningAlgorithm=signing_algorithm,
                                      TemplateArn=ca.template(template),
                                      Validity={"Type": "ABSOLUTE",
                                                "Value": int(validity[1].timestamp())},
                                      ValidityNotBefore={"Type": "ABSOLUTE",
                                                         "Value": int(validity[0].timestamp())},
                                      IdempotencyToken=idempotency_token(key)))
            cert_arn = str(response["CertificateArn"])
            with self._lock:
                self._issued[slot] = (cert_arn, digest)
                while len(self._issued) > _REMEMBERED:
                    self._issued.popitem(last=False)
        return cert_arn

    def _fetch(self, ca_arn: str, cert_arn: str,
               ) -> tuple[x509.Certificate, tuple[x509.Certificate, ...]]:
        """Wait for a certificate to be issued, then read it and its chain, nearest first."""
        self._wait("certificate_issued", "GetCertificate", ca_arn,
                   CertificateAuthorityArn=ca_arn, CertificateArn=cert_arn)
        response = self._call("GetCertificate", ca_arn, lambda: self._client.get_certificate(
            CertificateAuthorityArn=ca_arn, CertificateArn=cert_arn))
        certificate = bundle.load_certificate(str(response["Certificate"]).encode(), cert_arn)
        return certificate, _ordered_chain(certificate, response.get("CertificateChain"), ca_arn)

    # -- CA lifecycle steps -------------------------------------------------------------

    def _create(self, kind: str, subject: dict[str, str], idempotency: str) -> Arn:
        response = self._call("CreateCertificateAuthority", None,
                              lambda: self._client.create_certificate_authority(
                                  CertificateAuthorityConfiguration={
                                      "KeyAlgorithm": "RSA_2048",
                                      "SigningAlgorithm": "SHA256WITHRSA",
                                      "Subject": subject},
                                  CertificateAuthorityType=kind,
                                  IdempotencyToken=idempotency_token(f"{idempotency}/create"),
                                  Tags=[{"Key": "Name", "Value": subject["CommonName"]},
                                        {"Key": "managed-by", "Value": "meshtrust"}]))
        return Arn.parse(str(response["CertificateAuthorityArn"]))

    def _ca_csr(self, arn: Arn) -> bytes:
        self._wait("certificate_authority_csr_created", "GetCertificateAuthorityCsr", arn.text,
                   CertificateAuthorityArn=arn.text)
        response = self._call("GetCertificateAuthorityCsr", arn.text,
                              lambda: self._client.get_certificate_authority_csr(
                                  CertificateAuthorityArn=arn.text))
        return str(response["Csr"]).encode()

    def _install(self, arn: str, certificate: x509.Certificate,
                 chain: tuple[x509.Certificate, ...]) -> None:
        extra = {"CertificateChain": bundle.dump_certificates(chain)} if chain else {}
        self._call("ImportCertificateAuthorityCertificate", arn,
                   lambda: self._client.import_certificate_authority_certificate(
                       CertificateAuthorityArn=arn,
                       Certificate=bundle.dump_certificate(certificate), **extra))
        self._authority(arn)  # ACTIVE now, or a ProviderError saying what it is instead

    def _authority(self, arn: str) -> _Authority:
        """Describe the CA ``arn``; refuse one in another region or not ACTIVE, saying why."""
        parsed = Arn.parse(arn)
        if parsed.region != self.region:
            raise errors.ProviderError(
                f"the certificate authority {arn} is in region {parsed.region}, but this client "
                f"uses {self.region}; pass --region {parsed.region}")
        response = self._call("DescribeCertificateAuthority", arn,
                              lambda: self._client.describe_certificate_authority(
                                  CertificateAuthorityArn=arn))
        ca = response["CertificateAuthority"]
        status = str(ca.get("Status", "UNKNOWN"))
        if status != "ACTIVE":
            fix = _STATE_FIX.get(status, "make it ACTIVE").format(arn=arn)
            raise errors.ProviderError(
                f"the certificate authority {arn} is {status}, not ACTIVE, so it cannot sign; "
                f"{fix}")
        config = ca.get("CertificateAuthorityConfiguration", {})
        signing = SIGNING_ALGORITHMS.get(str(config.get("KeyAlgorithm")),
                                         str(config.get("SigningAlgorithm", "SHA256WITHRSA")))
        not_after = ca.get("NotAfter")
        return _Authority(arn=parsed, signing_algorithm=signing,
                          not_after=not_after.astimezone(dt.UTC) if not_after else None)

    # -- the one retry layer ------------------------------------------------------------

    def _before_call(self, params: dict[str, Any], **_: Any) -> None:
        """Every API call, waiter polls included, takes a token from its CA's bucket."""
        arn = str(params.get("CertificateAuthorityArn") or params.get("ResourceArn") or "")
        with self._lock:
            bucket = self._buckets.get(arn)
            if bucket is None:
                bucket = self._buckets[arn] = TokenBucket(self._rate, sleep=self._sleep,
                                                          monotonic=self._monotonic)
        bucket.acquire()

    def _call(self, operation: str, arn: str | None, call: Callable[[], _T]) -> _T:
        """Run ``call``, retrying throttling with backoff; translate every SDK failure."""
        attempt = 0
        while True:
            attempt += 1
            try:
                return call()
            except (botocore.exceptions.ClientError, botocore.exceptions.WaiterError) as exc:
                code, status = _code(exc)
                if attempt < self._max_attempts and _retryable(exc, code, status):
                    base_delay, cap = self._backoff
                    ceiling = min(cap, base_delay * 2 ** (attempt - 1))
                    delay = ceiling / 2 + self._random.uniform(0, ceiling / 2)
                    log.warning("AWS Private CA answered %s to %s (attempt %d of %d); "
                                "retrying in %.2fs", code or status, operation, attempt,
                                self._max_attempts, delay)
                    self._sleep(delay)
                    continue
                raise self._error(exc, operation, arn, attempt) from exc
            except botocore.exceptions.BotoCoreError as exc:
                raise self._error(exc, operation, arn, attempt) from exc

    def _wait(self, waiter: str, operation: str, arn: str, **params: str) -> None:
        self._call(operation, arn, lambda: self._client.get_waiter(waiter).wait(
            WaiterConfig=self._waiter, **params))

    def _error(self, exc: Exception, operation: str, arn: str | None,
               attempts: int) -> errors.ProviderError:
        """The ProviderError for an SDK failure: what happened and what to change."""
        target = arn or f"region {self.region}"
        if isinstance(exc, botocore.exceptions.NoCredentialsError):
            return errors.ProviderError(
                "no AWS credentials found for AWS Private CA; set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, choose a profile with AWS_PROFILE, or run with an IAM "
                "role (instance profile, EKS IRSA or pod identity)")
        if isinstance(exc, botocore.exceptions.ConnectionError):
            endpoint = exc.kwargs.get("endpoint_url") or self._client.meta.endpoint_url
            return errors.ProviderError(
                f"cannot reach AWS Private CA at {endpoint} ({operation}); check the network "
                "and proxy settings, the --region and any --endpoint-url")
        code, status = _code(exc)
        message = _message(exc)
        if isinstance(exc, botocore.exceptions.WaiterError) and str(
                exc.kwargs.get("reason", "")).startswith("Max attempts exceeded"):
            return errors.ProviderError(
                f"AWS Private CA did not finish {operation} for {target} in time; check the "
                "CA's status with 'aws acm-pca describe-certificate-authority' and try again")
        if code in _THROTTLED or status == 429:
            return errors.ProviderError(
                f"AWS Private CA throttled {operation} on {target} {attempts} times in a row; "
                f"raise the acm-pca {operation} quota in Service Quotas or lower meshtrust's "
                f"request rate (now {self._rate:g} a second per CA)")
        if code == "RequestInProgressException" or status == 503:
            return errors.ProviderError(
                f"AWS Private CA was still busy with {operation} on {target} after {attempts} "
                "attempts; try again in a minute")
        if code in ("AccessDeniedException", "AccessDenied"):
            return errors.ProviderError(
                f"AWS denied acm-pca:{operation} on {target} ({message}); grant the caller's "
                f"IAM identity the permission acm-pca:{operation} on that resource")
        if code == "ResourceNotFoundException":
            return errors.ProviderError(
                f"no such certificate authority in region {self.region}: {target} ({message}); "
                "check the ARN and --region")
        if code == "InvalidStateException":
            return errors.ProviderError(
                f"the certificate authority {target} is not in a state that allows "
                f"{operation} ({message}); check its Status with 'aws acm-pca "
                "describe-certificate-authority' and make it ACTIVE")
        if not code and status is None:
            return errors.ProviderError(f"AWS Private CA call {operation} on {target} failed: "
                                        f"{exc}")
        return errors.ProviderError(
            f"AWS Private CA refused {operation} on {target}: {code or status}: {message}")


class AwsPcaProvider:
    """One AWS Private CA as a ``CAProvider``: its key never leaves AWS.

    The blocking SDK calls run in a worker thread, so the event loop keeps serving.
    """

    def __init__(self, pca: AwsPca, arn: str) -> None:
        self._pca = pca
        self.arn = Arn.parse(arn).text

    async def describe(self) -> base.Description:
        return await asyncio.to_thread(self._pca.adopt, self.arn)

    async def sign(self, request: base.SignRequest, now: dt.datetime) -> base.Signed:
        return await asyncio.to_thread(self._pca.sign, self.arn, request, now)


def _same_key(certificate: x509.Certificate, public_key: keys.PublicKey) -> bool:
    return certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo,
    ) == keys.public_key_der(public_key)


def _subject(common_name: str, organization: str | None,
             organizational_unit: str | None) -> dict[str, str]:
    subject = {"CommonName": common_name}
    if organization:
        subject["Organization"] = organization
    if organizational_unit:
        subject["OrganizationalUnit"] = organizational_unit
    return subject


def _validity_end(now: dt.datetime, lifetime: dt.timedelta, ca_not_after: dt.datetime | None,
                  arn: str) -> dt.datetime:
    """``now + lifetime``, clamped so that no certificate outlives its issuer."""
    if lifetime <= dt.timedelta(0):
        raise ValueError("lifetime must be positive")
    end = now + lifetime
    if ca_not_after is None:
        return end
    if ca_not_after <= now:
        raise errors.ProviderError(
            f"the CA certificate of {arn} expired at {ca_not_after.isoformat()}; install a "
            "renewed CA certificate before signing")
    return min(end, ca_not_after)


def _ordered_chain(certificate: x509.Certificate, pem: object,
                   arn: str) -> tuple[x509.Certificate, ...]:
    """The chain AWS returned, nearest first and root last; ProviderError if it stops short."""
    if not pem:
        if bundle.is_self_signed(certificate):
            return ()
        raise errors.ProviderError(
            f"AWS Private CA returned no chain for a certificate of {arn}; install the CA "
            "certificate with its full chain (import-certificate-authority-certificate)")
    pool = bundle.load_certificates(str(pem).encode(), f"the chain from {arn}")
    path = bundle.order_chain(certificate, pool)
    if not bundle.is_self_signed(path[-1]):
        raise errors.ProviderError(
            f"the chain AWS Private CA returned for {arn} does not reach a root; install the CA "
            "certificate with its full chain (import-certificate-authority-certificate)")
    return tuple(path[1:])


def _code(exc: Exception) -> tuple[str, int | None]:
    """The AWS error code and HTTP status of a ClientError or a failed waiter."""
    response = getattr(exc, "response", None) or getattr(exc, "last_response", None) or {}
    code = str(response.get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") if isinstance(
        response, dict) else None
    return code, int(status) if status is not None else None


def _message(exc: Exception) -> str:
    response = getattr(exc, "response", None) or getattr(exc, "last_response", None) or {}
    return str(response.get("Error", {}).get("Message", "") or exc) if isinstance(
        response, dict) else str(exc)


def _retryable(exc: Exception, code: str, status: int | None) -> bool:
    """Throttling and busy answers are retried; a waiter polls RequestInProgress itself."""
    if isinstance(exc, botocore.exceptions.WaiterError):
        return code in _THROTTLED or status in RETRYABLE_STATUS
    return code in RETRYABLE_CODES or status in RETRYABLE_STATUS
