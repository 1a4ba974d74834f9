"""DER encoding of the few ASN.1 values that frame a certificate.

``issuer`` assembles the to-be-signed part of every certificate itself, from
pieces that are encoded once and reused: the issuer's name, the profile's
fixed extensions, the signature algorithm. pyca/cryptography still encodes
every value whose shape is not trivial (names, key identifiers, subject
alternative names, extension values, public keys); this module only adds
the frame around them: tag and length, integers, times, object identifiers.
Going through a ``CertificateBuilder`` for each certificate cost about a
third of ``issue``'s time (see docs/benchmarks.md, "Issuance").

Everything here follows X.690 DER: definite lengths in the shortest form,
integers in the fewest octets, times as RFC 5280 section 4.1.2.5 asks.
"""

from __future__ import annotations

import datetime as dt
import functools

from cryptography import x509

SEQUENCE = 0x30
SET = 0x31
INTEGER = 0x02
BIT_STRING = 0x03
OCTET_STRING = 0x04
NULL = b"\x05\x00"
OBJECT_IDENTIFIER = 0x06
UTC_TIME = 0x17
GENERALIZED_TIME = 0x18
TRUE = b"\x01\x01\xff"

# RFC 5280 4.1.2.5: UTCTime through 2049, GeneralizedTime from 2050 on.
_UTC_TIME_BEFORE = 2050


def tlv(tag: int, body: bytes) -> bytes:
    """One value: its tag, its length in the shortest form, its contents."""
    size = len(body)
    if size < 0x80:
        return bytes((tag, size)) + body
    length = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(length))) + length + body


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
    utc = moment.astimezone(dt.UTC)
    clock = f"{utc.month:02d}{utc.day:02d}{utc.hour:02d}{utc.minute:02d}{utc.second:02d}Z"
    if utc.year < _UTC_TIME_BEFORE:
        return tlv(UTC_TIME, f"{utc.year % 100:02d}{clock}".encode("ascii"))
    return tlv(GENERALIZED_TIME, f"{utc.year:04d}{clock}".encode("ascii"))


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


def subject_public_key(spki: bytes) -> bytes:
    """The key bits of a SubjectPublicKeyInfo (as cryptography encodes it), for key identifiers.

    SubjectPublicKeyInfo is SEQUENCE { algorithm AlgorithmIdentifier,
    subjectPublicKey BIT STRING }; the BIT STRING's first octet counts unused bits.
    """
    tag, start, end = _header(spki, 0)
    if tag != SEQUENCE or end != len(spki):
        raise ValueError("not a DER SubjectPublicKeyInfo")
    _, _, algorithm_end = _header(spki, start)
    tag, bits_start, bits_end = _header(spki, algorithm_end)
    if tag != BIT_STRING or bits_end != end or spki[bits_start] != 0:
        raise ValueError("not a DER SubjectPublicKeyInfo")
    return spki[bits_start + 1:bits_end]


def extension(value: x509.ExtensionType, critical: bool) -> bytes:
    """One ``Extension``: its OID, the critical flag when set, its value's DER wrapped."""
    return sequence(object_identifier(value.oid), TRUE if critical else b"",
                    octet_string(value.public_bytes()))
