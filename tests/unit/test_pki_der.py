"""The certificate frame meshtrust encodes itself is the DER cryptography would write."""

from __future__ import annotations

import datetime as dt
import ipaddress

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshtrust.pki import csr, der, issuer, keys, profiles

NOW = dt.datetime(2026, 11, 22, 12, 0, 7, 654321, tzinfo=dt.UTC)


class TestDer:
    @pytest.mark.parametrize(("value", "encoded"), [
        (0, "020100"), (1, "020101"), (127, "02017f"), (128, "02020080"),
        (255, "020200ff"), (256, "02020100"), (2**127, "021100" + "80" + "00" * 15),
    ])
    def test_integers_take_the_fewest_octets_and_stay_positive(self, value: int,
                                                               encoded: str) -> None:
        """A leading zero appears only when the top bit would make the integer negative."""
        assert der.integer(value).hex() == encoded

    def test_negative_integers_are_refused(self) -> None:
        """Serials and versions are never negative; asking to encode one is a bug."""
        with pytest.raises(ValueError, match="non-negative"):
            der.integer(-1)

    @pytest.mark.parametrize(("size", "header"), [
        (0, "0400"), (127, "047f"), (128, "048180"), (255, "0481ff"), (256, "04820100"),
        (70000, "0483011170"),
    ])
    def test_lengths_use_the_short_form_below_128_and_the_shortest_long_form_above(
            self, size: int, header: str) -> None:
        """X.690 10.1: definite lengths in the fewest octets."""
        assert der.octet_string(b"\x00" * size)[:len(header) // 2].hex() == header
        assert len(der.octet_string(b"\x00" * size)) == len(header) // 2 + size

    @pytest.mark.parametrize(("moment", "encoded"), [
        (dt.datetime(2049, 12, 31, 23, 59, 59, 999999, tzinfo=dt.UTC),
         b"\x17\x0d491231235959Z"),
        (dt.datetime(2050, 1, 1, tzinfo=dt.UTC), b"\x18\x0f20500101000000Z"),
        (dt.datetime(2030, 6, 1, 2, 3, 4, tzinfo=dt.timezone(dt.timedelta(hours=2))),
         b"\x17\x0d300601000304Z"),
    ])
    def test_times_are_utc_whole_seconds_utctime_until_2049(self, moment: dt.datetime,
                                                           encoded: bytes) -> None:
        """RFC 5280 4.1.2.5: UTCTime through 2049, GeneralizedTime from 2050, always Z."""
        assert der.time(moment) == encoded

    def test_naive_times_are_refused(self) -> None:
        """A time without a zone could be read in local time; only aware times are encoded."""
        with pytest.raises(ValueError, match="timezone-aware"):
            der.time(dt.datetime(2030, 1, 1))

    @pytest.mark.parametrize("oid", [
        ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH,
        x509.ObjectIdentifier("1.2.840.113549.1.1.11"), x509.ObjectIdentifier("2.999.16384.1"),
    ])
    def test_object_identifiers_match_cryptographys_encoding(self,
                                                             oid: x509.ObjectIdentifier) -> None:
        """An EKU extension value is a SEQUENCE of OIDs, so cryptography encodes them for us."""
        assert x509.ExtendedKeyUsage([oid]).public_bytes() == \
            der.sequence(der.object_identifier(oid))

    @pytest.mark.parametrize("key", [ec.generate_private_key(ec.SECP256R1()).public_key(),
                                     ec.generate_private_key(ec.SECP384R1()).public_key(),
                                     rsa.generate_private_key(65537, 2048).public_key()],
                             ids=["p256", "p384", "rsa2048"])
    def test_subject_public_key_is_what_key_identifiers_hash(self, key: keys.PublicKey) -> None:
        """The key bits of the SPKI are the X9.62 point or the PKCS#1 key, as RFC 5280 hashes."""
        spki = keys.public_key_der(key)
        expected = (key.public_bytes(serialization.Encoding.X962,
                                     serialization.PublicFormat.UncompressedPoint)
                    if isinstance(key, ec.EllipticCurvePublicKey) else
                    key.public_bytes(serialization.Encoding.DER,
                                     serialization.PublicFormat.PKCS1))
        assert der.subject_public_key(spki) == expected

    def test_subject_public_key_refuses_other_structures(self) -> None:
        """Bytes that are not one SubjectPublicKeyInfo are refused, not half-read."""
        spki = keys.public_key_der(ec.generate_private_key(ec.SECP256R1()).public_key())
        for bad in (spki + b"\x00", der.sequence(der.integer(1), der.integer(2)),
                    der.octet_string(spki)):
            with pytest.raises(ValueError, match="SubjectPublicKeyInfo"):
                der.subject_public_key(bad)


def _rebuilt_tbs(cert: x509.Certificate, key: keys.PrivateKey) -> bytes:
    """The to-be-signed bytes cryptography's CertificateBuilder makes from the same content."""
    builder = (x509.CertificateBuilder()
               .subject_name(cert.subject).issuer_name(cert.issuer)
               .public_key(cert.public_key())  # type: ignore[arg-type]
               .serial_number(cert.serial_number)
               .not_valid_before(cert.not_valid_before_utc)
               .not_valid_after(cert.not_valid_after_utc))
    for ext in cert.extensions:
        builder = builder.add_extension(ext.value, ext.critical)
    return builder.sign(key, keys.signature_hash(key)).tbs_certificate_bytes


CA_TYPES = [keys.KeyType.EC_P256, keys.KeyType.EC_P384, keys.KeyType.RSA_2048]


class TestIssuedEncoding:
    @pytest.mark.parametrize("ca_type", CA_TYPES, ids=lambda t: t.value)
    @pytest.mark.parametrize("leaf_type", [keys.KeyType.EC_P256, keys.KeyType.RSA_4096],
                             ids=lambda t: t.value)
    def test_every_profile_encodes_as_cryptography_would(self, ca_type: keys.KeyType,
                                                         leaf_type: keys.KeyType) -> None:
        """Same content through CertificateBuilder gives byte-identical TBS, and it verifies."""
        root = issuer.new_root(ca_type, profiles.RELAY_ROOT, NOW)
        assert _rebuilt_tbs(root.certificate, root.key) == root.certificate.tbs_certificate_bytes
        leaf_key = keys.generate_key(leaf_type)
        request = csr.load_csr(csr.dump_csr(csr.build_csr(
            leaf_key, common_name="cluster-1", names=["cluster-1"])))
        subject = issuer.Subject(cluster="cluster-1", names=("relay.example.com", "10.0.0.1"),
                                 namespace="default", service_account="sleep")
        for profile in profiles.PROFILES.values():
            if profile.is_ca:
                cert = issuer.issue(csr.Request(csr=csr.build_csr(leaf_key, ca=True),
                                                public_key=leaf_key.public_key()),
                                    root, profile, NOW, subject=subject)
            else:
                cert = issuer.issue(request, root, profile, NOW, subject=subject)
            assert _rebuilt_tbs(cert, root.key) == cert.tbs_certificate_bytes, profile.name
            cert.verify_directly_issued_by(root.certificate)
            assert cert.signature_algorithm_oid == root.certificate.signature_algorithm_oid
            assert cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value == \
                x509.SubjectKeyIdentifier.from_public_key(leaf_key.public_key())

    def test_rsa_signatures_are_deterministic_so_the_whole_certificate_matches(self) -> None:
        """PKCS #1 v1.5 signs deterministically: the whole DER equals cryptography's."""
        root = issuer.new_root(keys.KeyType.RSA_2048, profiles.RELAY_ROOT, NOW)
        builder = (x509.CertificateBuilder()
                   .subject_name(root.certificate.subject).issuer_name(root.certificate.issuer)
                   .public_key(root.key.public_key()).serial_number(root.certificate.serial_number)
                   .not_valid_before(root.certificate.not_valid_before_utc)
                   .not_valid_after(root.certificate.not_valid_after_utc))
        for ext in root.certificate.extensions:
            builder = builder.add_extension(ext.value, ext.critical)
        assert isinstance(root.key, rsa.RSAPrivateKey)
        rebuilt = builder.sign(root.key, hashes.SHA256(), rsa_padding=padding.PKCS1v15())
        assert rebuilt.public_bytes(serialization.Encoding.DER) == \
            root.certificate.public_bytes(serialization.Encoding.DER)

    def test_validity_past_2049_is_generalized_time(self) -> None:
        """A root made in 2045 for ten years ends in 2055, written as GeneralizedTime."""
        now = dt.datetime(2045, 3, 1, tzinfo=dt.UTC)
        root = issuer.new_root(keys.KeyType.EC_P256, profiles.RELAY_ROOT, now)
        assert root.certificate.not_valid_after_utc.year == 2055
        assert b"\x18\x0f2055" in root.certificate.tbs_certificate_bytes
        assert _rebuilt_tbs(root.certificate, root.key) == root.certificate.tbs_certificate_bytes

    def test_serials_with_the_top_bit_set_stay_positive(self) -> None:
        """Half of all random serials have the top bit set; each must read back positive."""
        root = issuer.new_root(keys.KeyType.EC_P256, profiles.RELAY_ROOT, NOW)
        key = keys.generate_key(keys.KeyType.EC_P256)
        request = csr.Request(csr=csr.build_csr(key), public_key=key.public_key())
        serials = [issuer.issue(request, root, profiles.RELAY_SERVER, NOW).serial_number
                   for _ in range(40)]
        assert all(0 < s < 2**128 for s in serials)
        assert any(s >= 2**127 for s in serials)  # chance of none in 40: 2**-40
        assert len(set(serials)) == len(serials)

    def test_subject_is_the_profile_name(self) -> None:
        """The Istio intermediate's subject is O, CN, L in that order, as the seeds' scripts."""
        root = issuer.new_root(keys.KeyType.EC_P256, profiles.ISTIO_ROOT, NOW)
        ca = issuer.new_intermediate(keys.KeyType.EC_P256, root, profiles.ISTIO_INTERMEDIATE,
                                     NOW, subject=issuer.Subject(cluster="cluster-7"))
        oids = [a.oid for a in ca.certificate.subject]
        assert oids == [NameOID.ORGANIZATION_NAME, NameOID.COMMON_NAME, NameOID.LOCALITY_NAME]
        assert ca.certificate.issuer == root.certificate.subject


def _request(key: keys.PrivateKey, name: x509.Name,
             names: list[x509.GeneralName] | None = None) -> x509.CertificateSigningRequest:
    builder = x509.CertificateSigningRequestBuilder().subject_name(name)
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(key, keys.signature_hash(key))


class TestNames:
    def test_names_encode_as_cryptography_would(self) -> None:
        """CN, O, OU, L and ST in order, as UTF8Strings: the bytes of cryptography's Name."""
        attributes = [(NameOID.ORGANIZATION_NAME, "Istio"), (NameOID.COMMON_NAME, "Root CA"),
                      (NameOID.ORGANIZATIONAL_UNIT_NAME, "Demo"),
                      (NameOID.LOCALITY_NAME, "clüster-7"), (NameOID.STATE_OR_PROVINCE_NAME, "MA")]
        expected = x509.Name([x509.NameAttribute(oid, value) for oid, value in attributes])
        assert der.name(attributes) == expected.public_bytes()
        assert der.name([]) == x509.Name([]).public_bytes()

    @pytest.mark.parametrize("size", [1, 64, 118, 119, 120, 125, 126, 127, 128, 200, 300])
    def test_long_values_take_the_long_form(self, size: int) -> None:
        """Values around the sizes where a length leaves the short form: the same bytes."""
        attributes = [(NameOID.ORGANIZATION_NAME, "o" * size), (NameOID.LOCALITY_NAME, "l")]
        expected = x509.Name([x509.NameAttribute(oid, value) for oid, value in attributes])
        assert der.name(attributes) == expected.public_bytes()

    def test_attributes_of_another_string_type_are_refused(self) -> None:
        """cryptography writes countryName as a PrintableString; encoding it here would differ."""
        with pytest.raises(ValueError, match="UTF8String"):
            der.name([(NameOID.COUNTRY_NAME, "US")])

    def test_general_names_encode_as_cryptography_would(self) -> None:
        """DNS names, URIs and IPv4/IPv6 addresses: the bytes of cryptography's SAN value."""
        names: list[x509.GeneralName] = [
            x509.DNSName("*.gloo-mesh"), x509.DNSName("cluster-1"),
            x509.UniformResourceIdentifier("spiffe://cluster.local/ns/istio-system/sa/istiod"),
            x509.IPAddress(ipaddress.ip_address("10.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("2001:db8::1"))]
        assert der.general_names(names) == x509.SubjectAlternativeName(names).public_bytes()

    def test_other_general_names_are_refused(self) -> None:
        """An e-mail address is never put in a certificate here; asking to encode one is a bug."""
        with pytest.raises(ValueError, match="cannot encode"):
            der.general_names([x509.RFC822Name("ops@example.com")])


class TestRequestParts:
    @pytest.mark.parametrize("key_type", [keys.KeyType.EC_P256, keys.KeyType.RSA_2048],
                             ids=lambda t: t.value)
    def test_subject_and_key_are_the_csrs_own(self, key_type: keys.KeyType) -> None:
        """The parts read from the signed bytes are the subject and key cryptography reads,
        and the attributes after them (none here)."""
        key = keys.generate_key(key_type)
        request = _request(key, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "c-1"),
                                           x509.NameAttribute(NameOID.LOCALITY_NAME, "x")]))
        parts = der.request_parts(request.tbs_certrequest_bytes)
        assert parts == (request.subject.public_bytes(), keys.public_key_der(key),
                         der.NO_ATTRIBUTES)

    @pytest.mark.parametrize("key_type", [keys.KeyType.EC_P256, keys.KeyType.RSA_2048],
                             ids=lambda t: t.value)
    def test_the_signed_part_is_the_one_cryptography_reads(self, key_type: keys.KeyType
                                                          ) -> None:
        """A request's first value is its CertificationRequestInfo, as cryptography gives it;
        bytes framed otherwise (another tag, trailing or missing octets) give nothing."""
        request = _request(keys.generate_key(key_type), x509.Name(
            [x509.NameAttribute(NameOID.COMMON_NAME, "c-1")]))
        encoded = request.public_bytes(serialization.Encoding.DER)
        assert der.first_element(encoded) == request.tbs_certrequest_bytes
        for bad in (b"", b"\x30", encoded + b"\x00", encoded[:-1], b"\x31" + encoded[1:],
                    der.sequence(der.integer(1)), der.sequence(b"\x30\x05\x00")):
            assert der.first_element(bad) is None

    def test_other_structures_give_nothing(self) -> None:
        """Bytes that do not start as a CertificationRequestInfo are not read."""
        for bad in (b"", b"\x30", der.sequence(der.octet_string(b"x")),
                    der.sequence(der.integer(0), der.octet_string(b"x")),
                    der.sequence(der.integer(0), der.sequence(), der.integer(1)),
                    der.sequence(der.integer(0))[:-1] + b"\x30\x85"):
            assert der.request_parts(bad) is None

    @pytest.mark.parametrize("value", ["cluster-1", "c", "ü" * 32, "x" * 64])
    def test_a_lone_common_name_is_read_from_der(self, value: str) -> None:
        """One UTF8String commonName of 1 to 64 octets: the value cryptography reads."""
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, value)])
        assert der.common_name(name.public_bytes()) == value

    @pytest.mark.parametrize("name", [
        x509.Name([]),
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "a"),
                   x509.NameAttribute(NameOID.COMMON_NAME, "b")]),
        x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cluster-1")]),
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cluster-1",
                                      _type=x509.name._ASN1Type.PrintableString)]),
        x509.Name([x509.RelativeDistinguishedName([
            x509.NameAttribute(NameOID.COMMON_NAME, "a"),
            x509.NameAttribute(NameOID.LOCALITY_NAME, "b")])]),
    ], ids=["empty", "two", "organization", "printable", "multi-valued"])
    def test_any_other_name_is_left_to_cryptography(self, name: x509.Name) -> None:
        """None tells the caller to read the subject the slow, general way."""
        assert der.common_name(name.public_bytes()) is None

    def test_out_of_bounds_or_broken_values_are_left_to_cryptography(self) -> None:
        """65 octets (cryptography warns), and bytes that are not UTF-8, are not read here."""
        long_name = der.sequence(der.tlv(der.SET, der.sequence(
            der.object_identifier(NameOID.COMMON_NAME), der.tlv(der.UTF8_STRING, b"x" * 65))))
        broken = der.sequence(der.tlv(der.SET, der.sequence(
            der.object_identifier(NameOID.COMMON_NAME), der.tlv(der.UTF8_STRING, b"\xff\xfe"))))
        assert der.common_name(long_name) is None
        assert der.common_name(broken) is None
        assert der.common_name(None) is None


def _attributes(request: x509.CertificateSigningRequest) -> bytes:
    parts = der.request_parts(request.tbs_certrequest_bytes)
    assert parts is not None
    return parts[2]


def _asking(*extensions: tuple[x509.ExtensionType, bool]) -> x509.CertificateSigningRequest:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "c-1")]))
    for value, critical in extensions:
        builder = builder.add_extension(value, critical=critical)
    key = keys.generate_key(keys.KeyType.EC_P256)
    return builder.sign(key, keys.signature_hash(key))


class TestRequestedNames:
    @pytest.mark.parametrize(("names", "critical"), [
        (["cluster-1"], False), (["cluster-1"], True),
        (["cluster-1", "Cluster-1.example", "*.gloo-mesh"], False), (["x" * 90], False),
    ])
    def test_dns_names_of_the_plain_form_are_the_ones_cryptography_reads(
            self, names: list[str], critical: bool) -> None:
        """One subjectAltName of DNS names, critical or not: the same names, in order."""
        request = _asking((x509.SubjectAlternativeName([x509.DNSName(n) for n in names]),
                           critical))
        read = der.requested_dns_names(_attributes(request))
        san = request.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert read is not None
        assert list(read) == san.get_values_for_type(x509.DNSName) == names

    @pytest.mark.parametrize("extensions", [
        [],
        [(x509.SubjectAlternativeName([x509.DNSName("c-1"), x509.UniformResourceIdentifier(
            "spiffe://cluster.local/ns/a/sa/b")]), False)],
        [(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("10.0.0.1"))]),
          False)],
        [(x509.SubjectAlternativeName([x509.DNSName("c-1")]), False),
         (x509.BasicConstraints(ca=True, path_length=None), True)],
        [(x509.BasicConstraints(ca=False, path_length=None), True),
         (x509.SubjectAlternativeName([x509.DNSName("c-1")]), False)],
        [(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)],
        [(x509.SubjectAlternativeName([x509.DNSName(f"name-{i}.example")
                                       for i in range(8)]), False)],
    ], ids=["none", "with-uri", "ip", "and-ca", "after-basic", "eku-only", "long"])
    def test_every_other_form_is_left_to_cryptography(
            self, extensions: list[tuple[x509.ExtensionType, bool]]) -> None:
        """Other names, other extensions, no extension, or a length past the short form:
        None, and cryptography reads them."""
        assert der.requested_dns_names(_attributes(_asking(*extensions))) is None

    def test_hand_made_variants_are_left_to_cryptography(self) -> None:
        """A critical flag written as FALSE (not DER), an empty DNS name, a name that is not
        ASCII, an empty name list, a second attribute: None."""
        def attributes(extension: bytes, *more: bytes) -> bytes:
            request = der.sequence(der.object_identifier(x509.ObjectIdentifier(
                "1.2.840.113549.1.9.14")), der.tlv(der.SET, der.sequence(extension)))
            return der.tlv(0xA0, request + b"".join(more))

        def san(critical: bytes, *names: bytes) -> bytes:
            return der.sequence(b"\x06\x03\x55\x1d\x11", critical, der.octet_string(
                der.sequence(*(der.tlv(0x82, name) for name in names))))

        assert der.requested_dns_names(attributes(san(b"", b"c-1"))) == ("c-1",)
        assert der.requested_dns_names(attributes(san(der.TRUE, b"c-1"))) == ("c-1",)
        challenge = der.sequence(der.object_identifier(x509.ObjectIdentifier(
            "1.2.840.113549.1.9.7")), der.tlv(der.SET, der.tlv(der.UTF8_STRING, b"pw")))
        for variant in (attributes(san(b"\x01\x01\x00", b"c-1")), attributes(san(b"", b"")),
                        attributes(san(b"", b"c-\xe9")), attributes(san(b"")),
                        attributes(san(b"", b"c-1"), challenge)):
            assert der.requested_dns_names(variant) is None

    def test_cut_or_grown_bytes_give_nothing(self) -> None:
        """Every prefix of the plain form, and the form with a byte more, give None and raise
        nothing."""
        plain = _attributes(_asking((x509.SubjectAlternativeName(
            [x509.DNSName("cluster-1"), x509.DNSName("c-2")]), False)))
        assert der.requested_dns_names(plain) == ("cluster-1", "c-2")
        for size in range(len(plain)):
            assert der.requested_dns_names(plain[:size]) is None
        assert der.requested_dns_names(plain + b"\x00") is None
        assert der.requested_dns_names(plain[:-1] + b"\x82") is None
