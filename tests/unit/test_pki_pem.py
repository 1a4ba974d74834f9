"""Reading a CSR cheaply: plain PEM decoded directly (anything else goes to cryptography's
reader), the key's DER reused only in the form cryptography writes, DNS names checked in one
expression; and a certificate just signed written as PEM from its DER."""

from __future__ import annotations

import datetime as dt
import hashlib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from meshtrust import errors
from meshtrust.pki import csr, der, identity, issuer, keys, pem, profiles

LABELS = (b"CERTIFICATE REQUEST", b"NEW CERTIFICATE REQUEST")
KEY = ec.generate_private_key(ec.SECP256R1())
REQUEST = csr.build_csr(KEY, common_name="cluster-1", names=["cluster-1"])
DER = REQUEST.public_bytes(serialization.Encoding.DER)
PEM = REQUEST.public_bytes(serialization.Encoding.PEM)


class TestEncode:
    @pytest.mark.parametrize("size", [0, 1, 47, 48, 49, 96, 700, 1500])
    def test_blocks_are_base64_lines_of_64_between_the_markers(self, size: int) -> None:
        """Lines of 64 base64 characters, the last one shorter or full, and the markers."""
        data = bytes(range(256)) * 6
        written = pem.encode(data[:size], b"CERTIFICATE")
        assert written.startswith(b"-----BEGIN CERTIFICATE-----\n")
        assert written.endswith(b"\n-----END CERTIFICATE-----\n")
        assert all(len(line) <= 64 for line in written.splitlines())
        if size:
            assert pem.decode_single(written, [b"CERTIFICATE"]) == data[:size]

    @pytest.mark.parametrize("key_type", [keys.KeyType.EC_P256, keys.KeyType.RSA_4096],
                             ids=lambda t: t.value)
    def test_an_issued_certificate_reads_as_cryptographys_own_pem(
            self, key_type: keys.KeyType) -> None:
        """``issue_pem`` gives byte for byte what ``public_bytes`` writes for the same
        certificate."""
        now = dt.datetime.now(dt.UTC)
        ca = issuer.new_root(key_type, profiles.RELAY_ROOT, now)
        request = csr.load_csr(csr.dump_csr(csr.build_csr(
            keys.generate_key(key_type), common_name="cluster-1", names=["cluster-1"])))
        certificate, written = issuer.issue_pem(request, ca, profiles.RELAY_CLIENT, now,
                                                subject=issuer.Subject(cluster="cluster-1"))
        assert written == certificate.public_bytes(serialization.Encoding.PEM)


class TestDecodeSingle:
    def test_a_plain_block_gives_its_der(self) -> None:
        """The block cryptography writes, with CRLF line ends or whitespace around it too."""
        assert pem.decode_single(PEM, LABELS) == DER
        assert pem.decode_single(PEM.replace(b"\n", b"\r\n"), LABELS) == DER
        assert pem.decode_single(b"\n  " + PEM + b"\n\n", LABELS) == DER
        renamed = PEM.replace(b"CERTIFICATE REQUEST", b"NEW CERTIFICATE REQUEST")
        assert pem.decode_single(renamed, LABELS) == DER

    @pytest.mark.parametrize("data", [
        b"subject=CN=cluster-1\n" + PEM,                       # text before the block
        PEM + PEM,                                              # two blocks
        PEM.replace(b"CERTIFICATE REQUEST", b"CERTIFICATE"),   # another label
        PEM.replace(b"-----END CERTIFICATE REQUEST", b"-----END NEW CERTIFICATE REQUEST"),
        PEM.replace(b"\n", b"\n ", 3),                          # a space in the base64
        PEM[:40] + b"=" + PEM[41:],                             # padding in the middle
        PEM[:-40] + PEM[-39:],                                  # a character missing
        DER,
    ], ids=["text-before", "two-blocks", "other-label", "mismatched-end", "space",
            "inner-padding", "truncated", "der"])
    def test_anything_else_is_left_to_the_full_reader(self, data: bytes) -> None:
        """None: the caller hands the bytes to cryptography, which accepts or refuses them."""
        assert pem.decode_single(data, LABELS) is None

    @pytest.mark.parametrize("data", [PEM + PEM, PEM.replace(b"\n", b"\n ", 3)],
                             ids=["two-blocks", "space"])
    def test_load_csr_still_reads_what_only_the_full_reader_takes(self, data: bytes) -> None:
        """cryptography's reader takes the first of two blocks, and spaces between lines."""
        assert pem.decode_single(data, LABELS) is None
        request = csr.load_csr(data)
        assert request.common_name == "cluster-1" and request.spki == keys.public_key_der(KEY)

    def test_load_csr_refuses_a_broken_block_as_before(self) -> None:
        """A block whose base64 is broken is still refused, by the full reader."""
        with pytest.raises(errors.InvalidCSR, match="cannot parse the CSR"):
            csr.load_csr(PEM[:40] + b"=" + PEM[41:])


class TestRequestValues:
    def test_key_der_and_fingerprint_are_the_keys(self) -> None:
        """The SubjectPublicKeyInfo kept with a request, and its SHA-256, name its key."""
        request = csr.load_csr(PEM)
        assert request.spki == keys.public_key_der(KEY)
        assert request.key_sha256 == hashlib.sha256(keys.public_key_der(KEY)).hexdigest()

    def test_an_ec_key_read_in_its_only_form_is_reused(self) -> None:
        """An uncompressed P-256 point on the named curve is kept as read, not encoded again."""
        spki = keys.public_key_der(KEY)
        assert keys.public_key_der_of(KEY.public_key(), spki) is spki

    def test_a_compressed_point_is_written_uncompressed(self) -> None:
        """A key read in another form gets the form cryptography writes, in the certificate."""
        public = KEY.public_key()
        compressed = public.public_bytes(serialization.Encoding.X962,
                                         serialization.PublicFormat.CompressedPoint)
        algorithm = der.sequence(der.object_identifier(x509.ObjectIdentifier("1.2.840.10045.2.1")),
                                 der.object_identifier(x509.ObjectIdentifier("1.2.840.10045.3.1.7")))
        spki = der.sequence(algorithm, der.bit_string(compressed))
        assert serialization.load_der_public_key(spki) == public
        assert keys.public_key_der_of(public, spki) == keys.public_key_der(KEY)
        assert keys.public_key_der_of(public, None) == keys.public_key_der(KEY)

    def test_an_rsa_key_read_with_its_null_parameters_is_reused(self) -> None:
        """rsaEncryption with NULL parameters, in strict DER: the form cryptography writes."""
        key = keys.generate_key(keys.KeyType.RSA_2048)
        spki = keys.public_key_der(key)
        assert keys.public_key_der_of(key.public_key(), spki) is spki

    def test_an_rsa_key_read_without_parameters_is_written_with_them(self) -> None:
        """cryptography reads rsaEncryption with its parameters left out, but writes NULL."""
        key = keys.generate_key(keys.KeyType.RSA_2048)
        public = key.public_key()
        pkcs1 = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
        algorithm = der.sequence(der.object_identifier(
            x509.ObjectIdentifier("1.2.840.113549.1.1.1")))
        spki = der.sequence(algorithm, der.bit_string(pkcs1))
        assert serialization.load_der_public_key(spki) == public
        assert keys.public_key_der_of(public, spki) == keys.public_key_der(key) != spki
        assert keys.public_key_der_of(public, b"\x30\x00") == keys.public_key_der(key)


class TestDnsNames:
    @pytest.mark.parametrize("text", ["cluster-1", "*.gloo-mesh", "a.b.c.", "A-1.example.com",
                                      "x" * 63 + ".y"])
    def test_valid_names(self, text: str) -> None:
        """Letters, digits, inner dashes, a leading wildcard label and trailing dots."""
        assert identity.is_dns_name(text)

    @pytest.mark.parametrize("text", ["", "cluster-1\n", "-a", "a-", "a..b", "a.*", "x" * 64,
                                      "a_b", "ü.example", "a" * 200 + "." + "b" * 60])
    def test_invalid_names(self, text: str) -> None:
        """A trailing newline, empty or edge-dashed labels, inner wildcards, long labels or
        names, and characters outside letters, digits and dashes."""
        assert not identity.is_dns_name(text)
