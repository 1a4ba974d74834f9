"""AWS Private CA through boto3 against a separate fake server: hierarchies, retries, refusals.

The fake is moto patched to follow the documented API (``pca_server_main.py``) and runs
as its own process, on real HTTP on 127.0.0.1. What it issues is checked with the
openssl command line.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import re
import socket
import uuid
from pathlib import Path

import botocore.exceptions
import pytest
from cryptography import x509

import openssl_cli
import pcaserver
from meshtrust import errors
from meshtrust.pki import csr, issuer, keys, profiles
from meshtrust.providers import aws_pca, base

pytestmark = pytest.mark.slow

DAY = dt.timedelta(days=1)
CLUSTER = "cluster-1"
ISTIOD_NAMES = ("istiod.istio-system.svc", "spiffe://cluster.local/ns/istio-system/sa/istiod")


@dataclasses.dataclass(frozen=True)
class Hierarchy:
    root: str
    sub: str


@pytest.fixture
def pca(pca_server: pcaserver.Server, monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> pcaserver.Server:
    """The session's fake AWS Private CA, fake credentials, no faults and zeroed counters."""
    pcaserver.use_fake_credentials(monkeypatch, tmp_path)
    pca_server.reset()
    return pca_server


@pytest.fixture(scope="module")
def hierarchy(pca_server: pcaserver.Server,
              tmp_path_factory: pytest.TempPathFactory) -> Hierarchy:
    """A PCA root and, under it, a PCA subordinate with path length 1 (as the seed script)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        pcaserver.use_fake_credentials(monkeypatch, tmp_path_factory.mktemp("aws"))
        client = pca_server.client()
        root = client.create_root("Gloo Mesh Root CA", organizational_unit="Demo",
                                  lifetime=3650 * DAY, idempotency=_unique("root"))
        sub = client.create_subordinate(root, "Relay Intermediate CA", organization="Solo.io",
                                        path_length=1, lifetime=1825 * DAY,
                                        idempotency=_unique("sub"))
    return Hierarchy(root=root, sub=sub)


def _unique(what: str) -> str:
    return f"{what}-{uuid.uuid4()}"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _istio_request(key: keys.PrivateKey, *, lifetime: dt.timedelta = 30 * DAY,
                   idempotency_key: str | None = None) -> base.SignRequest:
    made = csr.build_csr(key, common_name="Intermediate CA", organization="Istio",
                         locality=CLUSTER, names=ISTIOD_NAMES, ca=True)
    return base.SignRequest(request=csr.load_csr(csr.dump_csr(made)),
                            profile=profiles.ISTIO_INTERMEDIATE, lifetime=lifetime,
                            subject=issuer.Subject(cluster=CLUSTER),
                            idempotency_key=idempotency_key or _unique("istio"))


def _client_request(key: keys.PrivateKey, *, lifetime: dt.timedelta = 365 * DAY,
                    idempotency_key: str | None = None) -> base.SignRequest:
    made = csr.build_csr(key, common_name=CLUSTER, names=(CLUSTER,))
    return base.SignRequest(request=csr.load_csr(csr.dump_csr(made)),
                            profile=profiles.RELAY_CLIENT, lifetime=lifetime,
                            subject=issuer.Subject(cluster=CLUSTER),
                            idempotency_key=idempotency_key or _unique("client"))


def _sign(client: aws_pca.AwsPca, arn: str, request: base.SignRequest) -> base.Signed:
    return asyncio.run(client.provider(arn).sign(request, _now()))


def _ec_key() -> keys.PrivateKey:
    return keys.generate_key(keys.KeyType.EC_P256)


def _verified(tmp: Path, cert: x509.Certificate, root: x509.Certificate,
              untrusted: tuple[x509.Certificate, ...] = (), purpose: str | None = None) -> None:
    proc = openssl_cli.verify(tmp, cert, root, untrusted, purpose=purpose)
    assert proc.stdout.strip().endswith(": OK"), proc.stdout + proc.stderr


def _extensions(tmp: Path, cert: x509.Certificate) -> dict[str, tuple[bool, str]]:
    return openssl_cli.extensions(openssl_cli.text(tmp, cert))


def _key_ids(cert: x509.Certificate) -> tuple[bytes, bytes | None]:
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    return ski, aki.key_identifier


class TestHierarchy:
    def test_root_subordinate_istio_intermediate_and_leaf_verify_with_openssl(
            self, pca: pcaserver.Server, hierarchy: Hierarchy, tmp_path: Path) -> None:
        """PCA root → PCA sub (pathlen 1) → Istio intermediate (pathlen 0) → workload verify."""
        client = pca.client()
        sub = client.adopt(hierarchy.sub)
        root = sub.root
        istio_key = _ec_key()
        istio = _sign(client, hierarchy.sub, _istio_request(istio_key))
        leaf = _sign(client, hierarchy.sub, _client_request(_ec_key()))

        assert istio.chain == (sub.certificate, root)
        assert leaf.chain == (sub.certificate, root)
        _verified(tmp_path, sub.certificate, root)
        _verified(tmp_path, istio.certificate, root, istio.chain[:-1])
        _verified(tmp_path, leaf.certificate, root, leaf.chain[:-1], purpose="sslclient")
        # The Istio intermediate really is a CA: a workload certificate it signs verifies too.
        local_ca = issuer.CA(certificate=istio.certificate, key=istio_key, chain=istio.chain)
        workload_key = _ec_key()
        workload = issuer.issue(
            csr.Request(csr=csr.build_csr(workload_key), public_key=workload_key.public_key()),
            local_ca, profiles.SPIFFE_WORKLOAD, _now(),
            subject=issuer.Subject(namespace="default", service_account="app"))
        _verified(tmp_path, workload, root, (istio.certificate, sub.certificate))

        found = _extensions(tmp_path, root)
        assert found["X509v3 Basic Constraints"] == (True, "CA:TRUE")
        assert {"X509v3 Subject Key Identifier", "X509v3 Authority Key Identifier"} <= set(found)
        found = _extensions(tmp_path, sub.certificate)
        assert found["X509v3 Basic Constraints"] == (True, "CA:TRUE, pathlen:1")
        assert found["X509v3 Key Usage"] == (True, "Digital Signature, Certificate Sign, CRL Sign")
        found = _extensions(tmp_path, istio.certificate)
        assert found["X509v3 Basic Constraints"] == (True, "CA:TRUE, pathlen:0")
        assert found["X509v3 Key Usage"] == (True, "Digital Signature, Certificate Sign, CRL Sign")
        assert found["X509v3 Subject Alternative Name"][1] == (
            f"DNS:{ISTIOD_NAMES[0]}, URI:{ISTIOD_NAMES[1]}")
        found = _extensions(tmp_path, leaf.certificate)
        assert found["X509v3 Basic Constraints"][1] == "CA:FALSE"
        assert found["X509v3 Extended Key Usage"][1] == (
            "TLS Web Server Authentication, TLS Web Client Authentication")
        for child, parent in ((sub.certificate, root), (istio.certificate, sub.certificate),
                              (leaf.certificate, sub.certificate)):
            assert _key_ids(child)[1] == _key_ids(parent)[0]

    def test_validity_is_the_lifetime_asked_for_and_never_outlives_the_ca(
            self, pca: pcaserver.Server, hierarchy: Hierarchy) -> None:
        """NotAfter is now + lifetime, clamped to the issuing CA's NotAfter."""
        client = pca.client()
        sub = client.adopt(hierarchy.sub)
        short = _sign(client, hierarchy.sub, _istio_request(_ec_key(), lifetime=30 * DAY))
        endless = _sign(client, hierarchy.sub,
                        _client_request(_ec_key(), lifetime=100 * 365 * DAY))

        expected = _now() + 30 * DAY
        assert abs(short.certificate.not_valid_after_utc - expected) < dt.timedelta(minutes=2)
        assert endless.certificate.not_valid_after_utc == sub.not_after
        assert sub.not_after <= sub.root.not_valid_after_utc

    def test_adopt_describes_the_ca_and_its_chain(
            self, pca: pcaserver.Server, hierarchy: Hierarchy) -> None:
        """adopt returns the CA certificate, its chain to the root and where the key lives."""
        described = asyncio.run(pca.client().provider(hierarchy.sub).describe())

        assert described.provider == "aws-pca"
        assert described.key_location == hierarchy.sub
        assert len(described.chain) == 1
        assert described.root.subject.rfc4514_string() == "CN=Gloo Mesh Root CA,OU=Demo"
        assert described.certificate.subject.rfc4514_string() == (
            "CN=Relay Intermediate CA,O=Solo.io")


class TestHybrid:
    def test_a_locally_held_intermediate_under_a_pca_root(
            self, pca: pcaserver.Server, hierarchy: Hierarchy, tmp_path: Path) -> None:
        """sign_ca_csr signs a local key's CA; what that CA issues locally verifies to the root."""
        key = keys.generate_key(keys.KeyType.RSA_2048)
        request = csr.dump_csr(csr.build_csr(key, common_name="relay-signing-ca", ca=True))
        certificate, chain = pca.client().sign_ca_csr(
            hierarchy.root, request, path_length=0, lifetime=365 * DAY,
            idempotency_key=_unique("hybrid"))

        root = chain[-1]
        assert len(chain) == 1 and root.subject == root.issuer
        _verified(tmp_path, certificate, root)
        local = issuer.CA(certificate=certificate, key=key, chain=chain)
        leaf_key = _ec_key()
        leaf = issuer.issue(
            csr.load_csr(csr.dump_csr(csr.build_csr(leaf_key, common_name=CLUSTER,
                                                    names=(CLUSTER,)))),
            local, profiles.RELAY_CLIENT, _now(), subject=issuer.Subject(cluster=CLUSTER))
        _verified(tmp_path, leaf, root, (certificate,), purpose="sslclient")
        assert _extensions(tmp_path, certificate)["X509v3 Basic Constraints"] == (
            True, "CA:TRUE, pathlen:0")


class TestThrottling:
    def test_throttled_issue_succeeds_after_backoff_with_one_certificate(
            self, pca: pcaserver.Server, hierarchy: Hierarchy) -> None:
        """Three throttled IssueCertificate calls, then success: four attempts, one certificate."""
        pca.inject("IssueCertificate", "ThrottlingException", count=3)
        request = _istio_request(_ec_key())
        signed = _sign(pca.client(), hierarchy.sub, request)

        token = aws_pca.idempotency_token(request.idempotency_key)
        seen = pca.counters()
        assert signed.certificate.public_key() == request.request.public_key
        assert seen.requests["IssueCertificate"] == 4
        assert seen.backend["IssueCertificate"] == 1
        assert seen.issued == {token: 1}

    def test_throttling_that_never_ends_is_tried_a_bounded_number_of_times(
            self, pca: pcaserver.Server, hierarchy: Hierarchy) -> None:
        """Endless throttling: exactly max_attempts calls (the SDK adds none), then advice."""
        pca.inject("IssueCertificate", "ThrottlingException")
        with pytest.raises(errors.ProviderError,
                           match=r"throttled IssueCertificate .* 6 times in a row; raise the "
                                 r"acm-pca IssueCertificate quota .* or lower"):
            _sign(pca.client(max_attempts=6), hierarchy.sub, _istio_request(_ec_key()))

        seen = pca.counters()
        assert seen.requests["IssueCertificate"] == 6
        assert "IssueCertificate" not in seen.backend

    def test_a_lost_response_is_retried_without_issuing_twice(
            self, pca: pcaserver.Server, hierarchy: Hierarchy) -> None:
        """IssueCertificate reaches AWS but the answer is lost: the retry gets the same one."""
        pca.inject("IssueCertificate", "ServiceUnavailable", message="Service unavailable",
                   status=503, count=1, lose_response=True)
        request = _istio_request(_ec_key())
        _sign(pca.client(), hierarchy.sub, request)

        token = aws_pca.idempotency_token(request.idempotency_key)
        seen = pca.counters()
        assert seen.issue_calls == {token: 2}
        assert seen.issued == {token: 1}

    def test_throttled_waiter_polls_are_retried(
            self, pca: pcaserver.Server, hierarchy: Hierarchy) -> None:
        """GetCertificate throttled while waiting for issuance: the wait is retried, then done."""
        pca.inject("GetCertificate", "TooManyRequestsException", count=2)
        signed = _sign(pca.client(), hierarchy.sub, _client_request(_ec_key()))

        assert signed.chain
        assert pca.counters().requests["GetCertificate"] == 4  # 2 throttled, 1 poll, 1 read

    def test_every_call_against_one_ca_shares_its_rate_limit(
            self, pca: pcaserver.Server, hierarchy: Hierarchy) -> None:
        """At 4 calls a second, eight calls against one CA wait for four; another CA's do not."""
        waits: list[float] = []
        # The limits' clock stands still, as the recorded sleeps take no time: on a slow
        # machine the real one would refill the bucket between the calls.
        client = pca.client(rate_per_second=4.0, sleep=waits.append, monotonic=lambda: 0.0)
        for _ in range(4):
            client.adopt(hierarchy.sub)  # two calls each
        assert len(waits) == 4
        assert waits[-1] == pytest.approx(1.0, abs=0.1)

        client.adopt(hierarchy.root)
        assert len(waits) == 4


class TestTokenBucket:
    def test_calls_past_the_burst_wait_their_turn(self) -> None:
        """At 10 a second, ten calls pass at once and the next ones wait 0.1 s more each."""
        clock = [0.0]
        bucket = aws_pca.TokenBucket(10.0, monotonic=lambda: clock[0], sleep=lambda _: None)
        waits = [bucket.acquire() for _ in range(12)]
        assert waits[:10] == [0.0] * 10
        assert waits[10:] == pytest.approx([0.1, 0.2])

        clock[0] += 10.0
        assert bucket.acquire() == 0.0


class TestIdempotency:
    def test_the_same_key_twice_gives_the_same_certificate(
            self, pca: pcaserver.Server, hierarchy: Hierarchy) -> None:
        """A repeated request is fetched, not issued again: same serial, one IssueCertificate."""
        client = pca.client()
        request = _istio_request(_ec_key())
        first = _sign(client, hierarchy.sub, request)
        again = _sign(client, hierarchy.sub, request)

        assert again.certificate.serial_number == first.certificate.serial_number
        assert pca.counters().backend["IssueCertificate"] == 1

    def test_a_new_process_with_the_same_key_gets_the_same_certificate(
            self, pca: pcaserver.Server, hierarchy: Hierarchy) -> None:
        """Without the in-process memory, the IdempotencyToken still yields one certificate."""
        request = _istio_request(_ec_key())
        first = _sign(pca.client(), hierarchy.sub, request)
        again = _sign(pca.client(), hierarchy.sub, request)

        token = aws_pca.idempotency_token(request.idempotency_key)
        assert again.certificate.serial_number == first.certificate.serial_number
        assert pca.counters().issue_calls == {token: 2}
        assert pca.counters().issued == {token: 1}

    def test_a_retry_after_a_failed_fetch_does_not_issue_again(
            self, pca: pcaserver.Server, hierarchy: Hierarchy) -> None:
        """Issued but not fetched (GetCertificate denied): the retry only fetches."""
        client = pca.client()
        request = _client_request(_ec_key())
        pca.inject("GetCertificate", "AccessDeniedException", message="not authorized")
        with pytest.raises(errors.ProviderError, match="acm-pca:GetCertificate"):
            _sign(client, hierarchy.sub, request)
        pca.clear_faults()
        signed = _sign(client, hierarchy.sub, request)

        assert signed.certificate.public_key() == request.request.public_key
        assert pca.counters().issue_calls == {
            aws_pca.idempotency_token(request.idempotency_key): 1}

    def test_one_key_for_two_csrs_is_refused(
            self, pca: pcaserver.Server, hierarchy: Hierarchy) -> None:
        """Reusing an idempotency key for another CSR is a caller's bug, not a second request."""
        client = pca.client()
        _sign(client, hierarchy.sub, _client_request(_ec_key(), idempotency_key="k-1"))
        with pytest.raises(ValueError, match="already used for another CSR"):
            _sign(client, hierarchy.sub, _client_request(_ec_key(), idempotency_key="k-1"))


class TestMisconfiguration:
    def test_access_denied_names_the_action_the_ca_and_the_permission(
            self, pca: pcaserver.Server, hierarchy: Hierarchy) -> None:
        """AccessDenied on IssueCertificate says which permission to grant on which CA."""
        pca.inject("IssueCertificate", "AccessDeniedException",
                   message="User: arn:aws:iam::123456789012:user/ci is not authorized to "
                           "perform: acm-pca:IssueCertificate")
        with pytest.raises(errors.ProviderError,
                           match=f"denied acm-pca:IssueCertificate on {re.escape(hierarchy.sub)}"
                                 r".*grant the caller's IAM identity the permission "
                                 r"acm-pca:IssueCertificate"):
            _sign(pca.client(), hierarchy.sub, _client_request(_ec_key()))
        assert pca.counters().requests["IssueCertificate"] == 1  # not retried

    def test_a_ca_in_another_region_says_which_region_to_pass(
            self, pca: pcaserver.Server, hierarchy: Hierarchy) -> None:
        """A us-east-1 ARN with a eu-west-1 client: refused before any call, naming --region."""
        client = pca.client(region="eu-west-1")
        with pytest.raises(errors.ProviderError, match="is in region us-east-1, but this client "
                                                      "uses eu-west-1; pass --region us-east-1"):
            client.adopt(hierarchy.sub)
        with pytest.raises(errors.ProviderError, match="pass --region us-east-1"):
            _sign(client, hierarchy.sub, _client_request(_ec_key()))
        assert pca.counters().requests == {}

    def test_a_ca_never_activated_is_refused_with_its_state(
            self, pca: pcaserver.Server) -> None:
        """A CA still pending its certificate cannot be adopted; the message says how to fix."""
        arn = pca.boto3().create_certificate_authority(
            CertificateAuthorityConfiguration={
                "KeyAlgorithm": "RSA_2048", "SigningAlgorithm": "SHA256WITHRSA",
                "Subject": {"CommonName": "never activated"}},
            CertificateAuthorityType="SUBORDINATE")["CertificateAuthorityArn"]
        client = pca.client()
        with pytest.raises(errors.ProviderError,
                           match="is PENDING_CERTIFICATE, not ACTIVE.*"
                                 "import-certificate-authority-certificate"):
            client.adopt(arn)
        with pytest.raises(errors.ProviderError, match="PENDING_CERTIFICATE"):
            _sign(client, arn, _client_request(_ec_key()))
        assert "IssueCertificate" not in pca.counters().requests

    def test_a_disabled_ca_refuses_to_sign_and_says_how_to_enable_it(
            self, pca: pcaserver.Server) -> None:
        """A DISABLED CA: sign is refused with the state and the command that enables it."""
        client = pca.client()
        arn = client.create_root("soon disabled", lifetime=30 * DAY,
                                 idempotency=_unique("disabled"))
        pca.boto3().update_certificate_authority(CertificateAuthorityArn=arn, Status="DISABLED")
        with pytest.raises(errors.ProviderError,
                           match=rf"{re.escape(arn)} is DISABLED, not ACTIVE.*"
                                 r"update-certificate-authority .*--status ACTIVE"):
            _sign(client, arn, _client_request(_ec_key()))
        assert pca.counters().requests.get("IssueCertificate", 0) == 1  # the root's own

    def test_an_unknown_ca_names_the_region_to_check(self, pca: pcaserver.Server) -> None:
        """ResourceNotFound: no such CA in the region; check the ARN and --region."""
        arn = f"arn:aws:acm-pca:us-east-1:123456789012:certificate-authority/{uuid.uuid4()}"
        with pytest.raises(errors.ProviderError,
                           match="no such certificate authority in region us-east-1.*--region"):
            pca.client().adopt(arn)

    def test_missing_credentials_say_how_to_provide_them(
            self, pca: pcaserver.Server, hierarchy: Hierarchy,
            monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        """No credentials anywhere: the message lists the ways to provide them."""
        pcaserver.use_fake_credentials(monkeypatch, tmp_path, credentials=False)
        with pytest.raises(errors.ProviderError,
                           match="no AWS credentials found.*AWS_ACCESS_KEY_ID.*AWS_PROFILE"):
            pca.client().adopt(hierarchy.sub)

    def test_an_unreachable_endpoint_is_named(
            self, pca: pcaserver.Server, hierarchy: Hierarchy) -> None:
        """Nothing listens at the endpoint: the message names it."""
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        client = aws_pca.AwsPca("us-east-1", endpoint_url=f"http://127.0.0.1:{port}")
        with pytest.raises(errors.ProviderError,
                           match=f"cannot reach AWS Private CA at http://127.0.0.1:{port}"):
            client.adopt(hierarchy.sub)

    def test_a_malformed_arn_and_a_root_profile_are_refused(
            self, pca: pcaserver.Server, hierarchy: Hierarchy) -> None:
        """Not a CA ARN: ConfigError; a root profile has no PCA template: ProviderError."""
        client = pca.client()
        with pytest.raises(errors.ConfigError, match="not an AWS Private CA ARN"):
            client.adopt("arn:aws:acm:us-east-1:123456789012:certificate/abc")
        root_request = dataclasses.replace(_istio_request(_ec_key()),
                                           profile=profiles.RELAY_ROOT)
        with pytest.raises(errors.ProviderError, match="cannot issue a relay-root certificate"):
            _sign(client, hierarchy.sub, root_request)


class TestFake:
    def test_the_fake_refuses_to_issue_from_a_disabled_ca(
            self, pca: pcaserver.Server) -> None:
        """As AWS does, and moto does not: IssueCertificate on a DISABLED CA fails."""
        client = pca.client()
        arn = client.create_root("fake check", lifetime=30 * DAY, idempotency=_unique("fake"))
        raw = pca.boto3()
        raw.update_certificate_authority(CertificateAuthorityArn=arn, Status="DISABLED")
        request = csr.dump_csr(csr.build_csr(_ec_key(), common_name="x"))
        with pytest.raises(botocore.exceptions.ClientError, match="InvalidStateException"):
            raw.issue_certificate(CertificateAuthorityArn=arn, Csr=request,
                                  SigningAlgorithm="SHA256WITHRSA",
                                  Validity={"Type": "DAYS", "Value": 1})
