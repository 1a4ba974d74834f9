"""DER encoding of the few ASN.1 values that frame a certificate.

``issuer`` assembles the to-be-signed part of every certificate itself, from
pieces that are encoded once and reused: the issuer's name, the profile's
fixed extensions, the signature algorithm. pyca/cryptography still encodes
every value whose shape is not trivial (names, key identifiers, subject
alternative names, extension values, public keys); this module only adds
the frame around them: tag and length, integers, times, object identifiers.
Going through a ``CertificateBuilder`` for each certificate cost about a
third of ``issue``'s time (see docs/benchmarks.md, "Issuance").

Reading goes the other way for the few parts of a CSR that every agent sends in
one plain form (the signed part, the subject that is one commonName, the
subjectAltName of DNS names): those are read here, and anything in another
form is left to cryptography, which reads it as before.

Everything here follows X.690 DER: definite lengths in the shortest form,
integers in the fewest octets, times as RFC 5280 section 4.1.2.5 asks.
"""

from __future__ import annotations

import datetime as dt
import functools
import ipaddress
from collections.abc import Sequence

from cryptography import x509
from cryptography.x509.oid import ExtensionOID, NameOID

SEQUENCE = 0x30
SET = 0x31
INTEGER = 0x02
BIT_STRING = 0x03
OCTET_STRING = 0x04
NULL = b"\x05\x00"
OBJECT_IDENTIFIER = 0x06
UTF8_STRING = 0x0C
UTC_TIME = 0x17
GENERALIZED_TIME = 0x18
TRUE = b"\x01\x01\xff"

# RFC 5280 4.1.2.5: UTCTime through 2049, GeneralizedTime from 2050 on.
_UTC_TIME_BEFORE = 2050

# GeneralName choices, context-specific and primitive (RFC 5280 4.2.1.6).
_DNS_NAME = 0x82
_URI = 0x86
_IP_ADDRESS = 0x87
_UTF8_ATTRIBUTES = frozenset({NameOID.COMMON_NAME, NameOID.ORGANIZATION_NAME,
                              NameOID.ORGANIZATIONAL_UNIT_NAME, NameOID.LOCALITY_NAME,
                              NameOID.STATE_OR_PROVINCE_NAME})


def tlv(tag: int, body: bytes) -> bytes:
    """One value: its tag, its length in the shortest form, its contents."""
    size = len(body)
    if size < 0x80:
        return b"%c%c%b" % (tag, size, body)  # one step: faster than joining the header
    length = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return b"%c%c%b%b" % (tag, 0x80 | len(length), length, body)


def sequence(*parts: bytes) -> bytes:
    return tlv(SEQUENCE, b"".join(parts))


def explicit(number: int, body: bytes) -> bytes:
    """A context-specific, constructed tag ``[number] EXPLICIT`` around ``body``."""
    if not 0 <= number < 31:
        raise ValueError(f"context tag {number} is out of the short-form range")
    return tlv(0xA0 | number, body)


def integer(value: int) -> bytes:
    """A non-negative INTEGER in the fewest octets (a leading zero keeps it positive)."""
    if value < 0:
        raise ValueError("only non-negative integers are encoded here")
    return tlv(INTEGER, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def octet_string(body: bytes) -> bytes:
    return tlv(OCTET_STRING, body)


def bit_string(body: bytes) -> bytes:
    """A BIT STRING of whole octets (no unused bits), as signatures are."""
    return tlv(BIT_STRING, b"\x00" + body)


def time(moment: dt.datetime) -> bytes:
    """A certificate validity time in UTC, whole seconds, as RFC 5280 wants it."""
    if moment.tzinfo is None:
        raise ValueError("certificate times must be timezone-aware")
    utc = moment if moment.tzinfo is dt.UTC else moment.astimezone(dt.UTC)
    clock = (utc.month, utc.day, utc.hour, utc.minute, utc.second)
    # Both forms are shorter than 128 octets: the length is one octet.
    if utc.year < _UTC_TIME_BEFORE:
        return b"\x17\x0d%02d%02d%02d%02d%02d%02dZ" % (utc.year % 100, *clock)
    return b"\x18\x0f%04d%02d%02d%02d%02d%02dZ" % (utc.year, *clock)


def validity(not_before: dt.datetime, not_after: dt.datetime) -> bytes:
    """A certificate's Validity: SEQUENCE { notBefore, notAfter }, each as ``time`` writes it."""
    start, end = time(not_before), time(not_after)
    return b"\x30%c%b%b" % (len(start) + len(end), start, end)  # at most 34 octets


@functools.lru_cache(maxsize=128)
def object_identifier(oid: x509.ObjectIdentifier) -> bytes:
    """An OBJECT IDENTIFIER: the first two arcs in one number, each arc base 128."""
    arcs = [int(arc) for arc in oid.dotted_string.split(".")]
    body = bytearray()
    for arc in [40 * arcs[0] + arcs[1], *arcs[2:]]:
        chunk = [arc & 0x7F]
        rest = arc >> 7
        while rest:
            chunk.append(0x80 | (rest & 0x7F))
            rest >>= 7
        body.extend(reversed(chunk))
    return tlv(OBJECT_IDENTIFIER, bytes(body))


def _header(data: bytes, offset: int) -> tuple[int, int, int]:
    """The tag at ``offset`` and where its contents start and end."""
    tag, first = data[offset], data[offset + 1]
    start = offset + 2
    if first < 0x80:
        return tag, start, start + first
    count = first & 0x7F
    size = int.from_bytes(data[start:start + count], "big")
    return tag, start + count, start + count + size


def first_element(data: bytes) -> bytes | None:
    """The first value inside the SEQUENCE that is the whole of ``data``, as DER; None if
    ``data`` is not framed that way.

    A CSR is SEQUENCE { certificationRequestInfo, signatureAlgorithm, signature }
    (RFC 2986 4.2): its first value is the part the signature covers, byte for byte
    as the requester signed it.
    """
    try:
        tag, start, end = _header(data, 0)
        if tag != SEQUENCE or end != len(data):
            return None
        tag, _, first_end = _header(data, start)
    except IndexError:
        return None
    if tag != SEQUENCE or first_end > end:
        return None
    return data[start:first_end]


def request_parts(info: bytes) -> tuple[bytes, bytes, bytes] | None:
    """The subject Name, the SubjectPublicKeyInfo and the attributes of a CSR's signed part,
    as DER.

    CertificationRequestInfo is SEQUENCE { version INTEGER, subject Name,
    subjectPKInfo SubjectPublicKeyInfo, attributes [0] Attributes } (RFC 2986 4.1);
    the attributes are what follows the key, up to the end. None if ``info`` does
    not start that way.
    """
    try:
        tag, start, end = _header(info, 0)
        if tag != SEQUENCE:
            return None
        tag, _, version_end = _header(info, start)
        if tag != INTEGER:
            return None
        tag, _, name_end = _header(info, version_end)
        if tag != SEQUENCE:
            return None
        tag, _, key_end = _header(info, name_end)
    except IndexError:
        return None
    if tag != SEQUENCE or key_end > end or end > len(info):
        return None
    return info[version_end:name_end], info[name_end:key_end], info[key_end:end]


NO_ATTRIBUTES = b"\xa0\x00"
# The types of an extensionRequest attribute (PKCS #9, RFC 2985 5.4.2) and of a
# subjectAltName extension, as DER; their lengths fix the offsets read below.
_EXTENSION_REQUEST_OID = object_identifier(x509.ObjectIdentifier("1.2.840.113549.1.9.14"))
_SUBJECT_ALT_NAME_OID = object_identifier(ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
assert len(_EXTENSION_REQUEST_OID) == 11 and len(_SUBJECT_ALT_NAME_OID) == 5


def requested_dns_names(attributes: bytes) -> tuple[str, ...] | None:
    """The DNS names a CSR asks for, if its attributes are in the one plain form agents send:
    a single extensionRequest holding a single subjectAltName of DNS names, each value
    and the whole in the short form of length. None for anything else, which the
    caller reads with cryptography.

    For attributes in this form cryptography reads the same names (and, there being no
    other extension, no basicConstraints and no extended key usage).
    """
    # [0] { SEQUENCE { OID, SET { SEQUENCE (Extensions) { SEQUENCE (Extension) {
    #   OID, [BOOLEAN TRUE], OCTET STRING { SEQUENCE (GeneralNames) { [2] IA5String ... }}}}}}}
    size = len(attributes)
    if size < 33 or size > 129 or attributes[0] != 0xA0 or attributes[1] != size - 2 or \
            attributes[2] != SEQUENCE or attributes[3] != size - 4 or \
            attributes[4:15] != _EXTENSION_REQUEST_OID or attributes[15] != SET or \
            attributes[16] != size - 17 or attributes[17] != SEQUENCE or \
            attributes[18] != size - 19 or attributes[19] != SEQUENCE or \
            attributes[20] != size - 21 or attributes[21:26] != _SUBJECT_ALT_NAME_OID:
        return None
    at = 29 if attributes[26:29] == TRUE else 26
    if attributes[at] != OCTET_STRING or attributes[at + 1] != size - at - 2 or \
            attributes[at + 2] != SEQUENCE or attributes[at + 3] != size - at - 4:
        return None
    at += 4
    names = []
    while at < size:
        start = at + 2
        if start > size or attributes[at] != _DNS_NAME:
            return None
        at = start + attributes[start - 1]
        if at > size or at == start:
            return None
        try:
            names.append(attributes[start:at].decode("ascii"))
        except UnicodeDecodeError:
            return None
    return tuple(names) if names else None


_COMMON_NAME_PREFIX = b"\x06\x03\x55\x04\x03\x0c"  # OID 2.5.4.3, then a UTF8String


def common_name(name: bytes | None) -> str | None:
    """The value of a Name that is exactly one commonName, a UTF8String of 1 to 64 octets.

    None for any other Name (more attributes, another string type, a longer
    value): the caller then reads it with cryptography, which refuses what is
    malformed. For the Names accepted here the two readings agree.
    """
    # SEQUENCE { SET { SEQUENCE { OID, UTF8String } } }, every length in the short form.
    if name is None or len(name) < 13 or name[0] != SEQUENCE or name[2] != SET or \
            name[4] != SEQUENCE or name[6:12] != _COMMON_NAME_PREFIX:
        return None
    size = name[12]
    if not (name[1] == size + 11 == len(name) - 2 and name[3] == size + 9 and
            name[5] == size + 7):
        return None
    if not 1 <= size <= 64:  # cryptography's bound, in UTF-8 octets
        return None
    try:
        return name[13:].decode("utf-8")
    except UnicodeDecodeError:
        return None


def public_key_info(spki: bytes) -> tuple[bytes, bytes]:
    """The AlgorithmIdentifier (as DER) and the key bits of a SubjectPublicKeyInfo.

    SubjectPublicKeyInfo is SEQUENCE { algorithm AlgorithmIdentifier,
    subjectPublicKey BIT STRING }; the BIT STRING's first octet counts unused bits,
    which must be none.
    """
    tag, start, end = _header(spki, 0)
    if tag != SEQUENCE or end != len(spki):
        raise ValueError("not a DER SubjectPublicKeyInfo")
    tag, _, algorithm_end = _header(spki, start)
    if tag != SEQUENCE:
        raise ValueError("not a DER SubjectPublicKeyInfo")
    tag, bits_start, bits_end = _header(spki, algorithm_end)
    if tag != BIT_STRING or bits_end != end or spki[bits_start] != 0:
        raise ValueError("not a DER SubjectPublicKeyInfo")
    return spki[start:algorithm_end], spki[bits_start + 1:bits_end]


def subject_public_key(spki: bytes) -> bytes:
    """The key bits of a SubjectPublicKeyInfo (as cryptography encodes it), for key identifiers."""
    return public_key_info(spki)[1]


def extension(value: x509.ExtensionType, critical: bool) -> bytes:
    """One ``Extension``: its OID, the critical flag when set, its value's DER wrapped."""
    return encoded_extension(value.oid, critical, value.public_bytes())


def encoded_extension(oid: x509.ObjectIdentifier, critical: bool, value: bytes) -> bytes:
    """One ``Extension`` whose value is already DER."""
    return sequence(object_identifier(oid), TRUE if critical else b"", octet_string(value))


def name(attributes: Sequence[tuple[x509.ObjectIdentifier, str]]) -> bytes:
    """A Name of one attribute per RDN, in order, each value a UTF8String.

    That is how cryptography encodes the commonName, organizationName and
    localityName meshtrust puts in subjects; attributes that cryptography writes
    as another string type (countryName, serialNumber, ...) are refused.
    """
    rdns = []
    for oid, value in attributes:
        if oid not in _UTF8_ATTRIBUTES:
            raise ValueError(f"attribute {oid.dotted_string} is not encoded as a UTF8String")
        identifier, text = object_identifier(oid), value.encode("utf-8")
        size = len(identifier) + 2 + len(text)  # of the SEQUENCE { type, value }
        if size < 0x7E:  # every length in the short form: the RDN in one step
            rdns.append(b"\x31%c\x30%c%b\x0c%c%b" % (size + 2, size, identifier, len(text),
                                                      text))
        else:
            rdns.append(tlv(SET, sequence(identifier, tlv(UTF8_STRING, text))))
    return sequence(*rdns)


def dns_names(names: Sequence[str]) -> bytes:
    """GeneralNames of DNS names only, each already checked to be one (ASCII)."""
    return sequence(*[tlv(_DNS_NAME, name.encode("ascii")) for name in names])


def general_names(names: Sequence[x509.GeneralName]) -> bytes:
    """GeneralNames (the value of a subjectAltName) of DNS names, URIs and IP addresses."""
    encoded = []
    for entry in names:
        if isinstance(entry, x509.DNSName):
            encoded.append(tlv(_DNS_NAME, entry.value.encode("ascii")))
        elif isinstance(entry, x509.UniformResourceIdentifier):
            encoded.append(tlv(_URI, entry.value.encode("ascii")))
        elif isinstance(entry, x509.IPAddress) and \
                isinstance(entry.value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
            encoded.append(tlv(_IP_ADDRESS, entry.value.packed))
        else:
            raise ValueError(f"cannot encode the name {entry!r}")
    return sequence(*encoded)

