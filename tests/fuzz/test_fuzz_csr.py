"""Fuzzing the CSR gate and the issuer: damaged, re-signed and generated requests.

Every request goes through ``csr.load_csr`` and, when it passes, is issued
under the relay client and the Istio intermediate profiles. The properties:
a refusal is a domain error with a message; an issued certificate has exactly
its profile's shape, for the CSR's key, within the configured lifetime; and
the relay client profile issues exactly when the request asks for nothing
beyond it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import ipaddress
import warnings
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID, ObjectIdentifier
from hypothesis import given

import fuzzkit
from meshtrust import errors
from meshtrust.pki import csr, der, issuer, keys, profiles

NOW = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)
CLUSTER = "c1"
CLIENT_LIFETIME = dt.timedelta(hours=1)
ISTIO_LIFETIME = dt.timedelta(days=30)
TRUST_DOMAIN = "mesh.example"
ORGANIZATION = "Istio"


@dataclasses.dataclass(frozen=True)
class CAs:
    relay: issuer.CA
    istio: issuer.CA


@functools.cache
def cas() -> CAs:
    with fuzzkit.deterministic():
        root = issuer.new_root(keys.KeyType.EC_P256, profiles.RELAY_ROOT,
                               NOW - dt.timedelta(days=1))
        relay = issuer.new_intermediate(keys.KeyType.EC_P256, root, profiles.RELAY_SIGNING,
                                        NOW - dt.timedelta(days=1))
        istio = issuer.new_root(keys.KeyType.EC_P256, profiles.ISTIO_ROOT,
                                NOW - dt.timedelta(days=1))
    return CAs(relay=relay, istio=istio)


def _der(request: x509.CertificateSigningRequest) -> bytes:
    return request.public_bytes(serialization.Encoding.DER)


@dataclasses.dataclass(frozen=True)
class Seed:
    der: bytes
    key_name: str


@functools.cache
def seeds() -> tuple[Seed, ...]:
    """Valid requests of every shape an agent or an attacker would send, the same bytes on
    every run."""
    with fuzzkit.deterministic():
        return _seeds()


def _seeds() -> tuple[Seed, ...]:
    def build(key_name: str, **kwargs: Any) -> Seed:
        return Seed(_der(csr.build_csr(fuzzkit.key(key_name), **kwargs)), key_name)

    built = [
        build("ec-p256", common_name=CLUSTER, names=[CLUSTER]),
        build("rsa-2048", common_name=CLUSTER, names=[CLUSTER]),
        build("ec-p384", common_name="Intermediate CA", organization="Istio", locality=CLUSTER,
              ca=True, names=[issuer.ISTIOD_DNS, "spiffe://cluster.local/ns/istio-system/sa/x"]),
        build("ec-p256", common_name="c2", names=["c2", "10.0.0.1", "https://c2.example/x"]),
        build("ec-p256"),
    ]
    extended = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, CLUSTER),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "ops"),
    ])).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
                      ).add_extension(x509.KeyUsage(
                          digital_signature=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          key_cert_sign=True, crl_sign=False, encipher_only=False,
                          decipher_only=False), critical=True
                      ).add_extension(x509.UnrecognizedExtension(
                          ObjectIdentifier("1.3.6.1.4.1.99999.1"), b"\x04\x02hi"), critical=True)
    built.append(Seed(_der(extended.sign(fuzzkit.key("ec-p256"),
                                         fuzzkit.sign_hash(fuzzkit.key("ec-p256")))), "ec-p256"))
    built.append(Seed(_der(x509.CertificateSigningRequestBuilder().subject_name(x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, CLUSTER)])).sign(fuzzkit.key("ed25519"), None)),
        "ed25519"))
    return tuple(built)


def _extension_values(request: csr.Request) -> dict[type[Any], Any]:
    """The request's extensions as cryptography reads them, by type."""
    return {type(e.value): e.value for e in request.csr.extensions}


def client_request_allowed(request: csr.Request, cluster: str) -> bool:
    """What the relay client profile may issue for, decided from the CSR alone."""
    value = _extension_values(request)
    basic = value.get(x509.BasicConstraints)
    if basic is not None and basic.ca:
        return False
    eku = value.get(x509.ExtendedKeyUsage)
    if eku is not None and any(oid != ExtendedKeyUsageOID.CLIENT_AUTH for oid in eku):
        return False
    names = request.csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if names and names[0].value != cluster:
        return False
    san = value.get(x509.SubjectAlternativeName)
    return all(isinstance(n, x509.DNSName) and n.value.lower() == cluster.lower()
               for n in (san or []))


def read_as_cryptography_does(request: csr.Request) -> None:
    """What the request asks for, as ``csr.Request`` read it (from the DER for the plain
    forms), is what cryptography reads."""
    value = _extension_values(request)
    san = value.get(x509.SubjectAlternativeName)
    basic = value.get(x509.BasicConstraints)
    assert request.names == (tuple(san) if san is not None else ())
    assert request.requested_ca() == (basic is not None and basic.ca)
    assert request.requested_eku() == list(value.get(x509.ExtendedKeyUsage) or [])
    names = request.csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    assert request.common_name == (names[0].value if names else None)


def issue_everything(data: bytes) -> str:
    """Load ``data`` and issue what each profile allows; return how it ended."""
    try:
        request = csr.load_csr(data)
    except errors.MeshTrustError as exc:
        fuzzkit.refusal(exc)
        return f"refused: {type(exc).__name__}"
    read_as_cryptography_does(request)
    found = cas()
    allowed = client_request_allowed(request, CLUSTER)
    outcome = "loaded"
    try:
        client = issuer.issue(request, found.relay, profiles.RELAY_CLIENT, NOW, CLIENT_LIFETIME,
                              issuer.Subject(cluster=CLUSTER))
    except errors.ProfileViolation as exc:
        fuzzkit.refusal(exc)
        assert not allowed, f"a request the relay client profile allows was refused: {exc}"
    else:
        assert allowed, "the relay client profile issued for a request beyond it"
        fuzzkit.check_relay_client(client, cluster=CLUSTER, ca=found.relay,
                                   public_key=request.public_key, now=NOW,
                                   lifetime=CLIENT_LIFETIME)
        outcome = "issued"
    intermediate = issuer.issue(request, found.istio, profiles.ISTIO_INTERMEDIATE, NOW,
                                ISTIO_LIFETIME, issuer.Subject(
                                    cluster=CLUSTER, trust_domain=TRUST_DOMAIN,
                                    organization=ORGANIZATION))
    fuzzkit.check_istio_intermediate(intermediate, cluster=CLUSTER, ca=found.istio,
                                     public_key=request.public_key, now=NOW,
                                     lifetime=ISTIO_LIFETIME, trust_domain=TRUST_DOMAIN,
                                     organization=ORGANIZATION)
    return outcome


def _as_pem(data: bytes, wrap: int) -> bytes:
    """``data`` as is (DER), or in a PEM block, sometimes with text around it."""
    if wrap % 4 == 0:
        return data
    block = fuzzkit.pem("CERTIFICATE REQUEST", data)
    if wrap % 4 == 2:
        return b"  \n" + block
    if wrap % 4 == 3:
        return block + fuzzkit.pem("CERTIFICATE REQUEST", data[:len(data) // 2])
    return block


class TestDamagedRequests:
    def test_mutated_requests(self) -> None:
        """A damaged CSR (its DER, its PEM text, or its inside validly signed again) is refused
        with a domain error, or gets only what its profile allows."""
        fuzzkit.make_keys()
        pool = seeds()
        ders = tuple(s.der for s in pool)
        pems = tuple(_as_pem(d, 1) for d in ders)
        infos = tuple(fuzzkit.request_info(d) for d in ders)
        tally = fuzzkit.Tally()

        @fuzzkit.FUZZ
        @given(data=fuzzkit.examples())
        def example(data: bytes) -> None:
            pick = fuzzkit.Picker(data)
            mode = pick.integer(0, 3)
            if mode == 0:  # the DER
                request = _as_pem(pick.mutated(ders), pick.integer(0, 3))
            elif mode == 1:  # the PEM text
                request = pick.mutated(pems, structured=False)
            else:  # the signed part, then signed again: the damage reaches the parsers behind
                seed = pick.choice(pool)
                info = fuzzkit.mutate(fuzzkit.request_info(seed.der), pick.program(), infos)
                request = _as_pem(fuzzkit.sign_raw(fuzzkit.key(seed.key_name), info),
                                  pick.integer(0, 1))
            with fuzzkit.watchdog():
                tally.add(issue_everything(request))

        example()
        print(f"mutated CSRs: {tally}")
        assert tally["refused: InvalidCSR"] > tally.total // 2
        assert tally["issued"] > 0 and tally["loaded"] > 0


# -- the attributes agents send, read from their DER -----------------------------------------


@functools.cache
def plain_requests() -> tuple[bytes, ...]:
    """Signed parts of requests whose attributes ``csr.Request`` reads from the DER: one
    subjectAltName of DNS names, plain or critical."""
    with fuzzkit.deterministic():
        key = fuzzkit.key("ec-p256")
        plain = [csr.build_csr(key, common_name=CLUSTER, names=[CLUSTER]),
                 csr.build_csr(key, common_name=CLUSTER, names=[CLUSTER, "c1.example", "C1"])]
        critical = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([
            x509.NameAttribute(NameOID.COMMON_NAME, CLUSTER)])).add_extension(
                x509.SubjectAlternativeName([x509.DNSName(CLUSTER)]), critical=True)
        plain.append(fuzzkit.sign_request(critical, key))
    return tuple(fuzzkit.request_info(_der(request)) for request in plain)


class TestPlainAttributes:
    def test_mutated_attributes(self) -> None:
        """Damaged attributes of a plain request, validly signed again: each is refused, or
        read as cryptography reads it, whether from the DER or by cryptography."""
        infos = plain_requests()
        heads, attributes = [], []
        for info in infos:  # version, subject, key; then the attributes
            tree = fuzzkit.parse_der(info)
            assert tree is not None and tree.children is not None
            heads.append(b"".join(child.dump() for child in tree.children[:3]))
            attributes.append(tree.children[3].dump())
            assert der.requested_dns_names(attributes[-1]) is not None  # the plain path
        tally = fuzzkit.Tally()

        @fuzzkit.FUZZ
        @given(data=fuzzkit.examples())
        def example(data: bytes) -> None:
            pick = fuzzkit.Picker(data)
            which = pick.integer(0, len(infos) - 1)
            attrs = fuzzkit.mutate(attributes[which], pick.program(), attributes,
                                   structured=pick.flag())
            plain = der.requested_dns_names(attrs) is not None
            info = fuzzkit.tlv(0x30, heads[which] + attrs)
            try:
                request = csr.load_csr(fuzzkit.sign_raw(fuzzkit.key("ec-p256"), info))
            except errors.MeshTrustError as exc:
                fuzzkit.refusal(exc)
                tally.add("refused")
                return
            read_as_cryptography_does(request)
            tally.add("read from the DER" if plain else "read by cryptography")

        example()
        print(f"mutated attributes: {tally}")
        assert tally["read from the DER"] > 0 and tally["read by cryptography"] > 0
        assert tally["refused"] > 0


# -- generated requests ------------------------------------------------------------------------

_OTHER_OID = ObjectIdentifier("1.3.6.1.4.1.99999.7")
_EKUS = (ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH,
         ExtendedKeyUsageOID.CODE_SIGNING, ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE,
         _OTHER_OID)
_KEY_USAGES = ("digital_signature", "content_commitment", "key_encipherment",
               "data_encipherment", "key_agreement", "key_cert_sign", "crl_sign")
# Mostly keys that are accepted and quick to sign with; each refused kind now and then.
_KEY_NAMES = ("ec-p256",) * 5 + ("rsa-2048-e3",) * 3 + ("ec-p384", "rsa-2048") + \
    fuzzkit.REFUSED_KEYS
_COMMON_NAMES = (CLUSTER, None, "C1", "c2", "c1 ", "Intermediate CA", "")
_DNS_NAMES = (CLUSTER, "C1", "c2", "*.c1", "c1.", "*", "localhost", issuer.ISTIOD_DNS,
              "*.gloo-mesh", "")
_URIS = ("spiffe://cluster.local/ns/istio-system/sa/istiod", "spiffe://c1", "https://c1/", "")
_ATTRIBUTES = ((), ((NameOID.ORGANIZATION_NAME, "Istio"),),
               ((NameOID.LOCALITY_NAME, CLUSTER), (NameOID.ORGANIZATIONAL_UNIT_NAME, "ops")),
               ((NameOID.COMMON_NAME, "evil"),))


def _ascii(pick: fuzzkit.Picker, max_size: int) -> str:
    return "".join(chr(pick.integer(0x20, 0x7E)) for _ in range(pick.integer(0, max_size)))


def _general_name(pick: fuzzkit.Picker) -> x509.GeneralName:
    kind = pick.integer(0, 7)
    if kind == 0:
        return x509.DNSName(pick.choice(_DNS_NAMES) if pick.flag() else _ascii(pick, 24))
    if kind == 1:
        return x509.UniformResourceIdentifier(pick.choice(_URIS) if pick.flag()
                                              else _ascii(pick, 24))
    if kind == 2:
        raw = pick.take(16 if pick.flag() else 4)
        return x509.IPAddress(ipaddress.ip_address(raw))
    if kind == 3:
        return x509.IPAddress(ipaddress.ip_network("10.0.0.0/8"))
    if kind == 4:
        return x509.RFC822Name(pick.choice(("ops@c1", "c1")))
    if kind == 5:
        return x509.RegisteredID(_OTHER_OID)
    if kind == 6:
        return x509.OtherName(_OTHER_OID, fuzzkit.tlv(0x04, pick.bytes(8)))
    return x509.DirectoryName(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CLUSTER)]))


def _empty(oid: x509.ObjectIdentifier) -> x509.UnrecognizedExtension:
    """An extension whose value is an empty SEQUENCE (an empty subjectAltName or extended key
    usage), as raw DER: cryptography 51 no longer builds those itself."""
    return x509.UnrecognizedExtension(oid, b"\x30\x00")


def generated_request(pick: fuzzkit.Picker) -> bytes:
    """A CSR with random names, extensions and key, validly signed; all zeros is a request
    the relay client profile accepts."""
    private = fuzzkit.key(pick.choice(_KEY_NAMES))
    with warnings.catch_warnings():  # a name attribute out of its bounds is made on purpose
        warnings.simplefilter("ignore", UserWarning)
        cn = pick.choice(_COMMON_NAMES) if pick.integer(0, 3) else pick.text(70)
        attributes = [x509.NameAttribute(oid, value, _validate=False)
                      for oid, value in pick.choice(_ATTRIBUTES)]
        if cn is not None:
            attributes.insert(0, x509.NameAttribute(NameOID.COMMON_NAME, cn, _validate=False))
        builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(attributes))
        names = [_general_name(pick) for _ in range(pick.integer(0, 3))]
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names),
                                            critical=pick.flag())
        elif pick.flag():
            builder = builder.add_extension(_empty(ExtensionOID.SUBJECT_ALTERNATIVE_NAME),
                                            critical=pick.flag())
        basic = pick.integer(0, 4)
        if basic:
            builder = builder.add_extension(
                x509.BasicConstraints(ca=basic > 1, path_length=None if basic < 3 else basic - 3),
                critical=pick.flag())
        if pick.flag():
            usages = [oid for oid in _EKUS if pick.flag()]
            eku = x509.ExtendedKeyUsage(usages) if usages else \
                _empty(ExtensionOID.EXTENDED_KEY_USAGE)
            builder = builder.add_extension(eku, critical=pick.flag())
        if pick.flag():
            builder = builder.add_extension(x509.KeyUsage(
                **{name: pick.flag() for name in _KEY_USAGES}, encipher_only=False,
                decipher_only=False), critical=pick.flag())
        if pick.flag():
            builder = builder.add_extension(
                x509.UnrecognizedExtension(_OTHER_OID, pick.bytes(12)), critical=pick.flag())
        request = fuzzkit.sign_request(builder, private)
    return _as_pem(_der(request), pick.integer(0, 3))


class TestGeneratedRequests:
    def test_random_names_extensions_and_keys(self) -> None:
        """A well-signed request gets exactly its profile; its own names and extensions never."""
        fuzzkit.make_keys()
        tally = fuzzkit.Tally()

        @fuzzkit.FUZZ
        @given(data=fuzzkit.examples())
        def example(data: bytes) -> None:
            request = generated_request(fuzzkit.Picker(data))
            with fuzzkit.watchdog():
                tally.add(issue_everything(request))

        example()
        print(f"generated CSRs: {tally}")
        assert tally["issued"] > 0 and tally["loaded"] > 0
        assert tally["refused: KeyPolicyError"] > 0
