"""Untrusted CSRs: each refusal names its problem, and each check can fail."""

from __future__ import annotations

import datetime as dt
import warnings

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, padding, rsa
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshtrust import errors
from meshtrust.pki import csr, issuer, keys, profiles
from meshtrust.pki import der as der_mod

NOW = dt.datetime(2026, 11, 22, 12, 0, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def signing_ca() -> issuer.CA:
    root = issuer.new_root(keys.KeyType.EC_P256, profiles.RELAY_ROOT, NOW)
    return issuer.new_intermediate(keys.KeyType.EC_P256, root, profiles.RELAY_SIGNING, NOW)


SHA256 = hashes.SHA256()


def _pem(builder: x509.CertificateSigningRequestBuilder, key: object,
         algorithm: hashes.HashAlgorithm | None = SHA256) -> bytes:
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM)  # type: ignore[arg-type]


def _named(cn: str | None = None) -> x509.CertificateSigningRequestBuilder:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else []
    return x509.CertificateSigningRequestBuilder().subject_name(x509.Name(attrs))


EC_KEY = ec.generate_private_key(ec.SECP256R1())


class TestLoadCSR:
    def test_accepts_pem_and_der(self) -> None:
        """A well-formed CSR loads from PEM and from DER with the same key."""
        built = csr.build_csr(EC_KEY, common_name="cluster-1", names=["cluster-1"])
        pem = csr.load_csr(csr.dump_csr(built))
        der = csr.load_csr(built.public_bytes(serialization.Encoding.DER))
        assert pem.common_name == der.common_name == "cluster-1"
        assert keys.public_key_der(pem.public_key) == keys.public_key_der(EC_KEY)

    def test_refuses_oversize(self) -> None:
        """A CSR over 64 KiB is refused before it is parsed."""
        with pytest.raises(errors.InvalidCSR, match="over the limit of 65536"):
            csr.load_csr(b"-----BEGIN CERTIFICATE REQUEST-----\n" + b"A" * 70000)

    def test_refuses_garbage(self) -> None:
        """Bytes that are not a CSR are refused with a parse error."""
        with pytest.raises(errors.InvalidCSR, match="cannot parse the CSR"):
            csr.load_csr(b"\x30\x03\x02\x01\x00")

    def test_refuses_empty(self) -> None:
        """An empty body is refused."""
        with pytest.raises(errors.InvalidCSR, match="empty"):
            csr.load_csr(b"")

    def test_refuses_bad_signature(self) -> None:
        """A CSR whose signature was tampered with is refused."""
        der = bytearray(csr.build_csr(EC_KEY, common_name="x").public_bytes(
            serialization.Encoding.DER))
        der[-5] ^= 0x01  # inside the signature value
        with pytest.raises(errors.InvalidCSR, match="signature"):
            csr.load_csr(bytes(der))

    @pytest.mark.parametrize("scheme", [padding.PKCS1v15(), padding.PSS(
        mgf=padding.MGF1(hashes.SHA256()), salt_length=32)], ids=["pkcs1v15", "pss"])
    def test_checks_rsa_signatures_in_either_padding(self, scheme: padding.AsymmetricPadding
                                                     ) -> None:
        """An RSA CSR signed with PKCS #1 v1.5 or PSS loads; the same one tampered is refused."""
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        signed = _named("cluster-1").sign(key, SHA256, rsa_padding=scheme)
        der = bytearray(signed.public_bytes(serialization.Encoding.DER))
        assert csr.load_csr(bytes(der)).common_name == "cluster-1"
        der[-5] ^= 0x01
        with pytest.raises(errors.InvalidCSR, match="does not match its public key"):
            csr.load_csr(bytes(der))

    def test_refuses_a_signature_algorithm_that_does_not_fit_the_key(self) -> None:
        """An EC key with an RSA signature algorithm is refused, saying which algorithm."""
        signed = _named("x").sign(EC_KEY, SHA256)
        rsa_sha256 = x509.ObjectIdentifier("1.2.840.113549.1.1.11")
        forged = der_mod.sequence(signed.tbs_certrequest_bytes,
                                  der_mod.sequence(der_mod.object_identifier(rsa_sha256),
                                                   der_mod.NULL),
                                  der_mod.bit_string(signed.signature))
        with pytest.raises(errors.InvalidCSR, match=r"1\.2\.840\.113549\.1\.1\.11 does not "
                                                    "fit the CSR's ECDSA P-256 key"):
            csr.load_csr(forged)

    def test_refuses_small_rsa(self) -> None:
        """An RSA key below 2048 bits is refused as too weak."""
        small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
        with pytest.raises(errors.KeyPolicyError, match="1024 bits is too weak"):
            csr.load_csr(_pem(_named("x"), small))

    def test_refuses_unsupported_curve(self) -> None:
        """An ECDSA key on P-521 is refused as unsupported."""
        key = ec.generate_private_key(ec.SECP521R1())
        with pytest.raises(errors.KeyPolicyError, match="secp521r1 is not supported"):
            csr.load_csr(_pem(_named("x"), key, hashes.SHA512()))

    def test_refuses_unsupported_key_type(self) -> None:
        """An Ed25519 or DSA key is refused as an unsupported type."""
        with pytest.raises(errors.KeyPolicyError, match="not supported"):
            csr.load_csr(_pem(_named("x"), ed25519.Ed25519PrivateKey.generate(), None))
        with warnings.catch_warnings():  # cryptography deprecates DSA (from 51 on)
            warnings.simplefilter("ignore", CryptographyDeprecationWarning)
            dsa_csr = _pem(_named("x"), dsa.generate_private_key(key_size=2048))
        with pytest.raises(errors.KeyPolicyError, match="DSA is not supported"):
            csr.load_csr(dsa_csr)


class TestIssuePolicy:
    def test_client_csr_for_another_cluster_is_refused(self, signing_ca: issuer.CA) -> None:
        """A relay client CSR whose CN is not the registered cluster is refused."""
        request = csr.load_csr(_pem(_named("cluster-2"), EC_KEY))
        with pytest.raises(errors.ProfileViolation, match="'cluster-2' is not the cluster name"):
            issuer.issue(request, signing_ca, profiles.RELAY_CLIENT, NOW,
                         subject=issuer.Subject(cluster="cluster-1"))

    def test_client_csr_with_foreign_san_is_refused(self, signing_ca: issuer.CA) -> None:
        """A relay client CSR naming a SAN other than the cluster is refused."""
        built = csr.build_csr(EC_KEY, common_name="cluster-1",
                              names=["cluster-1", "mgmt.gloo-mesh"])
        with pytest.raises(errors.ProfileViolation, match="DNS:mgmt.gloo-mesh"):
            issuer.issue(csr.load_csr(csr.dump_csr(built)), signing_ca, profiles.RELAY_CLIENT,
                         NOW, subject=issuer.Subject(cluster="cluster-1"))

    def test_leaf_asking_for_ca_is_refused(self, signing_ca: issuer.CA) -> None:
        """A leaf CSR asking for basicConstraints CA:true is refused."""
        built = csr.build_csr(EC_KEY, common_name="cluster-1", ca=True)
        with pytest.raises(errors.ProfileViolation, match="CA:true"):
            issuer.issue(csr.load_csr(csr.dump_csr(built)), signing_ca, profiles.RELAY_CLIENT,
                         NOW, subject=issuer.Subject(cluster="cluster-1"))

    def test_leaf_asking_for_extra_eku_is_refused(self, signing_ca: issuer.CA) -> None:
        """A relay client CSR asking for serverAuth or codeSigning is refused."""
        builder = _named("cluster-1").add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH,
                                   ExtendedKeyUsageOID.CODE_SIGNING]), critical=False)
        with pytest.raises(errors.ProfileViolation, match="codeSigning"):
            issuer.issue(csr.load_csr(_pem(builder, EC_KEY)), signing_ca,
                         profiles.RELAY_CLIENT, NOW, subject=issuer.Subject(cluster="cluster-1"))

    def test_allowed_eku_and_names_pass(self, signing_ca: issuer.CA) -> None:
        """A client CSR that asks only for what the profile grants is signed."""
        builder = _named("cluster-1").add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        cert = issuer.issue(csr.load_csr(_pem(builder, EC_KEY)), signing_ca,
                            profiles.RELAY_CLIENT, NOW, subject=issuer.Subject(cluster="cluster-1"))
        assert cert.subject.rfc4514_string() == "CN=cluster-1"

    def test_issuer_decides_extensions(self, signing_ca: issuer.CA) -> None:
        """Extensions the CSR asks for (SANs, key usage) never reach the certificate."""
        builder = _named("cluster-1").add_extension(
            x509.KeyUsage(digital_signature=True, content_commitment=True,
                          key_encipherment=True, data_encipherment=True, key_agreement=True,
                          key_cert_sign=True, crl_sign=True, encipher_only=False,
                          decipher_only=False), critical=True)
        cert = issuer.issue(csr.load_csr(_pem(builder, EC_KEY)), signing_ca,
                            profiles.RELAY_CLIENT, NOW, subject=issuer.Subject(cluster="cluster-1"))
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        assert not ku.key_cert_sign and not ku.crl_sign and not ku.content_commitment

    def test_not_after_is_clamped_to_the_issuer(self, signing_ca: issuer.CA) -> None:
        """A requested lifetime beyond the issuer's expiry ends at the issuer's notAfter."""
        request = csr.load_csr(csr.dump_csr(csr.build_csr(EC_KEY, common_name="cluster-1")))
        cert = issuer.issue(request, signing_ca, profiles.RELAY_CLIENT, NOW,
                            lifetime=dt.timedelta(days=365 * 50),
                            subject=issuer.Subject(cluster="cluster-1"))
        assert cert.not_valid_after_utc == signing_ca.certificate.not_valid_after_utc
        assert cert.not_valid_before_utc < NOW

    def test_serials_are_random_positive_128_bit(self, signing_ca: issuer.CA) -> None:
        """Serials are positive, at most 128 bits, and differ between certificates."""
        request = csr.load_csr(csr.dump_csr(csr.build_csr(EC_KEY)))
        serials = {issuer.issue(request, signing_ca, profiles.RELAY_SERVER, NOW).serial_number
                   for _ in range(20)}
        assert len(serials) == 20
        assert all(0 < s < 2**128 for s in serials)

    def test_expired_issuer_refuses(self, signing_ca: issuer.CA) -> None:
        """Issuing after the issuer's notAfter is refused with a ChainError."""
        request = csr.load_csr(csr.dump_csr(csr.build_csr(EC_KEY)))
        later = signing_ca.certificate.not_valid_after_utc + dt.timedelta(seconds=1)
        with pytest.raises(errors.ChainError, match="expired"):
            issuer.issue(request, signing_ca, profiles.RELAY_SERVER, later)

    def test_ca_key_must_match(self, signing_ca: issuer.CA) -> None:
        """A CA whose key is not its certificate's is refused."""
        with pytest.raises(errors.ChainError, match="does not match"):
            issuer.CA(certificate=signing_ca.certificate, key=EC_KEY)


class TestKeys:
    @pytest.mark.parametrize("key_type", [keys.KeyType.RSA_2048, keys.KeyType.EC_P256,
                                          keys.KeyType.EC_P384])
    def test_round_trip_with_passphrase(self, key_type: keys.KeyType) -> None:
        """RSA and both curves dump to encrypted PKCS#8 and load back."""
        key = keys.generate_key(key_type)
        pem = keys.dump_private_key(key, b"s3cret")
        assert b"ENCRYPTED PRIVATE KEY" in pem
        assert keys.public_key_der(keys.load_private_key(pem, b"s3cret")) == \
            keys.public_key_der(key)

    def test_wrong_passphrase_is_refused(self) -> None:
        """Loading an encrypted key with the wrong passphrase says so."""
        pem = keys.dump_private_key(EC_KEY, b"right")
        with pytest.raises(errors.KeyPolicyError, match="wrong passphrase"):
            keys.load_private_key(pem, b"wrong")

    def test_missing_passphrase_is_explained(self) -> None:
        """Loading an encrypted key without a passphrase asks for one."""
        pem = keys.dump_private_key(EC_KEY, b"right")
        with pytest.raises(errors.KeyPolicyError, match="give its passphrase"):
            keys.load_private_key(pem)

    def test_key_families_are_isinstance_answers(self) -> None:
        """``is_rsa_public``/``is_ec_public`` answer as ``isinstance`` does, for public keys,
        private keys, other key types and other objects, asked twice."""
        rsa_key = keys.generate_key(keys.KeyType.RSA_2048)
        things: list[object] = [rsa_key.public_key(), EC_KEY.public_key(), rsa_key, EC_KEY,
                                ed25519.Ed25519PrivateKey.generate().public_key(), b"key", None]
        for _ in range(2):
            for thing in things:
                assert keys.is_rsa_public(thing) == isinstance(thing, rsa.RSAPublicKey)
                assert keys.is_ec_public(thing) == isinstance(thing, ec.EllipticCurvePublicKey)

    def test_key_type_parse(self) -> None:
        """Key types parse from their names and aliases; unknown names list the choices."""
        assert keys.KeyType.parse("RSA-4096") is keys.KeyType.RSA_4096
        assert keys.KeyType.parse("p256") is keys.KeyType.EC_P256
        with pytest.raises(errors.ConfigError, match="ecdsa-p384"):
            keys.KeyType.parse("ed25519")
